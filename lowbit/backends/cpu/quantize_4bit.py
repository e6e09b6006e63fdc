"""4-bit quantize/dequantize through the native library (csrc/cpu/quantize_4bit.cpp)."""

from __future__ import annotations

import math

import torch

from ...core import formats
from . import kernels, native


@kernels.register("quantize_4bit")
def quantize_4bit(A: torch.Tensor, blocksize: int, quant_type: str, quant_storage: torch.dtype):
    n = A.numel()
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8)
    absmax = torch.empty(formats.num_blocks(n, blocksize), dtype=torch.float32)
    native.check(
        native.lib().lowbit_quantize_4bit(
            native.DTYPES[A.dtype], native.ptr(A), n, blocksize, native.QUANT_TYPES[quant_type],
            *native.buf(packed), *native.buf(absmax), native.num_threads(),
        ),
        "lowbit_quantize_4bit",
    )  # fmt: skip
    return packed.view(quant_storage).unsqueeze(1), absmax


@kernels.register("dequantize_4bit.out")
def dequantize_4bit_out(A, absmax, blocksize, quant_type, shape, dtype, out):
    native.check(
        native.lib().lowbit_dequantize_4bit(
            native.DTYPES[dtype], native.ptr(A), A.nbytes, *native.buf(absmax), blocksize,
            *native.buf(formats.code_tensor(quant_type)), native.ptr(out), math.prod(shape), native.num_threads(),
        ),
        "lowbit_dequantize_4bit",
    )  # fmt: skip


@kernels.register("dequantize_4bit")
def dequantize_4bit(A, absmax, blocksize, quant_type, shape, dtype):
    out = torch.empty(shape, dtype=dtype)
    dequantize_4bit_out(A, absmax, blocksize, quant_type, shape, dtype, out)
    return out
