"""Products with a 4-bit weight through the GPU library (csrc/cuda/gemv_4bit.cu).

The fused kernel takes 1..8 activation rows per launch; up to ``FUSED_MAX_ROWS`` rows run as
8-row slices (each re-reads the packed weight, still far less traffic than a dense copy: see
``lowbit.autograd.matmul_4bit.GPU_GEMV_MAX_ROWS``, which routes larger batches to dequantize +
cuBLAS before they get here). More rows, or a bias whose dtype is not a float dtype, run the
reference kernel (dequantize + torch matmul, float32) on the same device. Results differ from the
reference only by float32 accumulation order."""

from __future__ import annotations

import torch

from ...core.registry import KernelTable
from ..reference import matmul_4bit as reference
from .native import DTYPES, GpuLibrary, buf, ptr

MAX_ROWS = 8  # lowbit_cuda_gemv_4bit_max_rows(): rows per launch
FUSED_MAX_ROWS = 16  # rows served by the fused kernel, in slices of MAX_ROWS (= GPU_GEMV_MAX_ROWS)


def _fused(gpu: GpuLibrary, A, B, shapeB, absmax, code, blocksize, bias, out) -> None:
    N, K = shapeB
    rows = A.numel() // K
    A2d, out2d = A.reshape(rows, K), out.view(rows, N)
    for first in range(0, rows, MAX_ROWS):  # contiguous row slices: A stays 16-byte aligned when K % 8 == 0
        count = min(MAX_ROWS, rows - first)
        gpu.call(
            "lowbit_cuda_gemv_4bit", A.device,
            DTYPES[A.dtype], ptr(A2d[first]), count, ptr(B), B.nbytes, N, K, *buf(absmax), *buf(code), blocksize,
            *buf(bias), DTYPES[bias.dtype] if bias is not None else 0, ptr(out2d[first]),
        )  # fmt: skip


def _fits(A, shapeB, bias) -> bool:
    return A.numel() // shapeB[1] <= FUSED_MAX_ROWS and (bias is None or bias.dtype in DTYPES)


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
