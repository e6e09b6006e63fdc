"""Matrix products with a 4-bit weight: ``A @ dequantize(B).T`` accumulated in float32, and
``gemm_4bit`` (bitsandbytes' op), composed from the other ops."""

from __future__ import annotations

import torch

from ...core import formats
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


@kernels.register("gemm_4bit")
def gemm_4bit(A, B, shapeB, absmax, blocksize, quant_type, bias=None, absmax_8bit=None, absmax_code=None,
              absmax_offset=None):  # fmt: skip
    # bitsandbytes' definition: undo the double quantization of the absmax (dequantize, then add
    # the offset, in float32), dequantize the weight to A's dtype, then F.linear. Each step is a
    # torch.ops.lowbit op, so it runs on the backend active for A's device.
    if absmax_8bit is not None:
        absmax = torch.ops.lowbit.dequantize_blockwise(
            absmax_8bit, absmax, absmax_code, formats.NESTED_BLOCKSIZE, torch.float32
        )
        absmax += absmax_offset.float()
    weight = torch.ops.lowbit.dequantize_4bit(B, absmax, blocksize, quant_type, list(shapeB), A.dtype)
    return torch.nn.functional.linear(A, weight, None if bias is None else bias.to(A.dtype))
