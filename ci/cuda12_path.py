#!/usr/bin/env python3
"""Lay out a CUDA 12.8 tree for ``clang++ --cuda-path`` from PyPI wheels (for sm_70 builds).

    python3 ci/cuda12_path.py build/cuda12          # -> build/cuda12/{bin,include,lib64,nvvm}
    cmake -S csrc/cuda -B build/sm70 -DLOWBIT_GPU_TOOLCHAIN=clang-cuda \\
          -DLOWBIT_CUDA_PATH=$PWD/build/cuda12 -DLOWBIT_GPU_ARCHS=70

Why: CUDA 13's nvcc no longer targets sm_70 (Volta), but clang still does, given a CUDA
installation whose ptxas accepts sm_70. The wheels (no system packages, no NVIDIA download
site) are

  nvidia-cuda-nvcc-cu12==12.8.*     bin/ptxas, nvvm/libdevice
  nvidia-cuda-runtime-cu12==12.8.*  include/ (cuda_runtime.h, ...), lib/libcudart.so.12
  nvidia-cuda-cccl-cu12==12.8.*     include/{cuda,nv,thrust,cub} (clang's CUDA wrappers need them)
  nvidia-curand-cu12                include/curand*.h (clang's __clang_cuda_runtime_wrapper.h
                                    includes curand_mtgp32_kernel.h)

They are pip-installed (``--no-deps --target``) into ``<dir>/wheels`` and linked into the layout
clang expects: ``bin/ptxas``, ``include/``, ``lib64/libcudart.so``, ``nvvm/libdevice/``, plus a
``version.txt`` naming the CUDA version.

One piece is missing from those wheels: ``fatbinary``, which clang runs to package the cubin
and PTX. CUDA 13's ``fatbinary`` (found next to ``nvcc`` on PATH, or via ``--fatbinary``)
packages sm_70 code fine but no longer accepts the ``--image=profile=sm_70,file=...`` option
that clang 19 passes; ``bin/fatbinary`` here is therefore a small Python shim that rewrites
those options into ``--image3=kind=elf,sm=70,file=...`` (``kind=ptx`` for ``compute_70``) and
runs the real tool. ``ci/gpu_fatbin.py`` and ``cuobjdump`` read the result like any other.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional

WHEELS = (
    "nvidia-cuda-nvcc-cu12==12.8.*",
    "nvidia-cuda-runtime-cu12==12.8.*",
    "nvidia-cuda-cccl-cu12==12.8.*",
    "nvidia-curand-cu12",
)

SHIM = '''#!{python}
"""fatbinary shim (written by ci/cuda12_path.py): clang's --image=profile=... -> --image3."""
import os
import sys

REAL = {real!r}
args = []
for arg in sys.argv[1:]:
    if arg.startswith(("--image=", "-image=")):
        spec = dict(item.split("=", 1) for item in arg.split("=", 1)[1].split(","))
        profile = spec.pop("profile")
        kind, _, sm = profile.partition("_")
        kind = {{"sm": "elf", "compute": "ptx"}}[kind]
        arg = "--image3=kind={{}},sm={{}},file={{}}".format(kind, sm, spec["file"])
    args.append(arg)
os.execv(REAL, [REAL] + args)
'''


def find_fatbinary(explicit: Optional[str]) -> Path:
    candidates = [explicit] if explicit else []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parent / "fatbinary"))
        # wrapper scripts (exec /usr/local/cuda-13.0/bin/nvcc "$@"): look inside for the real path
        try:
            text = Path(nvcc).read_text(errors="ignore")
            for word in text.split():
                if word.endswith("/nvcc"):
                    candidates.append(str(Path(word).parent / "fatbinary"))
        except OSError:
            pass
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            candidates.append(str(Path(home) / "bin" / "fatbinary"))
    for candidate in candidates:
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return Path(candidate)
    raise SystemExit("cuda12_path: no fatbinary found (install a CUDA toolkit or pass --fatbinary)")


def pip_install(target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--upgrade", "--target", str(target), *WHEELS],
        check=True,
    )


def link(src: Path, dst: Path) -> None:
    if dst.is_symlink() or dst.exists():
        return
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.symlink_to(src)


def layout(root: Path, fatbinary: Path) -> Path:
    nvidia = root / "wheels" / "nvidia"
    for sub in ("bin", "include", "lib64", "nvvm"):
        path = root / sub
        if path.exists():
            shutil.rmtree(path)
    link(nvidia / "cuda_nvcc" / "bin" / "ptxas", root / "bin" / "ptxas")
    link(nvidia / "cuda_nvcc" / "nvvm" / "libdevice", root / "nvvm" / "libdevice")
    for package in ("cuda_runtime", "cuda_cccl", "curand", "cuda_nvcc"):
        include = nvidia / package / "include"
        if not include.is_dir():
            continue
        for entry in sorted(include.iterdir()):
            if entry.name in ("__init__.py", "__pycache__"):
                continue
            link(entry, root / "include" / entry.name)  # first package wins on a clash
    cudart = nvidia / "cuda_runtime" / "lib" / "libcudart.so.12"
    link(cudart, root / "lib64" / "libcudart.so.12")
    link(Path("libcudart.so.12"), root / "lib64" / "libcudart.so")
    version = "12.8"
    header = nvidia / "cuda_runtime" / "include" / "cuda_runtime_api.h"
    for line in header.read_text(errors="ignore").splitlines():
        if line.startswith("#define CUDART_VERSION"):
            number = int(line.split()[-1])
            version = f"{number // 1000}.{number % 1000 // 10}"
    (root / "version.txt").write_text(f"CUDA Version {version}\n")
    shim = root / "bin" / "fatbinary"
    shim.write_text(SHIM.format(python=sys.executable, real=str(fatbinary)))
    shim.chmod(0o755)
    return root


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", type=Path, help="directory to create (the --cuda-path)")
    parser.add_argument("--fatbinary", help="CUDA fatbinary to wrap (default: next to nvcc)")
    parser.add_argument("--no-install", action="store_true", help="reuse <root>/wheels as installed")
    args = parser.parse_args(argv)
    root = args.root.resolve()
    fatbinary = find_fatbinary(args.fatbinary)
    if not args.no_install:
        pip_install(root / "wheels")
    layout(root, fatbinary)
    print(root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
