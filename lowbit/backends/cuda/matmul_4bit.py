"""Products with a 4-bit weight through the GPU library (csrc/cuda/gemv_4bit.cu).

The fused kernel serves 1..8 activation rows (the decode regime gemv_4bit is for); more rows,
or a bias whose dtype is not a float dtype, run the reference kernel (dequantize + torch matmul)
on the same device. Results differ from the reference only by float32 accumulation order."""

from __future__ import annotations

import torch

from ...core.registry import KernelTable
from ..reference import matmul_4bit as reference
from .native import DTYPES, GpuLibrary, buf, ptr

MAX_ROWS = 8  # lowbit_cuda_gemv_4bit_max_rows()


def _fused(gpu: GpuLibrary, A, B, shapeB, absmax, code, blocksize, bias, out) -> None:
    N, K = shapeB
    gpu.call(
        "lowbit_cuda_gemv_4bit", A.device,
        DTYPES[A.dtype], ptr(A), A.numel() // K, ptr(B), B.nbytes, N, K, *buf(absmax), *buf(code), blocksize,
        *buf(bias), DTYPES[bias.dtype] if bias is not None else 0, ptr(out),
    )  # fmt: skip


def _fits(A, shapeB, bias) -> bool:
    return A.numel() // shapeB[1] <= MAX_ROWS and (bias is None or bias.dtype in DTYPES)


def install(kernels: KernelTable, gpu: GpuLibrary) -> None:
    @kernels.register("gemv_4bit")
    def gemv_4bit(A, B, shapeB, absmax, code, blocksize):
        if not _fits(A, shapeB, None):
            return reference.gemv_4bit(A, B, shapeB, absmax, code, blocksize)
        out = torch.empty((*A.shape[:-1], shapeB[0]), dtype=A.dtype, device=A.device)
        _fused(gpu, A, B, shapeB, absmax, code, blocksize, None, out)
        return out

    @kernels.register("gemv_4bit.out")
    def gemv_4bit_out(A, B, shapeB, absmax, code, blocksize, out):
        if not _fits(A, shapeB, None):
            return reference.gemv_4bit_out(A, B, shapeB, absmax, code, blocksize, out)
        _fused(gpu, A, B, shapeB, absmax, code, blocksize, None, out)

    @kernels.register("matmul_4bit")
    def matmul_4bit(A, B, shapeB, absmax, code, blocksize, bias=None):
        if not _fits(A, shapeB, bias):
            return reference.matmul_4bit(A, B, shapeB, absmax, code, blocksize, bias)
        out = torch.empty((*A.shape[:-1], shapeB[0]), dtype=A.dtype, device=A.device)
        _fused(gpu, A, B, shapeB, absmax, code, blocksize, bias, out)
        return out
