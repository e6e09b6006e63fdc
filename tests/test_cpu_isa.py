"""The native CPU library's instruction-set builds: selection, the LOWBIT_CPU_ISA cap, what
`python -m lowbit` reports, that no wide instruction leaks into a narrower build, and the thread
pool (fork safety, concurrent callers, results independent of the thread count).

Parity of every ISA with the reference is in test_parity.py (parametrized by ISA)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import threading

import pytest
import torch

import lowbit.functional as F
from lowbit.backends.cpu import native
from support import run_python

pytestmark = pytest.mark.skipif(native.load_error() is not None, reason="native CPU library not built")

ISAS = list(native.ISAS)


def test_default_is_the_widest_supported_isa():
    supported = native.supported_isas()
    assert supported[0] == "scalar" and supported == [i for i in ISAS if i in supported]
    if os.environ.get(native.ENV_ISA):
        pytest.skip(f"{native.ENV_ISA} is set for this run")
    assert native.cpu_isa() == supported[-1]


@pytest.mark.skipif(not os.path.exists("/proc/cpuinfo"), reason="needs /proc/cpuinfo")
def test_supported_isas_match_the_cpu_flags():
    with open("/proc/cpuinfo") as f:
        flags = set(next(line for line in f if line.startswith("flags")).split(":", 1)[1].split())
    build = native.details()["build"]
    expected = ["scalar"]
    if {"avx2", "fma", "f16c"} <= flags and "avx2(" in build:
        expected.append("avx2")
        if {"avx512f", "avx512bw", "avx512vl"} <= flags and "avx512(" in build:
            expected.append("avx512")
    assert native.supported_isas() == expected


def test_set_cpu_isa_switches_and_restores():
    before = native.cpu_isa()
    for isa in native.supported_isas():
        with native.use_cpu_isa(isa):
            assert native.cpu_isa() == isa
        assert native.cpu_isa() == before


def test_set_cpu_isa_rejects_unknown_and_unsupported_names():
    before = native.cpu_isa()
    with pytest.raises(
        ValueError, match="unknown CPU instruction set 'sse9'; valid names: scalar, avx2, avx512"
    ):
        native.set_cpu_isa("sse9")
    for isa in set(ISAS) - set(native.supported_isas()):
        with pytest.raises(ValueError, match=f"{isa!r} cannot run here"):
            native.set_cpu_isa(isa)
    assert native.cpu_isa() == before
    lib = native.lib()
    assert lib.lowbit_set_cpu_isa(3) == 1 and lib.lowbit_set_cpu_isa(-1) == 1  # LOWBIT_ERR_ARGUMENT
    assert lib.lowbit_cpu_isa_supported(3) == 0 and lib.lowbit_cpu_isa_supported(-1) == 0


def test_build_info_lists_the_compiled_isas():
    build = native.details()["build"]
    assert "cpu_isas=scalar" in build
    if re.match(r"x86_64|AMD64", os.uname().machine) and "avx2" in native.supported_isas():
        assert "avx2(-mavx2 -mfma -mf16c)" in build


@pytest.mark.parametrize("cap", ISAS)
def test_environment_caps_the_isa(cap):
    result = run_python(
        "from lowbit.backends.cpu import native; print('ISA', native.cpu_isa())", LOWBIT_CPU_ISA=cap
    )
    assert result.returncode == 0, result.stderr
    expected = [i for i in native.supported_isas() if ISAS.index(i) <= ISAS.index(cap)][-1]
    assert f"ISA {expected}" in result.stdout


def test_unknown_environment_isa_is_reported():
    probe = "import lowbit; print('ACTIVE', lowbit.backends.active('cpu'))"
    result = run_python(probe, LOWBIT_CPU_ISA="avx3")
    message = (
        "LOWBIT_CPU_ISA='avx3' is not a CPU instruction set lowbit knows; valid names: scalar, avx2, avx512"
    )
    assert result.returncode == 0 and "ACTIVE reference" in result.stdout
    assert message in result.stderr  # the one LowbitWarning of the fallback
    forced = run_python(probe, LOWBIT_CPU_ISA="avx3", LOWBIT_BACKEND="cpu")
    assert forced.returncode != 0 and message in forced.stderr


def test_report_shows_the_isa():
    result = run_python(
        "import sys; from lowbit.__main__ import main; sys.exit(main([]))", LOWBIT_CPU_ISA="scalar"
    )
    assert result.returncode == 0, result.stderr
    assert "cpu_isa: scalar (LOWBIT_CPU_ISA=scalar)" in result.stdout
    assert f"cpu_isas_supported: {' '.join(native.supported_isas())}" in result.stdout


# ---- what the compiler put where -------------------------------------------------------------
_FUNCTION = re.compile(r"^([0-9a-f]+) <(.*)>:$")


def _functions(path) -> list[tuple[int, str, list[str]]]:
    """(address, demangled name, instructions) of every function in the library's code."""
    text = subprocess.run(
        ["objdump", "-d", "--no-show-raw-insn", "-C", str(path)], capture_output=True, text=True, check=True
    ).stdout
    functions: list[tuple[int, str, list[str]]] = []
    for line in text.splitlines():
        match = _FUNCTION.match(line)
        if match:
            functions.append((int(match.group(1), 16), match.group(2), []))
        elif functions and "\t" in line:
            functions[-1][2].append(line.split("\t", 1)[1].strip())
    return functions


@pytest.mark.skipif(shutil.which("objdump") is None, reason="objdump not installed")
@pytest.mark.skipif(os.uname().machine not in ("x86_64", "AMD64"), reason="x86-64 builds only")
def test_no_wide_instruction_outside_its_isa_build():
    """Code that any CPU may run (the C ABI, dispatch, threads, the scalar kernels, and whichever
    copy of a shared inline function the linker kept) must be baseline x86-64: no VEX/EVEX
    instruction (mnemonics starting with 'v') and no ymm/zmm/mask register. The avx2 build must
    not use AVX-512.

    Objects are linked baseline first, then avx2, then avx512 (CMakeLists.txt), so the code of
    each ISA build occupies its own address range; functions with internal linkage that the
    compiler left out of line (copies of lowbit_formats.h helpers, one per object) are attributed
    by address. A shared inline function kept from an ISA object would land in that range, but
    then no baseline object emitted it, so no baseline code calls it."""
    functions = _functions(native.library_path())
    ranges = {}
    for isa in ("avx2", "avx512"):
        addresses = [address for address, name, _ in functions if f"::{isa}::" in name]
        assert addresses, f"no {isa} kernels in the library"
        ranges[isa] = (min(addresses), max(addresses))
    leaks = []
    for address, name, instructions in functions:
        owner = next((isa for isa, (lo, hi) in ranges.items() if lo <= address <= hi), "baseline")
        if owner == "avx512":
            continue
        for insn in instructions:
            if owner == "avx2":
                bad = bool(re.search(r"%zmm\d|%k[0-7]\b", insn))
            else:
                bad = insn.startswith("v") or bool(re.search(r"%[yz]mm\d|%k[0-7]\b", insn))
            if bad:
                leaks.append(f"{owner}: {name}: {insn}")
                break
    assert not leaks, "wide instructions outside their ISA build:\n" + "\n".join(leaks[:20])


# ---- threads ----------------------------------------------------------------------------------
def _gemv_problem(N=1024, K=1024):
    g = torch.Generator().manual_seed(3)
    packed, state = F.quantize_4bit(torch.randn(N, K, generator=g), quant_type="nf4")
    return torch.randn(3, K, generator=g), packed, state


def test_gemv_does_not_depend_on_the_thread_count():
    A, packed, state = _gemv_problem()
    previous = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 5):
            torch.set_num_threads(threads)
            results.append(F.gemv_4bit(A, packed, state=state))
    finally:
        torch.set_num_threads(previous)
    assert all(torch.equal(r, results[0]) for r in results)


def test_concurrent_callers_get_their_own_results():
    A, packed, state = _gemv_problem()
    inputs = [A * (i + 1) for i in range(4)]
    want = [F.gemv_4bit(a, packed, state=state) for a in inputs]
    got: dict[int, list[torch.Tensor]] = {i: [] for i in range(4)}

    def work(i):
        for _ in range(10):
            got[i].append(F.gemv_4bit(inputs[i], packed, state=state))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(4):
        assert all(torch.equal(r, want[i]) for r in got[i])


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork() here")
def test_kernels_work_in_a_forked_child():
    """The worker pool's threads do not exist in a fork()ed child: it must start its own."""
    code = """
import os, torch, lowbit.functional as F
torch.set_num_threads(2)
packed, state = F.quantize_4bit(torch.randn(1024, 1024), quant_type="nf4")
A = torch.randn(1, 1024)
want = F.gemv_4bit(A, packed, state=state)  # the parent's pool is running now
pid = os.fork()
if pid == 0:
    ok = torch.equal(F.gemv_4bit(A, packed, state=state), want)
    os._exit(0 if ok else 3)
print("CHILD", os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
"""
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    assert "CHILD 0" in result.stdout
