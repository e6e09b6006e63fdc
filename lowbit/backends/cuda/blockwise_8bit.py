"""8-bit blockwise quantize/dequantize through the GPU library (csrc/cuda/blockwise_8bit.cu).
Bit-exact with the reference and the CPU backend (docs/design.md §5). The GPU kernels take blocks
of up to 4096 values; the larger 8-bit blocksizes (formats.BLOCKSIZES_8BIT) run the reference kernel."""

from __future__ import annotations

import torch

from ...core import formats
from ...core.registry import KernelTable
from ..reference import blockwise_8bit as reference
from .native import DTYPES, GpuLibrary, buf, ptr


def install(kernels: KernelTable, gpu: GpuLibrary) -> None:
    @kernels.register("quantize_blockwise")
    def quantize_blockwise(A: torch.Tensor, code: torch.Tensor, blocksize: int):
        if blocksize not in formats.BLOCKSIZES:
            return reference.quantize_blockwise(A, code, blocksize)
        n = A.numel()
        q = torch.empty(A.shape, dtype=torch.uint8, device=A.device)
        absmax = torch.empty(formats.num_blocks(n, blocksize), dtype=torch.float32, device=A.device)
        gpu.call(
            "lowbit_cuda_quantize_blockwise", A.device,
            DTYPES[A.dtype], *buf(code), ptr(A), n, blocksize, *buf(q), *buf(absmax),
        )  # fmt: skip
        return q, absmax

    @kernels.register("dequantize_blockwise.out")
    def dequantize_blockwise_out(A, absmax, code, blocksize, dtype, out):
        if blocksize not in formats.BLOCKSIZES:
            return reference.dequantize_blockwise_out(A, absmax, code, blocksize, dtype, out)
        gpu.call(
            "lowbit_cuda_dequantize_blockwise", A.device,
            DTYPES[dtype], *buf(code), *buf(A), *buf(absmax), blocksize, ptr(out), out.numel(),
        )  # fmt: skip

    @kernels.register("dequantize_blockwise")
    def dequantize_blockwise(A, absmax, code, blocksize, dtype):
        out = torch.empty(A.shape, dtype=dtype, device=A.device)
        dequantize_blockwise_out(A, absmax, code, blocksize, dtype, out)
        return out
