"""Matrix products with a 4-bit weight: ``A @ dequantize(B).T`` accumulated in float32."""

from __future__ import annotations

import torch

from . import kernels
from .quantize_4bit import decode_4bit


def product(A: torch.Tensor, weight: torch.Tensor, bias=None) -> torch.Tensor:
    """``A @ weight.T`` (+ bias) in float32, returned in A's dtype, for a decoded float32 weight."""
    out = A.float() @ weight.t()
    if bias is not None:
        out = out + bias.float()
    return out.to(A.dtype)


def _product(A, B, shapeB, absmax, code, blocksize, bias=None) -> torch.Tensor:
    return product(A, decode_4bit(B, absmax, code, blocksize, shapeB[0] * shapeB[1]).view(shapeB), bias)


@kernels.register("gemv_4bit")
def gemv_4bit(A, B, shapeB, absmax, code, blocksize):
    return _product(A, B, shapeB, absmax, code, blocksize)


@kernels.register("gemv_4bit.out")
def gemv_4bit_out(A, B, shapeB, absmax, code, blocksize, out):
    out.copy_(_product(A, B, shapeB, absmax, code, blocksize))


@kernels.register("matmul_4bit")
def matmul_4bit(A, B, shapeB, absmax, code, blocksize, bias=None):
    return _product(A, B, shapeB, absmax, code, blocksize, bias)
