"""The CUDA backend (NVIDIA, compute capability 7.0+): kernels in csrc/cuda through the C ABI of
csrc/cuda/lowbit_cuda_capi.h, loaded with ctypes (``native.py``).

Available when torch has CUDA, a GPU is visible, ``liblowbit_cuda<major>.so`` (the one for torch.version.cuda) loads with the right ABI
and holds code the current GPU can run; otherwise :func:`probe` says which of these fails (and,
when torch itself is the blocker, also what state the library is in), so that
``python -m lowbit`` and ``LOWBIT_BACKEND=cuda`` are precise. Ops it lacks run the reference
kernels, which are device-agnostic torch.
"""

from __future__ import annotations

from typing import Any, Optional

from ...core.registry import KernelTable
from ..gpu_probe import backend_problem
from . import blockwise_8bit, int8, matmul_4bit, native, optimizers, quantize_4bit

kernels = KernelTable("cuda")
for _family in (quantize_4bit, blockwise_8bit, matmul_4bit, int8, optimizers):
    _family.install(kernels, native.CUDA)


def probe() -> Optional[str]:
    return backend_problem(native.CUDA, rocm=False)


def details() -> dict[str, Any]:
    return native.CUDA.details()
