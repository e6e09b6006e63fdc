#!/usr/bin/env python3
"""Build the GPU library with one toolchain and check that it holds code for every requested arch.

    python3 ci/gpu_build.py nvcc --archs "75;80;86;89;90;100;120"
    python3 ci/gpu_build.py clang-cuda --archs 70 --cuda-path build/gpu/cuda12
    python3 ci/gpu_build.py hip --archs "gfx906;gfx908;gfx90a;gfx1030;gfx940"
    python3 ci/gpu_build.py nvcc --archs "75;80" --per-arch     # also one build per arch, timed

Used by the ``build_cuda``, ``build_cuda_sm70``, ``build_hip`` and ``build_gpu_min`` nox sessions.
Each build configures ``csrc/cuda`` with CMake (Ninja), compiles every kernel with warnings as
errors, then checks the produced library:

* ``ci/gpu_fatbin.py`` (ELF + fat binary parser, no GPU tool needed) must find every expected
  target in *every* translation unit's device code (SASS ``sm_XY`` per arch and, for nvcc, PTX
  ``compute_XY`` of the highest arch; clang embeds PTX for each arch; ``gfxNNN`` code objects
  for HIP);
* where present, the vendor tools must agree: ``cuobjdump --list-elf`` / ``--list-ptx`` (pip
  package ``nvidia-cuda-cuobjdump``), ``roc-obj-ls`` or ``clang-offload-bundler --list``.

This script installs nothing on the system: a missing compiler is an error naming the package
(``.ci/run`` installs clang-19 and hipcc before nox runs). ``--json FILE`` writes the results
(toolchain, targets, seconds, ok) for the record.
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

APT_PACKAGES = {"clang-cuda": ("clang++-19", "clang-19"), "hip": ("hipcc", "hipcc")}
LIBRARY = {"nvcc": "liblowbit_cuda.so", "clang-cuda": "liblowbit_cuda.so", "hip": "liblowbit_hip.so"}


def log(message: str) -> None:
    print(f"[gpu_build] {message}", flush=True)


def run(cmd: list[str], env: Optional[dict[str, str]] = None) -> None:
    log("$ " + " ".join(cmd))
    subprocess.run(cmd, check=True, env=env)


def ensure_compiler(toolchain: str) -> None:
    if toolchain == "nvcc":
        if not shutil.which("nvcc"):
            raise SystemExit("nvcc not found on PATH: install a CUDA toolkit (12.x or 13.x)")
        return
    program, package = APT_PACKAGES[toolchain]
    if not shutil.which(program):
        raise SystemExit(f"{program} not found: apt-get install {package}")


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
    if toolchain == "hip":
        return list(archs)
    numbers = sorted(int(a) for a in archs)
    targets = [f"sm_{a}" for a in numbers]
    if toolchain == "clang-cuda":
        targets += [f"compute_{a}" for a in numbers]
    elif ptx:
        targets.append(f"compute_{numbers[-1]}")
    return targets


def vendor_check(toolchain: str, library: Path, expected: list[str]) -> str:
    """Cross-check with the vendor's tool when available; returns what was checked."""
    if toolchain in ("nvcc", "clang-cuda"):
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


def build(toolchain: str, archs: list[str], build_dir: Path, cuda_path: Optional[Path], ptx: bool,
          jobs: Optional[int]) -> dict:  # fmt: skip
    if build_dir.exists():
        shutil.rmtree(build_dir)
    configure = [
        "cmake", "-S", str(ROOT / "csrc" / "cuda"), "-B", str(build_dir), "-G", "Ninja",
        f"-DLOWBIT_GPU_TOOLCHAIN={toolchain}", f"-DLOWBIT_GPU_ARCHS={';'.join(archs)}",
        f"-DLOWBIT_GPU_PTX={'ON' if ptx else 'OFF'}", "-DLOWBIT_GPU_WERROR=ON",
    ]  # fmt: skip
    if cuda_path is not None:
        configure.append(f"-DLOWBIT_CUDA_PATH={cuda_path}")
    env = {**os.environ, "HIP_PLATFORM": "amd"} if toolchain == "hip" else None
    started = time.perf_counter()
    run(configure, env=env)
    configured = time.perf_counter()
    run(["cmake", "--build", str(build_dir), *(["-j", str(jobs)] if jobs else [])], env=env)
    finished = time.perf_counter()
    library = build_dir / LIBRARY[toolchain]
    expected = expected_targets(toolchain, archs, ptx)
    listing = gpu_fatbin.list_targets(library)
    problems = gpu_fatbin.missing(listing, expected)
    if problems:
        raise SystemExit(f"{library}: " + "; ".join(problems))
    vendor = vendor_check(toolchain, library, expected)
    result = {
        "toolchain": toolchain,
        "archs": archs,
        "targets": listing["targets"],
        "translation_units_with_device_code": len(listing["containers"]),
        "configure_s": round(configured - started, 1),
        "build_s": round(finished - configured, 1),
        "library": str(library),
        "library_mb": round(library.stat().st_size / 2**20, 1),
        "vendor_check": vendor,
        "ok": True,
    }
    log(
        f"OK {toolchain} {' '.join(archs)}: build {result['build_s']} s (configure {result['configure_s']} s), "
        f"{result['library_mb']} MB, every translation unit holds {' '.join(expected)}; {vendor}"
    )
    return result


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("toolchain", choices=("nvcc", "clang-cuda", "hip"))
    parser.add_argument("--archs", required=True, help="';'- or ','-separated: 75;80 or gfx90a;gfx1030")
    parser.add_argument("--build-root", type=Path, default=ROOT / "build" / "gpu")
    parser.add_argument("--cuda-path", type=Path, help="clang-cuda: existing CUDA tree (default: lay one out)")
    parser.add_argument("--no-ptx", action="store_true", help="nvcc: no PTX for the highest arch")
    parser.add_argument("--per-arch", action="store_true", help="also build each arch on its own and time it")
    parser.add_argument("--jobs", type=int, help="parallel compile jobs (default: ninja's)")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)

    archs = [a.strip() for a in args.archs.replace(",", ";").split(";") if a.strip()]
    started = time.perf_counter()
    ensure_compiler(args.toolchain)
    cuda_path = None
    if args.toolchain == "clang-cuda":
        cuda_path = args.cuda_path
        if cuda_path is None:
            t0 = time.perf_counter()
            cuda_path = args.build_root / "cuda12"
            cuda12_path.main([str(cuda_path)])
            log(f"CUDA 12.8 tree for clang at {cuda_path} ({time.perf_counter() - t0:.1f} s)")
        cuda_path = cuda_path.resolve()

    results = []
    name = f"{args.toolchain}-{'-'.join(archs)}" if len(archs) <= 2 else f"{args.toolchain}-all"
    results.append(build(args.toolchain, archs, args.build_root / name, cuda_path, not args.no_ptx, args.jobs))
    if args.per_arch and len(archs) > 1:
        for arch in archs:
            one = build(args.toolchain, [arch], args.build_root / f"{args.toolchain}-{arch}", cuda_path,
                        not args.no_ptx, args.jobs)  # fmt: skip
            results.append(one)
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
