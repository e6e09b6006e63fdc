"""4-bit blockwise quantize/dequantize (NF4/FP4) as Triton kernels, bit-exact with the reference
(lowbit/backends/reference/quantize_4bit.py; docs/design.md §4):

* a full block scales by ``x * (1 / max(absmax, 1e-38))`` and stores its absmax; the partial last
  block divides, ``x / am`` with ``am = max(absmax, 1e-38)``, and stores ``am``;
* the code is ``order[number of the 15 sorted midpoints < s]`` (a value on a threshold takes the
  lower code), so an all-zero block gives the code of 0.0 (NF4 0x77, FP4 0x00: the CPU bytes,
  which the cuda backend writes too);
* element 2i is the high nibble of byte i; an odd length pads the last low nibble with the code
  of 0.0;
* dequantize is ``code[nibble] * absmax[block]`` in float32, then one rounding to the output dtype.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ...core import formats
from ...core.registry import KernelTable
from .blockwise_8bit import block_absmax
from .runtime import EXACT, cast_to, on_device, per_program, to_float32


@triton.jit
def _quantize_4bit(A, packed, absmax, midpoints, order, n, floor, BS: tl.constexpr, GROUP: tl.constexpr):
    # Layout: program p owns quantization blocks p*GROUP .. p*GROUP+GROUP-1 as a [GROUP, BS] tile
    # (one block per row, read once); it writes their GROUP*BS/2 packed bytes and GROUP absmax.
    block = tl.program_id(0) * GROUP + tl.arange(0, GROUP)
    start = block.to(tl.int64) * BS
    offs = start[:, None] + tl.arange(0, BS)[None, :]
    x = to_float32(tl.load(A + offs, mask=offs < n, other=0.0))
    m = block_absmax(x)
    am = tl.maximum(m, floor)
    full = start + BS <= n
    s = tl.where(full[:, None], x * tl.div_rn(1.0, am)[:, None], tl.div_rn(x, am[:, None]))
    s = tl.minimum(tl.maximum(s, -1.0), 1.0)
    position = tl.zeros([GROUP, BS], dtype=tl.int32)  # number of midpoints < s: a binary search
    for level in tl.static_range(4):
        candidate = position + (8 >> level)
        position = tl.where(tl.load(midpoints + candidate - 1) < s, candidate, position)
    code = tl.load(order + position)
    high, low = tl.split(tl.reshape(code, [GROUP, BS // 2, 2]))
    byte = (start // 2)[:, None] + tl.arange(0, BS // 2)[None, :]
    tl.store(packed + byte, (high << 4) | low, mask=byte < (n + 1) // 2)
    tl.store(absmax + block, tl.where(full | (m != m), m, am), mask=start < n)  # NaN stays NaN: the op raises


@triton.jit
def _dequantize_4bit(packed, absmax, code, out, n, BS: tl.constexpr, BYTES: tl.constexpr):
    # Layout: program p decodes packed bytes p*BYTES .. +BYTES into elements 2*byte, 2*byte + 1.
    byte = tl.program_id(0).to(tl.int64) * BYTES + tl.arange(0, BYTES)
    inside = byte < (n + 1) // 2
    b = tl.load(packed + byte, mask=inside, other=0)
    scale = tl.load(absmax + (2 * byte) // BS, mask=inside, other=0.0)  # both nibbles share a block
    high = tl.load(code + (b >> 4)) * scale
    low = tl.load(code + (b & 15)) * scale
    element = tl.program_id(0).to(tl.int64) * (2 * BYTES) + tl.arange(0, 2 * BYTES)
    tl.store(out + element, cast_to(tl.interleave(high, low), out.dtype.element_ty), mask=element < n)


@functools.cache
def _tables(quant_type: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The 15 sorted midpoints and the code order of ``quant_type`` on ``device``."""
    order = torch.tensor(formats.ORDERS[quant_type], dtype=torch.uint8, device=device)
    return formats.sorted_midpoints(quant_type).to(device), order


def dequantize_into(A, absmax, code, blocksize: int, n: int, out: torch.Tensor) -> None:
    """``out`` (n elements, any float dtype) = the 4-bit tensor ``A`` decoded with the 16-entry ``code``."""
    n_bytes = (n + 1) // 2
    bytes_per_program = per_program(n_bytes, 2)
    with on_device(out):
        _dequantize_4bit[(triton.cdiv(n_bytes, bytes_per_program),)](
            A, absmax, code, out, n, BS=blocksize, BYTES=bytes_per_program, **EXACT
        )


def install(kernels: KernelTable) -> None:
    @kernels.register("quantize_4bit")
    def quantize_4bit(A: torch.Tensor, blocksize: int, quant_type: str, quant_storage: torch.dtype):
        n = A.numel()
        packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=A.device)
        absmax = torch.empty(formats.num_blocks(n, blocksize), dtype=torch.float32, device=A.device)
        midpoints, order = _tables(quant_type, A.device)
        group = per_program(absmax.numel(), blocksize)
        with on_device(A):
            _quantize_4bit[(triton.cdiv(absmax.numel(), group),)](
                A, packed, absmax, midpoints, order, n, formats.ABSMAX_FLOOR, BS=blocksize, GROUP=group, **EXACT
            )
        return packed.view(quant_storage).unsqueeze(1), absmax

    @kernels.register("dequantize_4bit.out")
    def dequantize_4bit_out(A, absmax, blocksize, quant_type, shape, dtype, out):
        code = formats.code_tensor(quant_type, A.device)
        dequantize_into(A.view(torch.uint8), absmax, code, blocksize, out.numel(), out)

    @kernels.register("dequantize_4bit")
    def dequantize_4bit(A, absmax, blocksize, quant_type, shape, dtype):
        out = torch.empty(shape, dtype=dtype, device=A.device)
        dequantize_4bit_out(A, absmax, blocksize, quant_type, shape, dtype, out)
        return out
