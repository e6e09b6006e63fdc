"""LLM.int8 through the native library (csrc/cpu/int8.cpp): the exact int8 x int8 -> int32
product (AVX-512 VNNI / AVX2 / scalar) and the row-wise quantization and float epilogues,
bit-exact with the reference backend (``lowbit/backends/reference/int8.py``; the per-element
definition the kernels share with csrc/cuda is csrc/common/lowbit_int8.h).

Arguments arrive validated by ``core/ops.py`` (dtypes, sizes, contiguity), so every tensor here is
contiguous and a pointer can be taken directly. Two cases stay with the reference kernel, because
the native one would compute something else:

* a threshold > 0 that rounds to 0 in A's dtype (e.g. 1e-50): the reference then compares
  ``|x| >= 0``, which makes every element an outlier;
* an ``int8_mm_dequant`` bias whose dtype is not float32/float16/bfloat16 (float64 promotes the
  whole sum to float64, an integer bias is added after its own conversion) or that is not 1-D
  (broadcasting of another shape is the reference's business).
"""

from __future__ import annotations

from typing import Optional

import torch

from ...core import formats
from ..reference import int8 as reference
from . import kernels, native


def _threshold_in_dtype(threshold: float, dtype: torch.dtype) -> float:
    """The reference compares ``|x| >= threshold`` in A's dtype: round the threshold the same way
    (torch converts the Python number to A's dtype through float32). +Inf means no outliers."""
    return float(torch.tensor(threshold, dtype=torch.float64).to(dtype).float())


def _native_threshold(threshold: float, dtype: torch.dtype) -> Optional[float]:
    """The threshold the kernel gets (0: no outliers), or None when only the reference is right."""
    if threshold <= 0.0:
        return 0.0
    t = _threshold_in_dtype(threshold, dtype)
    if t == 0.0:
        return None  # |x| >= 0 holds everywhere
    return 0.0 if t == float("inf") else t  # no finite |x| reaches +Inf


def _quantize_rows(A2d: torch.Tensor, threshold: float, with_columns: bool):
    rows, cols = A2d.shape
    q = torch.empty((rows, cols), dtype=torch.int8)
    row_stats = torch.empty(rows, dtype=torch.float32)
    flags = torch.empty(cols, dtype=torch.uint8) if with_columns else None
    native.check(
        native.lib().lowbit_int8_vectorwise_quant(
            native.DTYPES[A2d.dtype], native.ptr(A2d), rows, cols, threshold, native.ptr(q), *native.buf(row_stats),
            *native.buf(flags), native.num_threads(),
        ),
        "lowbit_int8_vectorwise_quant",
    )  # fmt: skip
    return q, row_stats, flags


@kernels.register("int8_vectorwise_quant")
def int8_vectorwise_quant(A: torch.Tensor, threshold: float = 0.0):
    t = _native_threshold(threshold, A.dtype)
    if t is None:
        return reference.int8_vectorwise_quant(A, threshold)
    A2d = A.reshape(-1, A.shape[-1])
    q, row_stats, flags = _quantize_rows(A2d, t, with_columns=threshold > 0.0)
    outlier_cols = torch.nonzero(flags).view(-1) if flags is not None else None
    return q.view(A.shape), row_stats, outlier_cols


@kernels.register("int8_vectorwise_dequant")
def int8_vectorwise_dequant(A: torch.Tensor, stats: torch.Tensor):
    out = torch.empty(A.shape, dtype=torch.float32)
    cols = A.shape[-1]
    native.check(
        native.lib().lowbit_int8_vectorwise_dequant(
            native.ptr(A), *native.buf(stats), A.numel() // cols, cols, formats.INT8_DEQUANT_SCALE, native.ptr(out),
            native.num_threads(),
        ),
        "lowbit_int8_vectorwise_dequant",
    )  # fmt: skip
    return out


@kernels.register("int8_double_quant")
def int8_double_quant(A: torch.Tensor, threshold: float = 0.0):
    t = _native_threshold(threshold, A.dtype)
    if t is None:
        return reference.int8_double_quant(A, threshold)
    q_rows, row_stats, outlier_cols = int8_vectorwise_quant(A, threshold)
    A2d = A.reshape(-1, A.shape[-1])
    rows, cols = A2d.shape
    q_cols = torch.empty(A.shape, dtype=torch.int8)
    col_stats = torch.empty(cols, dtype=torch.float32)
    native.check(
        native.lib().lowbit_int8_colwise_quant(
            native.DTYPES[A.dtype], native.ptr(A2d), rows, cols, t, native.ptr(q_cols), *native.buf(col_stats),
            native.num_threads(),
        ),
        "lowbit_int8_colwise_quant",
    )  # fmt: skip
    return q_rows, q_cols, row_stats, col_stats, outlier_cols


def _matmul(A: torch.Tensor, B: torch.Tensor, out: torch.Tensor) -> None:
    K = A.shape[-1]
    native.check(
        native.lib().lowbit_int8_linear_matmul(
            native.ptr(A), A.numel() // K, K, native.ptr(B), B.shape[0], native.ptr(out), native.num_threads()
        ),
        "lowbit_int8_linear_matmul",
    )


@kernels.register("int8_linear_matmul")
def int8_linear_matmul(A: torch.Tensor, B: torch.Tensor):
    out = torch.empty((*A.shape[:-1], B.shape[0]), dtype=torch.int32)
    _matmul(A, B, out)
    return out


@kernels.register("int8_linear_matmul.out")
def int8_linear_matmul_out(A, B, out):
    _matmul(A, B, out)


@kernels.register("int8_mm_dequant")
def int8_mm_dequant(A, row_stats, col_stats, dtype=None, bias=None):
    dtype = dtype or torch.float16
    if bias is not None and (bias.dtype not in native.DTYPES or bias.dim() != 1):
        return reference.int8_mm_dequant(A, row_stats, col_stats, dtype, bias)
    out = torch.empty(A.shape, dtype=dtype)
    cols = A.shape[-1]
    native.check(
        native.lib().lowbit_int8_mm_dequant(
            native.ptr(A), *native.buf(row_stats), *native.buf(col_stats), A.numel() // cols, cols,
            formats.INT8_MM_DEQUANT_SCALE, *native.buf(bias), native.DTYPES[bias.dtype] if bias is not None else 0,
            native.DTYPES[dtype], native.ptr(out), native.num_threads(),
        ),
        "lowbit_int8_mm_dequant",
    )  # fmt: skip
    return out


@kernels.register("int8_scaled_mm")
def int8_scaled_mm(A, B, row_stats, col_stats, bias=None, dtype=None):
    return int8_mm_dequant(int8_linear_matmul(A, B), row_stats, col_stats, dtype or torch.float16, bias)


# LLM.int8 forward: the native int8 product of the regular columns plus the 16-bit product of the
# outlier columns, the same operations as the reference
kernels.register("int8_mixed_scaled_mm")(reference.mixed_scaled_mm(int8_scaled_mm, int8_vectorwise_dequant))
