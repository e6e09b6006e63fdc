"""8-bit blockwise quantize/dequantize through the native library (csrc/cpu/blockwise_8bit.cpp)."""

from __future__ import annotations

import torch

from ...core import formats
from . import kernels, native


@kernels.register("quantize_blockwise")
def quantize_blockwise(A: torch.Tensor, code: torch.Tensor, blocksize: int):
    n = A.numel()
    q = torch.empty(A.shape, dtype=torch.uint8)
    absmax = torch.empty(formats.num_blocks(n, blocksize), dtype=torch.float32)
    native.check(
        native.lib().lowbit_quantize_blockwise(
            native.DTYPES[A.dtype], *native.buf(code), native.ptr(A), n, blocksize, *native.buf(q),
            *native.buf(absmax), native.num_threads(),
        ),
        "lowbit_quantize_blockwise",
    )  # fmt: skip
    return q, absmax


@kernels.register("dequantize_blockwise.out")
def dequantize_blockwise_out(A, absmax, code, blocksize, dtype, out):
    native.check(
        native.lib().lowbit_dequantize_blockwise(
            native.DTYPES[dtype], *native.buf(code), *native.buf(A), *native.buf(absmax), blocksize,
            native.ptr(out), out.numel(), native.num_threads(),
        ),
        "lowbit_dequantize_blockwise",
    )  # fmt: skip


@kernels.register("dequantize_blockwise")
def dequantize_blockwise(A, absmax, code, blocksize, dtype):
    out = torch.empty(A.shape, dtype=dtype)
    dequantize_blockwise_out(A, absmax, code, blocksize, dtype, out)
    return out
