"""The Intel XPU backend (torch.xpu): the Triton kernels of ``lowbit/backends/triton`` (torch's XPU
wheels bring Intel's Triton as ``pytorch-triton-xpu``), the int8 product through ``torch._int_mm``
where torch has it for XPU (the Triton int8 kernels choose it), and IPEX's ops where IPEX matches
torch (``ipex.py`` says which, or why IPEX is not used).
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from ...core.registry import KernelTable
from .. import triton as triton_backend
from . import ipex

kernels = KernelTable("xpu")
_IPEX_KERNELS = ipex.kernels()
for _op in sorted(set(triton_backend.kernels.names()) | set(_IPEX_KERNELS)):
    kernels.register(_op)(_IPEX_KERNELS.get(_op) or triton_backend.kernels.get(_op))


def probe() -> Optional[str]:
    xpu = getattr(torch, "xpu", None)
    if xpu is None or not xpu.is_available():
        return "no Intel XPU device: torch.xpu.is_available() is False"
    return triton_backend.IMPORT_ERROR


def details() -> dict[str, Any]:
    return {"kernels": "triton " + triton_backend.details().get("triton", "(not installed)"), "ipex": ipex.describe()}
