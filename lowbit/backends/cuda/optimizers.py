"""Fused optimizer steps through the GPU library (csrc/cuda/optimizers.cu): 32-bit state, and
8-bit blockwise state (dequantize -> update -> requantize in one kernel). Same formulas and
operation order as lowbit/backends/reference/optimizers.py; docs/design.md §5 tolerances."""

from __future__ import annotations

import ctypes

import torch

from ...core import formats
from ...core.registry import KernelTable
from .native import DTYPES, OPTIMIZERS, GpuLibrary, args_struct, buf, ptr


def install(kernels: KernelTable, gpu: GpuLibrary) -> None:
    @kernels.register("optimizer_update_32bit")
    @torch.no_grad()
    def optimizer_update_32bit(
        optimizer_name, g, p, state1, state2, unorm_vec, max_unorm, param_norm, beta1, beta2, beta3, alpha, eps,
        weight_decay, step, lr, gnorm_scale, skip_zeros=False,
    ):  # fmt: skip
        if skip_zeros:
            raise NotImplementedError("skip_zeros is not supported")
        optimizer = OPTIMIZERS[optimizer_name]
        trust = max_unorm > 0.0 and optimizer in formats.NATIVE_TRUST_RATIO_IDS
        scratch = torch.zeros(1, dtype=torch.float64, device=p.device) if trust else None
        args = args_struct(beta1, beta2, beta3, alpha, eps, weight_decay, lr, gnorm_scale, step, max_unorm, param_norm)
        gpu.call(
            "lowbit_cuda_optimizer_update_32bit", p.device,
            optimizer, DTYPES[p.dtype], ptr(g), ptr(p), p.numel(), *buf(state1), *buf(state2), ctypes.byref(args),
            ptr(unorm_vec) if trust else None, ptr(scratch),
        )  # fmt: skip

    @kernels.register("optimizer_update_8bit_blockwise")
    @torch.no_grad()
    def optimizer_update_8bit_blockwise(
        optimizer_name, g, p, state1, state2, beta1, beta2, beta3, alpha, eps, step, lr, qmap1, qmap2, absmax1,
        absmax2, weight_decay, gnorm_scale, skip_zeros=False,
    ):  # fmt: skip
        if skip_zeros:
            raise NotImplementedError("skip_zeros is not supported")
        args = args_struct(beta1, beta2, beta3, alpha, eps, weight_decay, lr, gnorm_scale, step)
        gpu.call(
            "lowbit_cuda_optimizer_update_8bit_blockwise", p.device,
            OPTIMIZERS[optimizer_name], DTYPES[p.dtype], ptr(g), ptr(p), p.numel(), *buf(state1), *buf(state2),
            ctypes.byref(args), *buf(qmap1), *buf(qmap2), *buf(absmax1), *buf(absmax2),
        )  # fmt: skip
