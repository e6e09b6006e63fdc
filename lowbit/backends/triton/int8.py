"""LLM.int8 as Triton kernels, every output bit-exact with the reference
(lowbit/backends/reference/int8.py; per element as csrc/common/lowbit_int8.h states it):

* outlier element: ``|x| >= t`` when threshold > 0, compared in A's dtype (the kernel rounds the
  threshold to A's dtype through float32, as torch does a Python number: 1e-50 becomes 0 and makes
  every element an outlier, 1e10 becomes +Inf in float16 and makes none); a column holding one is
  an outlier column, zero in the row-wise int8 matrix;
* row_stats = max |x| over the row's other elements; scale = (1 / row_stats) * 127 (torch's
  ``127.0 / t``), 0 for an all-zero row; q = round-half-even(x * scale), and 0 where x * scale is
  not finite (a row max below 2**-128 makes the scale +Inf: torch's float -> int8 cast gives 0);
* dequantize ``(q * stat) * (1/127)``; mm dequantize ``(acc * (row * col)) * (1/127**2)`` [+ bias].

The int8 x int8 -> int32 product is ``torch._int_mm`` where torch has it for the device (CUDA, and
XPU from torch 2.7), zero-padded to its shape rules like the cuda backend; elsewhere (and on CPU
tensors under the interpreter) a Triton GEMM (``tl.dot`` of int8 tiles into int32, exact).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...core import formats
from ...core.registry import KernelTable
from ..cuda.int8 import int_mm as padded_int_mm
from ..reference import int8 as reference
from .runtime import EXACT, autotune, cast_to, on_device, per_program, to_float32

# Round half to even of |y| < 2**22 in float32: adding 1.5 * 2**23 leaves no fraction bits.
_ROUNDING = 12582912.0


@triton.jit
def _outliers(x, threshold, HAS_THRESHOLD: tl.constexpr):
    """|x| >= threshold in x's dtype, x (and the result) as float32 (both sides widen exactly)."""
    if HAS_THRESHOLD:
        # a float argument is float32 in a compiled kernel, a Python float in the interpreter
        t = to_float32(cast_to(tl.full([], threshold, tl.float32), x.dtype))
        return tl.abs(to_float32(x)) >= t
    return tl.zeros(x.shape, dtype=tl.int1)


@triton.jit
def _row_stats(A, stride_r, stride_c, rows, cols, threshold, row_stats, flags, HAS_THRESHOLD: tl.constexpr,
               WITH_FLAGS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):  # fmt: skip
    # Layout: program p owns rows p*BLOCK_R .. +BLOCK_R (rows of A, or its columns through the
    # strides) and walks their columns BLOCK_C at a time; an outlier column is flagged by a store
    # of 1 from any program that meets one (idempotent).
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    m = tl.zeros([BLOCK_R], dtype=tl.float32)
    for c0 in range(0, cols, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        inside = (r[:, None] < rows) & (c[None, :] < cols)
        x = tl.load(A + r.to(tl.int64)[:, None] * stride_r + c[None, :] * stride_c, mask=inside, other=0.0)
        outlier = _outliers(x, threshold, HAS_THRESHOLD) & inside
        m = tl.maximum(m, tl.max(tl.where(outlier, 0.0, tl.abs(to_float32(x))), axis=1))
        if WITH_FLAGS:
            tl.store(flags + c, tl.full([BLOCK_C], 1, tl.uint8), mask=tl.max(outlier.to(tl.int32), axis=0) > 0)
    tl.store(row_stats + r, m, mask=r < rows)


@triton.jit
def _quantize_rows(A, stride_r, stride_c, rows, cols, threshold, row_stats, flags, q, HAS_THRESHOLD: tl.constexpr,
                   WITH_FLAGS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):  # fmt: skip
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    inside = (r[:, None] < rows) & (c[None, :] < cols)
    offs = r.to(tl.int64)[:, None] * stride_r + c[None, :] * stride_c
    x = tl.load(A + offs, mask=inside, other=0.0)
    stat = tl.load(row_stats + r, mask=r < rows, other=0.0)
    scale = tl.where(stat > 0.0, tl.div_rn(1.0, stat) * 127.0, 0.0)
    y = to_float32(x) * scale[:, None]
    rounded = (y + _ROUNDING) - _ROUNDING
    zero = _outliers(x, threshold, HAS_THRESHOLD) | ~(tl.abs(y) < 128.0)  # |y| <= 127 unless not finite
    if WITH_FLAGS:
        zero |= (tl.load(flags + c, mask=c < cols, other=0) != 0)[None, :]
    tl.store(q + offs, tl.where(zero, 0.0, rounded).to(tl.int8), mask=inside)


@triton.jit
def _vectorwise_dequant(A, stats, out, n, cols, scale, TILE_SIZE: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * TILE_SIZE + tl.arange(0, TILE_SIZE)
    inside = offs < n
    q = tl.load(A + offs, mask=inside, other=0).to(tl.float32)
    tl.store(out + offs, (q * tl.load(stats + offs // cols, mask=inside)) * scale, mask=inside)


@triton.jit
def _mm_dequant(A, row_stats, col_stats, bias, out, rows, cols, scale, HAS_BIAS: tl.constexpr,
                BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):  # fmt: skip
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    inside = (r[:, None] < rows) & (c[None, :] < cols)
    offs = r.to(tl.int64)[:, None] * cols + c[None, :]
    acc = tl.load(A + offs, mask=inside, other=0).to(tl.float32)
    stat = tl.load(row_stats + r, mask=r < rows, other=0.0)[:, None] * tl.load(col_stats + c, mask=c < cols, other=0.0)
    value = (acc * stat) * scale
    if HAS_BIAS:
        value += to_float32(tl.load(bias + c, mask=c < cols, other=0.0))[None, :]
    tl.store(out + offs, cast_to(value, out.dtype.element_ty), mask=inside)


@autotune(
    configs=[
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in (
            (128, 128, 64, 8, 3), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4), (64, 64, 128, 4, 3), (32, 64, 128, 4, 3),
            (16, 64, 256, 4, 3),
        )
    ],
    key=["M", "N", "K"],
    interpreted={
        "BLOCK_M": lambda args: min(64, max(16, triton.next_power_of_2(args["M"]))),
        "BLOCK_N": lambda args: min(64, max(16, triton.next_power_of_2(args["N"]))),
        "BLOCK_K": lambda args: min(2048, max(16, triton.next_power_of_2(args["K"]))),
    },
)  # fmt: skip
@triton.jit
def _int8_gemm(A, B, C, M, N, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # Layout: program (i, j) computes C[i*BLOCK_M:, j*BLOCK_N:] = A[rows] @ B[cols].T over K in
    # BLOCK_K steps; B (N, K) is read as [BLOCK_K, BLOCK_N] tiles. Zero padding keeps it exact.
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(A + rows.to(tl.int64)[:, None] * K + ks[None, :], mask=(rows[:, None] < M) & (ks[None, :] < K), other=0)
        b = tl.load(B + cols.to(tl.int64)[None, :] * K + ks[:, None], mask=(cols[None, :] < N) & (ks[:, None] < K), other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
    tl.store(C + rows.to(tl.int64)[:, None] * N + cols[None, :], acc, mask=(rows[:, None] < M) & (cols[None, :] < N))


def _torch_has_int_mm(device: torch.device) -> bool:
    """torch._int_mm exists for this GPU's dispatch key (CUDA; XPU from torch 2.7). CPU tensors
    (the interpreter) take the Triton GEMM: oneDNN's AVX2 _int_mm saturates."""
    return device.type != "cpu" and torch._C._dispatch_has_kernel_for_dispatch_key("aten::_int_mm", device.type.upper())


def int_mm(A2d: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Exact ``A2d @ B.T`` for int8 (M, K) and (N, K), as int32 (M, N)."""
    if _torch_has_int_mm(A2d.device):
        return padded_int_mm(A2d, B)
    M, K = A2d.shape
    N = B.shape[0]
    C = torch.empty((M, N), dtype=torch.int32, device=A2d.device)
    with on_device(A2d):
        _int8_gemm[lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"]))](A2d, B, C, M, N, K)
    return C


def _row_tile(rows: int, cols: int) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_C) of the row-wise kernels: up to 256 columns, TILE elements."""
    block_c = min(256, triton.next_power_of_2(cols))
    return per_program(rows, block_c), block_c


def _quantize(A2d: torch.Tensor, transpose: bool, threshold: float, with_flags: bool):
    """Row-wise int8 quantization of A2d, or of A2d.T (its columns) written in A2d's layout."""
    rows, cols = A2d.shape[::-1] if transpose else A2d.shape
    strides = (1, rows) if transpose else (cols, 1)
    row_stats = torch.empty(rows, dtype=torch.float32, device=A2d.device)
    flags = torch.zeros(cols, dtype=torch.uint8, device=A2d.device) if with_flags else None
    q = torch.empty(A2d.shape, dtype=torch.int8, device=A2d.device)
    block_r, block_c = _row_tile(rows, cols)
    meta = dict(HAS_THRESHOLD=threshold > 0.0, WITH_FLAGS=with_flags, BLOCK_R=block_r, BLOCK_C=block_c, **EXACT)
    with on_device(A2d):
        _row_stats[(triton.cdiv(rows, block_r),)](A2d, *strides, rows, cols, threshold, row_stats, flags, **meta)
        grid = (triton.cdiv(rows, block_r), triton.cdiv(cols, block_c))
        _quantize_rows[grid](A2d, *strides, rows, cols, threshold, row_stats, flags, q, **meta)
    return q, row_stats, flags


def install(kernels: KernelTable) -> None:
    @kernels.register("int8_vectorwise_quant")
    def int8_vectorwise_quant(A: torch.Tensor, threshold: float = 0.0):
        A2d = A.reshape(-1, A.shape[-1])
        q, row_stats, flags = _quantize(A2d, False, threshold, with_flags=threshold > 0.0)
        outlier_cols = torch.nonzero(flags).view(-1) if flags is not None else None
        return q.view(A.shape), row_stats, outlier_cols

    @kernels.register("int8_double_quant")
    def int8_double_quant(A: torch.Tensor, threshold: float = 0.0):
        q_rows, row_stats, outlier_cols = int8_vectorwise_quant(A, threshold)
        q_cols, col_stats, _ = _quantize(A.reshape(-1, A.shape[-1]), True, threshold, with_flags=False)
        return q_rows, q_cols.view(A.shape), row_stats, col_stats, outlier_cols

    @kernels.register("int8_vectorwise_dequant")
    def int8_vectorwise_dequant(A: torch.Tensor, stats: torch.Tensor):
        out = torch.empty(A.shape, dtype=torch.float32, device=A.device)
        tile = per_program(A.numel())
        with on_device(A):
            _vectorwise_dequant[(triton.cdiv(A.numel(), tile),)](
                A, stats, out, A.numel(), A.shape[-1], formats.INT8_DEQUANT_SCALE, TILE_SIZE=tile, **EXACT
            )
        return out

    @kernels.register("int8_linear_matmul")
    def int8_linear_matmul(A: torch.Tensor, B: torch.Tensor):
        return int_mm(A.reshape(-1, A.shape[-1]), B).reshape(*A.shape[:-1], B.shape[0])

    @kernels.register("int8_linear_matmul.out")
    def int8_linear_matmul_out(A, B, out):
        out.copy_(int8_linear_matmul(A, B))

    @kernels.register("int8_mm_dequant")
    def int8_mm_dequant(A, row_stats, col_stats, dtype=None, bias=None):
        dtype = dtype or torch.float16
        if bias is not None and bias.dtype not in formats.FLOAT_DTYPES:
            return reference.int8_mm_dequant(A, row_stats, col_stats, dtype, bias)  # float64 sums: the reference's
        cols = A.shape[-1]
        rows = A.numel() // cols
        out = torch.empty(A.shape, dtype=dtype, device=A.device)
        block_r, block_c = _row_tile(rows, cols)
        with on_device(A):
            _mm_dequant[(triton.cdiv(rows, block_r), triton.cdiv(cols, block_c))](
                A, row_stats, col_stats, bias, out, rows, cols, formats.INT8_MM_DEQUANT_SCALE,
                HAS_BIAS=bias is not None, BLOCK_R=block_r, BLOCK_C=block_c, **EXACT,
            )  # fmt: skip
        return out

    @kernels.register("int8_scaled_mm")
    def int8_scaled_mm(A, B, row_stats, col_stats, bias=None, dtype=None):
        return int8_mm_dequant(int8_linear_matmul(A, B), row_stats, col_stats, dtype or torch.float16, bias)

    kernels.register("int8_mixed_scaled_mm")(reference.mixed_scaled_mm(int8_scaled_mm, int8_vectorwise_dequant))
