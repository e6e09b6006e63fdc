"""Why a GPU backend cannot run here, in words a user can act on."""

from __future__ import annotations

from typing import Optional

import torch

NATIVE_GPU_LIBRARY_MISSING = (
    "native library {lib} is not built (pip install . builds the CPU library only; GPU kernels are not "
    "part of this release)"
)


def cuda_device_problem(rocm: bool) -> Optional[str]:
    """None when torch sees a usable GPU of the right kind, else the reason."""
    if rocm and not torch.version.hip:
        return "this torch is not a ROCm build (torch.version.hip is None)"
    if not rocm and torch.version.hip:
        return "this torch is a ROCm build; use the hip backend"
    if not rocm and torch.version.cuda is None:
        return f"this torch ({torch.__version__}) was built without CUDA support"
    if not torch.cuda.is_available():
        return "no GPU visible: torch.cuda.is_available() is False (no device or no driver)"
    return None
