"""The HIP backend (AMD GPUs through ROCm), built by hipcc from the csrc/cuda sources (issue 6)."""

from ...core.registry import KernelTable
from ..gpu_probe import NATIVE_GPU_LIBRARY_MISSING, cuda_device_problem

kernels = KernelTable("hip")


def probe():
    return cuda_device_problem(rocm=True) or NATIVE_GPU_LIBRARY_MISSING.format(lib="liblowbit_hip.so")
