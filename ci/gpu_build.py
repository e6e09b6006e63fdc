#!/usr/bin/env python3
"""Build the GPU library with one toolchain and check that it holds code for every requested arch.

    python3 ci/gpu_build.py nvcc --archs "75;80;86;89;90;100;120"      # liblowbit_cuda13.so
    python3 ci/gpu_build.py clang-cuda --archs "70;75;80;86;89;90" --cuda-path build/gpu/cuda12   # liblowbit_cuda12.so
    python3 ci/gpu_build.py hip --archs "gfx906;gfx908;gfx90a;gfx1030"
    python3 ci/gpu_build.py hip-clang --archs "gfx90a;gfx942;gfx1100;gfx1201"
    python3 ci/gpu_build.py nvcc --archs "75;80" --per-arch     # also one build per arch, timed
    python3 ci/gpu_build.py nvcc --archs native --install      # the local GPU only, into lowbit/_native

What each toolchain covers (the ones a Debian 12 machine gets from apt and PyPI):

* ``nvcc`` -- CUDA 13 (nvcc on PATH): sm_75..sm_120 -> ``liblowbit_cuda13.so`` for torch cu13x;
* ``clang-cuda`` -- clang-19 with CUDA 12.8 from PyPI wheels (``ci/cuda12_path.py``; the wheels
  hold ptxas but no nvcc): sm_70..sm_90 + PTX -> ``liblowbit_cuda12.so`` for torch cu12x;
* ``hip`` -- hipcc (Debian: ROCm 5.2, clang 15): gfx906, gfx908, gfx90a, gfx1030 (no gfx942,
  no device libraries for gfx11xx); a ROCm 6/7 hipcc builds every default target;
* ``hip-clang`` -- clang-19 with Debian's HIP headers and device libraries (``ci/rocm_path.py``):
  adds gfx942, gfx1100, gfx1201 (gfx950 needs LLVM 20).

Used by the ``build_cuda*``, ``build_hip*``, ``build_gpu_min`` and ``gpu`` nox sessions.
Each build configures ``csrc/cuda`` with CMake (Ninja), compiles every kernel with warnings as
errors, then checks the produced library:

* ``ci/gpu_fatbin.py`` (ELF + fat binary parser, no GPU tool needed) must find every expected
  target in *every* translation unit's device code (SASS ``sm_XY`` per arch and, for nvcc, PTX
  ``compute_XY`` of the highest arch; clang embeds PTX for each arch; ``gfxNNN`` code objects
  for HIP);
* where present, the vendor tools must agree: ``cuobjdump --list-elf`` / ``--list-ptx`` (pip
  package ``nvidia-cuda-cuobjdump``), ``roc-obj-ls`` or ``clang-offload-bundler --list``;
* ``readelf`` must show how the library reaches its runtime: a CUDA library NEEDs
  ``libcudart.so.<major>`` of its name and leaves the runtime's entry points undefined (no static
  cudart inside); the HIP library NEEDs no ``libamdhip64`` (it binds to torch's at load time).

This script installs nothing on the system: a missing compiler is an error naming its Debian
packages (``.ci/run`` installs clang-19, lld-19 and hipcc before nox runs). ``--json FILE`` writes the results (toolchain, targets, seconds, ok) for the record.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "ci"))

import cuda12_path  # noqa: E402
import gpu_fatbin  # noqa: E402
import rocm_path  # noqa: E402

# program that must exist -> Debian package that brings it
APT_PACKAGES = {
    "clang-cuda": {"clang++-19": "clang-19"},
    "hip": {"hipcc": "hipcc"},
    "hip-clang": {"clang++-19": "clang-19", "ld.lld-19": "lld-19", "hipcc": "hipcc"},
}
TOOLCHAINS = ("nvcc", "clang-cuda", "hip", "hip-clang")


def log(message: str) -> None:
    print(f"[gpu_build] {message}", flush=True)


def run(cmd: list[str], env: Optional[dict[str, str]] = None) -> None:
    log("$ " + " ".join(cmd))
    subprocess.run(cmd, check=True, env=env)


def ensure_compiler(toolchain: str) -> None:
    if toolchain == "nvcc":
        if not shutil.which("nvcc"):
            raise SystemExit("nvcc not found on PATH: install a CUDA toolkit (13.x)")
        return
    missing = sorted({package for program, package in APT_PACKAGES[toolchain].items() if not shutil.which(program)})
    if missing:
        raise SystemExit(f"not found: apt-get install {' '.join(missing)}")


def cuobjdump() -> Optional[str]:
    """cuobjdump from PATH, the CUDA toolkit, or the nvidia-cuda-cuobjdump wheel."""
    found = shutil.which("cuobjdump")
    if found:
        return found
    candidates = [os.environ.get("CUDA_HOME", ""), "/usr/local/cuda"]
    candidates += glob.glob(os.path.join(sysconfig.get_paths()["purelib"], "nvidia", "cu*"))
    for base in candidates:
        path = Path(base) / "bin" / "cuobjdump"
        if base and path.is_file():
            return str(path)
    return None


def expected_targets(toolchain: str, archs: list[str], ptx: bool) -> list[str]:
    if toolchain.startswith("hip"):
        return list(archs)
    numbers = sorted(int(a) for a in archs)
    targets = [f"sm_{a}" for a in numbers]
    if ptx:
        targets.append(f"compute_{numbers[-1]}")
    return targets


def dynamic_section(library: Path) -> tuple[list[str], set[str]]:
    """(NEEDED entries, undefined dynamic symbols) of a shared library, read with readelf."""
    dynamic = subprocess.run(["readelf", "-d", str(library)], capture_output=True, text=True, check=True).stdout
    needed = [line.split("[", 1)[1].rstrip("]") for line in dynamic.splitlines() if "(NEEDED)" in line]
    symbols = subprocess.run(["readelf", "--dyn-syms", "-W", str(library)], capture_output=True, text=True, check=True).stdout
    undefined = {fields[7].split("@")[0] for fields in map(str.split, symbols.splitlines()) if len(fields) >= 8 and fields[6] == "UND"}
    return needed, undefined


def runtime_problems(library: Path, needed: list[str], undefined: set[str]) -> list[str]:
    """How the library reaches its GPU runtime, checked against what its name promises:
    liblowbit_cuda<M>.so NEEDs libcudart.so.<M> and leaves the runtime's entry points undefined (a
    static cudart would define them inside and NEED nothing); liblowbit_hip.so NEEDs no libamdhip64
    (one build for ROCm 6 and 7) and leaves the HIP entry points undefined."""
    name = library.name
    problems = []
    if name.startswith("liblowbit_cuda"):
        major = name[len("liblowbit_cuda"):].split(".")[0]
        if not major.isdigit():
            return [f"{name}: the file name carries no CUDA major (liblowbit_cuda12.so, liblowbit_cuda13.so)"]
        cudart = [n for n in needed if n.startswith("libcudart")]
        if cudart != [f"libcudart.so.{major}"]:
            problems.append(f"{name} NEEDs {cudart or 'no libcudart'}, not libcudart.so.{major}")
        if "__cudaRegisterFatBinary" not in undefined:
            problems.append(f"{name} defines the CUDA runtime's entry points itself: a static cudart is linked in")
    elif name.startswith("liblowbit_hip"):
        hip = [n for n in needed if n.startswith("libamdhip64")]
        if hip:
            problems.append(f"{name} NEEDs {hip}: it would load with one ROCm major only")
        if "__hipRegisterFatBinary" not in undefined:
            problems.append(f"{name} does not take __hipRegisterFatBinary from the process's HIP runtime")
    else:
        problems.append(f"unexpected library name {name}")
    return problems


def vendor_check(toolchain: str, library: Path, expected: list[str]) -> str:
    """Cross-check with the vendor's tool when available; returns what was checked."""
    if not toolchain.startswith("hip"):
        tool = cuobjdump()
        if tool is None:
            return "cuobjdump not available (pip install nvidia-cuda-cuobjdump): skipped"
        elf = subprocess.run([tool, "--list-elf", str(library)], capture_output=True, text=True, check=True).stdout
        ptx = subprocess.run([tool, "--list-ptx", str(library)], capture_output=True, text=True, check=True).stdout
        seen = {line.rsplit(".", 2)[-2] for line in elf.splitlines() if line.endswith(".cubin")}
        seen |= {"compute_" + line.rsplit(".", 2)[-2][3:] for line in ptx.splitlines() if line.endswith(".ptx")}
        absent = [t for t in expected if t not in seen]
        if absent:
            raise SystemExit(f"cuobjdump does not list {' '.join(absent)} in {library} (it lists {' '.join(sorted(seen))})")
        return f"cuobjdump agrees ({' '.join(sorted(seen, key=gpu_fatbin._target_key))})"
    tool = shutil.which("roc-obj-ls")
    if tool:
        out = subprocess.run([tool, str(library)], capture_output=True, text=True, check=True).stdout
        seen = {line.split()[1].rsplit("-", 1)[-1] for line in out.splitlines() if "amdgcn" in line}
        absent = [t for t in expected if t not in seen]
        if absent:
            raise SystemExit(f"roc-obj-ls does not list {' '.join(absent)} in {library}")
        return f"roc-obj-ls agrees ({' '.join(sorted(seen))})"
    return "roc-obj-ls not available: skipped"


def build(toolchain: str, archs: list[str], build_dir: Path, tree: Optional[Path], ptx: bool,
          jobs: Optional[int]) -> dict:  # fmt: skip
    if build_dir.exists():
        shutil.rmtree(build_dir)
    configure = [
        "cmake", "-S", str(ROOT / "csrc" / "cuda"), "-B", str(build_dir), "-G", "Ninja",
        f"-DLOWBIT_GPU_TOOLCHAIN={'hip' if toolchain == 'hip-clang' else toolchain}",
        f"-DLOWBIT_GPU_ARCHS={';'.join(archs)}", f"-DLOWBIT_GPU_PTX={'ON' if ptx else 'OFF'}", "-DLOWBIT_GPU_WERROR=ON",
    ]  # fmt: skip
    if toolchain == "clang-cuda":
        configure.append(f"-DLOWBIT_CUDA_PATH={tree}")
    elif toolchain == "hip-clang":
        configure += [f"-DLOWBIT_GPU_COMPILER={shutil.which('clang++-19')}", f"-DLOWBIT_ROCM_PATH={tree}"]
    env = {**os.environ, "HIP_PLATFORM": "amd"} if toolchain.startswith("hip") else None
    started = time.perf_counter()
    run(configure, env=env)
    configured = time.perf_counter()
    run(["cmake", "--build", str(build_dir), *(["-j", str(jobs)] if jobs else [])], env=env)
    finished = time.perf_counter()
    libraries = sorted(build_dir.glob("liblowbit_*.so"))
    if len(libraries) != 1:
        raise SystemExit(f"{build_dir}: expected one liblowbit_*.so, found {[p.name for p in libraries]}")
    library = libraries[0]
    expected = expected_targets(toolchain, archs, ptx)
    listing = gpu_fatbin.list_targets(library)
    problems = gpu_fatbin.missing(listing, expected)
    problems += runtime_problems(library, *dynamic_section(library))
    if problems:
        raise SystemExit(f"{library}: " + "; ".join(problems))
    vendor = vendor_check(toolchain, library, expected)
    needed = dynamic_section(library)[0]
    result = {
        "toolchain": toolchain,
        "archs": archs,
        "targets": listing["targets"],
        "translation_units_with_device_code": len(listing["containers"]),
        "configure_s": round(configured - started, 1),
        "build_s": round(finished - configured, 1),
        "library": str(library),
        "library_mb": round(library.stat().st_size / 2**20, 1),
        "needed": needed,
        "vendor_check": vendor,
        "ok": True,
    }
    log(
        f"OK {toolchain} {' '.join(archs)}: {library.name}, build {result['build_s']} s (configure {result['configure_s']} s), "
        f"{result['library_mb']} MB, every translation unit holds {' '.join(expected)}; NEEDED {' '.join(needed)}; {vendor}"
    )
    return result


def parse_archs(text: str) -> list[str]:
    return [a.strip() for a in text.replace(",", ";").split(";") if a.strip()]


def native_archs() -> list[str]:
    """Compute capabilities of the NVIDIA GPUs on this machine (nvidia-smi), e.g. ["90"]."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"],
                             capture_output=True, text=True, check=True).stdout  # fmt: skip
    except (OSError, subprocess.CalledProcessError) as err:
        raise SystemExit(f"--archs native: nvidia-smi cannot list the GPUs: {err}") from err
    archs = sorted({line.strip().replace(".", "") for line in out.splitlines() if line.strip()})
    if not archs:
        raise SystemExit("--archs native: nvidia-smi lists no GPU")
    return archs


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("toolchain", choices=TOOLCHAINS)
    parser.add_argument("--archs", required=True,
                        help="';'- or ','-separated: 75;80 or gfx90a;gfx1030; 'native': the GPUs nvidia-smi lists")
    parser.add_argument("--install", action="store_true", help="copy the library into lowbit/_native/")
    parser.add_argument("--build-root", type=Path, default=ROOT / "build" / "gpu")
    parser.add_argument("--cuda-path", type=Path, help="clang-cuda: existing CUDA tree (default: lay one out)")
    parser.add_argument("--no-ptx", action="store_true", help="nvcc: no PTX for the highest arch")
    parser.add_argument("--per-arch", action="store_true", help="also build each arch on its own and time it")
    parser.add_argument("--jobs", type=int, help="parallel compile jobs (default: ninja's)")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)

    archs = native_archs() if args.archs == "native" else parse_archs(args.archs)
    started = time.perf_counter()
    ensure_compiler(args.toolchain)
    tree = None  # the CUDA 12.8 tree for clang-cuda, the ROCm tree for hip-clang
    if args.toolchain == "clang-cuda":
        tree = args.cuda_path
        if tree is None:
            t0 = time.perf_counter()
            tree = args.build_root / "cuda12"
            cuda12_path.main([str(tree)])
            log(f"CUDA 12.8 tree for clang at {tree} ({time.perf_counter() - t0:.1f} s)")
        tree = tree.resolve()
    elif args.toolchain == "hip-clang":
        tree = rocm_path.layout((args.build_root / "rocm").resolve(), archs, "clang-19")
        log(f"ROCm tree for clang at {tree}")

    results = []
    name = f"{args.toolchain}-{'-'.join(archs)}" if len(archs) <= 2 else f"{args.toolchain}-all"
    results.append(build(args.toolchain, archs, args.build_root / name, tree, not args.no_ptx, args.jobs))
    if args.per_arch and len(archs) > 1:
        for arch in archs:
            one = build(args.toolchain, [arch], args.build_root / f"{args.toolchain}-{arch}", tree,
                        not args.no_ptx, args.jobs)  # fmt: skip
            results.append(one)
    if args.install:
        destination = ROOT / "lowbit" / "_native" / Path(results[0]["library"]).name
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(results[0]["library"], destination)
        log(f"installed {destination}")
    total = time.perf_counter() - started
    log("summary:")
    for r in results:
        log(f"  {r['toolchain']:<10} {' '.join(r['archs']):<40} build {r['build_s']:>7.1f} s  {r['library_mb']:>6.1f} MB  ok")
    log(f"  total (with installs) {total:.1f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"results": results, "total_s": round(total, 1)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
