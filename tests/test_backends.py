"""Backend selection: LOWBIT_BACKEND, the fallback when the native library is missing or broken,
backends.use(), backends.available() and `python -m lowbit`. Environment variables are read at
import, so those tests run Python in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import lowbit
from lowbit.backends.cpu import native
from lowbit.core import registry
from support import NATIVE_CPU_BACKENDS

LOWBIT_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(lowbit.__file__)))
PROBE = "import lowbit; print('ACTIVE', lowbit.backends.active('cpu'))"


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k not in (registry.ENV_BACKEND, native.ENV_LIBRARY)}
    environment.update(env)
    # run beside the lowbit under test, so that `-c` imports that one and not a checkout in cwd
    return subprocess.run(
        [sys.executable, "-W", "always::UserWarning", "-c", code],
        capture_output=True, text=True, env=environment, timeout=120, cwd=LOWBIT_PARENT,
    )  # fmt: skip


def test_forced_reference_is_reported_as_forced():
    result = run_python("import sys; from lowbit.__main__ import main; sys.exit(main([]))", LOWBIT_BACKEND="reference")
    assert result.returncode == 0, result.stderr
    assert "LOWBIT_BACKEND: reference -> reference forced" in result.stdout
    assert any(line.startswith("reference") and "forced" in line for line in result.stdout.splitlines())


def test_unknown_backend_name_lists_valid_names():
    result = run_python(PROBE, LOWBIT_BACKEND="nope")
    assert result.returncode != 0
    assert "LOWBIT_BACKEND='nope' is not a lowbit backend; valid names: reference, cpu, cuda, hip, xpu" in result.stderr


@pytest.mark.parametrize("name", ["cuda", "hip", "xpu"])
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
    with pytest.raises(lowbit.backends.BackendError, match="valid names: reference, cpu, cuda, hip, xpu"):
        with lowbit.backends.use("tpu"):
            pass
    unavailable = [s for s in lowbit.backends.available() if not s.available]
    for status in unavailable:
        with pytest.raises(lowbit.backends.BackendError, match="cannot run"):
            with lowbit.backends.use(status.name):
                pass


def test_available_reports_every_backend_with_a_reason():
    statuses = {s.name: s for s in lowbit.backends.available()}
    assert list(statuses) == ["reference", "cpu", "cuda", "hip", "xpu"]
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
    for name in ("reference", "cpu", "cuda", "hip", "xpu"):
        assert any(line.startswith(name) for line in out.splitlines())
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
