"""Loading ``liblowbit_cuda.so`` / ``liblowbit_hip.so`` and calling it: the only place that touches
ctypes for GPUs (the CUDA and the HIP backend share it; ``GpuLibrary("hip")`` is the HIP one).

Which file: ``liblowbit_cuda<major>.so`` for the CUDA major torch is built with, or
``liblowbit_hip.so`` (``runtime.py`` says why, and binds it to the runtime torch loaded). It is
found as the CPU one is (``lowbit/backends/cpu/native.py``): ``LOWBIT_CUDA_LIBRARY`` /
``LOWBIT_HIP_LIBRARY`` first, then ``lowbit/_native/`` beside this package, then the installed
``lowbit`` distribution. It is loaded lazily, the first time a backend is probed, and every
reason it cannot serve a device is put into words: not built (and how to build it), failed to
load, a symbol missing, another ABI version, no code for this GPU's architecture, a runtime that
cannot start (e.g. a driver older than the library's CUDA runtime).

Calls pass raw device pointers, sizes, the device ordinal and the current torch stream
(``torch.cuda.current_stream(device).cuda_stream``), so kernels are ordered with torch's work.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import os
import threading
from pathlib import Path
from typing import Any, Optional

import torch

from ...core import formats
from .. import native_library
from . import runtime

ABI_VERSION = 2  # must equal LOWBIT_CUDA_ABI_VERSION in csrc/cuda/lowbit_cuda_capi.h

# every file name a GPU library of this platform may have (the variants of runtime.py)
LIBRARY_NAMES = {
    "cuda": tuple(runtime.cuda_library_name(major) for major in runtime.CUDA_MAJORS),
    "hip": (runtime.HIP_LIBRARY,),
}
ENV_LIBRARY = {"cuda": "LOWBIT_CUDA_LIBRARY", "hip": "LOWBIT_HIP_LIBRARY"}
BUILD_HINTS = {
    "cuda": (
        "build it from a lowbit checkout with `cmake -S csrc/cuda -B build/cuda && cmake --build build/cuda && "
        "cmake --install build/cuda --prefix .` (nvcc 13 builds liblowbit_cuda13.so; `python3 -m nox -s build_cuda` "
        "builds and checks it, `python3 -m nox -s build_cuda12` liblowbit_cuda12.so with clang and CUDA 12.8 wheels), "
        "or set LOWBIT_CUDA_LIBRARY to a built library"
    ),
    "hip": (
        "build it from a lowbit checkout with `HIP_PLATFORM=amd cmake -S csrc/cuda -B build/hip "
        "-DLOWBIT_GPU_TOOLCHAIN=hip && cmake --build build/hip && cmake --install build/hip --prefix .` "
        "(ROCm 6 or 7 with hipcc), or set LOWBIT_HIP_LIBRARY to a built liblowbit_hip.so"
    ),
}

# enums of csrc/cuda/lowbit_cuda_capi.h and csrc/capi/lowbit_capi.h
STATUS = {0: "ok", 1: "invalid argument", 2: "unsupported", 3: "runtime error"}
DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
QUANT_TYPES = {"fp4": 0, "nf4": 1}
OPTIMIZERS = formats.NATIVE_OPTIMIZER_IDS


class OptimArgs(ctypes.Structure):
    """lowbit_cuda_optim_args."""

    _fields_ = [
        ("beta1", ctypes.c_double),
        ("beta2", ctypes.c_double),
        ("beta3", ctypes.c_double),
        ("alpha", ctypes.c_double),
        ("eps", ctypes.c_double),
        ("weight_decay", ctypes.c_double),
        ("lr", ctypes.c_double),
        ("gnorm_scale", ctypes.c_double),
        ("max_unorm", ctypes.c_double),
        ("param_norm", ctypes.c_double),
        ("step", ctypes.c_int64),
    ]


_p, _i32, _i64, _f32 = ctypes.c_void_p, ctypes.c_int32, ctypes.c_int64, ctypes.c_float
_str = ctypes.c_char_p
SIGNATURES: dict[str, tuple[list[Any], Any]] = {
    "lowbit_cuda_abi_version": ([], _i32),
    "lowbit_cuda_build_info": ([], _str),
    "lowbit_cuda_platform": ([], _str),
    "lowbit_cuda_targets": ([], _str),
    "lowbit_cuda_last_error": ([], _str),
    "lowbit_cuda_device_check": ([_i32], _i32),
    "lowbit_cuda_quantize_4bit": ([_i32, _p, _i64, _i64, _i32, _p, _i64, _p, _i64, _i32, _p], _i32),
    "lowbit_cuda_dequantize_4bit": ([_i32, _p, _i64, _p, _i64, _i64, _i32, _p, _i64, _i32, _p], _i32),
    "lowbit_cuda_quantize_blockwise": ([_i32, _p, _i64, _p, _i64, _i64, _p, _i64, _p, _i64, _i32, _p], _i32),
    "lowbit_cuda_dequantize_blockwise": ([_i32, _p, _i64, _p, _i64, _p, _i64, _i64, _p, _i64, _i32, _p], _i32),
    "lowbit_cuda_gemv_4bit": (
        [_i32, _p, _i64, _p, _i64, _i64, _i64, _p, _i64, _p, _i64, _i64, _p, _i64, _i32, _p, _i32, _p], _i32,
    ),
    "lowbit_cuda_gemv_4bit_max_rows": ([], _i32),
    "lowbit_cuda_int8_vectorwise_quant": ([_i32, _p, _i64, _i64, _f32, _p, _p, _i64, _p, _i64, _i32, _p], _i32),
    "lowbit_cuda_int8_vectorwise_dequant": ([_p, _p, _i64, _i64, _i64, _f32, _p, _i32, _p], _i32),
    "lowbit_cuda_int8_mm_dequant": ([_p, _p, _i64, _p, _i64, _i64, _i64, _f32, _p, _i64, _i32, _i32, _p, _i32, _p], _i32),
    "lowbit_cuda_optimizer_update_32bit": (
        [_i32, _i32, _p, _p, _i64, _p, _i64, _p, _i64, ctypes.POINTER(OptimArgs), _p, _p, _i32, _p], _i32,
    ),
    "lowbit_cuda_optimizer_update_8bit_blockwise": (
        [_i32, _i32, _p, _p, _i64, _p, _i64, _p, _i64, ctypes.POINTER(OptimArgs), _p, _i64, _p, _i64, _p, _i64, _p, _i64,
         _i32, _p], _i32,
    ),
    "lowbit_cuda_managed_supported": ([_i32, ctypes.POINTER(_i32)], _i32),
    "lowbit_cuda_managed_alloc": ([_i64, _i32, ctypes.POINTER(_p)], _i32),
    "lowbit_cuda_managed_free": ([_p], _i32),
    "lowbit_cuda_prefetch": ([_p, _i64, _i32, _p], _i32),
}


def parse_targets(text: str) -> tuple[set[int], set[int], set[str]]:
    """``"sm_75 sm_80 compute_80 gfx90a"`` -> ({75, 80}, {80}, {"gfx90a"})."""
    sass, ptx, gfx = set(), set(), set()
    for token in text.split():
        if token.startswith("sm_") and token[3:].isdigit():
            sass.add(int(token[3:]))
        elif token.startswith("compute_") and token[8:].isdigit():
            ptx.add(int(token[8:]))
        elif token.startswith("gfx"):
            gfx.add(token)
    return sass, ptx, gfx


def cuda_arch_problem(targets: str, capability: tuple[int, int]) -> Optional[str]:
    """None when a CUDA library with ``targets`` can run on a GPU of compute ``capability``.

    SASS for sm_XY runs on devices of the same major version and a minor version >= Y; PTX for
    compute_XY is JIT-compiled by the driver for any device of capability >= XY.
    """
    major, minor = capability
    sass, ptx, _ = parse_targets(targets)
    if any(arch // 10 == major and arch % 10 <= minor for arch in sass):
        return None
    if any(arch <= major * 10 + minor for arch in ptx):
        return None
    return (
        f"the library was built without code for this GPU (compute capability {major}.{minor}, sm_{major}{minor}); "
        f"it holds {targets or 'no device code'}: rebuild with -DLOWBIT_GPU_ARCHS including {major}{minor}"
        + (" (sm_70 needs liblowbit_cuda12.so: `python3 -m nox -s build_cuda12`)" if major * 10 + minor < 75 else "")
    )


def hip_arch_problem(targets: str, arch_name: str) -> Optional[str]:
    """None when a HIP library with ``targets`` has a code object for ``arch_name`` (gcnArchName)."""
    base = arch_name.split(":", 1)[0]
    _, _, gfx = parse_targets(targets)
    if base in gfx:
        return None
    return (
        f"the library was built without code for this GPU ({base}); it holds {targets or 'no device code'}: "
        f"rebuild with -DLOWBIT_GPU_ARCHS including {base}"
    )


class GpuLibrary:
    """One GPU library (``platform`` "cuda" or "hip"), loaded at most once.

    ``path`` pins the file (tests); by default it is looked up as described in the module docstring.
    """

    def __init__(self, platform: str, path: Optional[Path] = None):
        self.platform = platform
        self._path = path
        self._lock = threading.Lock()
        self._loaded = False
        self._lib: Optional[ctypes.CDLL] = None
        self._error: Optional[str] = None
        self._device_problems: dict[int, Optional[str]] = {}

    # ---- finding and loading ----------------------------------------------------------------
    def variant(self) -> runtime.Variant:
        """The library file torch's build calls for here, its runtime and why (runtime.py)."""
        if self.platform == "hip":
            return runtime.hip_variant(torch.version.hip)
        if self.platform == "cuda":
            return runtime.cuda_variant(torch.version.cuda)
        return runtime.Variant(f"liblowbit_{self.platform}.so", None, "pinned library")

    @property
    def name(self) -> str:
        """The file name looked for: the pinned or LOWBIT_*_LIBRARY file, else the variant's."""
        override = self._override()
        if override is not None:
            return override.name
        return self.variant().library or LIBRARY_NAMES.get(self.platform, (f"liblowbit_{self.platform}.so",))[-1]

    def selected(self) -> bool:
        """Whether a library file applies here: a pinned or LOWBIT_*_LIBRARY one, or torch's variant."""
        return self._override() is not None or self.variant().library is not None

    def _override(self) -> Optional[Path]:
        if self._path is not None:
            return Path(self._path)
        override = os.environ.get(ENV_LIBRARY.get(self.platform, ""))
        return Path(override) if override else None

    def library_path(self) -> Path:
        override = self._override()
        if override is not None:
            return override
        beside_package = Path(__file__).resolve().parents[2] / "_native" / self.name
        if beside_package.is_file():
            return beside_package
        try:
            installed = Path(importlib.metadata.distribution("lowbit").locate_file(f"lowbit/_native/{self.name}"))
        except importlib.metadata.PackageNotFoundError:
            return beside_package
        return installed if installed.is_file() else beside_package

    def _load(self) -> tuple[Optional[ctypes.CDLL], Optional[str]]:
        with self._lock:
            if not self._loaded:
                self._lib, self._error = self._open()
                self._loaded = True
            return self._lib, self._error

    def _open(self) -> tuple[Optional[ctypes.CDLL], Optional[str]]:
        variant = self.variant()
        if not self.selected():
            return None, f"no {self.platform} library variant for this torch: {variant.reason}"
        path = self.library_path()
        if not path.exists():
            hint = BUILD_HINTS.get(self.platform, "build it with csrc/cuda/CMakeLists.txt")
            return None, f"native library {self.name} is not built (looked for {path}); {hint}"
        # bind to the runtime torch uses; a library that needs none (a stub, the emulation) loads regardless
        runtime_problem = runtime.preload_runtime(self.platform, variant)
        try:
            lib = native_library.load(path)
        except OSError as err:
            hint = f" ({runtime_problem})" if runtime_problem else ""
            return None, f"native library at {path} failed to load: {err}{hint}"
        try:
            for name, (argtypes, restype) in SIGNATURES.items():
                fn = getattr(lib, name)
                fn.argtypes, fn.restype = argtypes, restype
        except AttributeError as err:
            return None, f"native library at {path} lacks a symbol: {err}"
        version = lib.lowbit_cuda_abi_version()
        if version != ABI_VERSION:
            return None, f"native library at {path} has ABI version {version}, this lowbit needs {ABI_VERSION}; rebuild it"
        platform = lib.lowbit_cuda_platform().decode()
        if platform != self.platform:
            return None, f"native library at {path} is a {platform} build, not {self.platform}"
        return lib, None

    def load_error(self) -> Optional[str]:
        return self._load()[1]

    def lib(self) -> ctypes.CDLL:
        library, error = self._load()
        if library is None:
            raise RuntimeError(f"lowbit: {error}")
        return library

    def targets(self) -> str:
        return self.lib().lowbit_cuda_targets().decode()

    def details(self) -> dict[str, Any]:
        library, error = self._load()
        library_file = str(self.library_path()) if self.selected() else "none"
        info: dict[str, Any] = {"library": library_file, "variant": self.variant().reason}
        if library is not None:
            info["targets"] = library.lowbit_cuda_targets().decode()
            info["build"] = library.lowbit_cuda_build_info().decode()
            info["abi_version"] = ABI_VERSION
        return info

    # ---- devices ----------------------------------------------------------------------------
    def device_problem(self, index: int) -> Optional[str]:
        """None when the library can run on GPU ``index``, else why not (cached per device)."""
        if index not in self._device_problems:
            self._device_problems[index] = self._device_problem(index)
        return self._device_problems[index]

    def _device_problem(self, index: int) -> Optional[str]:
        library = self.lib()
        targets = library.lowbit_cuda_targets().decode()
        if self.platform == "cuda":
            problem = cuda_arch_problem(targets, torch.cuda.get_device_capability(index))
        else:
            arch = getattr(torch.cuda.get_device_properties(index), "gcnArchName", "") or ""
            problem = hip_arch_problem(targets, arch) if arch else None
        if problem is not None:
            return f"GPU {index} ({torch.cuda.get_device_name(index)}): {problem}"
        if library.lowbit_cuda_device_check(index) != 0:
            return f"GPU {index} ({torch.cuda.get_device_name(index)}): {library.lowbit_cuda_last_error().decode()}"
        return None

    def require_device(self, device: torch.device) -> int:
        """The ordinal of ``device``; raises with the reason when this library cannot run on it."""
        index = device.index if device.index is not None else torch.cuda.current_device()
        problem = self.device_problem(index)
        if problem is not None:
            raise RuntimeError(f"lowbit {self.platform} backend: {problem}")
        return index

    # ---- calls ------------------------------------------------------------------------------
    def launch_context(self, device: torch.device) -> tuple[int, ctypes.c_void_p]:
        """(device ordinal, current torch stream) for a call on tensors of ``device``."""
        if device.type != "cuda":  # never hand a host pointer to a kernel
            raise ValueError(f"lowbit {self.platform} backend: tensors must be on a GPU (device type cuda), got {device}")
        index = self.require_device(device)
        return index, ctypes.c_void_p(torch.cuda.current_stream(index).cuda_stream)

    def call(self, fn: str, device: torch.device, *args: Any) -> None:
        """Calls ``fn(*args, device_index, stream)`` and raises on a non-zero status."""
        index, stream = self.launch_context(device)
        library = self.lib()
        self.check(getattr(library, fn)(*args, index, stream), fn)

    def check(self, status: int, fn: str) -> None:
        if status != 0:
            message = self.lib().lowbit_cuda_last_error().decode()
            # Arguments are validated in Python first: a non-zero status is a runtime failure or a lowbit bug.
            raise RuntimeError(f"lowbit {self.platform} backend: {fn} returned {STATUS.get(status, status)}: {message}")


def ptr(t: Optional[torch.Tensor]) -> Optional[ctypes.c_void_p]:
    return None if t is None else ctypes.c_void_p(t.data_ptr())


def buf(t: Optional[torch.Tensor]) -> tuple[Optional[ctypes.c_void_p], int]:
    """A buffer argument and its declared length (element count): ``(pointer, numel)``, (NULL, 0) for None."""
    return ptr(t), (t.numel() if t is not None else 0)


def args_struct(
    beta1: float, beta2: float, beta3: float, alpha: float, eps: float, weight_decay: float, lr: float,
    gnorm_scale: float, step: int, max_unorm: float = 0.0, param_norm: float = 0.0,
) -> OptimArgs:  # fmt: skip
    return OptimArgs(
        float(beta1), float(beta2), float(beta3), float(alpha), float(eps), float(weight_decay), float(lr),
        float(gnorm_scale), float(max_unorm), float(param_norm), int(step),
    )  # fmt: skip


CUDA = GpuLibrary("cuda")
HIP = GpuLibrary("hip")
