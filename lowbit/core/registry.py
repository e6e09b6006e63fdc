"""Backend registry: which backend runs each op, per device type, and why.

A backend lives in ``lowbit/backends/<name>/`` and exposes two things (see
``lowbit/backends/reference/__init__.py`` for the smallest complete example):

* ``kernels``: a :class:`KernelTable` mapping op names (docs/design.md §5) to Python callables;
* ``probe()``: ``None`` when the backend can run here, else the reason it cannot.
  An optional ``details()`` returns a dict that ``python -m lowbit`` prints.

Selection (docs/design.md §3): the backend for a device type is chosen on first use, the first of
:func:`auto_order` that can run, else ``reference``: for ``cpu`` the native backend when its
library loads; for ``cuda`` the native ``hip`` backend on ROCm builds of torch, else ``cuda``, and
the ``triton`` kernels when that library cannot load but Triton can; for ``xpu`` the ``xpu``
backend (the Triton kernels). An op the chosen backend lacks runs the reference kernel.
``LOWBIT_BACKEND`` forces one backend (the import fails with the reason if it cannot load) and
:func:`use` overrides it in a block.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import importlib
import logging
import os
import threading
import warnings
from collections.abc import Callable, Iterator
from typing import Any, Optional

import torch

logger = logging.getLogger("lowbit")

BACKEND_NAMES: tuple[str, ...] = ("reference", "cpu", "cuda", "hip", "xpu", "triton")
#: Device types each backend serves; the reference backend (empty) serves every device type. A
#: backend module may widen its set with a ``device_types()`` function: the triton backend adds
#: ``cpu`` under Triton's interpreter (TRITON_INTERPRET=1), so that tests run its kernels here.
_DEVICE_TYPES: dict[str, tuple[str, ...]] = {
    "reference": (),
    "cpu": ("cpu",),
    "cuda": ("cuda",),
    "hip": ("cuda",),  # ROCm builds of torch expose AMD GPUs as device type "cuda"
    "xpu": ("xpu",),
    "triton": ("cuda", "xpu"),  # NVIDIA and AMD GPUs (device type "cuda") and Intel GPUs
}
ENV_BACKEND = "LOWBIT_BACKEND"


class BackendError(RuntimeError):
    """A requested backend does not exist or cannot load here."""


class LowbitWarning(UserWarning):
    """lowbit fell back to a slower path; the message says why."""


class KernelTable:
    """The kernels one backend implements, keyed by op name."""

    def __init__(self, backend: str):
        self.backend = backend
        self._kernels: dict[str, Callable[..., Any]] = {}

    def register(self, op_name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        def decorator(fn: Callable[..., Any]) -> Callable[..., Any]:
            if op_name in self._kernels:
                raise RuntimeError(f"backend {self.backend!r} registers {op_name!r} twice")
            self._kernels[op_name] = fn
            return fn

        return decorator

    def get(self, op_name: str) -> Optional[Callable[..., Any]]:
        return self._kernels.get(op_name)

    def names(self) -> list[str]:
        return sorted(self._kernels)


@dataclasses.dataclass
class BackendStatus:
    """What :func:`available` reports for one backend."""

    name: str
    device_type: str  # the device types it serves, comma-separated; "any" for the reference backend
    available: bool
    reason: str  # why it is unavailable, or "" when available
    ops: list[str]
    details: dict[str, Any]
    device_types: tuple[str, ...] = ()  # empty: every device type

    def serves(self, device_type: str) -> bool:
        return not self.device_types or device_type in self.device_types


class _Backend:
    """One backend module, loaded at most once."""

    def __init__(self, name: str):
        self.name = name
        self._lock = threading.Lock()
        self._loaded = False
        self.available = False
        self.reason = "not loaded yet"
        self.kernels = KernelTable(name)
        self.details: dict[str, Any] = {}
        self.device_types = _DEVICE_TYPES[name]

    def load(self) -> _Backend:
        with self._lock:
            if self._loaded:
                return self
            self._loaded = True
            try:
                module = importlib.import_module(f"lowbit.backends.{self.name}")
                reason = module.probe()
                self.details = module.details() if hasattr(module, "details") else {}
                if hasattr(module, "device_types"):
                    self.device_types = module.device_types()
            except Exception as err:  # a broken backend must never break `import lowbit`
                reason = f"loading lowbit.backends.{self.name} failed: {type(err).__name__}: {err}"
                module = None
            if reason is None:
                self.available, self.reason, self.kernels = True, "", module.kernels
            else:
                self.available, self.reason = False, reason
            return self

    def status(self, active: bool = False) -> BackendStatus:
        self.load()
        return BackendStatus(
            name=self.name,
            device_type=",".join(self.device_types) or "any",
            available=self.available,
            reason=self.reason,
            ops=self.kernels.names() if self.available else [],
            details=self.details,
            device_types=self.device_types,
        )


_BACKENDS = {name: _Backend(name) for name in BACKEND_NAMES}
_forced: Optional[str] = None
_auto: dict[str, str] = {}  # device type -> backend chosen on first use
_override: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("lowbit_backend", default=None)
_fallback_logged: set[tuple[str, str]] = set()


def _check_name(name: str, source: str) -> None:
    if name not in _BACKENDS:
        raise BackendError(f"{source}={name!r} is not a lowbit backend; valid names: {', '.join(BACKEND_NAMES)}")


def _require(name: str, source: str) -> _Backend:
    _check_name(name, source)
    backend = _BACKENDS[name].load()
    if not backend.available:
        raise BackendError(f"{source}={name!r} was requested but the {name} backend cannot run: {backend.reason}")
    return backend


def initialize() -> None:
    """Apply ``LOWBIT_BACKEND`` and pick the CPU backend. Called once by ``import lowbit``."""
    global _forced
    requested = os.environ.get(ENV_BACKEND, "").strip()
    if requested:
        _require(requested, ENV_BACKEND)
        _forced = requested
        return
    cpu = _BACKENDS["cpu"].load()
    if not cpu.available:
        warnings.warn(
            f"lowbit: the native CPU backend is unavailable ({cpu.reason}); using the slower reference "
            "backend. Run `python -m lowbit` for details.",
            LowbitWarning,
            stacklevel=3,
        )


def forced() -> Optional[str]:
    """The backend forced by ``LOWBIT_BACKEND``, or None."""
    return _forced


def _serves(name: str, device_type: str) -> bool:
    served = _BACKENDS[name].device_types
    return not served or device_type in served


def auto_order(device_type: str) -> tuple[str, ...]:
    """The backends tried for tensors of ``device_type``, best first (``reference`` comes last)."""
    if device_type == "cpu":
        return ("cpu",)
    if device_type == "cuda":  # the native library when it loads, else the Triton kernels
        return ("hip" if torch.version.hip else "cuda", "triton")
    if device_type == "xpu":
        return ("xpu",)
    return ()


def _auto_choice(device_type: str) -> str:
    return next((name for name in auto_order(device_type) if _BACKENDS[name].load().available), "reference")


def active(device_type: str) -> str:
    """Name of the backend that runs ops on tensors of ``device_type`` right now."""
    override = _override.get()
    if override is not None and _serves(override, device_type):
        return override
    if _forced is not None and _serves(_forced, device_type):
        return _forced
    if device_type not in _auto:
        _auto[device_type] = _auto_choice(device_type)
    return _auto[device_type]


def kernel_for(op_name: str, device_type: str) -> Callable[..., Any]:
    """The kernel for ``op_name`` on ``device_type``; the reference kernel when the backend lacks it."""
    name = active(device_type)
    kernel = _BACKENDS[name].kernels.get(op_name)
    if kernel is None:
        if (name, op_name) not in _fallback_logged:
            _fallback_logged.add((name, op_name))
            logger.debug("lowbit: backend %r has no %s kernel; using the reference kernel", name, op_name)
        kernel = _BACKENDS["reference"].load().kernels.get(op_name)
        if kernel is None:
            raise NotImplementedError(f"lowbit: no backend implements {op_name}")
    return kernel


def bind_weight(kernel: Callable[..., Any], *weight_args: Any) -> Callable[..., Any]:
    """``kernel`` of a product op (activation first, then the weight's arguments) with the weight's
    arguments given once: ``bind_weight(k, B, ...)(A, *rest) == k(A, B, ..., *rest)``. A kernel
    with a ``bind`` attribute prepares them itself, once (the CPU backend: a placed layer's product
    runs once per token, where each argument read costs a share of the layer)."""
    bind = getattr(kernel, "bind", None)
    if bind is not None:
        return bind(*weight_args)
    return lambda A, *rest: kernel(A, *weight_args, *rest)


def has_native_kernel(op_name: str, device_type: str) -> bool:
    """Whether the backend running ``device_type`` has its own kernel for ``op_name`` (so the op
    does not run the pure-torch reference)."""
    name = active(device_type)
    return name != "reference" and _BACKENDS[name].kernels.get(op_name) is not None


def get(name: str) -> _Backend:
    """The loaded backend ``name`` (for tests that call one backend's kernel directly)."""
    return _require(name, "backend")


def available() -> list[BackendStatus]:
    """Every known backend with its availability and, when unavailable, the reason."""
    return [_BACKENDS[name].status() for name in BACKEND_NAMES]


@contextlib.contextmanager
def use(name: str) -> Iterator[None]:
    """Run the ops in this block on backend ``name`` (for its device type; ``reference``: all)."""
    _require(name, "backend")
    token = _override.set(name)
    try:
        yield
    finally:
        _override.reset(token)
