#!/usr/bin/env python3
"""Lay out a ROCm tree for ``clang++ -x hip --rocm-path`` from Debian's ROCm 5.2 packages, so that a
clang that knows today's AMD GPUs (Debian's clang-19: gfx942, gfx1100, gfx1201) compile-checks them.

    python3 ci/rocm_path.py build/gpu/rocm --archs "gfx90a;gfx942;gfx1100;gfx1201"
    cmake -S csrc/cuda -B build/hip -DLOWBIT_GPU_TOOLCHAIN=hip -DLOWBIT_GPU_COMPILER=clang++-19 \\
          -DLOWBIT_ROCM_PATH=$PWD/build/gpu/rocm -DLOWBIT_GPU_ARCHS="gfx90a;gfx942"

Why: Debian 12's hipcc is ROCm 5.2 with clang 15, which knows neither gfx942 (MI300) nor has device
libraries for gfx11xx/gfx12xx. clang 19 knows them but needs, besides the HIP headers
(libamdhip64-dev: /usr/include/hip), the ROCm device libraries (rocm-device-libs: ocml/ockl
bitcode, readable by any later LLVM) -- and those hold one ``oclc_isa_version_<N>.bc`` per target
they know, which for the newer targets is missing. That file defines a single constant,
``__oclc_ISA_version`` (gfx942 -> 9402), so it is compiled here from one line of OpenCL.

The layout: ``include/hip`` and ``share/hip/version`` (symlinks to the system's), ``amdgcn/bitcode/``
(symlinks to the system's device libraries plus the generated ISA files), and
``bin/clang-offload-bundler`` (clang 19 packs the per-target code objects with it; Debian ships it
with clang-tools-19 or, already installed with hipcc, LLVM 15's, which writes the same format).

This is a compile check: what the device code of the newer targets links against is ROCm 5.2's
libraries. A HIP library for users is built by a ROCm 6/7 hipcc (``-DLOWBIT_GPU_COMPILER=hipcc``).
"""

from __future__ import annotations

import argparse
import glob
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional

SYSTEM_BITCODE = ("/usr/lib/x86_64-linux-gnu/amdgcn/bitcode", "/opt/rocm/amdgcn/bitcode")
SYSTEM_HIP_INCLUDE = ("/usr/include/hip", "/opt/rocm/include/hip")
SYSTEM_HIP_VERSION = ("/usr/share/hip/version", "/opt/rocm/share/hip/version")


def isa_version(arch: str) -> int:
    """gfx942 -> 9402, gfx90a -> 9010, gfx1100 -> 11000, gfx1201 -> 12001 (major, minor, stepping)."""
    digits = arch[len("gfx"):]
    if not arch.startswith("gfx") or len(digits) < 3:
        raise ValueError(f"not a gfx target: {arch!r}")
    return int(digits[:-2]) * 1000 + int(digits[-2], 16) * 100 + int(digits[-1], 16)


def first_existing(candidates: tuple[str, ...], what: str) -> Path:
    for candidate in candidates:
        if Path(candidate).exists():
            return Path(candidate)
    raise SystemExit(f"rocm_path: no {what} in {', '.join(candidates)} (apt-get install hipcc)")


def find_bundler() -> Path:
    found = shutil.which("clang-offload-bundler") or shutil.which("clang-offload-bundler-19")
    candidates = [found] if found else []
    candidates += sorted(glob.glob("/usr/lib/llvm-*/bin/clang-offload-bundler"), reverse=True)
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    raise SystemExit("rocm_path: no clang-offload-bundler (apt-get install clang-tools-19 or hipcc)")


def link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.is_symlink() or dst.exists():
        dst.unlink()
    dst.symlink_to(src)


def layout(root: Path, archs: list[str], clang: str) -> Path:
    bitcode = root / "amdgcn" / "bitcode"
    if root.exists():
        shutil.rmtree(root)
    bitcode.mkdir(parents=True)
    for source in sorted(first_existing(SYSTEM_BITCODE, "ROCm device libraries").glob("*.bc")):
        link(source, bitcode / source.name)
    link(first_existing(SYSTEM_HIP_INCLUDE, "HIP headers"), root / "include" / "hip")
    link(first_existing(SYSTEM_HIP_VERSION, "HIP version file"), root / "share" / "hip" / "version")
    link(find_bundler(), root / "bin" / "clang-offload-bundler")
    for arch in archs:
        target = bitcode / f"oclc_isa_version_{arch[len('gfx'):]}.bc"
        if target.exists():
            continue
        source = root / f"isa_{arch}.cl"
        source.write_text(f"__constant const int __oclc_ISA_version = {isa_version(arch)};\n")
        subprocess.run(
            [clang, "-x", "cl", "-cl-std=CL2.0", "--target=amdgcn-amd-amdhsa", "-nogpulib", "-emit-llvm",
             "-c", str(source), "-o", str(target)],
            check=True,
        )  # fmt: skip
    return root


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", type=Path, help="directory to create (the --rocm-path)")
    parser.add_argument("--archs", required=True, help="gfx targets, ;- or ,-separated")
    parser.add_argument("--clang", default="clang-19", help="clang that compiles the ISA version files")
    args = parser.parse_args(argv)
    archs = [a.strip() for a in args.archs.replace(",", ";").split(";") if a.strip()]
    print(layout(args.root.resolve(), archs, args.clang))
    return 0


if __name__ == "__main__":
    sys.exit(main())
