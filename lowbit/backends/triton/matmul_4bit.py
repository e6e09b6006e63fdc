"""Products with a 4-bit weight: one fused Triton kernel that decodes the weight tile in registers
and accumulates ``A @ W.T`` (+ bias) in float32, for 1..8 activation rows (the decode regime
gemv_4bit is for). More rows (prefill, training), or a bias whose dtype is not a float dtype of the
formats, decode the weight to float32 with the dequantize kernel and take one torch matmul (the
reference's product). Results differ from the reference only by float32 accumulation order
(tests/test_parity.py states the bound).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...core import formats
from ...core.registry import KernelTable
from ..reference import matmul_4bit as reference
from .quantize_4bit import dequantize_into
from .runtime import autotune, cast_to, on_device, to_float32

MAX_ROWS = 8


@autotune(
    configs=[
        triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w)
        for bn, bk, w in ((16, 128, 4), (32, 64, 4), (32, 128, 4), (64, 64, 4), (16, 256, 4), (8, 256, 2))
    ],
    key=["N", "K", "BS", "BLOCK_M"],
    interpreted={
        "BLOCK_N": lambda args: min(32, triton.next_power_of_2(args["N"])),
        "BLOCK_K": lambda args: min(1024, triton.next_power_of_2(args["K"])),
    },
)
@triton.jit
def _gemv_4bit(A, B, absmax, code, bias, out, M, N, K, HAS_BIAS: tl.constexpr, BS: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    # Layout: program p computes outputs [:, p*BLOCK_N : +BLOCK_N] for all M <= BLOCK_M rows,
    # walking K in BLOCK_K steps. Weight element (n, k) is nibble n*K + k of B (high nibble first:
    # rows of odd K start mid-byte) with absmax (n*K + k) // BS; each [BLOCK_N, BLOCK_K] tile is
    # decoded in registers and multiplied with the [BLOCK_M, BLOCK_K] activations as a broadcast
    # product summed over K.
    rows = tl.arange(0, BLOCK_M)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        a_mask = (rows[:, None] < M) & (ks[None, :] < K)
        a = to_float32(tl.load(A + rows[:, None] * K + ks[None, :], mask=a_mask, other=0.0))
        w_mask = (cols[:, None] < N) & (ks[None, :] < K)
        nibble_index = cols.to(tl.int64)[:, None] * K + ks[None, :]
        byte = tl.load(B + nibble_index // 2, mask=w_mask, other=0)
        nibble = tl.where(nibble_index % 2 == 0, byte >> 4, byte & 15)
        w = tl.load(code + nibble) * tl.load(absmax + nibble_index // BS, mask=w_mask, other=0.0)
        acc += tl.sum(a[:, None, :] * w[None, :, :], axis=2)
    if HAS_BIAS:
        acc += to_float32(tl.load(bias + cols, mask=cols < N, other=0.0))[None, :]
    o_mask = (rows[:, None] < M) & (cols[None, :] < N)
    tl.store(out + rows[:, None] * N + cols[None, :], cast_to(acc, out.dtype.element_ty), mask=o_mask)


def _product(A, B, shapeB, absmax, code, blocksize, bias, out=None) -> torch.Tensor:
    """``A @ W.T`` (+ bias) in A's dtype, into ``out`` when given: the fused kernel for up to
    MAX_ROWS rows and a float32/float16/bfloat16 bias; otherwise the weight decoded to float32 by
    the dequantize kernel and one torch matmul (the reference's product, on the same device)."""
    N, K = shapeB
    M = A.numel() // K
    if M > MAX_ROWS or (bias is not None and bias.dtype not in formats.FLOAT_DTYPES):
        weight = torch.empty(shapeB, dtype=torch.float32, device=A.device)
        dequantize_into(B.view(torch.uint8), absmax, code, blocksize, N * K, weight)
        result = reference.product(A, weight, bias)
        return result if out is None else out.copy_(result)
    if out is None:
        out = torch.empty((*A.shape[:-1], N), dtype=A.dtype, device=A.device)
    with on_device(A):
        _gemv_4bit[lambda meta: (triton.cdiv(N, meta["BLOCK_N"]),)](
            A, B.view(torch.uint8), absmax, code, bias, out, M, N, K,
            HAS_BIAS=bias is not None, BS=blocksize, BLOCK_M=triton.next_power_of_2(M),
        )  # fmt: skip
    return out


def install(kernels: KernelTable) -> None:
    @kernels.register("gemv_4bit")
    def gemv_4bit(A, B, shapeB, absmax, code, blocksize):
        return _product(A, B, shapeB, absmax, code, blocksize, None)

    @kernels.register("gemv_4bit.out")
    def gemv_4bit_out(A, B, shapeB, absmax, code, blocksize, out):
        _product(A, B, shapeB, absmax, code, blocksize, None, out)

    @kernels.register("matmul_4bit")
    def matmul_4bit(A, B, shapeB, absmax, code, blocksize, bias=None):
        return _product(A, B, shapeB, absmax, code, blocksize, bias)
