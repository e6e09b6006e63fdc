"""What machine the numbers come from: CPU, caches, memory bandwidth, library versions and
which lowbit backend (and instruction set) is active."""

from __future__ import annotations

import ctypes
import glob
import mmap
import os
import platform
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

import torch
from bench_core import Budget, Case, CaseResult, Impl, run_case

_SIZE = re.compile(r"^\s*(\d+)\s*([KMG]?)\s*$", re.IGNORECASE)


def _parse_size(text: str) -> Optional[int]:
    match = _SIZE.match(text)
    if not match:
        return None
    return int(match.group(1)) * {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[match.group(2).upper()]


def _read(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return ""


def caches() -> list[dict[str, Any]]:
    """The caches of cpu0 as sysfs describes them (level, type, size in bytes)."""
    found = []
    for index in sorted(glob.glob("/sys/devices/system/cpu/cpu0/cache/index*")):
        size = _parse_size(_read(f"{index}/size"))
        level = _read(f"{index}/level")
        if size and level.isdigit():
            found.append({"level": int(level), "type": _read(f"{index}/type"), "bytes": size})
    return found


#: Used when sysfs says nothing (not Linux, containers hiding it): a typical desktop L3.
FALLBACK_LLC_BYTES = 32 << 20


def llc_bytes() -> tuple[int, str]:
    """Size of the last-level cache and where the number came from."""
    found = [c for c in caches() if c["type"] in ("Unified", "Data")]
    if found:
        last = max(found, key=lambda c: (c["level"], c["bytes"]))
        return last["bytes"], f"sysfs L{last['level']}"
    return FALLBACK_LLC_BYTES, "assumed (sysfs has no cache info)"


def cpu_model() -> str:
    for line in _read("/proc/cpuinfo").splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def memory_bytes() -> Optional[int]:
    for line in _read("/proc/meminfo").splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    return None


def copy_bandwidth(llc: int, budget: Budget) -> CaseResult:
    """Time ``dst.copy_(src)`` on a buffer of at least 4x the LLC (and 256 MiB).

    ``bytes_read`` counts the bytes read plus the bytes written (2x the buffer), the usual
    'copy bandwidth'. A write-allocate cache also reads the destination before writing it,
    so the memory bus really carries up to 3x the buffer; that traffic is not counted.
    """
    size = max(4 * llc, 256 << 20)

    def build() -> list[Impl]:
        src = torch.ones(size, dtype=torch.uint8)
        dst = torch.zeros_like(src)
        return [Impl("torch", f"dst.copy_(src), {size >> 20} MiB", lambda: dst.copy_(src), bytes_read=2 * size)]

    return run_case(Case(f"copy {size >> 20} MiB", "bandwidth", build), budget)


def huge_page_ones(numel: int) -> torch.Tensor:
    """float32 ones whose whole 2 MiB pages are advised to be huge pages before they are first
    written (Linux ``madvise(MADV_HUGEPAGE)``), as lowbit advises its interleaved weights
    (csrc/cpu/huge_pages.h): a stream through 4 KiB pages reads measurably slower, and the read
    bandwidth is the best the machine can do. Elsewhere, plain ones."""
    src = torch.empty(numel, dtype=torch.float32)
    if hasattr(mmap, "MADV_HUGEPAGE"):  # Linux
        huge, start = 2 << 20, src.data_ptr()
        first, last = -(-start // huge) * huge, (start + src.nbytes) // huge * huge
        if last > first:  # a hint: its result does not matter
            ctypes.CDLL(None).madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), mmap.MADV_HUGEPAGE)
    return src.fill_(1.0)


def read_bandwidth(llc: int, budget: Budget) -> CaseResult:
    """Time ``src.sum()`` (float32, torch's vectorized multi-threaded reduction) on a buffer of at
    least 4x the LLC (and 256 MiB) in huge pages: the machine's read bandwidth, what a decode that
    streams its weights can reach at best. ``bytes_read`` is the buffer."""
    size = max(4 * llc, 256 << 20)

    def build() -> list[Impl]:
        src = huge_page_ones(size // 4)
        return [Impl("torch", f"src.sum(), float32, {size >> 20} MiB", lambda: src.sum(), bytes_read=size)]

    return run_case(Case(f"read {size >> 20} MiB", "bandwidth", build), budget)


# ------------------------------------------------------------------------------------------
# lowbit and library versions
# ------------------------------------------------------------------------------------------
def lowbit_backend_details() -> dict[str, Any]:
    """The active CPU backend and what it reports about itself (library, build, ISA)."""
    from lowbit.core import registry

    info: dict[str, Any] = {"active_cpu_backend": registry.active("cpu"), "backends": {}}
    for status in registry.available():
        info["backends"][status.name] = {
            "available": status.available,
            "reason": status.reason,
            "details": {k: str(v) for k, v in status.details.items()},
        }
    info["env"] = {k: v for k, v in os.environ.items() if k.startswith("LOWBIT_")}
    return info


def isa_of(backend: str, details: dict[str, Any]) -> str:
    """The instruction set a backend's kernels were built for or dispatch to, if it says."""
    entry = details.get("backends", {}).get(backend, {}).get("details", {})
    for key, value in entry.items():  # a dedicated field, e.g. "isa": "avx512"
        if "isa" in key.lower() and value:
            return str(value).split()[0].strip(",;")
    match = re.search(r"\bcpu=([\w.+-]+)", entry.get("build", ""))  # the build string's cpu=...
    if match:
        return match.group(1)
    return details.get("env", {}).get("LOWBIT_CPU_ISA", "")


def lowbit_report(timeout: float = 180.0) -> str:
    """The output of ``python -m lowbit`` run by this interpreter, with this lowbit."""
    import lowbit

    env = dict(os.environ)
    root = str(Path(lowbit.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH", "")]))
    try:
        done = subprocess.run(
            [sys.executable, "-m", "lowbit"], capture_output=True, text=True, timeout=timeout, env=env, check=False
        )
        return (done.stdout + done.stderr).strip()
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"python -m lowbit failed: {err}"


def versions() -> dict[str, str]:
    import lowbit

    found = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lowbit": f"{lowbit.__version__} ({Path(lowbit.__file__).parent})",
    }
    try:
        import bitsandbytes

        found["bitsandbytes"] = bitsandbytes.__version__
    except Exception as err:  # noqa: BLE001 (bitsandbytes import can fail in many ways)
        found["bitsandbytes"] = f"unavailable: {type(err).__name__}: {err}"
    try:
        import matplotlib

        found["matplotlib"] = matplotlib.__version__
    except ImportError:
        found["matplotlib"] = "unavailable"
    return found


def machine(threads: int) -> dict[str, Any]:
    llc, llc_source = llc_bytes()
    return {
        "cpu": cpu_model(),
        "arch": platform.machine(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": threads,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "caches": caches(),
        "llc_bytes": llc,
        "llc_source": llc_source,
        "memory_bytes": memory_bytes(),
        "platform": platform.platform(),
    }
