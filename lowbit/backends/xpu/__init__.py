"""The Intel XPU backend (torch.xpu; IPEX when present). Kernels are future work."""

import torch

from ...core.registry import KernelTable

kernels = KernelTable("xpu")


def probe():
    xpu = getattr(torch, "xpu", None)
    if xpu is None or not xpu.is_available():
        return "no Intel XPU device: torch.xpu.is_available() is False"
    return "no lowbit XPU kernels yet: XPU tensors run the reference backend"
