"""lowbit.nn: quantized parameters and layers, their state dicts, and torch.compile.

The layers must compute exactly what the functional API computes for them (same ops on the same
dequantized weight), so forward passes are compared with torch.equal against that.
"""

from __future__ import annotations

import copy
import io
import logging
import pickle

import pytest
import torch
import torch.nn.functional as F

import lowbit
from lowbit import functional as LF
from lowbit.nn import (
    Embedding,
    Embedding4bit,
    Embedding8bit,
    EmbeddingNF4,
    Int8Params,
    Linear4bit,
    Linear8bitLt,
    LinearFP4,
    LinearNF4,
    Params4bit,
    StableEmbedding,
)
from support import CPU_BACKENDS

IN, OUT = 128, 96


@pytest.fixture(params=CPU_BACKENDS, autouse=True, ids=lambda name: f"backend={name}")
def backend(request):
    with lowbit.backends.use(request.param):
        yield request.param


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _float_state(seed=0, n_in=IN, n_out=OUT):
    return {
        "weight": torch.randn(n_out, n_in, generator=_gen(seed)) * 0.1,
        "bias": torch.randn(n_out, generator=_gen(seed + 1)) * 0.1,
    }


def _linear4bit(quant_type="nf4", nested=True, seed=0, quantize=True, **kwargs):
    layer = Linear4bit(IN, OUT, quant_type=quant_type, compress_statistics=nested, **kwargs)
    layer.load_state_dict(_float_state(seed))
    return layer.to("cpu") if quantize else layer


def _linear8bit(seed=0, quantize=True, **kwargs):
    kwargs.setdefault("has_fp16_weights", False)
    layer = Linear8bitLt(IN, OUT, **kwargs)
    layer.load_state_dict(_float_state(seed))
    return layer.to("cpu") if quantize else layer


def _x(rows=5, dtype=torch.float32, seed=7):
    return torch.randn(rows, IN, generator=_gen(seed)).to(dtype)


def _save_load(state_dict, how):
    """A state dict after a round trip through torch.save or safetensors."""
    if how == "torch":
        buffer = io.BytesIO()
        torch.save(state_dict, buffer)
        buffer.seek(0)
        return torch.load(buffer, weights_only=True)
    safetensors_torch = pytest.importorskip("safetensors.torch")
    return safetensors_torch.load(safetensors_torch.save({k: v.contiguous() for k, v in state_dict.items()}))


def _assert_same_state_dict(actual, expected):
    assert list(actual) == list(expected)
    for key in expected:
        assert actual[key].dtype == expected[key].dtype, key
        assert torch.equal(actual[key], expected[key]), key


SAVE_FORMATS = [pytest.param("torch", id="torch.save"), pytest.param("safetensors", id="safetensors")]
CONFIGS_4BIT = [
    pytest.param(qt, nested, id=f"{qt}-{'nested' if nested else 'plain'}")
    for qt in ("nf4", "fp4")
    for nested in (False, True)
]


# ------------------------------------------------------------------------------------------
# Params4bit
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("move", ["to", "cpu", "module_to", "forward"])
def test_params4bit_quantizes_on_cpu_move_or_first_forward(move):
    layer = _linear4bit(quantize=False)
    W = layer.weight.data.clone()
    assert not layer.weight.bnb_quantized and layer.weight.quant_state is None
    if move == "to":
        layer.weight = layer.weight.to("cpu")
    elif move == "cpu":
        layer.weight = layer.weight.cpu()
    elif move == "module_to":
        layer.to("cpu")
    else:
        layer(_x())
    packed, state = LF.quantize_4bit(W, quant_type="nf4", compress_statistics=True)
    weight = layer.weight
    assert isinstance(weight, Params4bit) and weight.bnb_quantized and not weight.requires_grad
    assert weight.dtype == torch.uint8 and torch.equal(weight.data, packed)
    assert weight.quant_state == state
    assert layer.quant_state is weight.quant_state  # the layer keeps a reference (FSDP recovery)


def test_params4bit_settings_and_fsdp_attribute_access():
    weight = _linear4bit(quant_type="fp4", nested=True).weight
    assert (weight.blocksize, weight.quant_type, weight.compress_statistics, weight.quant_storage) == (
        64, "fp4", True, torch.uint8
    )  # fmt: skip
    state = weight.quant_state
    assert weight.absmax is state.absmax and weight.quant_map is state.code and weight.code is state.code
    assert weight.nested_absmax is state.state2.absmax and weight.nested_blocksize == 256
    assert weight.nested_offset is state.offset and weight.nested_dtype == torch.float32
    plain = _linear4bit(nested=False).weight
    with pytest.raises(AttributeError, match="nested_absmax"):
        _ = plain.nested_absmax
    with pytest.raises(AttributeError, match="absmax"):
        _ = Params4bit(torch.randn(4, 4)).absmax


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"quant_type": "int4"}, "quant_type"),
        ({"blocksize": 48}, "blocksize"),
        ({"quant_storage": torch.complex64}, "quant_storage"),
        ({"quant_state": {"absmax": None}}, "quant_state"),
    ],
)
def test_params4bit_rejects_bad_settings(kwargs, match):
    error = TypeError if "quant_state" in kwargs else ValueError
    with pytest.raises(error, match=match):
        Params4bit(torch.randn(4, 4), **kwargs)
    if "quant_type" in kwargs:
        with pytest.raises(ValueError, match="quant_type"):
            Linear4bit(4, 4, quant_type="int4")


def test_params4bit_moves_keep_data_and_state_together():
    weight = _linear4bit().weight
    data, state = weight.data.clone(), weight.quant_state
    assert weight.to("cpu") is weight  # already quantized: nothing to do
    assert weight.to(torch.float16) is weight and weight.dtype == torch.uint8  # packed bytes are never cast
    assert torch.equal(weight.data, data) and weight.quant_state is state
    meta = _linear4bit(quantize=False).weight.to("meta")  # the meta device does not quantize
    assert type(meta) is Params4bit and meta.device.type == "meta" and not meta.bnb_quantized


def _round_trip(param, how):
    if how == "deepcopy":
        return copy.deepcopy(param)
    if how == "pickle":
        return pickle.loads(pickle.dumps(param))
    buffer = io.BytesIO()
    torch.save(param, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=how == "torch_weights_only")


ROUND_TRIPS = ["deepcopy", "pickle", "torch", "torch_weights_only"]


@pytest.mark.parametrize("how", ROUND_TRIPS)
def test_params4bit_keeps_quant_state_through_copies(how):
    weight = _linear4bit(quant_storage=torch.bfloat16).weight
    copied = _round_trip(weight, how)
    assert type(copied) is Params4bit and copied is not weight
    assert torch.equal(copied.data.view(torch.uint8), weight.data.view(torch.uint8))
    assert copied.quant_state == weight.quant_state and copied.quant_state is not weight.quant_state
    for attr in (
        "blocksize",
        "quant_type",
        "compress_statistics",
        "quant_storage",
        "bnb_quantized",
        "requires_grad",
    ):
        assert getattr(copied, attr) == getattr(weight, attr), attr
    assert copied.module is None  # not pickled; the owning layer re-links it


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch"])
def test_quantized_model_survives_copies(how):
    model = torch.nn.Sequential(
        _linear4bit(), torch.nn.ReLU(), Linear8bitLt(OUT, IN, has_fp16_weights=False).to("cpu")
    )
    x = _x()
    copied = _round_trip(model, how)
    assert torch.equal(copied(x), model(x))
    assert copied[0].weight.module is copied[0]
    assert copied[0].quant_state is copied[0].weight.quant_state
    assert copied[2].weight.SCB is not None and copied[2].weight.CB is not None


def test_params4bit_chunk_keeps_subclass():
    weight = _linear4bit().weight
    chunks = torch.chunk(weight, 2)
    assert all(isinstance(c, Params4bit) and c.quant_state is weight.quant_state for c in chunks)
    assert type(weight + 0) is torch.Tensor  # other ops give plain tensors, as for nn.Parameter


def test_params4bit_from_prequantized():
    layer = _linear4bit(quant_type="fp4", nested=True)
    stats = {k.removeprefix("weight."): v for k, v in layer.state_dict().items() if k.startswith("weight.")}
    target = Linear4bit(IN, OUT)
    weight = Params4bit.from_prequantized(layer.weight.data, stats, device="cpu", module=target)
    assert weight.bnb_quantized and weight.quant_state == layer.weight.quant_state
    assert (weight.quant_type, weight.compress_statistics, weight.blocksize) == ("fp4", True, 64)
    assert target.quant_state is weight.quant_state
    assert (
        Params4bit.from_prequantized(layer.weight.data, stats).device.type == "cpu"
    )  # no CUDA here: stays put
    with pytest.raises(ValueError, match="data holds"):
        Params4bit.from_prequantized(layer.weight.data[:-1], stats, device="cpu")
    with pytest.raises(ValueError, match="absmax"):
        Params4bit.from_prequantized(
            layer.weight.data, {**stats, "absmax": stats["absmax"][:-1]}, device="cpu"
        )


# ------------------------------------------------------------------------------------------
# Linear4bit
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("quant_type,nested", CONFIGS_4BIT)
@pytest.mark.parametrize("compute_dtype", [None, torch.float32, torch.bfloat16, torch.float16])
def test_linear4bit_forward_is_dense_product_in_compute_dtype(quant_type, nested, compute_dtype):
    layer = _linear4bit(quant_type, nested, compute_dtype=compute_dtype)
    x = _x(rows=6)
    out = layer(x)
    dtype = compute_dtype or torch.float32
    W = LF.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    bias = _float_state()["bias"]
    expected = F.linear(x.to(dtype), W.to(dtype), bias.to(dtype)).float()
    assert out.dtype == torch.float32 and torch.equal(out, expected)
    assert layer.bias.dtype == dtype  # cast in place to the compute dtype, as bitsandbytes does


@pytest.mark.parametrize("make", [_linear4bit, _linear8bit], ids=["Linear4bit", "Linear8bitLt"])
def test_bias_follows_the_input_dtype_in_place(make):
    """bitsandbytes casts the bias Parameter to the compute dtype on first use; lowbit does too."""
    layer = make()
    bias = layer.bias
    before = (bias.data_ptr(), bias.dtype)
    for refused in (torch.tensor(1.0, dtype=torch.float16), torch.zeros(2, IN + 1, dtype=torch.float16)):
        with pytest.raises(ValueError):
            layer(refused)  # a refused call leaves the bias as it was
    assert (bias.data_ptr(), bias.dtype) == before == (before[0], torch.float32)
    x = _x(dtype=torch.float16)
    first = layer(x)
    assert layer.bias is bias and bias.dtype == torch.float16 and layer.state_dict()["bias"].dtype == torch.float16
    assert torch.equal(layer(x), first)  # no further change
    assert make(quantize=True).bias.dtype == torch.float32  # nothing happens before a forward


def test_linear4bit_adopts_input_dtype_and_warns_about_float16(caplog):
    layer = _linear4bit()
    layer(_x(dtype=torch.bfloat16))
    assert layer.compute_dtype == torch.bfloat16 and layer.compute_type_is_set
    layer = _linear4bit()
    with caplog.at_level(logging.WARNING, logger="lowbit"):
        out = layer(_x(dtype=torch.float16))
    assert "torch.float16" in caplog.text and out.dtype == torch.float16


def test_linear4bit_recovers_quant_state_of_a_stripped_weight():
    # FSDP and similar wrappers can replace the parameter by a plain one over the same bytes
    layer = _linear4bit()
    x = _x()
    expected = layer(x)
    layer.weight = torch.nn.Parameter(layer.weight.data, requires_grad=False)
    assert torch.equal(layer(x), expected)
    assert isinstance(layer.weight, Params4bit) and layer.weight.quant_state is layer.quant_state


def test_layers_reject_bad_settings():
    with pytest.raises(ValueError, match="compute_dtype"):
        Linear4bit(IN, OUT, compute_dtype=torch.float64)
    with pytest.raises(ValueError, match="threshold"):
        Linear8bitLt(IN, OUT, threshold=-1.0)
    with pytest.raises(ValueError, match="threshold"):
        Linear8bitLt(IN, OUT, threshold=float("inf"))


def test_linear_nf4_fp4_quant_types():
    assert LinearNF4(IN, OUT).weight.quant_type == "nf4"
    assert LinearFP4(IN, OUT, compress_statistics=False).weight.quant_type == "fp4"
    assert not LinearFP4(IN, OUT, compress_statistics=False).weight.compress_statistics


@pytest.mark.parametrize("quant_storage", [torch.bfloat16, torch.float32, torch.float16, torch.int32])
def test_linear4bit_quant_storage_views_the_same_bytes(quant_storage):
    reference = _linear4bit()
    layer = _linear4bit(quant_storage=quant_storage)
    assert layer.weight.dtype == quant_storage
    assert torch.equal(layer.weight.data.view(torch.uint8).reshape(-1), reference.weight.data.reshape(-1))
    x = _x()
    assert torch.equal(layer(x), reference(x))
    assert layer.state_dict()["weight"].dtype == quant_storage


@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
def test_linear4bit_state_dict_keys_are_bitsandbytes_keys(nested):
    layer = _linear4bit(nested=nested)
    expected = ["weight", "bias", "weight.absmax", "weight.quant_map"]
    if nested:
        expected += ["weight.nested_absmax", "weight.nested_quant_map"]
    expected.append("weight.quant_state.bitsandbytes__nf4")
    state = layer.state_dict()
    assert list(state) == expected
    assert all(type(v) is torch.Tensor and v.grad_fn is None for v in state.values())
    assert state["weight"].dtype == torch.uint8 and state["weight.absmax"].dtype == (
        torch.uint8 if nested else torch.float32
    )
    # before quantization the layer saves its float weight, like nn.Linear
    assert list(_linear4bit(quantize=False).state_dict()) == ["weight", "bias"]


@pytest.mark.parametrize("how", SAVE_FORMATS)
@pytest.mark.parametrize("quant_type,nested", CONFIGS_4BIT)
def test_linear4bit_checkpoint_loads_into_fresh_layer(quant_type, nested, how):
    source = _linear4bit(quant_type, nested, compute_dtype=torch.bfloat16)
    loaded_state = _save_load(source.state_dict(), how)
    # a fresh layer, float and with other settings: the checkpoint's quantization wins
    fresh = Linear4bit(
        IN, OUT, compute_dtype=torch.bfloat16, quant_type="fp4" if quant_type == "nf4" else "nf4"
    )
    assert fresh.load_state_dict(loaded_state) is not None
    assert fresh.weight.bnb_quantized and fresh.weight.quant_type == quant_type
    assert fresh.quant_state is fresh.weight.quant_state and fresh.weight.module is fresh
    x = _x()
    assert torch.equal(fresh(x), source(x))
    _assert_same_state_dict(fresh.state_dict(), source.state_dict())


def test_linear4bit_checkpoint_loads_into_quantized_layer_and_meta_layer():
    source = _linear4bit("fp4", False)
    target = _linear4bit("nf4", True, seed=3)
    target.load_state_dict(source.state_dict())
    _assert_same_state_dict(target.state_dict(), source.state_dict())
    with torch.device("meta"):
        meta = Linear4bit(IN, OUT)
    meta.load_state_dict(source.state_dict(), assign=True)
    assert meta.weight.device.type == "cpu" and torch.equal(meta(_x()), source(_x()))


def test_linear4bit_float_checkpoint_into_quantized_layer_requantizes():
    layer = _linear4bit(seed=3)
    layer.load_state_dict(_float_state(seed=0))
    _assert_same_state_dict(layer.state_dict(), _linear4bit(seed=0).state_dict())


def _corrupt_4bit(state, case):
    state = dict(state)
    if case == "truncated_absmax":
        state["weight.absmax"] = state["weight.absmax"][:-1]
    elif case == "nan_nested_absmax":
        state["weight.nested_absmax"] = torch.full_like(state["weight.nested_absmax"], float("nan"))
    elif case == "bad_json":
        state["weight.quant_state.bitsandbytes__nf4"] = torch.tensor(list(b"{not json"), dtype=torch.uint8)
    elif case == "missing_quant_state":
        del state["weight.quant_state.bitsandbytes__nf4"]
    elif case == "truncated_weight":
        state["weight"] = state["weight"][:-1]
    elif case == "other_layer_size":
        state = Linear4bit(IN, OUT + 2, quant_type="nf4").to("cpu").state_dict()
    elif case == "bias_size":
        state["bias"] = state["bias"][:-1]
    elif case == "quant_state_without_weight":
        del state["weight"]
    return state


CORRUPTIONS_4BIT = {
    "truncated_absmax": "0.weight.absmax",
    "nan_nested_absmax": "nested_absmax",
    "bad_json": "0.weight.quant_state.bitsandbytes__nf4",
    "missing_quant_state": "0.weight",
    "truncated_weight": "0.weight holds",
    "other_layer_size": "size mismatch for 0.weight",
    "bias_size": "size mismatch for 0.bias",
    "quant_state_without_weight": "0.weight is missing",
}


@pytest.mark.parametrize("case", list(CORRUPTIONS_4BIT))
@pytest.mark.parametrize("already_quantized", [False, True], ids=["fresh", "quantized"])
def test_linear4bit_corrupted_checkpoint_names_the_key_and_leaves_layer_unchanged(case, already_quantized):
    good = _linear4bit(seed=1)
    bad = {f"0.{k}": v for k, v in _corrupt_4bit(good.state_dict(), case).items()}
    model = torch.nn.Sequential(_linear4bit(seed=2, quantize=already_quantized))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    weight = model[0].weight
    with pytest.raises(RuntimeError, match=CORRUPTIONS_4BIT[case]):
        model.load_state_dict(bad)
    assert model[0].weight is weight and weight.bnb_quantized == already_quantized
    _assert_same_state_dict(model.state_dict(), before)


# ------------------------------------------------------------------------------------------
# Int8Params / Linear8bitLt
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("move", ["to", "cpu", "module_to", "forward"])
def test_int8params_quantize_on_cpu_move_or_first_forward(move):
    layer = _linear8bit(quantize=False)
    W = layer.weight.data.clone()
    if move == "to":
        layer.weight = layer.weight.to("cpu")
    elif move == "cpu":
        layer.weight = layer.weight.cpu()
    elif move == "module_to":
        layer.to("cpu")
    else:
        layer(_x())
    CB, SCB, _ = LF.int8_vectorwise_quant(W.half())
    weight = layer.weight
    assert isinstance(weight, Int8Params) and weight.dtype == torch.int8 and not weight.requires_grad
    assert torch.equal(weight.data, CB) and torch.equal(weight.CB, CB) and torch.equal(weight.SCB, SCB)


def test_int8params_with_fp16_weights_stay_float():
    layer = _linear8bit(has_fp16_weights=True)
    assert layer.weight.dtype == torch.float32 and layer.weight.requires_grad and layer.weight.SCB is None
    assert list(layer.state_dict()) == ["weight", "bias"]
    layer(_x()).sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.shape == (OUT, IN)


@pytest.mark.parametrize("how", ROUND_TRIPS)
def test_int8params_keep_scales_through_copies(how):
    weight = _linear8bit().weight
    copied = _round_trip(weight, how)
    assert type(copied) is Int8Params
    assert torch.equal(copied.data, weight.data) and torch.equal(copied.SCB, weight.SCB)
    assert copied.CB is not None and copied.CB.data_ptr() == copied.data.data_ptr()
    assert copied.has_fp16_weights is False and copied.requires_grad is False


@pytest.mark.parametrize("threshold", [0.0, 6.0])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_linear8bit_forward_is_lowbit_matmul(threshold, training):
    layer = _linear8bit(threshold=threshold).train(training)
    x = _x()
    x[:, 3] = 12.0  # an outlier column for threshold=6
    state = lowbit.autograd.MatmulLtState(
        CB=layer.weight.data,
        SCB=layer.weight.SCB,
        has_fp16_weights=False,
        is_training=training,
        threshold=threshold,
    )
    expected = lowbit.autograd.matmul(x, layer.weight.data, state=state, bias=layer.bias)
    assert torch.equal(layer(x), expected)
    assert layer.state.is_training == training and layer.state.SCB is layer.weight.SCB
    if threshold and not training:
        assert layer.state.idx.tolist() == [3]


def test_linear8bit_state_follows_the_weight():
    layer = _linear8bit(quantize=False)
    layer.to("cpu")
    assert layer.state.CB is layer.weight.CB and layer.state.SCB is layer.weight.SCB


def test_linear8bit_state_dict_keys_are_bitsandbytes_keys():
    state = _linear8bit().state_dict()
    assert list(state) == ["weight", "bias", "SCB", "weight_format"]
    assert state["weight"].dtype == torch.int8 and state["SCB"].dtype == torch.float32
    assert state["weight_format"].dtype == torch.uint8 and state["weight_format"].item() == 0
    assert list(_linear8bit(quantize=False).state_dict()) == ["weight", "bias"]


@pytest.mark.parametrize("how", SAVE_FORMATS)
def test_linear8bit_checkpoint_loads_into_fresh_and_quantized_layers(how):
    source = _linear8bit(threshold=6.0).eval()
    loaded_state = _save_load(source.state_dict(), how)
    for target in (_linear8bit(quantize=False, threshold=6.0), _linear8bit(seed=5, threshold=6.0)):
        target.eval()
        target.load_state_dict(loaded_state)
        _assert_same_state_dict(target.state_dict(), source.state_dict())
        x = _x()
        assert torch.equal(target(x), source(x))


def test_linear8bit_float_checkpoint_into_quantized_layer_requantizes():
    layer = _linear8bit(seed=3)
    layer.load_state_dict(_float_state(seed=0))
    _assert_same_state_dict(layer.state_dict(), _linear8bit(seed=0).state_dict())


def test_linear8bit_with_a_tied_plain_weight():
    """A plain Parameter put in place of the weight (tied to another module's weight) is a float
    weight: saved without SCB, refused with a clear error when a checkpoint holds int8 entries,
    and quantized afresh by every forward (it may change between calls)."""
    shared = torch.nn.Parameter(torch.randn(OUT, IN, generator=_gen(0)) * 0.1)
    layer = _linear8bit(quantize=False)
    layer.weight = shared
    assert list(layer.state_dict()) == ["weight", "bias"]

    x = _x()
    expected = lowbit.autograd.matmul(x, shared, state=lowbit.autograd.MatmulLtState(), bias=layer.bias)
    assert torch.equal(layer(x), expected)
    with torch.no_grad():
        shared.mul_(2.0)
    torch.testing.assert_close(layer(x) - layer.bias, 2 * (expected - layer.bias), rtol=2e-2, atol=2e-2)

    quantized = _linear8bit(seed=1).state_dict()
    with pytest.raises(RuntimeError, match="Loading a quantized checkpoint into non-quantized Linear8bitLt"):
        layer.load_state_dict(quantized)
    assert layer.weight is shared
    layer.load_state_dict(_float_state(seed=4))  # a float checkpoint copies into the shared weight
    assert torch.equal(shared, _float_state(seed=4)["weight"])


CORRUPTIONS_8BIT = {
    "scb_size": "0.SCB must be",
    "scb_nan": "0.SCB contains NaN",
    "weight_format": "0.weight_format",
    "no_scb": "0.SCB",
    "float_weight_with_scb": "0.weight must be int8",
    "other_layer_size": "size mismatch for 0.weight",
    "into_fp16_weights_layer": "has_fp16_weights=True",
}


@pytest.mark.parametrize("case", list(CORRUPTIONS_8BIT))
def test_linear8bit_corrupted_checkpoint_names_the_key_and_leaves_layer_unchanged(case):
    state = dict(_linear8bit(seed=1).state_dict())
    if case == "scb_size":
        state["SCB"] = state["SCB"][:-1]
    elif case == "scb_nan":
        state["SCB"] = state["SCB"].clone().fill_(float("nan"))
    elif case == "weight_format":
        state["weight_format"] = torch.tensor(1, dtype=torch.uint8)
    elif case == "no_scb":
        del state["SCB"]
    elif case == "float_weight_with_scb":
        state["weight"] = state["weight"].float()
    elif case == "other_layer_size":
        state = _linear8bit().state_dict()
        state["weight"] = torch.zeros(OUT, IN + 1, dtype=torch.int8)
    model = torch.nn.Sequential(_linear8bit(seed=2, has_fp16_weights=case == "into_fp16_weights_layer"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    weight = model[0].weight
    with pytest.raises(RuntimeError, match=CORRUPTIONS_8BIT[case]):
        model.load_state_dict({f"0.{k}": v for k, v in state.items()})
    assert model[0].weight is weight
    _assert_same_state_dict(model.state_dict(), before)


# ------------------------------------------------------------------------------------------
# embeddings
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dim", [128, 100], ids=["whole_blocks", "partial_blocks"])
def test_embedding4bit_lookup_is_dequantized_table(dim):
    table = torch.randn(40, dim, generator=_gen(0))
    layer = EmbeddingNF4(40, dim)
    layer.load_state_dict({"weight": table})
    layer.to("cpu")
    idx = torch.tensor([[0, 5, 39], [7, 7, 1]])
    expected = F.embedding(idx, LF.dequantize_4bit(layer.weight.data, layer.weight.quant_state))
    assert torch.equal(layer(idx), expected)
    # saving works too (bitsandbytes raises NotImplementedError) and reloads into a fresh layer
    fresh = Embedding4bit(40, dim, quant_type="nf4")
    fresh.load_state_dict(_save_load(layer.state_dict(), "safetensors"))
    assert torch.equal(fresh(idx), expected)


def test_embedding8bit_lookup_is_dequantized_rows():
    table = torch.randn(40, 64, generator=_gen(0))
    layer = Embedding8bit(40, 64)
    layer.load_state_dict({"weight": table})
    idx = torch.tensor([3, 0, 39])
    out = layer(idx)  # first forward quantizes
    CB, SCB, _ = LF.int8_vectorwise_quant(table.half())
    assert torch.equal(out, (CB[idx] * (SCB[idx].unsqueeze(1) / 127.0)).float())
    fresh = Embedding8bit(40, 64)
    fresh.load_state_dict(_save_load(layer.state_dict(), "torch"))
    assert torch.equal(fresh(idx), out)


def test_stable_embedding_and_embedding():
    layer = StableEmbedding(50, 16, padding_idx=0)
    out = layer(torch.tensor([0, 3, 49]))
    assert out.shape == (3, 16) and hasattr(layer, "norm")
    torch.testing.assert_close(out.mean(-1), torch.zeros(3), atol=1e-5, rtol=0)  # layer-normed
    plain = Embedding(50, 16, padding_idx=0)
    assert torch.equal(plain.weight[0], torch.zeros(16))
    assert torch.equal(plain(torch.tensor([4])), plain.weight[4:5])


def test_embeddings_ask_for_32bit_optimizer_state():
    optim = pytest.importorskip("lowbit.optim")
    manager = optim.GlobalOptimManager.get_instance()
    for layer in (StableEmbedding(10, 4), Embedding(10, 4)):
        registered = [entry for entry in manager.module_weight_config_triple if entry[0] is layer]
        assert registered == [(layer, "weight", {"optim_bits": 32})]


def test_bitsandbytes_import_path():
    from lowbit.nn import modules

    assert modules.Linear4bit is Linear4bit and modules.Int8Params is Int8Params


# ------------------------------------------------------------------------------------------
# training through a frozen 4-bit layer (QLoRA)
# ------------------------------------------------------------------------------------------
def test_qlora_style_training_step_reaches_the_input_and_adapter():
    base = _linear4bit(compute_dtype=torch.float32)
    adapter = torch.nn.Linear(IN, OUT, bias=False)
    x = _x().requires_grad_(True)
    (base(x) + adapter(x)).square().mean().backward()
    assert x.grad is not None and adapter.weight.grad is not None
    assert base.weight.grad is None and not base.weight.requires_grad
    W = LF.dequantize_4bit(base.weight.data, base.weight.quant_state)
    x_ref = x.detach().clone().requires_grad_(True)
    (F.linear(x_ref, W, base.bias) + adapter(x_ref)).square().mean().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------------------
# torch.compile
# ------------------------------------------------------------------------------------------
def _compile_model(quantize=True):
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        Linear4bit(IN, 160, quant_type="nf4", compute_dtype=torch.bfloat16),
        torch.nn.GELU(),
        Linear8bitLt(160, 64, has_fp16_weights=False, threshold=6.0),
        torch.nn.ReLU(),
        Linear4bit(64, OUT, quant_type="fp4", compress_statistics=False),
    )
    return model.to("cpu") if quantize else model


def _compile_input():
    x = torch.randn(4, IN, generator=_gen(1))
    x[:, 7] = 30.0  # outliers reach the int8 layer
    return x


def test_torch_compile_fullgraph_inductor_inference():
    torch._dynamo.reset()
    model = _compile_model().eval()
    x = _compile_input()
    with torch.no_grad():
        eager = model(x)
        compiled = torch.compile(model, fullgraph=True)(x)  # fullgraph: a graph break raises
    # The quantized products are opaque custom ops and F.linear, run identically; inductor only
    # fuses the elementwise glue around them (casts, activations), which may round differently.
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


def test_torch_compile_fullgraph_training_gradients():
    torch._dynamo.reset()
    model = _compile_model().train()
    x = _compile_input().requires_grad_(True)
    model(x).square().mean().backward()
    eager_grad, x.grad = x.grad.clone(), None
    torch.compile(model, fullgraph=True, backend="aot_eager")(x).square().mean().backward()
    torch.testing.assert_close(x.grad, eager_grad, rtol=1e-5, atol=1e-7)


def test_torch_compile_of_a_model_not_yet_quantized():
    # first-forward quantization runs eagerly: a graph break, refused by fullgraph=True
    torch._dynamo.reset()
    x = _compile_input()
    with torch.no_grad(), pytest.raises(Exception, match="quantize the model before torch.compile"):
        torch.compile(_compile_model(quantize=False), fullgraph=True, backend="aot_eager")(x)
    torch._dynamo.reset()
    model = _compile_model(quantize=False)
    with torch.no_grad():
        compiled = torch.compile(model, backend="aot_eager")(x)
        eager = _compile_model()(x)
    assert model[0].weight.bnb_quantized and model[2].weight.dtype == torch.int8
    assert torch.equal(compiled, eager)
