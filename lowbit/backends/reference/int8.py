"""LLM.int8: row-wise int8 quantization with outlier columns, exact int32 products, docs/design.md §4."""

from __future__ import annotations

from typing import Optional

import torch

from ...core import formats
from . import kernels


def _outliers(A2d: torch.Tensor, threshold: float) -> Optional[torch.Tensor]:
    """Mask of |x| >= threshold, compared in A's own dtype (as bitsandbytes does)."""
    return A2d.abs() >= threshold if threshold > 0.0 else None


def _quantize_rows(A2d: torch.Tensor, mask: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """q = round(x * 127 / rowmax) with outliers zeroed first; an all-zero row quantizes to 0."""
    if mask is not None:
        A2d = A2d.masked_fill(mask, 0.0)
    row_stats = A2d.abs().amax(dim=1).float()
    scale = torch.where(row_stats > 0, 127.0 / row_stats, torch.zeros_like(row_stats))
    return torch.round(A2d * scale.unsqueeze(1)).to(torch.int8), row_stats


@kernels.register("int8_vectorwise_quant")
def int8_vectorwise_quant(A: torch.Tensor, threshold: float = 0.0):
    A2d = A.reshape(-1, A.shape[-1])
    mask = _outliers(A2d, threshold)
    q, row_stats = _quantize_rows(A2d, mask)
    outlier_cols = None
    if mask is not None:
        outlier_cols = torch.argwhere(mask.any(dim=0)).view(-1)
        q[:, outlier_cols] = 0  # outlier columns go through the 16-bit product instead
    return q.reshape(A.shape), row_stats, outlier_cols


@kernels.register("int8_vectorwise_dequant")
def int8_vectorwise_dequant(A: torch.Tensor, stats: torch.Tensor):
    A2d = A.reshape(-1, A.shape[-1])
    return (A2d * stats.view(-1, 1) * formats.INT8_DEQUANT_SCALE).reshape(A.shape)


@kernels.register("int8_double_quant")
def int8_double_quant(A: torch.Tensor, threshold: float = 0.0):
    """Row-wise and column-wise int8 quantization of the same matrix (for training)."""
    q_rows, row_stats, outlier_cols = int8_vectorwise_quant(A, threshold)
    A2d = A.reshape(-1, A.shape[-1])
    q_cols_t, col_stats = _quantize_rows(A2d.t(), None if threshold <= 0.0 else _outliers(A2d.t(), threshold))
    return q_rows, q_cols_t.t().contiguous().reshape(A.shape), row_stats, col_stats, outlier_cols


@kernels.register("int8_linear_matmul")
def int8_linear_matmul(A: torch.Tensor, B: torch.Tensor):
    """A @ B.T in exact int32 arithmetic (K <= formats.INT8_MATMUL_MAX_K, checked by the op: no overflow)."""
    A2d = A.reshape(-1, A.shape[-1]).to(torch.int32)
    return (A2d @ B.to(torch.int32).t()).reshape(*A.shape[:-1], B.shape[0])


@kernels.register("int8_linear_matmul.out")
def int8_linear_matmul_out(A, B, out):
    out.copy_(int8_linear_matmul(A, B))


@kernels.register("int8_mm_dequant")
def int8_mm_dequant(A, row_stats, col_stats, dtype=None, bias=None):
    A2d = A.reshape(-1, A.shape[-1])
    out = A2d * (row_stats.view(-1, 1) * col_stats.view(1, -1)) * formats.INT8_MM_DEQUANT_SCALE
    if bias is not None:
        out = out + bias
    return out.to(dtype or torch.float16).reshape(A.shape)


@kernels.register("int8_scaled_mm")
def int8_scaled_mm(A, B, row_stats, col_stats, bias=None, dtype=None):
    return int8_mm_dequant(int8_linear_matmul(A, B), row_stats, col_stats, dtype or torch.float16, bias)


def mixed_scaled_mm(scaled_mm, vectorwise_dequant):
    """int8_mixed_scaled_mm built on a backend's ``int8_scaled_mm`` and ``int8_vectorwise_dequant``
    kernels (the outlier product is a torch addmm on any device)."""

    def int8_mixed_scaled_mm(A, CA, CB, SCA, SCB, outlier_cols=None, bias=None):
        """LLM.int8 forward: int8 product of the regular columns + 16-bit product of the outlier columns."""
        out = scaled_mm(CA, CB, SCA, SCB, bias, A.dtype)
        A2d = A.reshape(-1, A.shape[-1])
        if outlier_cols is None or outlier_cols.numel() == 0:
            return out, A2d.new_empty((A2d.shape[0], 0))
        sub_a = A2d[:, outlier_cols].contiguous()
        sub_b = vectorwise_dequant(CB[:, outlier_cols].contiguous(), SCB).to(A.dtype)
        out2d = out.reshape(-1, out.shape[-1]).addmm(sub_a, sub_b.t())
        return out2d.reshape(out.shape), sub_a

    return int8_mixed_scaled_mm


int8_mixed_scaled_mm = kernels.register("int8_mixed_scaled_mm")(mixed_scaled_mm(int8_scaled_mm, int8_vectorwise_dequant))
