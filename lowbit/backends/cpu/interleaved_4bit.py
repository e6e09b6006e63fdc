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


#: lowbit_precision of the ``exact`` argument
_PRECISION = {True: native.PRECISIONS["float32"], False: native.PRECISIONS["fast"]}


class BoundProduct:
    """``matmul_4bit_interleaved`` on one weight, what can be read of its arguments read once.

    Decoding runs one product per layer and token, after the previous layer's weights have flushed
    the caches, so every attribute read, call and object of the Python between two kernels costs a
    share of the layer (docs/design.md, "Per-call cost"). The weight's sizes and constants are read
    here, once; its data pointers are read per call: the storage may move between calls (FSDP
    frees and re-allocates it), and a stale address would read freed memory.
    """

    __slots__ = ("B", "absmax", "code", "N", "K", "blocksize", "B_len", "absmax_len", "code_len", "function")

    def __init__(self, B, shapeB, absmax, code, blocksize):
        self.B, self.absmax, self.code, self.blocksize = B, absmax, code, blocksize
        self.N, self.K = shapeB
        self.B_len, self.absmax_len, self.code_len = B.nbytes, absmax.numel(), code.numel()
        self.function = native.matmul_4bit_interleaved_function()

    def __call__(self, A, bias=None, exact=True):
        N, K = self.N, self.K
        shape, dtype = A.shape, A.dtype
        if bias is None:
            bias_ptr = bias_len = bias_dtype = 0  # NULL, "not given"
        else:
            if bias.dtype not in native.DTYPES:
                bias = bias.float()
            bias_ptr, bias_len, bias_dtype = bias.data_ptr(), bias.numel(), native.DTYPES[bias.dtype]
        # sizes as arguments: a tuple costs half as much again
        if len(shape) == 2:
            rows, out = shape[0], torch.empty(shape[0], N, dtype=dtype)
        else:
            rows, out = shape.numel() // K, torch.empty(*shape[:-1], N, dtype=dtype)
        dtype_code = native.DTYPES[dtype]
        # plain addresses: both calls (native.matmul_4bit_interleaved_function) take ints for void*
        status = self.function(
            dtype_code, A.data_ptr(), rows, K, self.B.data_ptr(), self.B_len,
            self.absmax.data_ptr(), self.absmax_len, self.code.data_ptr(), self.code_len, N, self.blocksize,
            bias_ptr, bias_len, bias_dtype, _PRECISION[exact], dtype_code, out.data_ptr(), native.num_threads(),
        )  # fmt: skip
        if status:
            native.check(status, "lowbit_matmul_4bit_interleaved")
        return out


@kernels.register("matmul_4bit_interleaved")
def matmul_4bit_interleaved(A, B, shapeB, absmax, code, blocksize, bias=None, exact=True):
    return BoundProduct(B, shapeB, absmax, code, blocksize)(A, bias, exact)


matmul_4bit_interleaved.bind = BoundProduct  # registry.bind_weight
