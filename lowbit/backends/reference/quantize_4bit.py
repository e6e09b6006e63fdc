"""4-bit blockwise quantization (NF4 / FP4), docs/design.md §4."""

from __future__ import annotations

import torch

from ...core import formats
from . import kernels


@kernels.register("quantize_4bit")
def quantize_4bit(A: torch.Tensor, blocksize: int, quant_type: str, quant_storage: torch.dtype):
    x = A.reshape(-1).float()
    n = x.numel()
    n_full = n - n % blocksize

    # Full blocks scale by the reciprocal of their absmax; the tail block (if any) divides by its
    # absmax and stores it floored at ABSMAX_FLOOR. Both match bitsandbytes bit for bit.
    full = x[:n_full].view(-1, blocksize)
    absmax = full.abs().amax(dim=1)
    scaled = [(full * (1.0 / absmax.clamp(min=formats.ABSMAX_FLOOR)).unsqueeze(1)).reshape(-1)]
    absmaxes = [absmax]
    if n_full < n:
        tail = x[n_full:]
        tail_absmax = tail.abs().amax().clamp(min=formats.ABSMAX_FLOOR)
        scaled.append(tail / tail_absmax)
        absmaxes.append(tail_absmax.reshape(1))
    s = torch.cat(scaled).clamp(-1.0, 1.0)
    if n % 2:
        s = torch.nn.functional.pad(s, (0, 1))  # the padding nibble is a quantized 0.0

    # position among the sorted codes = number of midpoints strictly below s
    midpoints = formats.sorted_midpoints(quant_type).to(s.device)
    order = torch.tensor(formats.ORDERS[quant_type], dtype=torch.uint8, device=s.device)
    nibbles = order[torch.bucketize(s, midpoints)]
    packed = (nibbles[0::2] << 4) | nibbles[1::2]  # element 2i -> high nibble of byte i
    return packed.view(quant_storage).unsqueeze(1), torch.cat(absmaxes)


def unpack_nibbles(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The first ``n`` code indices of a packed 4-bit tensor (element 2i is byte i's high nibble)."""
    data = packed.reshape(-1).view(torch.uint8)
    return torch.stack((data >> 4, data & 0x0F), dim=1).reshape(-1)[:n]


def decode_4bit(packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int, n: int) -> torch.Tensor:
    """The first ``n`` values of a packed 4-bit tensor as float32: ``code[nibble] * absmax[block]``."""
    values = code.to(absmax.device)[unpack_nibbles(packed, n).long()]
    n_blocks = absmax.numel()
    padded = torch.nn.functional.pad(values, (0, n_blocks * blocksize - n))
    return (padded.view(n_blocks, blocksize) * absmax.unsqueeze(1)).reshape(-1)[:n]


@kernels.register("dequantize_4bit")
def dequantize_4bit(A, absmax, blocksize, quant_type, shape, dtype):
    n = 1
    for size in shape:
        n *= size
    code = formats.code_tensor(quant_type, A.device)
    return decode_4bit(A, absmax, code, blocksize, n).to(dtype).reshape(shape)


@kernels.register("dequantize_4bit.out")
def dequantize_4bit_out(A, absmax, blocksize, quant_type, shape, dtype, out):
    out.copy_(dequantize_4bit(A, absmax, blocksize, quant_type, shape, dtype))
