"""4-bit quantize/dequantize through the GPU library (csrc/cuda/quantize_4bit.cu). Bit-exact with
the reference and the CPU backend (docs/design.md §5)."""

from __future__ import annotations

import math

import torch

from ...core import formats
from ...core.registry import KernelTable
from .native import DTYPES, QUANT_TYPES, GpuLibrary, buf, ptr


def install(kernels: KernelTable, gpu: GpuLibrary) -> None:
    @kernels.register("quantize_4bit")
    def quantize_4bit(A: torch.Tensor, blocksize: int, quant_type: str, quant_storage: torch.dtype):
        n = A.numel()
        packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=A.device)
        absmax = torch.empty(formats.num_blocks(n, blocksize), dtype=torch.float32, device=A.device)
        gpu.call(
            "lowbit_cuda_quantize_4bit", A.device,
            DTYPES[A.dtype], ptr(A), n, blocksize, QUANT_TYPES[quant_type], *buf(packed), *buf(absmax),
        )  # fmt: skip
        return packed.view(quant_storage).unsqueeze(1), absmax

    @kernels.register("dequantize_4bit.out")
    def dequantize_4bit_out(A, absmax, blocksize, quant_type, shape, dtype, out):
        gpu.call(
            "lowbit_cuda_dequantize_4bit", A.device,
            DTYPES[dtype], ptr(A), A.nbytes, *buf(absmax), blocksize, QUANT_TYPES[quant_type], ptr(out),
            math.prod(shape),
        )  # fmt: skip

    @kernels.register("dequantize_4bit")
    def dequantize_4bit(A, absmax, blocksize, quant_type, shape, dtype):
        out = torch.empty(shape, dtype=dtype, device=A.device)
        dequantize_4bit_out(A, absmax, blocksize, quant_type, shape, dtype, out)
        return out
