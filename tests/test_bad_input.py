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
