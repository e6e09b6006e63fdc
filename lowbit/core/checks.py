"""Argument checks shared by the op layer and the functional API.

Every op validates its inputs here, in Python, before any backend sees them: a native kernel is
only ever handed contiguous tensors of the right dtype, device and size. Each failure is a
``TypeError`` (not a tensor) or ``ValueError`` that names the offending argument.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Optional

import torch

from . import formats


def tensor(
    value: object,
    name: str,
    dtypes: Optional[Sequence[torch.dtype]] = None,
    *,
    numel: Optional[int] = None,
    nonempty: bool = True,
    contiguous: bool = True,
    device: Optional[torch.device] = None,
) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if dtypes is not None and value.dtype not in dtypes:
        allowed = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise ValueError(f"{name} must have dtype {allowed}; got {value.dtype}")
    if nonempty and value.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(value.shape)})")
    if numel is not None and value.numel() != numel:
        raise ValueError(f"{name} has {value.numel()} elements, expected {numel}")
    if contiguous and not value.is_contiguous():
        raise ValueError(f"{name} must be contiguous; call .contiguous() on it first")
    if device is not None and value.device != device:
        raise ValueError(f"{name} is on {value.device}, expected {device} (the device of the input)")
    return value


def blocksize(value: object, name: str = "blocksize") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value not in formats.BLOCKSIZES:
        raise ValueError(f"{name} must be one of {formats.BLOCKSIZES}, got {value!r}")
    return value


def quant_type(value: object, name: str = "quant_type") -> str:
    if value not in formats.QUANT_TYPES:
        raise ValueError(f"{name} must be 'nf4' or 'fp4', got {value!r}")
    return value  # type: ignore[return-value]


def float_dtype(value: object, name: str) -> torch.dtype:
    if value not in formats.FLOAT_DTYPES:
        raise ValueError(f"{name} must be torch.float32, torch.float16 or torch.bfloat16, got {value!r}")
    return value  # type: ignore[return-value]


def shape(value: object, name: str) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple, torch.Size)) or not all(
        isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in value
    ):
        raise ValueError(f"{name} must be a sequence of non-negative ints, got {value!r}")
    if math.prod(value) == 0:
        raise ValueError(f"{name} {tuple(value)} describes an empty tensor")
    return tuple(value)


def finite_absmax(absmax: torch.Tensor, input_name: str = "A") -> None:
    """Quantizers propagate NaN/Inf into the block's absmax; turn that into an error."""
    if not bool(torch.isfinite(absmax).all()):
        raise ValueError(f"{input_name} contains NaN or Inf values; they cannot be quantized")


def all_finite(A: torch.Tensor, name: str = "A") -> None:
    """Raise when ``A`` holds NaN or Inf. A sum is finite only if every element is (NaN and Inf
    propagate through it) and costs a fraction of ``torch.isfinite(A).all()`` (a tenth or less on a
    CPU); the element-wise test runs only when the sum is not finite (a NaN or Inf in ``A``, or
    large finite values that overflow the sum)."""
    if bool(torch.isfinite(A.sum())):
        return
    if not bool(torch.isfinite(A).all()):
        raise ValueError(f"{name} contains NaN or Inf values; they cannot be quantized")


def code(value: object, name: str, size: int, device: torch.device) -> torch.Tensor:
    value = tensor(value, name, (torch.float32,), numel=size, device=device)
    if size == 256 and not bool((value[1:] >= value[:-1]).all()):
        raise ValueError(f"{name} must be sorted in ascending order (a 256-entry 8-bit code)")
    return value


def rows(A: torch.Tensor) -> int:
    """Number of rows of A viewed as a matrix over its last dimension."""
    return A.numel() // A.shape[-1]
