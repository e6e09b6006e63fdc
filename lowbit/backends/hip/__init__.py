"""The HIP backend (AMD GPUs through ROCm): the csrc/cuda sources built by hipcc into
``liblowbit_hip.so`` (csrc/cuda/compat.cuh maps the CUDA names), same C ABI.

The Python side is the CUDA backend's, bound to the HIP library: the kernel families in
``lowbit/backends/cuda/`` (quantize_4bit, blockwise_8bit, matmul_4bit, int8, optimizers) register
their kernels here through ``install(kernels, native.HIP)``. ROCm builds of torch expose AMD GPUs
as device type ``cuda``, so the same torch calls (streams, devices) apply.
"""

from __future__ import annotations

from typing import Any, Optional

from ...core.registry import KernelTable
from ..cuda import blockwise_8bit, int8, matmul_4bit, native, optimizers, quantize_4bit
from ..gpu_probe import backend_problem

kernels = KernelTable("hip")
for _family in (quantize_4bit, blockwise_8bit, matmul_4bit, int8, optimizers):
    _family.install(kernels, native.HIP)


def probe() -> Optional[str]:
    return backend_problem(native.HIP, rocm=True)


def details() -> dict[str, Any]:
    return native.HIP.details()
