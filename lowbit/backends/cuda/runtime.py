"""Which GPU library variant this process loads, and the GPU runtime that library binds to.

CUDA: csrc/cuda/CMakeLists.txt builds one library per CUDA major version, each linked against the
*shared* runtime ``libcudart.so.<major>`` that torch's CUDA wheels ship (``nvidia-cuda-runtime-cu12``
puts it in ``site-packages/nvidia/cuda_runtime/lib``, ``nvidia-cuda-runtime`` 13 in
``site-packages/nvidia/cu13/lib``). The variant is picked by ``torch.version.cuda``, as
bitsandbytes does: the library then shares torch's runtime (one runtime in the process) and needs
no newer driver than torch itself.

HIP: ``liblowbit_hip.so`` has no versioned NEEDED entry for the HIP runtime, so one build serves
torch's ROCm 6 and ROCm 7 wheels (``libamdhip64.so.6`` / ``.7``, shipped in ``torch/lib``). Its
HIP symbols bind to the ``libamdhip64`` that torch loaded, which :func:`preload_runtime` makes
global before the library is opened.

Everything here is plain data and file look-ups so that the selection is unit-tested without a
GPU (tests/test_gpu_backends.py).
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import sys
import sysconfig
from collections.abc import Iterable
from pathlib import Path
from typing import Optional

# CUDA majors csrc/cuda/CMakeLists.txt builds: liblowbit_cuda12.so (clang + CUDA 12.8 wheels),
# liblowbit_cuda13.so (nvcc 13).
CUDA_MAJORS = (12, 13)
HIP_LIBRARY = "liblowbit_hip.so"
HIP_RUNTIME = "libamdhip64.so"


@dataclasses.dataclass(frozen=True)
class Variant:
    """The library file a backend loads here (None when none fits), the runtime it needs, and why."""

    library: Optional[str]
    runtime: Optional[str]
    reason: str


def cuda_library_name(major: int) -> str:
    return f"liblowbit_cuda{major}.so"


def cuda_variant(torch_cuda: Optional[str]) -> Variant:
    """The CUDA library for a torch built with CUDA ``torch_cuda`` (``torch.version.cuda``)."""
    if not torch_cuda:
        return Variant(None, None, "torch has no CUDA (torch.version.cuda is None): no CUDA library variant applies")
    try:
        major = int(torch_cuda.split(".")[0])
    except ValueError:
        return Variant(None, None, f"torch.version.cuda is {torch_cuda!r}, not a CUDA version")
    if major not in CUDA_MAJORS:
        built = ", ".join(cuda_library_name(m) for m in CUDA_MAJORS)
        return Variant(None, None, f"torch is built with CUDA {torch_cuda}; lowbit builds {built} only")
    runtime = f"libcudart.so.{major}"
    return Variant(
        cuda_library_name(major), runtime,
        f"torch is built with CUDA {torch_cuda}: {cuda_library_name(major)} links its shared {runtime}",
    )  # fmt: skip


def hip_variant(torch_hip: Optional[str]) -> Variant:
    """The HIP library for a torch built with ROCm ``torch_hip`` (``torch.version.hip``)."""
    if not torch_hip:
        return Variant(None, None, "torch is not a ROCm build (torch.version.hip is None)")
    major = torch_hip.split(".")[0]
    runtime = f"{HIP_RUNTIME}.{major}" if major.isdigit() else HIP_RUNTIME
    return Variant(
        HIP_LIBRARY, runtime,
        f"torch is built with ROCm {torch_hip}: {HIP_LIBRARY} binds to the {runtime} torch loaded",
    )  # fmt: skip


def loaded_libraries(maps: Optional[str] = None) -> list[Path]:
    """Shared objects mapped into this process (``/proc/self/maps``, or the text given)."""
    if maps is None:
        try:
            maps = Path("/proc/self/maps").read_text()
        except OSError:
            return []
    seen: dict[str, None] = {}
    for line in maps.splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].startswith("/") and ".so" in fields[5]:
            seen.setdefault(fields[5].strip(), None)
    return [Path(p) for p in seen]


def runtime_dirs(platform: str) -> list[Path]:
    """Where torch's wheels put the GPU runtime: site-packages/nvidia/{cuda_runtime,cu13}/lib (CUDA),
    torch/lib (ROCm wheels; also /opt/rocm/lib for a system ROCm)."""
    dirs: list[Path] = []
    paths = sysconfig.get_paths()
    for root in dict.fromkeys(r for r in (paths["purelib"], paths["platlib"], *sys.path) if r):
        base = Path(root)
        if platform == "cuda":
            dirs += [base / "nvidia" / "cuda_runtime" / "lib", base / "nvidia" / "cu13" / "lib"]
        else:
            dirs.append(base / "torch" / "lib")
    if platform != "cuda":
        dirs.append(Path("/opt/rocm/lib"))
    return [d for d in dirs if d.is_dir()]


def find_runtime(runtime: str, loaded: Iterable[Path], search_dirs: Iterable[Path]) -> Optional[Path]:
    """The shared library ``runtime`` (a soname such as libcudart.so.12; libamdhip64.so matches any
    version): the copy already mapped into the process first, else the first in ``search_dirs``."""

    def matches(path: Path) -> bool:
        return path.name == runtime or path.name.startswith(runtime + ".")

    found = next((path for path in loaded if matches(path)), None)
    if found is not None:
        return found
    return next((path for d in search_dirs for path in sorted(d.glob(runtime + "*")) if matches(path)), None)


def preload_runtime(platform: str, variant: Variant) -> Optional[str]:
    """Opens the runtime ``variant`` needs with RTLD_GLOBAL, so that the library binds to the copy
    torch uses (already loaded: this only makes its symbols global); None, or why it failed."""
    if variant.runtime is None:
        return None
    dirs = runtime_dirs(platform)
    path = find_runtime(variant.runtime, loaded_libraries(), dirs)
    if path is None:
        where = ", ".join(map(str, dirs)) or "none found"
        return f"{variant.library} needs {variant.runtime}, which is neither loaded in this process nor in torch's wheels ({where})"
    try:
        ctypes.CDLL(str(path), mode=os.RTLD_GLOBAL)
    except OSError as err:
        return f"{variant.library} needs {variant.runtime}: loading {path} failed: {err}"
    return None
