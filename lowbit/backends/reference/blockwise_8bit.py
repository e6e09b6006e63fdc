"""8-bit blockwise quantization with a 256-entry code, docs/design.md §4.

"Nearest code" is defined the way bitsandbytes' CPU kernel computes it, so that bytes agree:
``x / absmax`` in [-1, 1] is mapped onto 65536 uniform bins, and each bin holds the index of
the code whose midpoint interval contains the bin's left edge. Near 0 the bins are wider than
the code spacing, so e.g. 0.0 maps to index 131 (2.1e-5) of the signed dynamic code, not to index 127 (0.0).
"""

from __future__ import annotations

import functools

import torch

from ...core import formats
from . import kernels

_BINS = formats.BLOCKWISE_LUT_BINS


@functools.lru_cache(maxsize=8)
def _lookup_table(code_values: tuple[float, ...]) -> torch.Tensor:
    code = torch.tensor(code_values, dtype=torch.float32)
    midpoints = 0.5 * (code[:-1] + code[1:])
    bin_edges = -1.0 + (2.0 * torch.arange(_BINS, dtype=torch.float32)) / float(_BINS - 1)
    return torch.bucketize(bin_edges, midpoints).to(torch.uint8)  # count of midpoints < edge


def lookup_table(code: torch.Tensor) -> torch.Tensor:
    return _lookup_table(tuple(code.tolist())).to(code.device)


def _blocks(x: torch.Tensor, blocksize: int) -> torch.Tensor:
    n_blocks = formats.num_blocks(x.numel(), blocksize)
    return torch.nn.functional.pad(x, (0, n_blocks * blocksize - x.numel())).view(n_blocks, blocksize)


@kernels.register("quantize_blockwise")
def quantize_blockwise(A: torch.Tensor, code: torch.Tensor, blocksize: int):
    x = A.reshape(-1).float()
    blocks = _blocks(x, blocksize)
    absmax = blocks.abs().amax(dim=1)  # NaN propagates; the op layer raises on it
    usable = torch.isfinite(absmax) & (absmax > 0)  # zero (or non-finite) blocks encode as 0
    t = torch.where(usable.unsqueeze(1), blocks * (1.0 / absmax).unsqueeze(1), 0.0).clamp(-1.0, 1.0)
    # An absmax below 2**-128 (a float32/bfloat16 subnormal) has 1/absmax = inf, so the block's
    # zeros, and the zero padding of a tail block, become 0 * inf = NaN. bitsandbytes' kernel puts
    # NaN in the first bin (code index 0); cast to int64, NaN would be an out-of-range bin.
    t = t.nan_to_num(nan=-1.0)
    # each step rounds to float32 separately, as the C kernel does (no fused multiply-add)
    bins = (((t + 1.0) * 0.5) * float(_BINS - 1) + 0.5).to(torch.int64)
    q = lookup_table(code)[bins]
    q = torch.where(usable.unsqueeze(1), q, torch.zeros_like(q))
    return q.reshape(-1)[: x.numel()].reshape(A.shape), absmax


def decode_blockwise(A: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int) -> torch.Tensor:
    """``code[A] * absmax[block]`` as float32, flat."""
    values = code[A.reshape(-1).long()]
    return (_blocks(values, blocksize) * absmax.reshape(-1, 1)).reshape(-1)[: A.numel()]


@kernels.register("dequantize_blockwise")
def dequantize_blockwise(A, absmax, code, blocksize, dtype):
    return decode_blockwise(A, absmax, code, blocksize).to(dtype).reshape(A.shape)


@kernels.register("dequantize_blockwise.out")
def dequantize_blockwise_out(A, absmax, code, blocksize, dtype, out):
    out.copy_(dequantize_blockwise(A, absmax, code, blocksize, dtype))
