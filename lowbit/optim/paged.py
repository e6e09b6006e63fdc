"""Paged optimizer state: CUDA managed (unified) memory that the driver pages to the CPU.

A paged optimizer keeps its large state buffers in memory allocated with ``cudaMallocManaged``:
the GPU uses them in place, and when the GPU runs short the driver evicts pages to host memory
instead of failing with out-of-memory. lowbit calls the CUDA runtime that torch already loaded
(through ctypes; the native libraries never link it) and wraps each allocation in a torch CUDA
tensor through ``__cuda_array_interface__``, so every backend's kernels see ordinary tensors.

Where managed memory is unavailable (CPU tensors, ROCm/XPU, a runtime that cannot be found) the
buffers are plain tensors and a paged optimizer computes exactly what its unpaged twin computes;
:func:`warn_unpaged` says so once per process.
"""

from __future__ import annotations

import ctypes
import functools
import math
import sys
import warnings
from typing import Optional

import torch

from ..core.registry import LowbitWarning

#: bitsandbytes pages only buffers of parameters with at least this many elements (~0.4 MB fp32).
MIN_PAGED_NUMEL = 100_000

_CUDA_MEM_ATTACH_GLOBAL = 1
_TYPESTR = {torch.float32: "<f4", torch.uint8: "|u1"}
_warned = False


def warn_unpaged(reason: str) -> None:
    """Warn (once per process) that paged optimizers run unpaged here, and why."""
    global _warned
    if _warned:
        return
    _warned = True
    warnings.warn(
        f"lowbit.optim: paged optimizers need CUDA managed memory, which {reason}; their state is "
        "allocated as ordinary memory instead, so each Paged* optimizer behaves exactly like its "
        "unpaged twin (same results, no paging).",
        LowbitWarning,
        stacklevel=_user_stacklevel(),
    )


def _user_stacklevel() -> int:
    """The stacklevel of the first caller outside lowbit and torch (the user's ``step()`` call)."""
    level, frame = 2, sys._getframe(2)
    while frame is not None and frame.f_globals.get("__name__", "").startswith(("lowbit.", "torch.")):
        level, frame = level + 1, frame.f_back
    return level


def _cuda_major() -> Optional[int]:
    return int(torch.version.cuda.split(".")[0]) if torch.version.cuda else None


@functools.cache
def _cudart() -> Optional[ctypes.CDLL]:
    """The CUDA runtime torch loaded (found by soname), or None."""
    major = _cuda_major()
    if major is None or not torch.cuda.is_available():
        return None
    for name in (f"libcudart.so.{major}", f"libcudart.so.{major}.0", "libcudart.so"):
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        lib.cudaMallocManaged.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t, ctypes.c_uint]
        lib.cudaMallocManaged.restype = ctypes.c_int
        lib.cudaFree.argtypes = [ctypes.c_void_p]
        lib.cudaFree.restype = ctypes.c_int
        return lib
    return None


class _ManagedAllocation:
    """Owns one managed allocation; the tensor viewing it keeps this object (and the memory) alive."""

    def __init__(self, lib: ctypes.CDLL, ptr: int, shape: tuple[int, ...], dtype: torch.dtype):
        self._lib, self._ptr = lib, ptr
        self.__cuda_array_interface__ = {
            "shape": shape,
            "typestr": _TYPESTR[dtype],
            "data": (ptr, False),
            "version": 2,
        }

    def __del__(self) -> None:
        self._lib.cudaFree(ctypes.c_void_p(self._ptr))


def managed_zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Optional[torch.Tensor]:
    """A zero-filled CUDA tensor in managed memory, or None where managed memory is unavailable."""
    lib = _cudart()
    if lib is None or device.type != "cuda" or dtype not in _TYPESTR:
        return None
    nbytes = max(1, math.prod(shape) * torch.empty((), dtype=dtype).element_size())
    ptr = ctypes.c_void_p()
    with torch.cuda.device(device):
        if lib.cudaMallocManaged(ctypes.byref(ptr), nbytes, _CUDA_MEM_ATTACH_GLOBAL) != 0 or not ptr.value:
            return None
        owner = _ManagedAllocation(lib, ptr.value, tuple(shape), dtype)  # frees the memory when collected
        try:
            # the tensor holds a reference to ``owner`` (torch parses typestr with numpy)
            tensor = torch.as_tensor(owner, device=device)
        except (RuntimeError, TypeError, ValueError):
            return None
    if tensor.device != device or tensor.data_ptr() != ptr.value:  # copied somewhere: not managed
        return None
    return tensor.zero_()


def prefetch(tensor: torch.Tensor) -> None:
    """Ask the driver to move a managed tensor to its GPU before a kernel touches it (a hint).

    The call exists with this signature up to CUDA 12; elsewhere pages still migrate on demand."""
    lib, major = _cudart(), _cuda_major()
    if lib is None or major is None or major >= 13:
        return
    stream = torch.cuda.current_stream(tensor.device).cuda_stream
    lib.cudaMemPrefetchAsync(
        ctypes.c_void_p(tensor.data_ptr()),
        ctypes.c_size_t(tensor.numel() * tensor.element_size()),
        ctypes.c_int(tensor.device.index or 0),
        ctypes.c_void_p(stream),
    )
