"""Argument checks shared by the op layer and the functional API.

Every op validates its inputs here, in Python, before any backend sees them: a native kernel is
only ever handed contiguous tensors of the right dtype, device and size. Each failure is a
``TypeError`` (not a tensor) or ``ValueError`` that names the offending argument.

Metadata (dtype, shape, device, strides, aliasing) is checked on every call. Values are read
only where that costs no device synchronization (docs/design.md: no host read-back in hot paths):

* :func:`on_host` tensors (CPU tensors with real data): the data already sits on the host;
* :func:`once`: a constant (a quantization code) is validated the first time a tensor object is
  seen and again only after it was modified in place (its version counter moved);
* at load time (``QuantState.from_dict``, checkpoints, optimizer ``load_state_dict``).

Fake and meta tensors (``torch.compile`` tracing, ``FakeTensorMode``) have no data: value checks
skip them, so every check runs unchanged while tracing.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any, Optional

import torch
from torch._C._functorch import is_functorch_wrapped_tensor
from torch._subclasses.fake_tensor import is_fake
from torch.utils.weak import WeakIdKeyDictionary

from . import formats


def has_data(t: torch.Tensor) -> bool:
    """Whether ``t`` holds real values (not a fake or meta tensor of a trace). While torch.compile
    traces Python code nothing has values; the ops' own checks read them when the graph runs."""
    if torch.compiler.is_compiling() or t.is_meta:  # is_meta: t.device builds an object (0.2 us)
        return False
    # a plain tensor wraps no other (fake tensors are a subclass): is_fake's search, which costs
    # more than a decode step's product of a small layer, has nothing to find
    plain = type(t) is torch.Tensor and not torch._is_functional_tensor(t) and not is_functorch_wrapped_tensor(t)
    return plain or not is_fake(t)


def on_host(t: torch.Tensor) -> bool:
    """Whether reading ``t``'s values costs no device synchronization."""
    return t.is_cpu and has_data(t)


def tensor(
    value: object,
    name: str,
    dtypes: Optional[Sequence[torch.dtype]] = None,
    *,
    numel: Optional[int] = None,
    nonempty: bool = True,
    contiguous: bool = True,
    device: Optional[torch.device] = None,
    ndim: Optional[int] = None,
    min_ndim: int = 0,
) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if dtypes is not None and value.dtype not in dtypes:
        allowed = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise ValueError(f"{name} must have dtype {allowed}; got {value.dtype}")
    if device is not None and value.device != device:
        raise ValueError(f"{name} is on {value.device}, expected {device} (the device of the input)")
    if ndim is not None and value.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(value.shape)}")
    if value.dim() < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dimension(s), got shape {tuple(value.shape)}")
    if nonempty and value.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(value.shape)})")
    if numel is not None and value.numel() != numel:
        raise ValueError(f"{name} has {value.numel()} elements, expected {numel}")
    if contiguous and not value.is_contiguous():
        raise ValueError(f"{name} must be contiguous; call .contiguous() on it first")
    return value


def blocksize(value: object, name: str = "blocksize", allowed: Sequence[int] = formats.BLOCKSIZES) -> int:
    """One of ``allowed``: the blocksizes of every format, or ``formats.BLOCKSIZES_8BIT`` for 8-bit blockwise."""
    if isinstance(value, bool) or not isinstance(value, int) or value not in allowed:
        raise ValueError(f"{name} must be one of {tuple(allowed)}, got {value!r}")
    return value


def quant_type(value: object, name: str = "quant_type") -> str:
    if not isinstance(value, str) or value not in formats.QUANT_TYPES:
        raise ValueError(f"{name} must be 'nf4' or 'fp4', got {value!r}")
    return value


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


def number(
    value: object, name: str, low: float = -math.inf, high: float = math.inf, *, high_open: bool = False
) -> float:
    """A finite real number in ``[low, high]`` (``[low, high)`` with ``high_open``): Python numbers
    and 0-d tensors (a tensor ``lr``), never bools or strings."""
    if isinstance(value, torch.Tensor) and value.dim() == 0 and not value.is_complex():
        value = value.item()  # hyper-parameters are read on the host, at construction or step set-up
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    as_float = float(value)
    too_high = as_float >= high if high_open else as_float > high
    if not math.isfinite(as_float) or as_float < low or too_high:
        bracket = ")" if high_open else "]"
        raise ValueError(f"{name} must be a finite number in [{low:g}, {high:g}{bracket}, got {value!r}")
    return as_float


def finite_values(value: torch.Tensor, name: str) -> None:
    """NaN/Inf in ``value`` is an error, checked where the data is on the host. (A quantizer's
    absmax is non-finite exactly when its input is: checking it reads a block's worth less.)

    A sum is finite only if every element is (NaN and Inf propagate through it) and costs a
    fraction of ``torch.isfinite(value).all()`` (a tenth or less on a CPU); the element-wise test
    runs only when the sum is not finite (a NaN or Inf, or large finite values that overflow it)."""
    if not (on_host(value) and value.is_floating_point()) or bool(torch.isfinite(value.sum())):
        return
    if not bool(torch.isfinite(value).all()):
        raise ValueError(f"{name} contains NaN or Inf values; they cannot be quantized")


# ---- values checked once per tensor -----------------------------------------------------------
_validated: WeakIdKeyDictionary = WeakIdKeyDictionary()


def once(value: torch.Tensor, key: Any, validate: Callable[[torch.Tensor], None]) -> None:
    """Run ``validate(value)`` unless this tensor object passed the check ``key`` before and has not
    been modified in place since (its ``_version`` is unchanged). A constant such as a code is thus
    read back once, not at every call. Tensors without data are skipped (nothing to read)."""
    if not has_data(value):
        return
    try:
        version = value._version
    except RuntimeError:  # an inference tensor keeps no version counter: check it every time
        validate(value)
        return
    seen = _validated.get(value)
    if seen is not None and seen.get(key) == version:
        return
    validate(value)
    if seen is None:
        seen = _validated[value] = {}
    seen[key] = version


def _check_code_values(value: torch.Tensor, name: str, ascending: bool) -> None:
    if not bool(torch.isfinite(value).all()):
        raise ValueError(f"{name} contains NaN or Inf; a code holds finite values (usually in [-1, 1])")
    if ascending and not bool((value[1:] >= value[:-1]).all()):
        raise ValueError(f"{name} must be sorted in ascending order (a 256-entry 8-bit code)")


def code(value: object, name: str, size: int, device: torch.device) -> torch.Tensor:
    """A ``size``-entry float32 code on ``device``: finite, and ascending for 256-entry (8-bit)
    codes, whose quantizers search it. Values are validated once per tensor (:func:`once`)."""
    value = tensor(value, name, (torch.float32,), numel=size, device=device, ndim=1)
    once(value, ("code", size), lambda t: _check_code_values(t, name, ascending=size == 256))
    return value


def moved(value: torch.Tensor, name: str, device: torch.device) -> torch.Tensor:
    """``value`` on ``device`` (codes are constants that may live elsewhere, as in bitsandbytes);
    a tensor without data (meta) cannot move to a real device."""
    if value.device != device and value.device.type == "meta":
        raise ValueError(f"{name} is on meta (no data), expected {device} (the device of the input)")
    return value.to(device)


def code_matches(value: torch.Tensor, quant_type_: str, name: str) -> None:
    """A 4-bit code must be exactly the codebook of its quant type (checked once per tensor)."""
    tensor(value, name, (torch.float32,), numel=16, ndim=1)

    def validate(t: torch.Tensor) -> None:
        if not torch.equal(t.cpu(), formats.code_tensor(quant_type_)):
            raise ValueError(f"{name} is not the {quant_type_} codebook (quant_type={quant_type_!r})")

    once(value, ("codebook", quant_type_), validate)


def rows(A: torch.Tensor) -> int:
    """Number of rows of A viewed as a matrix over its last dimension."""
    return A.numel() // A.shape[-1]


# ---- out= arguments ---------------------------------------------------------------------------
def _byte_span(t: torch.Tensor) -> tuple[int, int]:
    """The bytes of its storage that ``t`` can touch, from its metadata only."""
    extent = 1 + sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride()))
    start = t.storage_offset() * t.element_size()
    return start, start + extent * t.element_size()


def overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` may share memory (same storage, intersecting byte ranges)."""
    if a.numel() == 0 or b.numel() == 0 or not torch._C._is_alias_of(a, b):
        return False
    a0, a1 = _byte_span(a)
    b0, b1 = _byte_span(b)
    return a0 < b1 and b0 < a1


def out(
    value: object,
    name: str,
    shape_: Sequence[int],
    dtype: torch.dtype,
    device: torch.device,
    inputs: dict[str, object],
    shape_of: str = "the result",
    *,
    contiguous: bool = True,
) -> torch.Tensor:
    """An ``out=`` tensor: exactly ``shape_`` and ``dtype`` (no broadcasting, no casting), on
    ``device``, contiguous (unless it is only ``copy_``-ed into), and sharing no memory with any of
    ``inputs`` (every backend would otherwise read values it already overwrote). ``shape_of`` says
    where the shape comes from."""
    value = tensor(value, name, (dtype,), device=device, nonempty=False, contiguous=contiguous)
    if tuple(value.shape) != tuple(shape_):
        raise ValueError(f"{name} has shape {tuple(value.shape)}, expected {tuple(shape_)} ({shape_of})")
    for input_name, other in inputs.items():
        if isinstance(other, torch.Tensor) and overlaps(value, other):
            raise ValueError(f"{name} overlaps the input {input_name}; pass a separate output tensor")
    return value
