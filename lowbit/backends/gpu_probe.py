"""Why a GPU backend cannot run here, in words a user can act on.

Checked in the order a user fixes them: torch's build (CUDA vs ROCm vs CPU-only), a visible GPU,
the native library (built? loads? right ABI? -- see ``lowbit/backends/cuda/native.py``), code
for this GPU's architecture in the library, and a runtime that starts on this driver. When torch
is the blocker, the library's own state is appended, so that the next obstacle is not a surprise.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch

if TYPE_CHECKING:  # pragma: no cover
    from .cuda.native import GpuLibrary


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


def backend_problem(library: GpuLibrary, rocm: bool) -> Optional[str]:
    """None when the GPU backend served by ``library`` can run on the current GPU, else why not."""
    torch_problem = cuda_device_problem(rocm)
    library_problem = library.load_error()
    if torch_problem is not None:
        if not library.selected():  # torch's build calls for no library file: nothing to add
            return torch_problem
        if library_problem is not None:
            return f"{torch_problem}; besides, {library_problem}"
        return f"{torch_problem} ({library.name} itself is built and loads)"
    if library_problem is not None:
        return library_problem
    return library.device_problem(torch.cuda.current_device())
