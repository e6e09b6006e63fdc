"""Layers and checkpoints against bitsandbytes 0.50.2: quantize the same float model in both
libraries, save it with either, load it with the other, and compare outputs.

Loading paths are each library's own: lowbit's ``load_state_dict`` into a freshly built (float)
model; for bitsandbytes, what its users (and transformers) do on CPU: ``Params4bit.from_prequantized``
for 4-bit layers, ``.to("cpu")`` then ``load_state_dict`` for 8-bit ones.

Outputs are compared with torch.equal: both libraries compute ``F.linear`` on bit-identical
dequantized weights (4-bit, and 8-bit in training mode) or the same int8 ops (8-bit in eval mode).
Two paths differ by construction and are compared within a stated tolerance instead:

* bitsandbytes' ``Linear4bit`` in eval mode on a CPU with AVX512-BF16 repacks the weight and runs
  a bfloat16 kernel (input and absmax rounded to bfloat16);
* lowbit's single-token inference runs the fused ``gemv_4bit`` (float32 accumulation, one rounding)
  where bitsandbytes 0.50 dequantizes and calls ``F.linear``.

The bitsandbytes model is kept in training mode (under ``torch.no_grad``) wherever outputs must be
equal, which selects its dequantize + ``F.linear`` path on every CPU.
"""

from __future__ import annotations

from itertools import product

import pytest
import torch

import lowbit.nn as lnn
from lowbit.autograd.matmul_4bit import GEMV_MAX_ROWS

from . import conftest
from .conftest import QUANT_TYPES, assert_identical, dtype_name

pytestmark = pytest.mark.compat

SIZES = (128, 192, 64)  # in -> hidden -> out
SAVE_FORMATS = ("safetensors", "torch.save")


def _bnb_nn():
    return conftest.bitsandbytes.nn


def _float_state() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1234)
    state = {}
    for i, (n_in, n_out) in zip((0, 2), zip(SIZES, SIZES[1:])):
        state[f"{i}.weight"] = torch.randn(n_out, n_in, generator=gen) * n_in**-0.5
        state[f"{i}.bias"] = torch.randn(n_out, generator=gen) * 0.1
    return state


def _input(rows: int = 12, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inputs of more rows than lowbit's fused 4-bit path takes (``GEMV_MAX_ROWS``), so that both
    libraries dequantize and run F.linear and their outputs are bit-identical."""
    x = torch.randn(rows, SIZES[0], generator=torch.Generator().manual_seed(99))
    x[:, 3] = 25.0  # an outlier feature, so that threshold=6 decomposes it
    return x.to(dtype)


def _model_4bit(nn, quant_type, nested, compute_dtype, quant_storage=torch.uint8):
    layers = [
        nn.Linear4bit(
            n_in,
            n_out,
            compute_dtype=compute_dtype,
            compress_statistics=nested,
            quant_type=quant_type,
            quant_storage=quant_storage,
        )  # fmt: skip
        for n_in, n_out in zip(SIZES, SIZES[1:])
    ]
    return torch.nn.Sequential(layers[0], torch.nn.ReLU(), layers[1])


def _model_8bit(nn, threshold):
    layers = [
        nn.Linear8bitLt(a, b, has_fp16_weights=False, threshold=threshold) for a, b in zip(SIZES, SIZES[1:])
    ]
    return torch.nn.Sequential(layers[0], torch.nn.ReLU(), layers[1])


def _quantized(model):
    model.load_state_dict(_float_state())
    return model.to("cpu")


def _save_load(state_dict, how, tmp_path):
    state_dict = {k: v.detach().contiguous() for k, v in state_dict.items()}
    if how == "safetensors":
        safetensors_torch = pytest.importorskip("safetensors.torch")
        path = tmp_path / "model.safetensors"
        safetensors_torch.save_file(state_dict, str(path))
        return safetensors_torch.load_file(str(path))
    path = tmp_path / "model.pt"
    torch.save(state_dict, path)
    return torch.load(path, weights_only=True)


def _assert_same_state_dict(actual, expected, what):
    assert list(actual) == list(expected), f"{what}: keys differ"
    for key in expected:
        assert_identical(actual[key], expected[key], f"{what}[{key}]")


def _outputs(model, x):
    with torch.no_grad():
        return model(x)


def _load_into_bnb_4bit(state, quant_type, nested, compute_dtype, quant_storage=torch.uint8):
    """bitsandbytes' path for a pre-quantized checkpoint on CPU (what transformers does)."""
    nn = _bnb_nn()
    model = _model_4bit(nn, quant_type, nested, compute_dtype, quant_storage)
    for index in (0, 2):
        layer = model[index]
        prefix = f"{index}.weight."
        stats = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        layer.weight = nn.Params4bit.from_prequantized(
            state[f"{index}.weight"], stats, requires_grad=False, device="cpu", module=layer
        )
        layer.bias.data.copy_(state[f"{index}.bias"])
    return model


CASES_4BIT = [
    pytest.param(qt, nested, cd, id=f"{qt}-{'nested' if nested else 'plain'}-{dtype_name(cd)}")
    for qt, nested, cd in product(QUANT_TYPES, (False, True), (torch.float32, torch.bfloat16))
]


# ------------------------------------------------------------------------------------------
# 4-bit
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("quant_type,nested,compute_dtype", CASES_4BIT)
@pytest.mark.parametrize("how", SAVE_FORMATS)
def test_linear4bit_bitsandbytes_checkpoint_loads_in_lowbit(
    backend, quant_type, nested, compute_dtype, how, tmp_path
):
    bnb_model = _quantized(_model_4bit(_bnb_nn(), quant_type, nested, compute_dtype))
    saved = bnb_model.state_dict()
    lowbit_model = _model_4bit(lnn, quant_type, nested, compute_dtype)  # fresh: float weights
    lowbit_model.load_state_dict(_save_load(saved, how, tmp_path))

    _assert_same_state_dict(lowbit_model.state_dict(), saved, "lowbit re-save of the bitsandbytes checkpoint")
    # the same model quantized by lowbit from the float weights has the same bytes too
    _assert_same_state_dict(
        _quantized(_model_4bit(lnn, quant_type, nested, compute_dtype)).state_dict(),
        saved,
        "lowbit quantization",
    )
    x = _input()
    assert_identical(_outputs(lowbit_model, x), _outputs(bnb_model, x), "output")


@pytest.mark.parametrize("quant_type,nested,compute_dtype", CASES_4BIT)
@pytest.mark.parametrize("how", SAVE_FORMATS)
def test_linear4bit_lowbit_checkpoint_loads_in_bitsandbytes(
    backend, quant_type, nested, compute_dtype, how, tmp_path
):
    lowbit_model = _quantized(_model_4bit(lnn, quant_type, nested, compute_dtype))
    bnb_model = _load_into_bnb_4bit(
        _save_load(lowbit_model.state_dict(), how, tmp_path), quant_type, nested, compute_dtype
    )
    _assert_same_state_dict(bnb_model.state_dict(), lowbit_model.state_dict(), "bitsandbytes re-save")
    x = _input()
    assert_identical(_outputs(lowbit_model, x), _outputs(bnb_model, x), "output")


@pytest.mark.parametrize("quant_storage", [torch.bfloat16, torch.float32], ids=dtype_name)
def test_linear4bit_fsdp_quant_storage_both_ways(backend, quant_storage, tmp_path):
    bnb_model = _quantized(_model_4bit(_bnb_nn(), "nf4", True, torch.bfloat16, quant_storage))
    lowbit_model = _model_4bit(lnn, "nf4", True, torch.bfloat16, quant_storage)
    lowbit_model.load_state_dict(_save_load(bnb_model.state_dict(), "safetensors", tmp_path))
    assert lowbit_model[0].weight.dtype == quant_storage
    back = _load_into_bnb_4bit(lowbit_model.state_dict(), "nf4", True, torch.bfloat16, quant_storage)
    x = _input()
    expected = _outputs(bnb_model, x)
    assert_identical(_outputs(lowbit_model, x), expected, "lowbit output")
    assert_identical(_outputs(back, x), expected, "bitsandbytes output after the round trip")


@pytest.mark.parametrize("rows", [1, GEMV_MAX_ROWS])
@pytest.mark.parametrize("quant_type,nested,compute_dtype", CASES_4BIT)
def test_linear4bit_few_tokens_within_tolerance(backend, quant_type, nested, compute_dtype, rows):
    bnb_model = _quantized(_model_4bit(_bnb_nn(), quant_type, nested, compute_dtype))
    lowbit_model = _quantized(_model_4bit(lnn, quant_type, nested, compute_dtype))
    x = _input(rows=rows)
    # lowbit: gemv_4bit, float32 accumulation rounded once to compute_dtype; bitsandbytes:
    # F.linear in compute_dtype. One rounding of compute_dtype per layer (two layers), relative
    # to the output's magnitude.
    actual, expected = _outputs(lowbit_model, x), _outputs(bnb_model, x)
    scale = expected.abs().max()
    tol = 1e-5 if compute_dtype == torch.float32 else 2 * 2**-8
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol * scale)


def test_linear4bit_eval_mode_bf16_kernel_within_tolerance(backend):
    bnb_model = _quantized(_model_4bit(_bnb_nn(), "nf4", True, torch.float32)).eval()
    lowbit_model = _quantized(_model_4bit(lnn, "nf4", True, torch.float32)).eval()
    x = _input()
    actual, expected = _outputs(lowbit_model, x), _outputs(bnb_model, x)
    if conftest.B.has_avx512bf16():
        # bitsandbytes rounds the input, the absmax and the output of each layer to bfloat16 here
        # (relative error ~2**-8 per rounding, a few roundings per layer): compare norms.
        assert ((actual - expected).norm() / expected.norm()).item() < 2e-2
    else:
        assert_identical(actual, expected, "output")


# ------------------------------------------------------------------------------------------
# 8-bit (LLM.int8)
# ------------------------------------------------------------------------------------------
CASES_8BIT = [
    pytest.param(threshold, dtype, id=f"threshold{threshold}-{dtype_name(dtype)}")
    for threshold, dtype in product((0.0, 6.0), (torch.float16, torch.bfloat16, torch.float32))
]


def _assert_same_8bit_outputs(actual_model, expected_model, dtype):
    x = _input(dtype=dtype)
    for training in (True, False):  # dequantized product / LLM.int8 int8 product
        actual_model.train(training)
        expected_model.train(training)
        mode = "train" if training else "eval"
        assert_identical(_outputs(actual_model, x), _outputs(expected_model, x), f"output ({mode})")


@pytest.mark.parametrize("threshold,dtype", CASES_8BIT)
@pytest.mark.parametrize("how", SAVE_FORMATS)
def test_linear8bit_bitsandbytes_checkpoint_loads_in_lowbit(backend, threshold, dtype, how, tmp_path):
    bnb_model = _quantized(_model_8bit(_bnb_nn(), threshold))
    saved = bnb_model.state_dict()
    lowbit_model = _model_8bit(lnn, threshold)  # fresh: float weights
    lowbit_model.load_state_dict(_save_load(saved, how, tmp_path))
    _assert_same_state_dict(lowbit_model.state_dict(), saved, "lowbit re-save of the bitsandbytes checkpoint")
    _assert_same_state_dict(
        _quantized(_model_8bit(lnn, threshold)).state_dict(), saved, "lowbit quantization"
    )
    _assert_same_8bit_outputs(lowbit_model, bnb_model, dtype)


@pytest.mark.parametrize("threshold,dtype", CASES_8BIT)
@pytest.mark.parametrize("how", SAVE_FORMATS)
def test_linear8bit_lowbit_checkpoint_loads_in_bitsandbytes(backend, threshold, dtype, how, tmp_path):
    lowbit_model = _quantized(_model_8bit(lnn, threshold))
    bnb_model = _model_8bit(_bnb_nn(), threshold).to("cpu")  # bitsandbytes must quantize before loading
    bnb_model.load_state_dict(_save_load(lowbit_model.state_dict(), how, tmp_path))
    _assert_same_state_dict(bnb_model.state_dict(), lowbit_model.state_dict(), "bitsandbytes re-save")
    _assert_same_8bit_outputs(lowbit_model, bnb_model, dtype)


def test_mixed_model_through_torch_save_of_whole_state_dict(backend, tmp_path):
    """A model mixing both layer kinds, saved by bitsandbytes with torch.save, loads in lowbit."""
    nn = _bnb_nn()

    def build(lib):
        return torch.nn.Sequential(
            lib.Linear4bit(SIZES[0], SIZES[1], compute_dtype=torch.bfloat16, quant_type="nf4"),
            torch.nn.ReLU(),
            lib.Linear8bitLt(SIZES[1], SIZES[2], has_fp16_weights=False, threshold=6.0),
        )

    bnb_model = _quantized(build(nn))
    lowbit_model = build(lnn)
    lowbit_model.load_state_dict(_save_load(bnb_model.state_dict(), "torch.save", tmp_path))
    x = _input()
    assert_identical(_outputs(lowbit_model, x), _outputs(bnb_model, x), "output")
