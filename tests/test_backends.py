"""Backend selection: LOWBIT_BACKEND, the fallback when the native library is missing or broken,
the automatic choice per device type (native library, else Triton, else reference; checked with
the registry's own seams, no GPU needed), Triton missing, IPEX on XPU, backends.use(),
backends.available() and `python -m lowbit`. Environment variables are read at import, so those
tests run Python in a subprocess."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest
import torch

import lowbit
from lowbit.backends import native_library
from lowbit.backends.cpu import native
from lowbit.core import registry
from support import NATIVE_CPU_BACKENDS, run_python

PROBE = "import lowbit; print('ACTIVE', lowbit.backends.active('cpu'))"


def test_forced_reference_is_reported_as_forced():
    result = run_python("import sys; from lowbit.__main__ import main; sys.exit(main([]))", LOWBIT_BACKEND="reference")
    assert result.returncode == 0, result.stderr
    assert "LOWBIT_BACKEND: reference -> reference forced" in result.stdout
    assert any(line.startswith("reference") and "forced" in line for line in result.stdout.splitlines())


def test_unknown_backend_name_lists_valid_names():
    result = run_python(PROBE, LOWBIT_BACKEND="nope")
    assert result.returncode != 0
    assert "LOWBIT_BACKEND='nope' is not a lowbit backend; valid names: reference, cpu, cuda, hip, xpu, triton" in result.stderr


@pytest.mark.parametrize("name", ["cuda", "hip", "xpu", "triton"])
def test_forcing_an_unavailable_backend_fails_with_the_reason(name):
    status = next(s for s in lowbit.backends.available() if s.name == name)
    if status.available:
        pytest.skip(f"{name} is available on this machine")
    result = run_python(PROBE, LOWBIT_BACKEND=name)
    assert result.returncode != 0
    assert f"LOWBIT_BACKEND={name!r} was requested but the {name} backend cannot run: {status.reason}" in result.stderr


def test_missing_native_library_warns_once_and_falls_back(tmp_path):
    missing = tmp_path / "liblowbit_cpu.so"
    code = PROBE + "; import lowbit.functional as F, torch; print(F.quantize_4bit(torch.ones(8))[0].shape)"
    result = run_python(code, LOWBIT_CPU_LIBRARY=str(missing))
    assert result.returncode == 0, result.stderr
    assert "ACTIVE reference" in result.stdout and "torch.Size([4, 1])" in result.stdout
    assert result.stderr.count("LowbitWarning") == 1
    assert f"native library not found at {missing}" in result.stderr


def test_broken_native_library_warns_and_falls_back(tmp_path):
    broken = tmp_path / "liblowbit_cpu.so"
    broken.write_bytes(b"\x7fELF this is not a shared library")
    result = run_python(PROBE, LOWBIT_CPU_LIBRARY=str(broken))
    assert result.returncode == 0, result.stderr
    assert "ACTIVE reference" in result.stdout and "failed to load" in result.stderr


def _library_copy(tmp_path, edit) -> str:
    """A copy of the built CPU library with ``edit(bytearray)`` applied."""
    data = bytearray(native.library_path().read_bytes())
    edited = tmp_path / "liblowbit_cpu.so"
    edited.write_bytes(bytes(edit(data)))
    return str(edited)


def _set(data: bytearray, offset: int, value: int, size: int) -> bytearray:
    data[offset : offset + size] = value.to_bytes(size, sys.byteorder)
    return data


# Bad libraries and what the loader says about each (ELF64 header offsets: e_type 16, e_machine 18,
# e_shnum 60; readelf -h). Each must warn + fall back (auto) or raise BackendError (forced), never
# kill the process: dlopen of a truncated file dies of SIGBUS.
BAD_LIBRARIES = {
    "truncated_64k": (lambda d: d[:65536], "it is truncated: the section headers end at byte"),
    # no section table (as after sstrip): the loadable segments themselves run past the end
    "truncated_segments": (lambda d: _set(d, 60, 0, 2)[:65536], "it is truncated: loadable segment"),
    "header_only": (lambda d: d[:40], "it is truncated: 40 bytes, shorter than an ELF header"),
    "empty": (lambda d: b"", "it is empty"),
    "text": (lambda d: b"#!/bin/sh\necho not a library\n", "it is not an ELF shared library (it starts with b'#!/bin/sh"),
    "foreign_arch": (lambda d: _set(d, 18, 183, 2), "it is built for AArch64, this machine is"),
    "32_bit": (lambda d: _set(d, 4, 1, 1), "it is a 32-bit ELF file"),
    "executable": (lambda d: _set(d, 16, 2, 2), "it is not a shared library (ELF type 2"),
}


ELF_X86_64_LINUX = pytest.mark.skipif(
    not NATIVE_CPU_BACKENDS or not sys.platform.startswith("linux") or os.uname().machine != "x86_64",
    reason="needs the built native library (ELF offsets of x86-64 Linux) to corrupt",
)


@ELF_X86_64_LINUX
@pytest.mark.parametrize("case", BAD_LIBRARIES)
def test_bad_native_library_is_refused_before_dlopen(tmp_path, case):
    edit, reason = BAD_LIBRARIES[case]
    with pytest.raises(OSError, match=re.escape(reason)):
        native_library.load(Path(_library_copy(tmp_path, edit)))


@ELF_X86_64_LINUX
def test_truncated_native_library_never_kills_the_import(tmp_path):
    library = _library_copy(tmp_path, lambda d: d[:65536])
    reason = f"native library at {library} failed to load: it is truncated"
    auto = run_python(PROBE, LOWBIT_CPU_LIBRARY=library)
    assert auto.returncode == 0, auto.stderr
    assert "ACTIVE reference" in auto.stdout and auto.stderr.count("LowbitWarning") == 1 and reason in auto.stderr
    forced = run_python(PROBE, LOWBIT_BACKEND="cpu", LOWBIT_CPU_LIBRARY=library)
    assert forced.returncode == 1, forced.stderr  # an exception, not a signal (a negative returncode)
    assert f"BackendError: LOWBIT_BACKEND='cpu' was requested but the cpu backend cannot run: {reason}" in forced.stderr


def test_directory_as_native_library_is_reported(tmp_path):
    result = run_python(PROBE, LOWBIT_CPU_LIBRARY=str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "ACTIVE reference" in result.stdout
    assert f"native library at {tmp_path} failed to load: it is not a regular file" in result.stderr


@pytest.mark.skipif(not NATIVE_CPU_BACKENDS, reason="native CPU library not built")
def test_built_library_passes_the_elf_check():
    assert native_library.elf_problem(native.library_path()) is None


def test_forced_cpu_without_library_is_an_error(tmp_path):
    result = run_python(PROBE, LOWBIT_BACKEND="cpu", LOWBIT_CPU_LIBRARY=str(tmp_path / "none.so"))
    assert result.returncode != 0
    assert "LOWBIT_BACKEND='cpu' was requested but the cpu backend cannot run: native library not found" in result.stderr


@pytest.mark.skipif(not NATIVE_CPU_BACKENDS, reason="native CPU library not built")
def test_native_backend_is_the_default_for_cpu():
    result = run_python(PROBE)
    assert "ACTIVE cpu" in result.stdout and "LowbitWarning" not in result.stderr


def test_use_switches_and_restores():
    before = lowbit.backends.active("cpu")
    with lowbit.backends.use("reference"):
        assert lowbit.backends.active("cpu") == "reference"
        assert lowbit.backends.active("cuda") == "reference"
    assert lowbit.backends.active("cpu") == before


def test_use_rejects_unknown_and_unavailable_backends():
    with pytest.raises(lowbit.backends.BackendError, match="valid names: reference, cpu, cuda, hip, xpu, triton"):
        with lowbit.backends.use("tpu"):
            pass
    unavailable = [s for s in lowbit.backends.available() if not s.available]
    for status in unavailable:
        with pytest.raises(lowbit.backends.BackendError, match="cannot run"):
            with lowbit.backends.use(status.name):
                pass


def test_available_reports_every_backend_with_a_reason():
    statuses = {s.name: s for s in lowbit.backends.available()}
    assert list(statuses) == ["reference", "cpu", "cuda", "hip", "xpu", "triton"]
    assert statuses["reference"].available and "quantize_4bit" in statuses["reference"].ops
    for status in statuses.values():
        assert status.available or status.reason, f"{status.name} is unavailable without a reason"
    if not torch.cuda.is_available():
        assert "torch.cuda.is_available() is False" in statuses["cuda"].reason or "without CUDA" in statuses["cuda"].reason


def test_backend_without_a_kernel_falls_through_to_reference(monkeypatch):
    cuda_kernels = registry.KernelTable("cuda")
    assert cuda_kernels.get("quantize_4bit") is None
    reference_kernel = registry.get("reference").kernels.get("int8_linear_matmul")
    # the native CPU backend implements every op now: take one away, the reference kernel serves it
    active = registry.get(registry.active("cpu")).kernels
    monkeypatch.delitem(active._kernels, "int8_linear_matmul", raising=False)
    assert registry.kernel_for("int8_linear_matmul", "cpu") is reference_kernel


def test_cli_report_and_self_test():
    result = run_python("import sys; from lowbit.__main__ import main; sys.exit(main([]))")
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert f"lowbit {lowbit.__version__}" in out and "features:" in out
    for name in ("reference", "cpu", "cuda", "hip", "xpu", "triton"):
        assert any(line.startswith(name) for line in out.splitlines())
    assert "Triton: " in out and "IPEX: " in out
    assert "self-test:" in out and "FAIL" not in out
    if NATIVE_CPU_BACKENDS:
        assert "library: " in out and "build: " in out


def test_cli_demo_runs():
    result = run_python("import sys; from lowbit.__main__ import main; sys.exit(main(['demo', '--no-model']))")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "nf4 + dq" in result.stdout and "saved" in result.stdout and "self-test:" in result.stdout


@pytest.mark.skipif(
    not os.environ.get("LOWBIT_REQUIRE_NATIVE"), reason="set LOWBIT_REQUIRE_NATIVE=1 where the native build is expected (nox does)"
)
def test_native_library_was_built_and_loads():
    status = next(s for s in lowbit.backends.available() if s.name == "cpu")
    assert status.available, status.reason


# ---- the automatic choice per device type (docs/design.md §3), through the registry's seams ----------
@pytest.fixture
def choose_afresh(monkeypatch):
    """Set backends' availability as if probed here, and forget earlier automatic choices."""
    monkeypatch.setattr(registry, "_auto", {})
    monkeypatch.setattr(registry, "_forced", None)

    def set_available(**availability: bool) -> None:
        registry._auto.clear()
        for name, ok in availability.items():
            monkeypatch.setattr(registry._BACKENDS[name].load(), "available", ok)

    return set_available


@pytest.mark.parametrize("rocm", [False, True], ids=["nvidia", "rocm"])
def test_cuda_tensors_use_the_native_library_else_triton_else_reference(rocm, choose_afresh, monkeypatch):
    monkeypatch.setattr(torch.version, "hip", "6.2" if rocm else None)
    native = "hip" if rocm else "cuda"
    assert registry.auto_order("cuda") == (native, "triton")
    choose_afresh(**{native: True, "triton": True})
    assert registry.active("cuda") == native
    choose_afresh(**{native: False, "triton": True})
    assert registry.active("cuda") == "triton"
    choose_afresh(**{native: False, "triton": False})
    assert registry.active("cuda") == "reference"


def test_xpu_and_cpu_tensors_never_fall_to_triton_directly(choose_afresh):
    """xpu tensors go to the xpu backend (itself the Triton kernels); cpu tensors never to triton,
    not even when Triton's interpreter lets it serve them."""
    choose_afresh(xpu=True, triton=True)
    assert registry.active("xpu") == "xpu"
    choose_afresh(xpu=False, triton=True, cpu=False)
    assert registry.active("xpu") == "reference" and registry.active("cpu") == "reference"


# ---- Triton missing, Triton's interpreter ------------------------------------------------------
NO_TRITON = """
import importlib.machinery, sys
class BrokenLoader:
    def create_module(self, spec):
        return None
    def exec_module(self, module):  # what a Triton whose native library does not load raises
        raise ImportError("libtriton.so: undefined symbol: cuGetProcAddress")
class NoTriton:  # as if Triton were not installed (or, with BROKEN set, broken)
    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            if BROKEN:
                return importlib.machinery.ModuleSpec(name, BrokenLoader())
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, NoTriton())
"""
MISSING_TRITON, BROKEN_TRITON = "BROKEN = False" + NO_TRITON, "BROKEN = True" + NO_TRITON
INSTALL_HINT = 'pip install "lowbit[triton]"'


def test_forced_triton_without_triton_fails_with_the_install_hint():
    result = run_python(MISSING_TRITON + PROBE, LOWBIT_BACKEND="triton")
    assert result.returncode != 0
    assert "LOWBIT_BACKEND='triton' was requested but the triton backend cannot run: Triton is not installed" in result.stderr
    assert INSTALL_HINT in result.stderr


@pytest.mark.parametrize(
    ("blocker", "reason"),
    [(MISSING_TRITON, "Triton is not installed"), (BROKEN_TRITON, "importing Triton failed (ImportError: libtriton.so")],
    ids=["missing", "broken"],
)
def test_without_a_working_triton_lowbit_imports_and_the_report_says_why(blocker, reason):
    result = run_python(blocker + "import sys; from lowbit.__main__ import main; sys.exit(main([]))")
    assert result.returncode == 0, result.stdout + result.stderr
    triton_line = next(line for line in result.stdout.splitlines() if line.startswith("Triton: "))
    assert reason in triton_line and INSTALL_HINT in triton_line
    row = next(line for line in result.stdout.splitlines() if line.startswith("triton "))
    assert "unavailable" in row and reason in row


STATUS = "import lowbit; s = {b.name: b for b in lowbit.backends.available()}['triton']; print(s.device_types, s.available)"


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU makes the triton backend available without the interpreter")
def test_triton_serves_cpu_tensors_only_under_its_interpreter():
    pytest.importorskip("triton", reason="Triton is not installed here (nox -s triton installs it)")
    compiled = run_python(STATUS + "; print(s.reason)", TRITON_INTERPRET="0")
    assert compiled.returncode == 0, compiled.stderr
    assert "('cuda', 'xpu') False" in compiled.stdout and "no GPU for the Triton kernels" in compiled.stdout
    interpreted = run_python(STATUS + "; print(lowbit.backends.active('cpu'))", TRITON_INTERPRET="1", LOWBIT_BACKEND="triton")
    assert interpreted.returncode == 0, interpreted.stderr
    assert "('cuda', 'xpu', 'cpu') True" in interpreted.stdout and interpreted.stdout.split()[-1] == "triton"


# ---- IPEX on XPU ---------------------------------------------------------------------------------
FAKE_IPEX = """
import torch
from lowbit.backends.reference.blockwise_8bit import decode_blockwise
CALLS = []

class _C:
    @staticmethod
    def _has_xpu():
        return True

def _dequantize(code, A, absmax, out, blocksize, n):  # IPEX's argument order
    CALLS.append(out.dtype)
    out.copy_(decode_blockwise(A, absmax, code, blocksize).to(out.dtype).view(out.shape))

class xpu:
    class bitsandbytes:
        cdequantize_blockwise_fp32 = cdequantize_blockwise_fp16 = cdequantize_blockwise_bf16 = staticmethod(_dequantize)
"""


def _fake_ipex(tmp_path, version: str) -> str:
    """A stand-in intel_extension_for_pytorch distribution (module + metadata) on a path of its own."""
    (tmp_path / "intel_extension_for_pytorch").mkdir()
    (tmp_path / "intel_extension_for_pytorch" / "__init__.py").write_text(FAKE_IPEX)
    info = tmp_path / f"intel_extension_for_pytorch-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: intel_extension_for_pytorch\nVersion: {version}\n")
    return str(tmp_path)


def test_ipex_matching_torch_serves_dequantize_blockwise_on_xpu(tmp_path):
    version = ".".join(torch.__version__.split("+")[0].split(".")[:2]) + ".10"
    code = """
import sys, torch, lowbit, intel_extension_for_pytorch as ipex
from lowbit.backends import xpu
from lowbit.core import formats, registry
print(xpu.ipex.describe())
q = torch.randint(0, 256, (1000,), dtype=torch.uint8)
absmax, code = torch.rand(4) * 3, formats.dynamic_map()
got = xpu.kernels.get("dequantize_blockwise")(q, absmax, code, 256, torch.bfloat16)
want = registry.get("reference").kernels.get("dequantize_blockwise")(q, absmax, code, 256, torch.bfloat16)
print("same", torch.equal(got, want), ipex.CALLS)
"""
    result = run_python(code, PYTHONPATH=_fake_ipex(tmp_path, version))
    assert result.returncode == 0, result.stderr
    assert f"used (intel_extension_for_pytorch {version}: dequantize_blockwise)" in result.stdout
    assert "same True [torch.bfloat16]" in result.stdout


def test_ipex_for_another_torch_is_not_loaded_and_the_report_says_why(tmp_path):
    code = "import sys; from lowbit.__main__ import main; main([]); print('loaded', 'intel_extension_for_pytorch' in sys.modules)"
    result = run_python(code, PYTHONPATH=_fake_ipex(tmp_path, "2.8.0"))
    assert result.returncode == 0, result.stderr
    minor = ".".join(torch.__version__.split(".")[:2])
    assert f"IPEX: not used: intel_extension_for_pytorch 2.8.0 is built for torch 2.8, this torch is {torch.__version__}" in result.stdout
    assert "loaded False" in result.stdout and minor != "2.8"


@pytest.mark.skipif(not NATIVE_CPU_BACKENDS, reason="native CPU library not built")
def test_native_refusal_is_a_value_error_naming_the_argument():
    """The C ABI checks every size against the buffers the caller declared (a too-large n into
    lowbit_dequantize_4bit used to overflow the heap); native.check turns a refusal into a ValueError
    carrying the library's words."""
    packed, absmax, code = torch.zeros(32, dtype=torch.uint8), torch.ones(1), torch.zeros(16)
    out = torch.empty(64)
    status = native.lib().lowbit_dequantize_4bit(
        0, *native.buf(packed), *native.buf(absmax), 64, *native.buf(code), native.ptr(out), 1 << 20, 1
    )
    with pytest.raises(ValueError, match=re.escape("lowbit_dequantize_4bit: A_len = 32, but (n + 1) / 2 = 524288")):
        native.check(status, "lowbit_dequantize_4bit")
    assert native.lib().lowbit_dequantize_4bit(
        0, *native.buf(packed), *native.buf(absmax), 64, *native.buf(code), native.ptr(out), 64, 1
    ) == 0
