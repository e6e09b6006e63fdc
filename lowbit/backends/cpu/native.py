"""Loading ``liblowbit_cpu.so`` and calling it: the only place that touches ctypes.

The library is looked up next to this package (``lowbit/_native/``), then in the installed
``lowbit`` distribution: run from a source checkout, ``python -m lowbit`` imports the package
from the checkout but still finds the library that ``pip install .`` built.
``LOWBIT_CPU_LIBRARY`` points at another build of the library (a sanitizer build, say).
"""

from __future__ import annotations

import ctypes
import functools
import importlib.metadata
import os
from pathlib import Path
from typing import Any, Optional

import torch

ABI_VERSION = 1  # must equal LOWBIT_ABI_VERSION in csrc/capi/lowbit_capi.h
LIBRARY_NAME = "liblowbit_cpu.so"
ENV_LIBRARY = "LOWBIT_CPU_LIBRARY"

# enums of csrc/capi/lowbit_capi.h
_STATUS = {0: "ok", 1: "invalid argument", 2: "unsupported"}
DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
QUANT_TYPES = {"fp4": 0, "nf4": 1}
TABLES = {
    "nf4_code": 0,
    "fp4_code": 1,
    "nf4_midpoints": 2,
    "fp4_midpoints": 3,
    "fp4_order": 4,
    "nf4_order": 5,
    "blocksizes": 6,
}

_p, _i32, _i64 = ctypes.c_void_p, ctypes.c_int32, ctypes.c_int64
_SIGNATURES = {
    "lowbit_abi_version": ([], _i32),
    "lowbit_build_info": ([], ctypes.c_char_p),
    "lowbit_format_table": ([_i32, _p, _i32, _p], _i32),
    "lowbit_quantize_4bit": ([_i32, _p, _i64, _i64, _i32, _p, _p, _i32], _i32),
    "lowbit_dequantize_4bit": ([_i32, _p, _p, _i64, _i64, _i32, _p, _i32], _i32),
    "lowbit_quantize_blockwise": ([_i32, _p, _p, _i64, _i64, _p, _p, _i32], _i32),
    "lowbit_dequantize_blockwise": ([_i32, _p, _p, _p, _i64, _i64, _p, _i32], _i32),
}


def library_path() -> Path:
    override = os.environ.get(ENV_LIBRARY)
    if override:
        return Path(override)
    beside_package = Path(__file__).resolve().parents[2] / "_native" / LIBRARY_NAME
    if beside_package.is_file():
        return beside_package
    try:
        installed = Path(importlib.metadata.distribution("lowbit").locate_file(f"lowbit/_native/{LIBRARY_NAME}"))
    except importlib.metadata.PackageNotFoundError:
        return beside_package
    return installed if installed.is_file() else beside_package


@functools.lru_cache(maxsize=1)
def _load() -> tuple[Optional[ctypes.CDLL], Optional[str]]:
    path = library_path()
    if not path.is_file():
        return None, f"native library not found at {path} (lowbit was installed without its native build)"
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as err:
        return None, f"native library at {path} failed to load: {err}"
    try:
        for name, (argtypes, restype) in _SIGNATURES.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = argtypes, restype
    except AttributeError as err:
        return None, f"native library at {path} lacks a symbol: {err}"
    version = lib.lowbit_abi_version()
    if version != ABI_VERSION:
        return None, f"native library at {path} has ABI version {version}, this lowbit needs {ABI_VERSION}"
    return lib, None


def load_error() -> Optional[str]:
    return _load()[1]


def lib() -> ctypes.CDLL:
    library, error = _load()
    if library is None:
        raise RuntimeError(f"lowbit: {error}")
    return library


def details() -> dict[str, Any]:
    library, error = _load()
    info: dict[str, Any] = {"library": str(library_path())}
    if library is not None:
        info["build"] = library.lowbit_build_info().decode()
        info["abi_version"] = ABI_VERSION
    return info


def table(name: str) -> list[float]:
    """A format table as compiled into the library (for the constants test)."""
    values = (ctypes.c_float * 256)()
    count = ctypes.c_int32()
    check(lib().lowbit_format_table(TABLES[name], values, 256, ctypes.byref(count)), "lowbit_format_table")
    return list(values[: count.value])


def ptr(t: torch.Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr())


def num_threads() -> int:
    return torch.get_num_threads()


def check(status: int, fn: str) -> None:
    if status != 0:
        # Arguments are validated in Python first, so this is a lowbit bug, not a user error.
        raise RuntimeError(f"lowbit internal error: {fn} returned {_STATUS.get(status, status)}")
