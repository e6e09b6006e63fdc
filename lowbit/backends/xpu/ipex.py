"""Intel Extension for PyTorch (IPEX) on XPU: whether lowbit uses it, and the ops it takes from it.

IPEX ships SYCL kernels for bitsandbytes' 8-bit blockwise dequantize
(``ipex.xpu.bitsandbytes.cdequantize_blockwise_{fp32,fp16,bf16}``), which bitsandbytes' XPU backend
used; lowbit uses them for ``dequantize_blockwise`` when IPEX is installed, built for this torch's
major.minor (IPEX binaries only load with the torch they were built for) and has XPU support.
Everything else on XPU runs the Triton kernels. IPEX's last release, 2.8.0, pairs with torch 2.8:
Intel has since moved XPU support into torch itself (``torch.xpu``, oneDNN, and Intel's Triton
backend that ``torch.compile`` uses), so with newer torch IPEX is neither available nor needed.
The version is read from the installed distribution before anything is imported, so a mismatched
IPEX is never loaded.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from collections.abc import Callable
from typing import Any, Optional

import torch

DISTRIBUTION = "intel_extension_for_pytorch"
_HISTORY = "IPEX's last release, 2.8.0, pairs with torch 2.8; newer torch has XPU support built in"


def _major_minor(version: str) -> tuple[str, ...]:
    return tuple(version.split("+")[0].split(".")[:2])


def _load() -> tuple[Optional[Any], str]:
    """(the IPEX module or None, why it is or is not used)."""
    try:
        version = importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return None, f"not installed ({_HISTORY})"
    if _major_minor(version) != _major_minor(torch.__version__):
        return None, (
            f"{DISTRIBUTION} {version} is built for torch {'.'.join(_major_minor(version))}, this torch is "
            f"{torch.__version__} ({_HISTORY})"
        )
    try:
        ipex = importlib.import_module(DISTRIBUTION)
    except Exception as err:  # a broken IPEX must not break lowbit
        return None, f"importing {DISTRIBUTION} {version} failed: {type(err).__name__}: {err}"
    if not ipex._C._has_xpu():
        return None, f"{DISTRIBUTION} {version} is a build without XPU support"
    return ipex, f"{DISTRIBUTION} {version}: dequantize_blockwise"


IPEX, REASON = _load()


def describe() -> str:
    """One line for ``python -m lowbit``: what is used, or why IPEX is not."""
    return f"used ({REASON})" if IPEX is not None else f"not used: {REASON}"


def kernels() -> dict[str, Callable[..., Any]]:
    """The ops the xpu backend takes from IPEX (empty when IPEX is not used)."""
    if IPEX is None:
        return {}
    by_dtype = {
        torch.float32: IPEX.xpu.bitsandbytes.cdequantize_blockwise_fp32,
        torch.float16: IPEX.xpu.bitsandbytes.cdequantize_blockwise_fp16,
        torch.bfloat16: IPEX.xpu.bitsandbytes.cdequantize_blockwise_bf16,
    }

    def dequantize_blockwise_out(A, absmax, code, blocksize, dtype, out):
        by_dtype[dtype](code, A, absmax, out, blocksize, A.numel())

    def dequantize_blockwise(A, absmax, code, blocksize, dtype):
        out = torch.empty(A.shape, dtype=dtype, device=A.device)
        dequantize_blockwise_out(A, absmax, code, blocksize, dtype, out)
        return out

    return {"dequantize_blockwise": dequantize_blockwise, "dequantize_blockwise.out": dequantize_blockwise_out}
