"""The interleaved 4-bit layout (CPU inference) and the product on it, through the native library
(csrc/cpu/interleaved_4bit.cpp): one fused pass over the weight for any number of rows of A."""

from __future__ import annotations

import functools

import torch

from . import kernels, native


def _permute(B, absmax, shapeB, blocksize, inverse: bool) -> tuple[torch.Tensor, torch.Tensor]:
    N, K = shapeB
    out_B, out_absmax = torch.empty_like(B), torch.empty_like(absmax)
    native.check(
        native.lib().lowbit_interleave_4bit(
            native.ptr(B), B.nbytes, *native.buf(absmax), N, K, blocksize, int(inverse), native.ptr(out_B),
            out_B.nbytes, *native.buf(out_absmax), native.num_threads(),
        ),
        "lowbit_interleave_4bit",
    )  # fmt: skip
    return out_B, out_absmax


kernels.register("interleave_4bit")(functools.partial(_permute, inverse=False))
kernels.register("deinterleave_4bit")(functools.partial(_permute, inverse=True))


@kernels.register("matmul_4bit_interleaved")
def matmul_4bit_interleaved(A, B, shapeB, absmax, code, blocksize, bias=None, exact=True):
    N, K = shapeB
    if bias is not None and bias.dtype not in native.DTYPES:
        bias = bias.float()
    out = torch.empty(*A.shape[:-1], N, dtype=A.dtype)  # sizes as arguments: half the cost of a tuple
    # plain addresses (ctypes converts ints for void* arguments): this runs once per layer and token
    native.check(
        native.lib().lowbit_matmul_4bit_interleaved(
            native.DTYPES[A.dtype], A.data_ptr(), A.numel() // K, K, B.data_ptr(), B.nbytes, absmax.data_ptr(),
            absmax.numel(), code.data_ptr(), code.numel(), N, blocksize, None if bias is None else bias.data_ptr(),
            0 if bias is None else bias.numel(), 0 if bias is None else native.DTYPES[bias.dtype],
            native.PRECISIONS["float32" if exact else "fast"],
            native.DTYPES[out.dtype], out.data_ptr(), native.num_threads(),
        ),
        "lowbit_matmul_4bit_interleaved",
    )  # fmt: skip
    return out
