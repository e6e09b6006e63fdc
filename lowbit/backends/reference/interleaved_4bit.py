"""The interleaved 4-bit layout (CPU inference) by its definition, ``formats.interleave_rows``, and
the product on it: back to the standard layout, then the product of ``matmul_4bit.py``."""

from __future__ import annotations

import functools

import torch

from ...core import formats
from . import kernels
from .matmul_4bit import _product
from .quantize_4bit import decode_4bit


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
    # the bf16 contract: each weight code * absmax and each element of A rounded once to bf16,
    # products and sums in float32
    weight = decode_4bit(B, absmax, code, blocksize, shapeB[0] * shapeB[1]).view(shapeB)
    out = A.bfloat16().float() @ weight.bfloat16().float().t()
    if bias is not None:
        out = out + bias.float()
    return out.to(A.dtype)
