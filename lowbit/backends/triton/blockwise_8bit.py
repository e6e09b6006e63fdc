"""8-bit blockwise quantize/dequantize with a 256-entry code as Triton kernels, bit-exact with the
reference (lowbit/backends/reference/blockwise_8bit.py; docs/design.md §4).

"Nearest code" is bitsandbytes' CPU lookup: ``t = clamp(x * (1/absmax), -1, 1)`` (NaN -> -1) falls
in bin ``j = int(((t + 1) * 0.5) * 65535 + 0.5)`` of 65536, and bin j holds the number of code
midpoints below ``-1 + 2j/65535``. Instead of a 64 KiB table per code the kernels count those
midpoints per element with a binary search (8 steps over the sorted code; the op layer rejects
unsorted codes). A block whose absmax is 0, +Inf or NaN stores that absmax and bytes 0.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...core import formats
from ...core.registry import KernelTable
from ..reference import blockwise_8bit as reference
from .runtime import EXACT, cast_to, on_device, per_program, to_float32


@triton.jit
def encode_8bit(x, inv, code):
    """Code indices (uint8) of the float32 values ``x`` of a block with reciprocal absmax ``inv``."""
    t = x * inv
    t = tl.where(t > -1.0, t, -1.0)  # NaN (0 * Inf of a subnormal absmax) -> -1, as the reference
    t = tl.where(t < 1.0, t, 1.0)
    bin = (((t + 1.0) * 0.5) * 65535.0 + 0.5).to(tl.int32)  # each step rounded (no FMA: EXACT)
    edge = -1.0 + tl.div_rn(2.0 * bin.to(tl.float32), 65535.0)
    count = tl.zeros_like(bin)
    for level in tl.static_range(8):  # count = number of midpoints (code[i] + code[i+1]) / 2 < edge
        candidate = count + (128 >> level)
        midpoint = 0.5 * (tl.load(code + candidate - 1) + tl.load(code + candidate))
        count = tl.where(midpoint < edge, candidate, count)
    return count.to(tl.uint8)


@triton.jit
def block_absmax(x):
    """max |x| over each row of a [blocks, blocksize] tile, NaN when the row holds a NaN."""
    is_nan = x != x
    m = tl.max(tl.where(is_nan, 0.0, tl.abs(x)), axis=1)
    return tl.where(tl.max(is_nan.to(tl.int32), axis=1) > 0, float("nan"), m)


@triton.jit
def encode_blocks(x, m, code):
    """Codes of a [blocks, blocksize] tile whose rows have absmax ``m``; 0 where m is 0, Inf or NaN."""
    usable = (m > 0.0) & (m < float("inf"))
    inv = tl.div_rn(1.0, tl.where(usable, m, 1.0))
    return tl.where(usable[:, None], encode_8bit(x, inv[:, None], code), 0).to(tl.uint8)


@triton.jit
def _quantize_blockwise(A, code, q, absmax, n, BS: tl.constexpr, GROUP: tl.constexpr):
    # Layout: program p owns blocks p*GROUP .. +GROUP as a [GROUP, BS] tile, one block per row.
    block = tl.program_id(0) * GROUP + tl.arange(0, GROUP)
    offs = block.to(tl.int64)[:, None] * BS + tl.arange(0, BS)[None, :]
    inside = offs < n
    x = to_float32(tl.load(A + offs, mask=inside, other=0.0))
    m = block_absmax(x)
    tl.store(q + offs, encode_blocks(x, m, code), mask=inside)
    tl.store(absmax + block, m, mask=block.to(tl.int64) * BS < n)


@triton.jit
def _dequantize_blockwise(q, absmax, code, out, n, BS: tl.constexpr, TILE_SIZE: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * TILE_SIZE + tl.arange(0, TILE_SIZE)
    inside = offs < n
    value = tl.load(code + tl.load(q + offs, mask=inside, other=0)) * tl.load(absmax + offs // BS, mask=inside)
    tl.store(out + offs, cast_to(value, out.dtype.element_ty), mask=inside)


def install(kernels: KernelTable) -> None:
    @kernels.register("quantize_blockwise")
    def quantize_blockwise(A: torch.Tensor, code: torch.Tensor, blocksize: int):
        if blocksize not in formats.BLOCKSIZES:  # the 8-bit-only large blocks: one tile would not fit
            return reference.quantize_blockwise(A, code, blocksize)
        n = A.numel()
        q = torch.empty(A.shape, dtype=torch.uint8, device=A.device)
        absmax = torch.empty(formats.num_blocks(n, blocksize), dtype=torch.float32, device=A.device)
        group = per_program(absmax.numel(), blocksize)
        with on_device(A):
            _quantize_blockwise[(triton.cdiv(absmax.numel(), group),)](
                A, code, q, absmax, n, BS=blocksize, GROUP=group, **EXACT
            )
        return q, absmax

    @kernels.register("dequantize_blockwise.out")
    def dequantize_blockwise_out(A, absmax, code, blocksize, dtype, out):
        tile = per_program(A.numel())
        with on_device(A):
            _dequantize_blockwise[(triton.cdiv(A.numel(), tile),)](
                A, absmax, code, out, A.numel(), BS=blocksize, TILE_SIZE=tile, **EXACT
            )

    @kernels.register("dequantize_blockwise")
    def dequantize_blockwise(A, absmax, code, blocksize, dtype):
        out = torch.empty(A.shape, dtype=dtype, device=A.device)
        dequantize_blockwise_out(A, absmax, code, blocksize, dtype, out)
        return out
