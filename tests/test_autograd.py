"""lowbit.autograd: matmul_4bit and LLM.int8 matmul against the dense computation they stand for.

Reference for every comparison: torch's own autograd through ``A @ W.T + bias`` where ``W`` is
the dequantized weight. The quantized products compute exactly that (same torch ops on the same
dequantized values) except where noted, so most checks are equalities; the exceptions (the fused
single-token ``gemv_4bit`` path, LLM.int8's int8 activations) state their tolerance.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

import lowbit
from lowbit import functional as LF
from lowbit.autograd import MatmulLtState, matmul, matmul_4bit
from lowbit.autograd.matmul_4bit import GEMV_MAX_ROWS
from support import CPU_BACKENDS

K, N = 192, 80  # in_features, out_features (192 = 3 blocks of 64 per row)


@pytest.fixture(params=CPU_BACKENDS, autouse=True, ids=lambda name: f"backend={name}")
def backend(request):
    with lowbit.backends.use(request.param):
        yield request.param


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _weight(seed: int = 0, rows: int = N, cols: int = K) -> torch.Tensor:
    return torch.randn(rows, cols, generator=_gen(seed)) * 0.1


def _input(shape, dtype, seed=1, requires_grad=False) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen(seed)).to(dtype).requires_grad_(requires_grad)


def _assert_grads_close(actual, expected, dtype, what):
    # Same products, possibly summed in another order by a different matmul call: a few ulps.
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol, msg=lambda m: f"{what}: {m}")


# ------------------------------------------------------------------------------------------
# matmul_4bit
# ------------------------------------------------------------------------------------------
QUANT_CASES = [
    pytest.param(qt, nested, id=f"{qt}-{'nested' if nested else 'plain'}")
    for qt in ("nf4", "fp4")
    for nested in (False, True)
]
DTYPES = [
    pytest.param(d, id=str(d).removeprefix("torch.")) for d in (torch.float32, torch.bfloat16, torch.float16)
]


def _quantized(quant_type, nested, seed=0):
    packed, state = LF.quantize_4bit(_weight(seed), quant_type=quant_type, compress_statistics=nested)
    return packed, state, LF.dequantize_4bit(packed, state)


@pytest.mark.parametrize("quant_type,nested", QUANT_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(GEMV_MAX_ROWS + 3, K), (2, 5, K)], ids=["2d", "3d"])
def test_matmul_4bit_inference_is_the_dense_product(quant_type, nested, dtype, shape):
    packed, state, W = _quantized(quant_type, nested)
    A = _input(shape, dtype)
    bias = torch.randn(N, generator=_gen(2)).to(dtype)
    with torch.no_grad():
        out = matmul_4bit(A, packed, state, bias=bias)
        # the transposed view of the packed weight (bitsandbytes <= 0.45 passed weight.t()) is the same bytes
        out_t = matmul_4bit(A, packed.t(), state, bias=bias)
    expected = F.linear(A, W.to(dtype), bias)
    assert out.dtype == dtype and out.shape == (*shape[:-1], N)
    assert torch.equal(out, expected)
    assert torch.equal(out_t, expected)


@pytest.mark.parametrize("quant_type,nested", QUANT_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, K), (GEMV_MAX_ROWS, K)], ids=["1token", "max_rows"])
def test_matmul_4bit_few_tokens_use_the_fused_product(quant_type, nested, dtype, shape, monkeypatch):
    packed, state, W = _quantized(quant_type, nested)
    calls = []
    fused = torch.ops.lowbit.matmul_4bit
    monkeypatch.setattr(torch.ops.lowbit, "matmul_4bit", lambda *args: calls.append(1) or fused(*args))
    A = _input(shape, dtype)
    bias = torch.randn(N, generator=_gen(2)).to(dtype)
    with torch.no_grad():
        out = matmul_4bit(A, packed, state, bias=bias)
    assert calls, "inference on a few tokens must go through the fused matmul_4bit op"
    # the op accumulates in float32 and rounds once: within one rounding of the output dtype
    # (plus float32 summation order) of the float32 product
    expected = F.linear(A.float(), W, bias.float())
    tol = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(out.float(), expected, rtol=tol, atol=tol)
    assert out.shape == (*shape[:-1], N) and out.dtype == dtype


@pytest.mark.parametrize("quant_type,nested", QUANT_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(5, K), (2, 3, K), (1, K)], ids=["2d", "3d", "1row"])
def test_matmul_4bit_gradients_match_dense_autograd(quant_type, nested, dtype, shape):
    packed, state, W = _quantized(quant_type, nested)
    A = _input(shape, dtype, requires_grad=True)
    bias = torch.randn(N, generator=_gen(2)).to(dtype).requires_grad_(True)
    grad_out = torch.randn(*shape[:-1], N, generator=_gen(3)).to(dtype)

    out = matmul_4bit(A, packed, state, bias=bias)
    out.backward(grad_out)

    A_ref = A.detach().clone().requires_grad_(True)
    bias_ref = bias.detach().clone().requires_grad_(True)
    expected = F.linear(A_ref, W.to(dtype), bias_ref)
    expected.backward(grad_out)

    assert torch.equal(out.detach(), expected.detach())
    _assert_grads_close(A.grad, A_ref.grad, dtype, "grad A")
    _assert_grads_close(bias.grad, bias_ref.grad, dtype, "grad bias")
    assert packed.grad is None


def test_matmul_4bit_grad_through_input_only_and_out_argument():
    packed, state, W = _quantized("nf4", True)
    A = _input((4, K), torch.float32, requires_grad=True)
    out = torch.empty(4, N)
    result = matmul_4bit(A, packed, state, out=out)
    assert result is out and torch.equal(out, F.linear(A.detach(), W))
    result.sum().backward()
    torch.testing.assert_close(A.grad, W.sum(0).expand(4, K), rtol=1e-5, atol=1e-5)


def test_matmul_4bit_empty_input():
    packed, state, _ = _quantized("nf4", False)
    A = torch.empty(0, K, requires_grad=True)
    out = matmul_4bit(A, packed, state)
    assert out.shape == (0, N)
    out.sum().backward()
    assert A.grad.shape == (0, K)


def test_matmul_4bit_accepts_weight_quantized_as_k_by_n_with_deprecation_warning():
    packed, state = LF.quantize_4bit(_weight().t().contiguous(), quant_type="nf4")  # state.shape = [K, N]
    A = _input((3, K), torch.float32)
    with pytest.warns(DeprecationWarning, match=r"\[K, N\].*Re-quantize from the weight in \[N, K\]"):
        out = matmul_4bit(A, packed, state)
    assert torch.equal(out, A @ LF.dequantize_4bit(packed, state))


def test_matmul_4bit_rejects_bad_arguments():
    packed, state, _ = _quantized("nf4", False)
    A = _input((2, K), torch.float32)
    with pytest.raises(ValueError, match="quant_state"):
        matmul_4bit(A, packed, None)
    with pytest.raises(TypeError, match="quant_state"):
        matmul_4bit(A, packed, {"absmax": state.absmax})
    with pytest.raises(ValueError, match="A has shape"):
        matmul_4bit(_input((2, K + 1), torch.float32), packed, state)
    with pytest.raises(TypeError, match="A must be"):
        matmul_4bit(A.numpy(), packed, state)
    with pytest.raises(ValueError, match="A must be float32, float16 or bfloat16"):
        matmul_4bit(A.long(), packed, state)


# ------------------------------------------------------------------------------------------
# gemm_4bit: bitsandbytes' op (absmax and its double quantization passed as separate tensors)
# ------------------------------------------------------------------------------------------
def _gemm_4bit_args(packed, state):
    if state.nested:
        return (state.state2.absmax,), {
            "absmax_8bit": state.absmax, "absmax_code": state.state2.code, "absmax_offset": state.offset,
        }  # fmt: skip
    return (state.absmax,), {}


@pytest.mark.parametrize("quant_type,nested", QUANT_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("storage", [torch.uint8, torch.bfloat16], ids=["uint8", "bf16_storage"])
def test_gemm_4bit_op_is_the_dense_product(quant_type, nested, dtype, storage):
    packed, state = LF.quantize_4bit(
        _weight(), quant_type=quant_type, compress_statistics=nested, quant_storage=storage
    )
    A = _input((2, GEMV_MAX_ROWS, K), dtype)
    bias = torch.randn(N, generator=_gen(2)).to(dtype)
    (absmax,), nested_args = _gemm_4bit_args(packed, state)
    out = torch.ops.lowbit.gemm_4bit(A, packed, [N, K], absmax, 64, quant_type, bias, **nested_args)
    assert torch.equal(out, F.linear(A, LF.dequantize_4bit(packed, state).to(dtype), bias))


def test_gemm_4bit_op_offset_of_any_float_dtype_and_bad_arguments():
    packed, state = LF.quantize_4bit(_weight(), quant_type="nf4", compress_statistics=True)
    A = _input((3, K), torch.float32)
    (absmax,), nested_args = _gemm_4bit_args(packed, state)
    offset16 = state.offset.half()
    want = torch.ops.lowbit.gemm_4bit(A, packed, [N, K], absmax, 64, "nf4", **{**nested_args, "absmax_offset": offset16.float()})
    got = torch.ops.lowbit.gemm_4bit(A, packed, [N, K], absmax, 64, "nf4", **{**nested_args, "absmax_offset": offset16})
    assert torch.equal(got, want)
    with pytest.raises(ValueError, match="absmax_code and absmax_offset are only used with absmax_8bit"):
        torch.ops.lowbit.gemm_4bit(A, packed, [N, K], state.state2.absmax, 64, "nf4", absmax_code=state.state2.code)
    with pytest.raises(ValueError, match="absmax_8bit has"):
        torch.ops.lowbit.gemm_4bit(A, packed, [N, K], absmax, 64, "nf4", **{**nested_args, "absmax_8bit": state.absmax[1:]})
    with pytest.raises(ValueError, match=f"A has {K} features in its last dimension but shapeB"):
        torch.ops.lowbit.gemm_4bit(A, packed, [K, N], state.state2.absmax, 64, "nf4", **nested_args)


# ------------------------------------------------------------------------------------------
# LLM.int8 matmul
# ------------------------------------------------------------------------------------------
def _int8_weight(seed=0):
    CB, SCB, _ = LF.int8_vectorwise_quant(_weight(seed).half())
    return CB, SCB


def _dequantized(CB, SCB, dtype):
    """bitsandbytes' dequantization of an int8 weight (the one its backward pass uses)."""
    return CB.to(dtype) * (SCB.unsqueeze(1) * (1.0 / 127.0))


def _int8_error_bound(A, W, outlier_cols=None):
    """Worst case of |A @ W.T - LLM.int8(A, W)|: rounding to int8 moves each value by at most half
    a step (rowmax / 254) in A's rows and W's rows; outlier columns are exact (16-bit)."""
    A = A.float().reshape(-1, A.shape[-1]).clone()
    W = W.float()
    if outlier_cols is not None and outlier_cols.numel():
        A[:, outlier_cols] = 0.0
        W = W.clone()
        W[:, outlier_cols] = 0.0
    step_a = A.abs().amax(1, keepdim=True) / 254
    step_w = W.abs().amax(1, keepdim=True) / 254
    return (
        A.abs() @ step_w.expand_as(W).t()
        + step_a.expand_as(A) @ W.abs().t()
        + step_a @ step_w.t() * A.shape[1]
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(6, K), (2, 3, K)], ids=["2d", "3d"])
def test_int8_matmul_inference_within_quantization_error(dtype, shape):
    CB, SCB = _int8_weight()
    state = MatmulLtState(CB=CB, SCB=SCB, has_fp16_weights=False, is_training=False)
    A = _input(shape, dtype)
    bias = torch.randn(N, generator=_gen(2)).to(dtype)
    with torch.no_grad():
        out = matmul(A, CB, state=state, bias=bias)
    assert out.shape == (*shape[:-1], N) and out.dtype == dtype
    W = _dequantized(CB, SCB, torch.float32)
    dense = F.linear(A.float(), W, bias.float()).reshape(-1, N)
    # the int8 error bound, plus one rounding of the output dtype
    bound = _int8_error_bound(A.half(), W) + dense.abs() * torch.finfo(dtype).eps + 1e-6
    assert bool(((out.float().reshape(-1, N) - dense).abs() <= bound).all())


def test_int8_matmul_threshold_decomposes_outlier_columns():
    CB, SCB = _int8_weight()
    A = _input((6, K), torch.float16)
    A[:, 5] = 40.0  # an outlier feature: it would dominate every row's int8 scale
    A[2, 77] = -9.0
    W = _dequantized(CB, SCB, torch.float32)
    dense = A.float() @ W.t()

    plain = matmul(A, CB, state=MatmulLtState(CB=CB, SCB=SCB, has_fp16_weights=False, is_training=False))
    state = MatmulLtState(CB=CB, SCB=SCB, has_fp16_weights=False, is_training=False)
    decomposed = matmul(A, CB, state=state, threshold=6.0)

    assert state.threshold == 6.0
    assert state.idx.tolist() == [5, 77]
    err_plain = (plain.float() - dense).abs().max()
    err_decomposed = (decomposed.float() - dense).abs().max()
    bound = _int8_error_bound(A, W, state.idx) + dense.abs() * torch.finfo(torch.float16).eps
    assert bool(((decomposed.float() - dense).abs() <= bound + 1e-3).all())
    assert err_decomposed < err_plain / 4, (err_decomposed, err_plain)


@pytest.mark.parametrize("dtype", DTYPES)
def test_int8_matmul_training_on_cpu_uses_the_dequantized_weight(dtype):
    CB, SCB = _int8_weight()
    A = _input((5, K), dtype)
    bias = torch.randn(N, generator=_gen(2)).to(dtype)
    out = matmul(
        A, CB, state=MatmulLtState(CB=CB, SCB=SCB, has_fp16_weights=False, is_training=True), bias=bias
    )
    assert torch.equal(out, F.linear(A, CB.to(dtype).mul_(SCB.unsqueeze(1).mul(1.0 / 127.0)), bias))


@pytest.mark.parametrize("is_training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(5, K), (2, 3, K)], ids=["2d", "3d"])
def test_int8_matmul_input_gradient_matches_dense_autograd(is_training, dtype, shape):
    CB, SCB = _int8_weight()
    state = MatmulLtState(CB=CB, SCB=SCB, has_fp16_weights=False, is_training=is_training, threshold=6.0)
    A = _input(shape, dtype, requires_grad=True)
    bias = torch.randn(N, generator=_gen(2)).to(dtype).requires_grad_(True)
    grad_out = torch.randn(*shape[:-1], N, generator=_gen(3)).to(dtype)
    matmul(A, CB, state=state, bias=bias).backward(grad_out)

    A_ref = A.detach().clone().requires_grad_(True)
    bias_ref = bias.detach().clone().requires_grad_(True)
    F.linear(A_ref, _dequantized(CB, SCB, torch.float32).to(dtype), bias_ref).backward(grad_out)
    _assert_grads_close(A.grad, A_ref.grad, dtype, "grad A")
    _assert_grads_close(bias.grad, bias_ref.grad, dtype, "grad bias")


@pytest.mark.parametrize("is_training", [True, False], ids=["train", "eval"])
def test_int8_matmul_fp16_weights_get_straight_through_gradient(is_training):
    W = _weight().requires_grad_(True)
    state = MatmulLtState(has_fp16_weights=True, is_training=is_training)
    A = _input((2, 3, K), torch.float32, requires_grad=True)
    grad_out = torch.randn(2, 3, N, generator=_gen(3))
    matmul(A, W, state=state).backward(grad_out)

    # the weight is quantized for the product; its gradient is the dense one (straight-through)
    CB, SCB, _ = LF.int8_vectorwise_quant(W.detach().half())
    assert torch.equal(state.CB, CB) and torch.equal(state.SCB, SCB)
    torch.testing.assert_close(
        W.grad, grad_out.reshape(-1, N).t() @ A.detach().reshape(-1, K), rtol=1e-5, atol=1e-5
    )
    torch.testing.assert_close(A.grad, grad_out @ _dequantized(CB, SCB, torch.float32), rtol=1e-5, atol=1e-5)


def test_int8_matmul_fp16_weights_are_requantized_after_an_update():
    W = _weight()
    state = MatmulLtState(has_fp16_weights=True, is_training=False)
    A = _input((3, K), torch.float32)
    before = matmul(A, W, state=state)
    with torch.no_grad():
        W.mul_(2.0)
    after = matmul(A, W, state=state)
    torch.testing.assert_close(after, 2 * before, rtol=1e-2, atol=1e-2)


def test_int8_matmul_quantizes_a_float_weight_and_accepts_out():
    W = _weight()
    A = _input((3, K), torch.float32)
    out = torch.empty(3, N)
    state = MatmulLtState(is_training=False)
    result = matmul(A, W, out=out, state=state)
    assert result is out
    CB, SCB = _int8_weight()
    assert torch.equal(state.CB, CB) and torch.equal(state.SCB, SCB)
    expected = matmul(A, CB, state=MatmulLtState(CB=CB, SCB=SCB, is_training=False))
    assert torch.equal(out, expected)


@pytest.mark.parametrize("is_training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("threshold", [0.0, 6.0])
def test_int8_matmul_takes_the_weight_from_the_state_in_either_orientation(is_training, threshold):
    """With state.CB set, B may be passed as CB.t() (as bitsandbytes' older callers do)."""
    CB, SCB = _int8_weight()
    A = _input((4, K), torch.float16, requires_grad=is_training)
    A.data[:, 3] = 8.0  # an outlier column for the threshold case

    def product(B):
        state = MatmulLtState(CB=CB, SCB=SCB, has_fp16_weights=False, is_training=is_training)
        return matmul(A, B, state=state, threshold=threshold)

    assert torch.equal(product(CB.t()), product(CB))


def test_int8_matmul_empty_input():
    CB, SCB = _int8_weight()
    A = torch.empty(0, K, requires_grad=True)
    out = matmul(A, CB, state=MatmulLtState(CB=CB, SCB=SCB, has_fp16_weights=False, is_training=False))
    assert out.shape == (0, N)


def test_int8_matmul_rejects_bad_arguments():
    CB, SCB = _int8_weight()
    A = _input((2, K), torch.float32)
    state = MatmulLtState(CB=CB, SCB=SCB, has_fp16_weights=False)
    with pytest.raises(ValueError, match="threshold"):
        matmul(A, CB, state=state, threshold=-1.0)
    with pytest.raises(ValueError, match="threshold"):
        matmul(A, CB, state=state, threshold=float("nan"))
    with pytest.raises(TypeError, match="state"):
        matmul(A, CB, state={"CB": CB})
    with pytest.raises(ValueError, match="B must be"):
        matmul(A, CB[:, :-1], state=MatmulLtState())
    with pytest.raises(ValueError, match="state.CB must be .* B that weight or its transpose"):
        matmul(A, CB[:-1], state=state)
    with pytest.raises(ValueError, match="SCB"):
        matmul(A, CB, state=MatmulLtState(has_fp16_weights=False))
    with pytest.raises(TypeError, match="bias"):
        matmul(A, CB, state=state, bias=[0.0] * N)


def test_matmul_lt_state_fields_and_deprecated_attributes():
    state = MatmulLtState()
    assert (state.threshold, state.is_training, state.has_fp16_weights, state.use_pool) == (
        0.0,
        True,
        True,
        False,
    )
    state.CB, state.SCB = _int8_weight()
    state.reset_grads()
    assert state.CB is None and state.SCB is None
    with pytest.warns(FutureWarning):
        assert state.CxB is None
    with pytest.raises(AttributeError):
        _ = state.not_a_field
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert MatmulLtState(threshold=6.0).threshold == 6.0


def test_bitsandbytes_import_path():
    from lowbit.autograd import _functions

    assert _functions.matmul is matmul and _functions.MatmulLtState is MatmulLtState
