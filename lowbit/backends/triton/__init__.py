"""The Triton backend: every op family as Triton kernels, compiled at first use for the GPU at hand.

Serves device type ``cuda`` when the native library (``cuda``/``hip``) cannot load, so that a GPU
user gets fused kernels without a compiler (torch's CUDA and ROCm wheels bring Triton), and is the
kernel set of the ``xpu`` backend (Intel GPUs). ``LOWBIT_BACKEND=triton`` forces it. Under
``TRITON_INTERPRET=1`` it also serves ``cpu`` tensors (``runtime.py``): the tests' way of running
the kernels without a GPU.

Same family files as the other backends (quantize_4bit, blockwise_8bit, matmul_4bit, int8,
optimizers), each registering its kernels here; the contracts are those of docs/design.md §5 (bit-exact
quantize/dequantize and int8, float products within the accumulation-order bound, optimizers
within the stated tolerances), checked by tests/test_parity.py against the reference.
"""

from __future__ import annotations

from typing import Any, Optional

from ...core.registry import KernelTable

INSTALL_HINT = 'pip install "lowbit[triton]" (torch\'s CUDA and ROCm wheels bring Triton; XPU wheels bring pytorch-triton-xpu)'

kernels = KernelTable("triton")

IMPORT_ERROR: Optional[str] = None  # why the kernels cannot load here (a missing or broken Triton)
try:
    import triton
except Exception as err:  # a missing or broken Triton must never break `import lowbit`
    if isinstance(err, ModuleNotFoundError) and err.name == "triton":
        IMPORT_ERROR = f"Triton is not installed: {INSTALL_HINT}"
    else:
        IMPORT_ERROR = f"importing Triton failed ({type(err).__name__}: {err}); reinstall it: {INSTALL_HINT}"
else:
    try:
        from . import blockwise_8bit, int8, matmul_4bit, optimizers, quantize_4bit, runtime

        for _family in (quantize_4bit, blockwise_8bit, matmul_4bit, int8, optimizers):
            _family.install(kernels)
    except Exception as err:  # e.g. an older Triton without an API the kernels use
        IMPORT_ERROR = (
            f"lowbit's Triton kernels do not load with triton {triton.__version__} ({type(err).__name__}: {err}); "
            "they need triton>=3.9"
        )


def probe() -> Optional[str]:
    return IMPORT_ERROR or runtime.device_problem()


def device_types() -> tuple[str, ...]:
    return ("cuda", "xpu") if IMPORT_ERROR else runtime.device_types()


def details() -> dict[str, Any]:
    return {} if IMPORT_ERROR else runtime.details()


def describe() -> str:
    """One line for ``python -m lowbit``: Triton's version and mode, or why it is missing."""
    if IMPORT_ERROR:
        return IMPORT_ERROR
    info = runtime.details()
    return f"{info['triton']}, kernels {info['kernels']}"
