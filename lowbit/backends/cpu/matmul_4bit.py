"""Products with a 4-bit weight through the native library (csrc/cpu/gemv_4bit.cpp).

``out = A @ dequantize_4bit(B).T`` with B the packed (N, K) weight, as the reference defines it:
float32 products and sums, then the result (plus bias) rounded once to A's dtype.

* Up to ``GEMV_MAX_ROWS`` rows of A: the fused gemv kernel decodes B in registers, never
  materializing the weight.
* More rows: B is dequantized to float32 a tile of output rows at a time (a few MiB, so a tile
  stays in cache while torch's GEMM reads it) and multiplied with torch.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from . import kernels, native

#: Largest number of rows of A sent to the gemv kernel (it makes one pass over B per 8 rows).
GEMV_MAX_ROWS = 8
#: Size of one dequantized float32 tile of B in the GEMM path.
TILE_BYTES = 4 << 20


def _gemv(A, B, N: int, K: int, absmax, code, blocksize: int, out: torch.Tensor) -> None:
    native.check(
        native.lib().lowbit_gemv_4bit(
            native.DTYPES[A.dtype], native.ptr(A), A.numel() // K, K, native.ptr(B), B.nbytes, *native.buf(absmax),
            *native.buf(code), N, blocksize, native.DTYPES[out.dtype], native.ptr(out), native.num_threads(),
        ),
        "lowbit_gemv_4bit",
    )  # fmt: skip


def _gemm_float32(A, B, N: int, K: int, absmax, code, blocksize: int) -> torch.Tensor:
    """``A.float() @ W.T`` (float32, A's leading shape), dequantizing W one tile of rows at a time.

    A tile starts at a block boundary (its first element n0*K is a multiple of blocksize), so it
    is dequantized by itself: bytes from n0*K/2, absmax from n0*K/blocksize.
    """
    step = blocksize // math.gcd(K, blocksize)  # tile rows must be a multiple of this
    rows = max(step, TILE_BYTES // (4 * K) // step * step)
    a = A.reshape(-1, K).float()
    out_t = torch.empty((N, a.shape[0]), dtype=torch.float32)  # out transposed: a tile is a row slice
    tile = torch.empty(min(rows, N) * K, dtype=torch.float32)
    data = B.reshape(-1).view(torch.uint8)
    for n0 in range(0, N, rows):
        r = min(rows, N - n0)
        e0, e1 = n0 * K, (n0 + r) * K
        native.check(
            native.lib().lowbit_dequantize_4bit(
                native.DTYPES[torch.float32], *native.buf(data[e0 // 2 : (e1 + 1) // 2]),
                *native.buf(absmax[e0 // blocksize : -(-e1 // blocksize)]), blocksize, *native.buf(code),
                native.ptr(tile), r * K, native.num_threads(),
            ),
            "lowbit_dequantize_4bit",
        )  # fmt: skip
        torch.mm(tile[: r * K].view(r, K), a.t(), out=out_t[n0 : n0 + r])
    return out_t.t().contiguous().view(*A.shape[:-1], N)


def _product(A, B, shapeB, absmax, code, blocksize, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    N, K = shapeB
    rows = A.numel() // K
    if rows <= GEMV_MAX_ROWS:
        # without a bias the kernel rounds straight to A's dtype; with one, bias is added in float32 first
        out = torch.empty((*A.shape[:-1], N), dtype=A.dtype if bias is None else torch.float32)
        _gemv(A, B, N, K, absmax, code, blocksize, out)
    else:
        out = _gemm_float32(A, B, N, K, absmax, code, blocksize)
    if bias is not None:
        out = out + bias.float()
    return out.to(A.dtype)


@kernels.register("gemv_4bit")
def gemv_4bit(A, B, shapeB, absmax, code, blocksize):
    return _product(A, B, shapeB, absmax, code, blocksize)


@kernels.register("gemv_4bit.out")
def gemv_4bit_out(A, B, shapeB, absmax, code, blocksize, out):
    N, K = shapeB
    if A.numel() // K <= GEMV_MAX_ROWS:
        _gemv(A, B, N, K, absmax, code, blocksize, out)
    else:
        out.copy_(_gemm_float32(A, B, N, K, absmax, code, blocksize))


@kernels.register("matmul_4bit")
def matmul_4bit(A, B, shapeB, absmax, code, blocksize, bias=None):
    return _product(A, B, shapeB, absmax, code, blocksize, bias)
