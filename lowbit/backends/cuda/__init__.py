"""The CUDA backend (NVIDIA, compute capability 7.0+). Kernels arrive with issue 6.

Until then the backend only reports why it cannot run, so that ``python -m lowbit`` and
``LOWBIT_BACKEND=cuda`` say something precise. Tensors on CUDA devices run the reference
kernels, which are device-agnostic torch.
"""

from ...core.registry import KernelTable
from ..gpu_probe import NATIVE_GPU_LIBRARY_MISSING, cuda_device_problem

kernels = KernelTable("cuda")


def probe():
    return cuda_device_problem(rocm=False) or NATIVE_GPU_LIBRARY_MISSING.format(lib="liblowbit_cuda.so")
