"""LLM.int8 ops on the GPU: row-wise int8 quantization with outlier columns and the float
epilogues through the GPU library (csrc/cuda/int8.cu); the int8 x int8 -> int32 product is
``torch._int_mm`` (cuBLASLt / hipBLASLt), exact like the reference's int32 matmul.

``torch._int_mm`` wants more than 16 rows and inner and output sizes that are multiples of 8;
other shapes are zero-padded (exact: padding adds zero products), and where ``_int_mm`` is not
available at all the product is taken in float64, which is exact for int8 inputs up to K = 2**37.
"""

from __future__ import annotations

import torch

from ...core import formats
from ...core.registry import KernelTable
from ..reference import int8 as reference
from .native import DTYPES, GpuLibrary, buf, ptr


def _round_up(value: int, multiple: int) -> int:
    return (value + multiple - 1) // multiple * multiple


def _pad(t: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    if tuple(t.shape) == (rows, cols):
        return t
    padded = t.new_zeros((rows, cols))
    padded[: t.shape[0], : t.shape[1]] = t
    return padded


def int_mm(A2d: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Exact ``A2d @ B.T`` for int8 (M, K) and (N, K), as int32 (M, N)."""
    M, K = A2d.shape
    N = B.shape[0]
    try:
        rows, inner, cols = max(M, 17), _round_up(K, 8), _round_up(N, 8)
        product = torch._int_mm(_pad(A2d, rows, inner), _pad(B, cols, inner).t())
        return product[:M, :N].contiguous() if (rows, cols) != (M, N) else product
    except (RuntimeError, NotImplementedError):
        return (A2d.double() @ B.double().t()).to(torch.int32)


def _threshold_in_dtype(threshold: float, dtype: torch.dtype) -> float:
    """The reference compares |x| >= threshold in A's dtype: round the threshold the same way."""
    return float(torch.tensor(threshold, dtype=torch.float64).to(dtype).float())


def install(kernels: KernelTable, gpu: GpuLibrary) -> None:
    def quantize_rows(A2d: torch.Tensor, threshold: float, with_columns: bool):
        rows, cols = A2d.shape
        q = torch.empty((rows, cols), dtype=torch.int8, device=A2d.device)
        row_stats = torch.empty(rows, dtype=torch.float32, device=A2d.device)
        flags = torch.empty(cols, dtype=torch.uint8, device=A2d.device) if with_columns and threshold > 0 else None
        gpu.call(
            "lowbit_cuda_int8_vectorwise_quant", A2d.device,
            DTYPES[A2d.dtype], ptr(A2d), rows, cols, _threshold_in_dtype(threshold, A2d.dtype) if threshold > 0 else 0.0,
            ptr(q), *buf(row_stats), *buf(flags),
        )  # fmt: skip
        return q, row_stats, flags

    @kernels.register("int8_vectorwise_quant")
    def int8_vectorwise_quant(A: torch.Tensor, threshold: float = 0.0):
        A2d = A.reshape(-1, A.shape[-1])
        q, row_stats, flags = quantize_rows(A2d, threshold, with_columns=True)
        outlier_cols = torch.nonzero(flags).view(-1) if flags is not None else None
        return q.reshape(A.shape), row_stats, outlier_cols

    @kernels.register("int8_vectorwise_dequant")
    def int8_vectorwise_dequant(A: torch.Tensor, stats: torch.Tensor):
        out = torch.empty(A.shape, dtype=torch.float32, device=A.device)
        cols = A.shape[-1]
        gpu.call(
            "lowbit_cuda_int8_vectorwise_dequant", A.device,
            ptr(A), *buf(stats), A.numel() // cols, cols, formats.INT8_DEQUANT_SCALE, ptr(out),
        )  # fmt: skip
        return out

    @kernels.register("int8_double_quant")
    def int8_double_quant(A: torch.Tensor, threshold: float = 0.0):
        q_rows, row_stats, outlier_cols = int8_vectorwise_quant(A, threshold)
        A2d = A.reshape(-1, A.shape[-1])
        q_cols_t, col_stats, _ = quantize_rows(A2d.t().contiguous(), threshold, with_columns=False)
        return q_rows, q_cols_t.t().contiguous().reshape(A.shape), row_stats, col_stats, outlier_cols

    @kernels.register("int8_linear_matmul")
    def int8_linear_matmul(A: torch.Tensor, B: torch.Tensor):
        return int_mm(A.reshape(-1, A.shape[-1]), B).reshape(*A.shape[:-1], B.shape[0])

    @kernels.register("int8_linear_matmul.out")
    def int8_linear_matmul_out(A, B, out):
        out.copy_(int8_linear_matmul(A, B))

    @kernels.register("int8_mm_dequant")
    def int8_mm_dequant(A, row_stats, col_stats, dtype=None, bias=None):
        dtype = dtype or torch.float16
        if bias is not None and bias.dtype not in DTYPES:
            return reference.int8_mm_dequant(A, row_stats, col_stats, dtype, bias)
        out = torch.empty(A.shape, dtype=dtype, device=A.device)
        cols = A.shape[-1]
        gpu.call(
            "lowbit_cuda_int8_mm_dequant", A.device,
            ptr(A), *buf(row_stats), *buf(col_stats), A.numel() // cols, cols, formats.INT8_MM_DEQUANT_SCALE,
            *buf(bias), DTYPES[bias.dtype] if bias is not None else 0, DTYPES[dtype], ptr(out),
        )  # fmt: skip
        return out

    @kernels.register("int8_scaled_mm")
    def int8_scaled_mm(A, B, row_stats, col_stats, bias=None, dtype=None):
        return int8_mm_dequant(int8_linear_matmul(A, B), row_stats, col_stats, dtype or torch.float16, bias)

    kernels.register("int8_mixed_scaled_mm")(reference.mixed_scaled_mm(int8_scaled_mm, int8_vectorwise_dequant))
