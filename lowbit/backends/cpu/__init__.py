"""The native CPU backend: kernels in ``csrc/cpu`` reached through the C ABI in ``csrc/capi``.

The library is loaded with ctypes when the backend is first probed. If it is missing, built for
another ABI version, or fails to load, the backend reports why and lowbit uses the reference
backend instead (``import lowbit`` warns once; ``LOWBIT_BACKEND=cpu`` makes it an error).
"""

from ...core.registry import KernelTable
from . import native

kernels = KernelTable("cpu")

from . import blockwise_8bit, int8, interleaved_4bit, matmul_4bit, optimizers, quantize_4bit  # noqa: E402,F401  (register kernels)


def probe():
    return native.load_error()


def details() -> dict:
    return native.details()
