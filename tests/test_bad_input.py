"""Bad input gets a clear exception naming the argument, on every backend, before any kernel runs."""

from __future__ import annotations

import pytest
import torch

import lowbit
from lowbit import functional as F
from support import CPU_BACKENDS

A = torch.randn(256)


@pytest.fixture(params=CPU_BACKENDS, autouse=True)
def backend(request):
    with lowbit.backends.use(request.param):
        yield request.param


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: F.quantize_4bit(A.to(torch.int32)), ValueError, "A must have dtype"),
        (lambda: F.quantize_4bit(A.double()), ValueError, "A must have dtype"),
        (lambda: F.quantize_4bit([1.0, 2.0]), TypeError, "A must be a torch.Tensor"),
        (lambda: F.quantize_4bit(A, blocksize=48), ValueError, "blocksize must be one of"),
        (lambda: F.quantize_4bit(A, blocksize=True), ValueError, "blocksize must be one of"),
        (lambda: F.quantize_4bit(A, quant_type="nf5"), ValueError, "quant_type must be 'nf4' or 'fp4', got 'nf5'"),
        (lambda: F.quantize_4bit(torch.empty(0)), ValueError, "A is empty"),
        (lambda: F.quantize_4bit(torch.randn(6), quant_storage=torch.float32), ValueError, "quant_storage"),
        (lambda: F.quantize_4bit(torch.tensor([1.0, float("nan")])), ValueError, "A contains NaN or Inf"),
        (lambda: F.quantize_4bit(torch.tensor([1.0, float("inf")] * 40)), ValueError, "A contains NaN or Inf"),
        (lambda: F.quantize_blockwise(torch.tensor([float("nan")] * 3)), ValueError, "A contains NaN or Inf"),
        (lambda: F.quantize_blockwise(A, blocksize=100), ValueError, "blocksize must be one of"),
        (lambda: F.quantize_blockwise(A, code=torch.rand(256)), ValueError, "code must be sorted"),
        (lambda: F.quantize_blockwise(A, code=torch.linspace(-1, 1, 16)), ValueError, "code has 16 elements, expected 256"),
        (lambda: F.dequantize_blockwise(torch.zeros(256, dtype=torch.int8), absmax=torch.ones(1)), ValueError, "A must have dtype uint8"),
        (lambda: F.dequantize_blockwise(torch.zeros(300, dtype=torch.uint8), absmax=torch.ones(1), blocksize=256), ValueError, "absmax has 1 elements, expected 2"),
        (lambda: F.dequantize_4bit(torch.zeros(128, 1, dtype=torch.uint8)), ValueError, "needs quant_state"),
        (lambda: F.int8_vectorwise_quant(torch.randn(4, 4), threshold=-1.0), ValueError, "threshold must be"),
        (lambda: F.int8_vectorwise_quant(torch.randn(4, 4).to(torch.int8)), ValueError, "A must have dtype"),
        (lambda: F.int8_vectorwise_quant(torch.tensor([[1.0, float("nan")]])), ValueError, "NaN or Inf"),
        (lambda: F.int8_linear_matmul(torch.zeros(2, 8, dtype=torch.int8), torch.zeros(3, 9, dtype=torch.int8)), ValueError, "B must be 2-D"),
        (lambda: F.int8_linear_matmul(torch.zeros(2, 8), torch.zeros(3, 8, dtype=torch.int8)), ValueError, "A must have dtype int8"),
        (lambda: F.int8_mm_dequant(torch.zeros(2, 3, dtype=torch.int32), torch.ones(2), torch.ones(4)), ValueError, "col_stats has 4 elements, expected 3"),
        (lambda: F.gemv_4bit(torch.randn(1, 64), torch.zeros(32, 1, dtype=torch.uint8)), ValueError, "gemv_4bit needs state"),
    ],
)
def test_bad_input_is_rejected(call, error, match):
    with pytest.raises(error, match=match):
        call()


def _nf4(shape=(64, 64)):
    W = torch.randn(*shape)
    return W, *F.quantize_4bit(W, quant_type="nf4")


def test_dequantize_4bit_checks_absmax_length():
    _, packed, state = _nf4()
    with pytest.raises(ValueError, match="absmax has 63 elements, expected 64"):
        torch.ops.lowbit.dequantize_4bit(packed, state.absmax[:63], 64, "nf4", [64, 64], torch.float32)


def test_dequantize_4bit_checks_packed_size():
    _, packed, state = _nf4()
    with pytest.raises(ValueError, match="A holds 2047 bytes but shape"):
        torch.ops.lowbit.dequantize_4bit(packed[:-1], state.absmax, 64, "nf4", [64, 64], torch.float32)


def test_dequantize_4bit_checks_dtype_and_out():
    _, packed, state = _nf4()
    with pytest.raises(ValueError, match="dtype must be"):
        torch.ops.lowbit.dequantize_4bit(packed, state.absmax, 64, "nf4", [64, 64], torch.int8)
    with pytest.raises(ValueError, match="out has shape"):
        F.dequantize_4bit(packed, state, out=torch.empty(64, 65))


def test_gemv_checks_feature_dimension():
    _, packed, state = _nf4()
    with pytest.raises(ValueError, match="A has 32 features"):
        F.gemv_4bit(torch.randn(1, 32), packed, state=state)


def test_optimizer_ops_check_names_and_shapes():
    p, g, s1, s2 = (torch.zeros(10) for _ in range(4))
    common = (None, 0.0, 1.0, 0.9, 0.99, 0.0, 0.0, 1e-8, 0.0, 1, 1e-3, 1.0)
    with pytest.raises(ValueError, match="optimizer_name must be one of"):
        torch.ops.lowbit.optimizer_update_32bit("adamm", g, p, s1, s2, *common)
    with pytest.raises(ValueError, match="state1 has 9 elements"):
        torch.ops.lowbit.optimizer_update_32bit("adam", g, p, s1[:9], s2, *common)
    with pytest.raises(ValueError, match="needs state2"):
        torch.ops.lowbit.optimizer_update_32bit("adam", g, p, s1, None, *common)
    with pytest.raises(ValueError, match="step must be"):
        torch.ops.lowbit.optimizer_update_32bit("adam", g, p, s1, s2, *common[:9], 0, *common[10:])


def test_rejected_call_leaves_inputs_untouched():
    A = torch.tensor([[1.0, 2.0], [float("nan"), 3.0]])
    before = A.clone()
    with pytest.raises(ValueError):
        F.int8_vectorwise_quant(A, threshold=1.5)
    assert torch.equal(A.nan_to_num(), before.nan_to_num())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_int8_quant_finiteness_check_is_exact(dtype):
    """The check sums A first: values whose sum overflows are still accepted, and a NaN or an
    Inf anywhere (an Inf and a -Inf cancel to NaN in the sum) is still refused."""
    big = torch.full((4, 64), torch.finfo(dtype).max, dtype=dtype)
    q, row_stats, _ = F.int8_vectorwise_quant(big)
    assert torch.equal(q, torch.full_like(q, 127)) and torch.isfinite(row_stats).all()
    for bad in (float("nan"), float("inf"), -float("inf")):
        A = torch.ones(4, 64, dtype=dtype)
        A[3, 17] = bad
        with pytest.raises(ValueError, match="A contains NaN or Inf"):
            F.int8_vectorwise_quant(A)
    A = torch.ones(4, 64, dtype=dtype)
    A[0, 0], A[2, 5] = float("inf"), -float("inf")
    with pytest.raises(ValueError, match="A contains NaN or Inf"):
        F.int8_double_quant(A)


# ---- the classes of issue 14, one example each (tests/test_bad_input_properties.py generates them) ----
import copy  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402

import lowbit.nn as lnn  # noqa: E402
import lowbit.optim as O  # noqa: E402
from lowbit.autograd import MatmulLtState  # noqa: E402
from lowbit.core import formats  # noqa: E402
from lowbit.core.quant_state import QuantState, pack_dict_to_tensor  # noqa: E402

_W = torch.randn(64, 64)
_PACKED, _STATE = F.quantize_4bit(_W, quant_type="nf4")
_Q8, _ABSMAX8 = torch.ops.lowbit.quantize_blockwise(_W, formats.dynamic_map(), 256)
_I8 = torch.randint(-127, 128, (4, 64), dtype=torch.int8)


def _sharing_memory(t: torch.Tensor, out_shape, out_dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A copy of ``t`` and an output tensor starting on the copy's first byte."""
    out_bytes = math.prod(out_shape) * torch.empty((), dtype=out_dtype).element_size()
    buffer = torch.zeros(max(t.numel() * t.element_size(), out_bytes), dtype=torch.uint8)
    copy_of_t = buffer[: t.numel() * t.element_size()].view(t.dtype).view(t.shape)
    copy_of_t.copy_(t)
    return copy_of_t, buffer[:out_bytes].view(out_dtype).view(out_shape)


def _dequantize_4bit_over_its_input():
    A, out = _sharing_memory(_PACKED, (64, 64), torch.float32)
    torch.ops.lowbit.dequantize_4bit.out(A, _STATE.absmax, 64, "nf4", [64, 64], torch.float32, out)


def _dequantize_blockwise_over_its_input():
    A, out = _sharing_memory(_Q8, (64, 64), torch.float32)
    torch.ops.lowbit.dequantize_blockwise.out(A, _ABSMAX8, formats.dynamic_map(), 256, torch.float32, out)


def _int8_linear_matmul_over_its_input():
    A, out = _sharing_memory(_I8, (4, 4), torch.int32)
    torch.ops.lowbit.int8_linear_matmul.out(A, _I8, out)


@pytest.mark.parametrize(
    "call, match",
    [
        # a meta tensor among CPU ones selected the fake kernel: uninitialized memory
        (lambda: torch.ops.lowbit.dequantize_4bit(_PACKED, _STATE.absmax.to("meta"), 64, "nf4", [64, 64], torch.float32), "absmax is on meta"),
        # out= over an input: garbage on the native backend
        (_dequantize_4bit_over_its_input, "out overlaps the input A"),
        (_dequantize_blockwise_over_its_input, "out overlaps the input A"),
        (_int8_linear_matmul_over_its_input, "out overlaps the input A"),
        # out=/absmax= filled with copy_: any dtype or broadcastable shape was accepted
        (lambda: F.quantize_4bit(_W, out=torch.empty(2048, 1)), "out must have dtype uint8"),
        (lambda: F.quantize_4bit(_W * 1e6, absmax=torch.empty(64, dtype=torch.float16)), "absmax must have dtype float32"),
        (lambda: F.int8_mm_dequant(torch.ones(2, 3, dtype=torch.int32), torch.ones(2), torch.ones(3), out=torch.empty(2, 3, dtype=torch.int8)), "out must have dtype float16"),
        (lambda: F.quantize_blockwise(_W, out=torch.empty(2, 64, 64, dtype=torch.uint8)), "out has shape"),
        # one absmax layout: 1-D
        (lambda: torch.ops.lowbit.dequantize_4bit(_PACKED, _STATE.absmax.view(8, 8), 64, "nf4", [64, 64], torch.float32), "absmax must be 1-D"),
        # a code that disagrees with its quant type
        (lambda: QuantState(_STATE.absmax, _STATE.shape, F.get_4bit_type("fp4"), 64, "nf4", torch.float32), "not the nf4 codebook"),
        (lambda: QuantState(_STATE.absmax, _STATE.shape, torch.linspace(-1, 1, 5), 64, "nf4", torch.float32), "code has 5 elements"),
        (lambda: QuantState(_STATE.absmax, _STATE.shape, _STATE.code, 64, "bogus", torch.float32), "quant_type must be"),
        # packed data viewed as bool / complex / float8
        (lambda: F.dequantize_4bit(_PACKED.view(torch.bool), _STATE), "A must have dtype"),
        (lambda: F.dequantize_4bit(_PACKED.view(-1).view(torch.complex64), _STATE), "A must have dtype"),
        (lambda: F.gemv_4bit(torch.randn(1, 64), _PACKED.t().view(torch.float8_e4m3fn), state=_STATE), "B must have dtype"),
        # int8: wrapped outlier index, complex bias
        (lambda: torch.ops.lowbit.int8_mixed_scaled_mm(torch.randn(4, 64).half(), _I8, _I8, torch.ones(4), torch.ones(4), torch.tensor([-1]), None), "outlier_cols must hold column indices"),
        (lambda: torch.ops.lowbit.int8_scaled_mm(_I8, _I8, torch.ones(4), torch.ones(4), torch.ones(4, dtype=torch.complex64), None), "bias must have dtype"),
        # a blockwise code with infinite ends
        (lambda: F.quantize_blockwise(_W, code=formats.dynamic_map().index_fill(0, torch.tensor([255]), math.inf)), "code contains NaN or Inf"),
        # optimizer arguments
        (lambda: O.AdamW([torch.nn.Parameter(torch.zeros(3))], betas=(0.9,)), "betas must hold 2 values"),
        (lambda: O.AdamW([torch.nn.Parameter(torch.zeros(3))], lr="abc"), "lr must be a real number"),
        (lambda: torch.ops.lowbit.optimizer_update_32bit("adam", torch.ones(8), torch.ones(8), torch.zeros(8), torch.zeros(8), None, 0.0, 0.0, 2.0, 0.99, 0.0, 0.0, 1e-8, 0.0, 1, 1e-3, 1.0), "beta1 must be"),
        (lambda: torch.ops.lowbit.optimizer_update_32bit("adam", torch.ones(8), torch.ones(8), torch.zeros(8), torch.zeros(8), None, 0.0, 0.0, 0.9, 0.99, 0.0, 0.0, 1e-8, 0.0, 1, 1e-3, math.inf), "gnorm_scale must be"),
        # unclear errors, now named
        (lambda: F.create_dynamic_map(max_exponent_bits=0), "max_exponent_bits must be"),
        (lambda: F.int8_mm_dequant(torch.tensor(1, dtype=torch.int32), torch.ones(1), torch.ones(1)), "A must have at least 1 dimension"),
        (lambda: F.dequantize_4bit(_PACKED, QuantState(_STATE.absmax, None, None, 64, "nf4", torch.float32)), "quant_state has no shape"),
    ],
)
def test_issue_14_examples_are_refused(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


def _packed_json_with(state: QuantState, **changes) -> dict:
    entries = state.as_dict(packed=True)
    key = next(k for k in entries if k.startswith("quant_state."))
    fields = {**json.loads(bytes(entries[key].tolist())), **changes}
    entries[key] = pack_dict_to_tensor(fields)
    return entries


_NESTED = F.quantize_4bit(_W, quant_type="nf4", compress_statistics=True)[1]


@pytest.mark.parametrize(
    "entries, match",
    [
        (_packed_json_with(_STATE, dtype="int8"), "'dtype' must be one of"),
        (_packed_json_with(_STATE, dtype="float64"), "'dtype' must be one of"),
        (_packed_json_with(_STATE, dtype="bool"), "'dtype' must be one of"),
        (_packed_json_with(_NESTED, nested_dtype="int64"), "'nested_dtype' must be one of 'float32'"),
        (_packed_json_with(_NESTED, nested_offset=True), "'nested_offset' must be a finite number"),
        (_packed_json_with(_STATE, shape=[True, 4096]), "'shape' must be a non-empty list"),
        (_packed_json_with(_STATE, shape=None), "'shape' must be a non-empty list"),
        ({("quant_state.bitsandbytes__fp4" if k.startswith("quant_state.") else k): v for k, v in _STATE.as_dict(packed=True).items()}, "holds the JSON of quant_type='nf4'"),
        ({**{k: v for k, v in _STATE.as_dict(packed=True).items() if not k.startswith("quant_state.")}, "quant_state.bitsandbytes__nf4": torch.tensor(list(b"[" * 100_000 + b"]" * 100_000), dtype=torch.uint8)}, "nests JSON too deeply"),
        ({k: v for k, v in _NESTED.as_dict(packed=True).items() if k != "nested_absmax"}, "nested state is missing 'nested_absmax'"),
    ],
)
def test_corrupted_quant_state_entries_name_the_key(entries, match):
    with pytest.raises(ValueError, match=match):
        QuantState.from_dict(entries)


def _trained_adamw8bit(seed: int = 0):
    torch.manual_seed(seed)
    p = torch.nn.Parameter(torch.randn(5000))
    opt = O.AdamW8bit([p])
    p.grad = torch.randn(5000)
    opt.step()
    return p, opt


def _quant(sd):
    return sd["state"][0]["__bnb_optimizer_quant_state__"]


@pytest.mark.parametrize(
    "corrupt, match",
    [
        (lambda sd: _quant(sd).__setitem__("state1", torch.zeros(4000, dtype=torch.uint8)), r"'state1'\] has shape \(4000,\)"),
        (lambda sd: sd["state"][0].__setitem__("step", -1), r"'step'\] must be an int >= 0"),
        (lambda sd: _quant(sd).__setitem__("state1", torch.zeros(5000, dtype=torch.float16)), r"'state1'\] must have dtype"),
        (lambda sd: _quant(sd)["qmap1"].__setitem__(3, math.nan), r"'qmap1'\] contains NaN"),
        (lambda sd: _quant(sd).pop("absmax1"), "has no 'absmax1'"),
        (lambda sd: sd["param_groups"][0].__setitem__("lr", "abc"), "lr must be a real number"),
        (lambda sd: sd.update(_lion_state()), "has no 'state2'"),
    ],
)
def test_optimizer_load_validates_and_leaves_the_optimizer_unchanged(corrupt, match):
    p, opt = _trained_adamw8bit()
    state_dict = copy.deepcopy(opt.state_dict())
    corrupt(state_dict)
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises((ValueError, TypeError), match=match):
        opt.load_state_dict(state_dict)
    after = opt.state_dict()
    assert after["param_groups"] == before["param_groups"]
    for key, value in _quant(before).items():
        assert torch.equal(_quant(after)[key], value), key
    p.grad = torch.randn(5000)
    opt.step()  # still usable


def _lion_state() -> dict:
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(5000))
    opt = O.Lion8bit([p])
    p.grad = torch.randn(5000)
    opt.step()
    return opt.state_dict()


def test_load_checkpoint_writes_nothing_when_a_later_layer_is_corrupt():
    def model(seed):
        torch.manual_seed(seed)
        return torch.nn.Sequential(lnn.Linear4bit(64, 64, quant_type="nf4"), lnn.Linear4bit(64, 64, quant_type="nf4")).to("cpu")

    target, source = model(0), model(1).state_dict()
    source["1.weight.absmax"] = source["1.weight.absmax"][:-1]
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(RuntimeError, match="1.weight.absmax.*nothing was loaded|nothing was loaded"):
        lnn.load_checkpoint(target, source)
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())
    # torch's own load_state_dict loads layer by layer: the first layer changes, the corrupt one does not
    with pytest.raises(RuntimeError, match="1.weight"):
        target.load_state_dict(source)
    after = target.state_dict()
    assert not torch.equal(before["0.weight"], after["0.weight"])
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("1."))


def test_valid_inputs_issue_14_found_rejected():
    weight = lnn.Int8Params(torch.randn(16, 32).half(), has_fp16_weights=False).to("cpu")
    A = torch.randn(4, 32).half()
    for training in (True, False):
        state = MatmulLtState(has_fp16_weights=False, is_training=training)
        assert lowbit.matmul(A, weight, state=state).shape == (4, 16)
    assert lowbit.matmul(A, weight, state=MatmulLtState(threshold=1.0, has_fp16_weights=False, is_training=False)).shape == (4, 16)
    copied = weight.to("cpu", copy=True)
    assert copied is not weight and torch.equal(copied.data, weight.data) and copied.data_ptr() != weight.data_ptr()
    assert weight.to(torch.int32).dtype == torch.int32 and weight.dtype == torch.int8  # a converted copy
    for cls in (O.AdamW8bit, O.AdamW, O.Lion8bit, O.AdEMAMix8bit):
        empty = torch.nn.Parameter(torch.zeros(0, 8))
        empty.grad = torch.zeros(0, 8)
        opt = cls([empty], min_8bit_size=0)
        opt.step()
        assert opt.state[empty]["step"] == 1
    table = lnn.EmbeddingNF4(10, 64).to("cpu")
    assert table(torch.empty(0, dtype=torch.long)).shape == (0, 64)
    assert table(torch.empty(3, 0, dtype=torch.long)).shape == (3, 0, 64)


def test_int8_linear_matmul_refuses_a_k_its_int32_accumulator_cannot_hold():
    """K = 2^17 of (-128)(-128) sums to 2^31, which wraps to -2^31 in int32: every backend refuses
    K > formats.INT8_MATMUL_MAX_K (shape check, no data read), also through int8_scaled_mm."""
    K = formats.INT8_MATMUL_MAX_K + 1
    A = torch.full((1, K), -128, dtype=torch.int8)
    with pytest.raises(ValueError, match=rf"A's last dimension \(K = {K}\) exceeds {K - 1}"):
        F.int8_linear_matmul(A, A)
    with pytest.raises(ValueError, match=rf"K = {K}"):
        torch.ops.lowbit.int8_scaled_mm(A, A, torch.ones(1), torch.ones(1))
    largest = A[:, 1:].contiguous()
    assert F.int8_linear_matmul(largest, largest).item() == (K - 1) * 128 * 128  # exact up to the limit
