"""LLM.int8: vectorwise quantization with outlier columns, int8 matmul and its dequantization."""

from __future__ import annotations

from itertools import product

import pytest
import torch

from .conftest import FLOAT_DTYPES, B, L, assert_identical, case_seed, dtype_name

pytestmark = pytest.mark.compat

THRESHOLDS = (0.0, 2.5, 6.0)


def _just_below(value: float, dtype: torch.dtype) -> torch.Tensor:
    """The largest ``dtype`` value below ``value`` (toward zero)."""
    v = torch.tensor(value, dtype=dtype)
    return torch.nextafter(v, torch.zeros_like(v))


def _matrix(kind: str, dtype: torch.dtype) -> torch.Tensor:
    """2-D inputs for int8_vectorwise_quant, named by what they exercise."""
    gen = torch.Generator().manual_seed(case_seed(kind, dtype))
    randn = lambda *shape: torch.randn(*shape, generator=gen)  # noqa: E731
    if kind == "gaussian":  # a few |x| > 2.5 by chance, none > 6
        x = randn(8, 64).clamp(-5.0, 5.0)
    elif kind == "no_outliers":
        x = torch.rand(8, 64, generator=gen) * 4.0 - 2.0
    elif kind == "outliers":  # outlier columns 3, 10 and 40
        x = randn(16, 64).clamp(-2.0, 2.0)
        x[:, 3] *= 8.0
        x[5, 10] = -12.0
        x[2, 40] = 7.0
    elif kind == "zero_rows":  # row 3 all zero; row 6 zero once its outlier is taken out
        x = randn(8, 64).clamp(-2.0, 2.0)
        x[3] = 0.0
        x[6] = 0.0
        x[6, 7] = 9.0
    elif kind == "single_row":
        x = randn(1, 64) * 3.0
    elif kind == "odd_shape":
        x = randn(33, 17) * 3.0
    elif kind == "wide_range":  # row maxima from ~1e4 down to float16 subnormals
        x = randn(4, 64) * torch.tensor([[1e4], [1e-3], [1e-6], [100.0]])
    elif kind != "at_threshold":
        raise ValueError(kind)
    if kind == "at_threshold":  # exactly on and just below both thresholds, in the input dtype
        x = randn(8, 64).clamp(-2.0, 2.0).to(dtype)
        for row, (value, sign) in enumerate(product((2.5, 6.0), (1, -1))):
            x[row, row + 1] = sign * value
            x[row + 4, row + 9] = sign * _just_below(value, dtype)
        return x
    return x.to(dtype)


KINDS = (
    "gaussian",
    "no_outliers",
    "outliers",
    "zero_rows",
    "single_row",
    "odd_shape",
    "wide_range",
    "at_threshold",
)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("threshold", THRESHOLDS, ids=lambda t: f"threshold{t}")
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_name)
def test_int8_vectorwise_quant_and_dequant(backend, dtype, threshold, kind):
    x = _matrix(kind, dtype)
    original = x.clone()
    # bitsandbytes zeroes the outliers of its input while it works (then restores them): give it a copy
    expected = B.int8_vectorwise_quant(x.clone(), threshold)
    actual = L.int8_vectorwise_quant(x, threshold)
    assert_identical(x, original, "the input after lowbit's int8_vectorwise_quant")
    for name, a, e in zip(("int8 matrix", "row_stats", "outlier_cols"), actual, expected):
        assert_identical(a, e, name)

    q, row_stats = expected[0], expected[1]
    assert_identical(
        L.int8_vectorwise_dequant(q, row_stats), B.int8_vectorwise_dequant(q, row_stats), "dequant"
    )


# (rows of A, rows of B, K). bitsandbytes' CPU fallback multiplies in float32, exact only while
# every |sum| < 2**24: K <= 256 keeps even all-(-128) inputs below that (256 * 128 * 128 = 2**22).
MATMUL_SHAPES = [(1, 8, 64), (16, 24, 64), (33, 5, 17), (4, 4, 256)]


def _int8_operands(m, n, k, kind):
    gen = torch.Generator().manual_seed(case_seed(m, n, k, kind))
    if kind == "extreme":
        return torch.full((m, k), -128, dtype=torch.int8), torch.full((n, k), -128, dtype=torch.int8)
    a = torch.randint(-128, 128, (m, k), generator=gen, dtype=torch.int8)
    b = torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int8)
    return a, b


@pytest.mark.parametrize("kind", ("random", "extreme"))
@pytest.mark.parametrize("m, n, k", MATMUL_SHAPES, ids=lambda v: str(v))
def test_int8_linear_matmul(backend, m, n, k, kind):
    a, b = _int8_operands(m, n, k, kind)
    assert_identical(L.int8_linear_matmul(a, b), B.int8_linear_matmul(a, b), "int32 product")


@pytest.mark.parametrize(
    "bias", (None, torch.float16, torch.float32), ids=lambda d: f"bias_{dtype_name(d) if d else 'none'}"
)
@pytest.mark.parametrize("m, n, k", MATMUL_SHAPES, ids=lambda v: str(v))
def test_int8_mm_dequant(backend, m, n, k, bias):
    """The LLM.int8 path end to end: quantize both operands, int8 product, dequantize (+ bias)."""
    gen = torch.Generator().manual_seed(case_seed(m, n, k))
    a = (torch.randn(m, k, generator=gen) * 2).half()
    w = (torch.randn(n, k, generator=gen) * 0.1).half()
    qa, row_stats, _ = B.int8_vectorwise_quant(a.clone())
    qw, col_stats, _ = B.int8_vectorwise_quant(w.clone())
    product_i32 = B.int8_linear_matmul(qa, qw)
    bias_vector = None if bias is None else torch.randn(n, generator=gen).to(bias)
    assert_identical(
        L.int8_mm_dequant(product_i32, row_stats, col_stats, bias=bias_vector),
        B.int8_mm_dequant(product_i32, row_stats, col_stats, bias=bias_vector),
        "dequantized product",
    )
