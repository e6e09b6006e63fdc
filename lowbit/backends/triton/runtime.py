"""Triton here: whether it is installed, where its kernels can run, and what every launch shares.

Imported only when ``import triton`` succeeds (``lowbit/backends/triton/__init__.py`` checks).

Where the kernels run: GPUs of device type ``cuda`` (NVIDIA, and AMD on ROCm builds of torch) and
``xpu`` (Intel; torch's XPU wheels bring Intel's Triton as ``pytorch-triton-xpu``). With
``TRITON_INTERPRET=1`` in the environment before lowbit loads this backend, Triton's interpreter
runs the same kernels on CPU tensors with numpy, one program at a time: that is how the tests run
them on machines without a GPU (``nox -s triton``), and the only case in which this backend serves
``cpu`` tensors.

Bit-exact kernels are launched with ``enable_fp_fusion=False`` (no contraction of a multiply and
an add into an FMA, as the reference's torch ops do not), use ``tl.div_rn`` / ``tl.sqrt_rn``
(Triton's ``/`` and ``tl.sqrt`` on float32 are approximate on NVIDIA GPUs), widen inputs with
:func:`to_float32` and round results to the output dtype with :func:`cast_to` (which the
interpreter would otherwise get wrong for bfloat16).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
import triton
import triton.language as tl

#: True when Triton's interpreter runs the kernels (TRITON_INTERPRET=1, read by Triton itself).
INTERPRETING = bool(triton.knobs.runtime.interpret)

#: Launch options of the kernels that must reproduce the reference bit for bit.
EXACT = {"enable_fp_fusion": False}

#: Elements one program of an elementwise or blockwise kernel handles at most. The interpreter
#: spends about 0.1 ms of Python per tensor operation per program, so it gets larger tiles (the
#: same code and masks; inputs of more than one tile still run several programs).
TILE = 16384 if INTERPRETING else 1024


def per_program(count: int, item_size: int = 1) -> int:
    """How many of ``count`` items of ``item_size`` elements (blocks, rows, or single elements) one
    program takes: a TILE's worth, at least one item, and no more than a small input needs (a
    power of two, as tile shapes must be)."""
    return min(max(1, TILE // item_size), triton.next_power_of_2(count))


@triton.jit
def to_float32(x):
    """``x`` (float32, float16 or bfloat16) as float32, exactly. bfloat16 by widening its bits,
    which is what GPUs do: Triton 3.9's interpreter flushes bfloat16 subnormals to zero."""
    if x.dtype == tl.bfloat16:
        return (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    return x.to(tl.float32)


@triton.jit
def cast_to(x, dtype: tl.constexpr):
    """float32 ``x`` rounded to nearest even in ``dtype``, as torch's ``.to(dtype)``. bfloat16 by
    integer arithmetic (lowbit_formats.h float_to_bf16_bits): GPUs round to nearest even, but
    Triton 3.9's interpreter truncates (and its "rtne" option rounds ties up), so the tests would
    not see what a GPU computes."""
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16
        quiet_nan = (bits >> 16) | 0x40
        half = tl.where((bits & 0x7FFFFFFF) > 0x7F800000, quiet_nan, rounded)
        return half.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return x.to(dtype)


def device_types() -> tuple[str, ...]:
    return ("cuda", "xpu", "cpu") if INTERPRETING else ("cuda", "xpu")


def device_problem() -> str | None:
    """None when some device can run the kernels, else why none can."""
    if INTERPRETING:
        return None
    xpu = getattr(torch, "xpu", None)
    if not torch.cuda.is_available() and not (xpu is not None and xpu.is_available()):
        return (
            "no GPU for the Triton kernels: torch.cuda.is_available() and torch.xpu.is_available() are False "
            "(TRITON_INTERPRET=1 runs them on CPU tensors, for tests)"
        )
    try:
        triton.runtime.driver.active.get_current_target()
    except Exception as err:  # no driver Triton can use for this GPU
        return f"Triton {triton.__version__} cannot start on this GPU: {type(err).__name__}: {err}"
    return None


def details() -> dict[str, Any]:
    mode = "interpreted on CPU tensors (TRITON_INTERPRET=1)" if INTERPRETING else "compiled for the GPU at first use"
    return {"triton": triton.__version__, "kernels": mode}


def on_device(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Triton launches on the current device and stream: make the tensor's device current."""
    if t.device.type == "cpu":
        return contextlib.nullcontext()
    return getattr(torch, t.device.type).device(t.device)


def autotune(configs: list[triton.Config], key: list[str], interpreted: dict[str, Callable[[dict], int]]):
    """``triton.autotune`` over ``configs`` on a GPU; under the interpreter (which would run every
    candidate, and where timing means nothing) the meta-parameters ``interpreted`` computes from
    the kernel's arguments."""
    if INTERPRETING:
        return triton.heuristics(interpreted)
    return triton.autotune(configs=configs, key=key)
