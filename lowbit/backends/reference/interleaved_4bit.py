"""The interleaved 4-bit layout (CPU inference) by its definition, ``formats.interleave_rows``, and
the product on it: back to the standard layout, then the product of ``matmul_4bit.py`` (exact) or
the 16-bit fixed-point product that defines the fast precision (docs/design.md §10)."""

from __future__ import annotations

import functools

import torch

from ...core import formats
from . import kernels
from .matmul_4bit import _product
from .quantize_4bit import unpack_nibbles


def _permute(B, absmax, shapeB, blocksize, inverse: bool) -> tuple[torch.Tensor, torch.Tensor]:
    N, K = shapeB
    words = B.reshape(-1).view(torch.uint8).view(N, K // formats.INTERLEAVE_WORD_WEIGHTS, 4)
    out_B = formats.interleave_rows(words, inverse).reshape(-1).view(B.dtype).view(B.shape)
    out_absmax = formats.interleave_rows(absmax.view(N, K // blocksize), inverse).reshape(absmax.shape)
    return out_B, out_absmax


kernels.register("interleave_4bit")(functools.partial(_permute, inverse=False))
kernels.register("deinterleave_4bit")(functools.partial(_permute, inverse=True))


@kernels.register("matmul_4bit_interleaved")
def matmul_4bit_interleaved(A, B, shapeB, absmax, code, blocksize, bias=None, exact=True):
    B, absmax = _permute(B, absmax, shapeB, blocksize, inverse=True)
    if exact:
        return _product(A, B, shapeB, absmax, code, blocksize, bias)
    return _fixed_point_product(A, B, shapeB, absmax, code, blocksize, bias)


def _fixed_point_product(A, B, shapeB, absmax, code, blocksize, bias):
    """The fast precision's product: code values and A in 16-bit fixed point (formats.FIXED_*),
    rounded with float32 arithmetic as the native kernels round them, exact integer products and
    chunk sums; the scaling by the chunk factors and the absmax here in float64 (native kernels do
    it in float32: they agree within float32 rounding of those few terms)."""
    N, K = shapeB
    chunk = min(blocksize, formats.FIXED_CHUNK)
    code = code.float()
    code_max = code.abs().max()
    one = torch.tensor(formats.FIXED_CODE_ONE, dtype=torch.float32)
    # where, not `if code_max > 0`: no read-back of a device tensor (an all-zero code gives zeros)
    code16 = torch.where(code_max > 0, torch.round(code / code_max * one), torch.zeros_like(code))
    nibbles = unpack_nibbles(B, N * K).long().view(N, K // chunk, chunk)
    w16 = code16[nibbles].double()
    rows = A.reshape(-1, K).float().view(-1, K // chunk, chunk)
    amax = rows.abs().amax(-1, keepdim=True)
    finite = amax.isfinite()
    active = torch.tensor(formats.FIXED_ACTIVATION_ONE, dtype=torch.float32)
    pre = torch.where(amax < formats.FIXED_TINY_CHUNK, 1 / formats.FIXED_TINY_CHUNK, 1.0).float()
    inverse = torch.where(finite & (amax > 0), active / (amax * pre), torch.zeros_like(amax))
    a16 = torch.round(torch.where(finite, rows, torch.zeros_like(rows)) * pre * inverse).double()
    factor = torch.where(finite, amax / active * (code_max / one), torch.full_like(amax, float("nan")))
    chunk_sums = torch.einsum("mci,nci->mnc", a16, w16)  # exact: integers below 2^31
    scaled = chunk_sums * factor.double().squeeze(-1)[:, None, :]
    per_block = scaled.view(*scaled.shape[:2], K // blocksize, blocksize // chunk).sum(-1)
    out = (per_block * absmax.view(N, K // blocksize).double()).sum(-1)
    if bias is not None:
        out = out + bias.double()
    return out.to(A.dtype).view(*A.shape[:-1], N)
