"""Loading ``liblowbit_cpu.so`` and calling it: the only place that touches ctypes.

The library is looked up next to this package (``lowbit/_native/``), then in the installed
``lowbit`` distribution: run from a source checkout, ``python -m lowbit`` imports the package
from the checkout but still finds the library that ``pip install .`` built.
``LOWBIT_CPU_LIBRARY`` points at another build of the library (a sanitizer build, say).

The library holds one build of its kernels per CPU instruction set (``ISAS``) and runs the best one
this CPU supports. ``LOWBIT_CPU_ISA=scalar|avx2|avx512`` caps that choice when the library is
loaded (an unknown name makes the backend unavailable, with the reason); :func:`set_cpu_isa`
changes it later, and :func:`use_cpu_isa` for a block (tests run every ISA this way).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import importlib.machinery
import importlib.metadata
import importlib.util
import os
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any, Optional

import torch

from .. import native_library

ABI_VERSION = 4  # must equal LOWBIT_ABI_VERSION in csrc/capi/lowbit_capi.h
LIBRARY_NAME = "liblowbit_cpu.so"
ENV_LIBRARY = "LOWBIT_CPU_LIBRARY"
ENV_ISA = "LOWBIT_CPU_ISA"
#: Where ``pip install`` (and ``cmake --install --prefix .`` in a checkout) puts the native builds.
_PACKAGE_NATIVE = Path(__file__).resolve().parents[2] / "_native"
#: The CPython extension that calls the decode product without ctypes (csrc/capi/lowbit_fastcall.cpp).
FASTCALL_MODULE = "_lowbit_fastcall"
#: ``LOWBIT_CPU_FASTCALL=0`` calls through ctypes even where the extension is built.
ENV_FASTCALL = "LOWBIT_CPU_FASTCALL"

# enums of csrc/capi/lowbit_capi.h
_STATUS = {0: "ok", 1: "invalid argument", 2: "unsupported"}
DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
QUANT_TYPES = {"fp4": 0, "nf4": 1}
#: lowbit_precision: how exact a product on the interleaved layout must be.
PRECISIONS = {"float32": 0, "fast": 1}
#: lowbit_isa, narrowest first (the numbering orders them).
ISAS = {"scalar": 0, "avx2": 1, "avx512": 2}
#: lowbit_cpu_feature: optional extensions an ISA build uses where the CPU has them (bit flags).
CPU_FEATURES = {"avx512_vnni": 1, "amx_bf16": 2, "avx_vnni": 4}
TABLES = {
    "nf4_code": 0,
    "fp4_code": 1,
    "nf4_midpoints": 2,
    "fp4_midpoints": 3,
    "fp4_order": 4,
    "nf4_order": 5,
    "blocksizes": 6,
    "interleave": 7,
}

_p, _i32, _i64, _f32 = ctypes.c_void_p, ctypes.c_int32, ctypes.c_int64, ctypes.c_float
_SIGNATURES = {
    "lowbit_abi_version": ([], _i32),
    "lowbit_last_error": ([], ctypes.c_char_p),
    "lowbit_build_info": ([], ctypes.c_char_p),
    "lowbit_cpu_isa_supported": ([_i32], _i32),
    "lowbit_cpu_isa": ([], _i32),
    "lowbit_set_cpu_isa": ([_i32], _i32),
    "lowbit_format_table": ([_i32, _p, _i32, _p], _i32),
    "lowbit_quantize_4bit": ([_i32, _p, _i64, _i64, _i32, _p, _i64, _p, _i64, _i32], _i32),
    "lowbit_dequantize_4bit": ([_i32, _p, _i64, _p, _i64, _i64, _p, _i64, _p, _i64, _i32], _i32),
    "lowbit_quantize_blockwise": ([_i32, _p, _i64, _p, _i64, _i64, _p, _i64, _p, _i64, _i32], _i32),
    "lowbit_dequantize_blockwise": ([_i32, _p, _i64, _p, _i64, _p, _i64, _i64, _p, _i64, _i32], _i32),
    "lowbit_gemv_4bit": ([_i32, _p, _i64, _i64, _p, _i64, _p, _i64, _p, _i64, _i64, _i64, _i32, _p, _i32], _i32),
    "lowbit_interleave_4bit": ([_p, _i64, _p, _i64, _i64, _i64, _i64, _i32, _p, _i64, _p, _i64, _i32], _i32),
    "lowbit_matmul_4bit_interleaved": (
        [_i32, _p, _i64, _i64, _p, _i64, _p, _i64, _p, _i64, _i64, _i64, _p, _i64, _i32, _i32, _i32, _p, _i32], _i32,
    ),
    "lowbit_cpu_features_supported": ([], _i32),
    "lowbit_cpu_features": ([], _i32),
    "lowbit_set_cpu_features": ([_i32], _i32),
    "lowbit_int8_linear_matmul": ([_p, _i64, _i64, _p, _i64, _p, _i32], _i32),
    "lowbit_int8_vectorwise_quant": ([_i32, _p, _i64, _i64, _f32, _p, _p, _i64, _p, _i64, _i32], _i32),
    "lowbit_int8_colwise_quant": ([_i32, _p, _i64, _i64, _f32, _p, _p, _i64, _i32], _i32),
    "lowbit_int8_vectorwise_dequant": ([_p, _p, _i64, _i64, _i64, _f32, _p, _i32], _i32),
    "lowbit_int8_mm_dequant": ([_p, _p, _i64, _p, _i64, _i64, _i64, _f32, _p, _i64, _i32, _i32, _p, _i32], _i32),
    "lowbit_optimizer_update_32bit": ([_i32, _i32, _p, _p, _i64, _p, _i64, _p, _i64, _p, _p, _i32], _i32),
    "lowbit_optimizer_update_8bit_blockwise": (
        [_i32, _i32, _p, _p, _i64, _p, _i64, _p, _i64, _p, _p, _i64, _p, _i64, _p, _i64, _p, _i64, _i32], _i32,
    ),
}


def library_path() -> Path:
    override = os.environ.get(ENV_LIBRARY)
    if override:
        return Path(override)
    beside_package = _PACKAGE_NATIVE / LIBRARY_NAME
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
    if not path.exists():
        return None, f"native library not found at {path} (lowbit was installed without its native build)"
    try:
        lib = native_library.load(path)
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
    cap = os.environ.get(ENV_ISA, "").strip()
    if cap:
        if cap not in ISAS:
            return None, f"{ENV_ISA}={cap!r} is not a CPU instruction set lowbit knows; valid names: {', '.join(ISAS)}"
        # a cap, not a demand: the widest supported ISA that is not wider than the cap
        usable = [i for name, i in ISAS.items() if i <= ISAS[cap] and lib.lowbit_cpu_isa_supported(i)]
        check(lib.lowbit_set_cpu_isa(max(usable)), "lowbit_set_cpu_isa")
    return lib, None


@functools.lru_cache(maxsize=1)
def _fastcall() -> tuple[Optional[ModuleType], str]:
    """The extension module, found beside the library (else in ``lowbit/_native/``), or None and
    why not. Optional: without it the same function is called through ctypes."""
    if os.environ.get(ENV_FASTCALL, "").strip() == "0":
        return None, f"{ENV_FASTCALL}=0"
    folders = dict.fromkeys([library_path().parent, _PACKAGE_NATIVE])
    names = [FASTCALL_MODULE + suffix for suffix in importlib.machinery.EXTENSION_SUFFIXES]
    found = [folder / name for folder in folders for name in names if (folder / name).is_file()]
    if not found:
        return None, f"{FASTCALL_MODULE} is not built (no Python >= 3.10 headers at build time?)"
    problem = native_library.elf_problem(found[0]) if sys.platform.startswith("linux") else None
    if problem is not None:
        return None, f"{found[0]}: {problem}"
    try:
        spec = importlib.util.spec_from_file_location(FASTCALL_MODULE, found[0])
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except ImportError as err:  # another CPython's build, or a broken file
        return None, f"{found[0]} failed to import: {err}"
    if getattr(module, "ABI_VERSION", None) != ABI_VERSION:
        return None, f"{found[0]} was built for ABI version {getattr(module, 'ABI_VERSION', None)}, not {ABI_VERSION}"
    return module, str(found[0])


@functools.lru_cache(maxsize=1)
def matmul_4bit_interleaved_function() -> Callable[..., int]:
    """``lowbit_matmul_4bit_interleaved`` as the decode path calls it (its 19 arguments as Python
    ints, None or 0 for NULL; returns the status): through the extension where it loaded, saving
    ctypes' conversions (~1.5 us a call), else through ctypes."""
    function = lib().lowbit_matmul_4bit_interleaved
    module = _fastcall()[0]
    if module is None:
        return function
    return functools.partial(module.matmul_4bit_interleaved, ctypes.cast(function, ctypes.c_void_p).value)


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
        capped = f" ({ENV_ISA}={os.environ[ENV_ISA].strip()})" if os.environ.get(ENV_ISA) else ""
        info["cpu_isa"] = cpu_isa() + capped
        info["cpu_isas_supported"] = " ".join(supported_isas())
        info["cpu_features"] = " ".join(cpu_features()) or "none"
        info["build"] = library.lowbit_build_info().decode()
        info["abi_version"] = ABI_VERSION
        module, where = _fastcall()
        info["decode_call"] = f"{FASTCALL_MODULE} ({where})" if module is not None else f"ctypes ({where})"
    return info


def supported_isas() -> list[str]:
    """The instruction sets that are compiled into the library and that this CPU can run."""
    return [name for name, i in ISAS.items() if lib().lowbit_cpu_isa_supported(i)]


def cpu_isa() -> str:
    """The instruction set the native kernels use now."""
    current = lib().lowbit_cpu_isa()
    return next(name for name, i in ISAS.items() if i == current)


def set_cpu_isa(name: str) -> None:
    """Run the native kernels with instruction set ``name`` from now on (process-wide)."""
    if name not in ISAS:
        raise ValueError(f"unknown CPU instruction set {name!r}; valid names: {', '.join(ISAS)}")
    if lib().lowbit_set_cpu_isa(ISAS[name]) != 0:
        raise ValueError(f"CPU instruction set {name!r} cannot run here; supported: {', '.join(supported_isas())}")


_isa_lock = threading.RLock()


@contextlib.contextmanager
def use_cpu_isa(name: str) -> Iterator[None]:
    """Run the native kernels with ``name`` inside the block, then restore the previous choice."""
    with _isa_lock:
        previous = cpu_isa()
        set_cpu_isa(name)
        try:
            yield
        finally:
            set_cpu_isa(previous)


def supported_cpu_features() -> list[str]:
    """The optional extensions (``CPU_FEATURES``) this CPU supports."""
    mask = lib().lowbit_cpu_features_supported()
    return [name for name, bit in CPU_FEATURES.items() if mask & bit]


def cpu_features() -> list[str]:
    """The optional extensions the native kernels use now."""
    mask = lib().lowbit_cpu_features()
    return [name for name, bit in CPU_FEATURES.items() if mask & bit]


def fixed_point_products() -> bool:
    """Whether the kernels in use compute the fast precision in 16-bit fixed point (avx2, or avx512
    with VNNI; csrc/cpu/interleaved_4bit.cpp ``fixed_available``) rather than in float32."""
    return cpu_isa() == "avx2" or (cpu_isa() == "avx512" and "avx512_vnni" in cpu_features())


@contextlib.contextmanager
def use_cpu_features(names: list[str]) -> Iterator[None]:
    """Let the native kernels use only the extensions ``names`` inside the block (tests reach the
    paths a CPU without them takes), then restore the previous choice."""
    unknown = set(names) - set(CPU_FEATURES)
    if unknown:
        raise ValueError(f"unknown CPU features {sorted(unknown)}; valid names: {', '.join(CPU_FEATURES)}")
    with _isa_lock:
        # the mask that reproduces the current state: the features in use plus the unsupported ones
        every = sum(CPU_FEATURES.values())
        previous = lib().lowbit_cpu_features() | (every & ~lib().lowbit_cpu_features_supported())
        check(lib().lowbit_set_cpu_features(sum(CPU_FEATURES[n] for n in names)), "lowbit_set_cpu_features")
        try:
            yield
        finally:
            check(lib().lowbit_set_cpu_features(previous), "lowbit_set_cpu_features")


def table(name: str) -> list[float]:
    """A format table as compiled into the library (for the constants test)."""
    values = (ctypes.c_float * 256)()
    count = ctypes.c_int32()
    check(lib().lowbit_format_table(TABLES[name], values, 256, ctypes.byref(count)), "lowbit_format_table")
    return list(values[: count.value])


def ptr(t: Optional[torch.Tensor]) -> ctypes.c_void_p:
    """The data pointer of ``t`` (NULL for None, the C ABI's "not given")."""
    return ctypes.c_void_p(t.data_ptr() if t is not None else None)


def buf(t: Optional[torch.Tensor]) -> tuple[ctypes.c_void_p, int]:
    """A buffer argument of the C ABI and its declared length: ``(pointer, element count)``, (NULL, 0)
    for None. Spread into a call: ``fn(*buf(absmax), ...)``."""
    return ptr(t), (t.numel() if t is not None else 0)


def num_threads() -> int:
    return torch.get_num_threads()


def check(status: int, fn: str) -> None:
    """Raises for a non-zero lowbit_status: ValueError with the library's words for a refused
    argument (Python validates first, so reaching this is a lowbit bug or a direct caller),
    RuntimeError otherwise."""
    if status == 1:
        raise ValueError(f"lowbit native library refused the call: {lib().lowbit_last_error().decode()}")
    if status != 0:
        raise RuntimeError(f"lowbit internal error: {fn} returned {_STATUS.get(status, status)}")
