"""``python -m lowbit``: a light import, subcommands with their own help, a report that names the CPU
and says where the package and its native library come from."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

import lowbit
from lowbit import __main__ as cli
from support import NATIVE_CPU_BACKENDS, subprocess_env


def _python(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, env=subprocess_env(), timeout=300
    )


def test_import_lowbit_does_not_import_dynamo():
    result = _python("-c", "import sys, lowbit; print(sorted(m for m in sys.modules if m.startswith('torch._dynamo')))")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def _import_us(importtime_log: str) -> tuple[int, int]:
    """(microseconds of every import, of torch's), from ``python -X importtime``'s lines: the
    cumulative times of the outermost imports add up to the whole."""
    total, torch_us = 0, 0
    for line in importtime_log.splitlines():
        match = re.match(r"import time:\s+\d+ \|\s+(\d+) \|( *)(\S+)\s*$", line)
        if not match:
            continue
        cumulative, depth, name = int(match.group(1)), len(match.group(2)), match.group(3)
        total += cumulative if depth == 1 else 0
        torch_us = cumulative if name == "torch" else torch_us
    return total, torch_us


def test_help_costs_little_beyond_import_torch():
    """Everything ``python -m lowbit --help`` imports besides torch takes under half of torch's own
    import time (both measured in the same process, so a busy machine scales both; it was over
    100 % while torch._dynamo came along) and under 2 s."""
    result = _python("-X", "importtime", "-m", "lowbit", "--help")
    assert result.returncode == 0, result.stderr
    assert "usage: python -m lowbit" in result.stdout
    total_us, torch_us = _import_us(result.stderr)
    beyond_us = total_us - torch_us
    assert torch_us > 0 and beyond_us > 0
    assert beyond_us < 0.5 * torch_us, f"{beyond_us / 1e6:.2f} s of imports beside torch's {torch_us / 1e6:.2f} s"
    assert beyond_us < 2e6


def _help(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*argv, "--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def test_top_level_help_lists_commands(capsys):
    out = _help(capsys)
    assert out.startswith("usage: python -m lowbit")
    flat = " ".join(out.split())  # argparse wraps to the terminal's width
    assert "report versions, CPU, every backend" in flat and "demo quantize a weight every way" in flat
    assert "``" not in out and "--windows" not in out


def test_demo_help_is_its_own(capsys):
    out = _help(capsys, "demo")
    usage = " ".join(out.split("\n\n", 1)[0].split())
    assert usage == "usage: python -m lowbit demo [-h] [--windows N] [--decode-tokens N] [--no-model]"
    flat = " ".join(out.split())  # argparse wraps to the terminal's width
    assert "SmolLM2-135M-Instruct" in flat and "(default 64)" in flat and "(default 2;" in flat
    assert "``" not in out and "commands:" not in out


def test_report_help(capsys):
    out = _help(capsys, "report")
    assert out.startswith("usage: python -m lowbit report") and "self-test" in out


@pytest.mark.parametrize("argv", [["demo", "--windows", "0"], ["demo", "--decode-tokens", "-3"], ["nonsense"]])
def test_bad_arguments_exit_with_usage(capsys, argv):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "usage: python -m lowbit" in err
    assert "must be at least 1" in err or "invalid choice: 'nonsense'" in err


def test_report_names_cpu_model_and_one_location(capsys):
    assert cli.main(["report"]) == 0
    out = capsys.readouterr().out
    package_dir = cli.Path(lowbit.__file__).resolve().parent
    assert out.startswith(f"lowbit {lowbit.__version__} from {package_dir}\n")
    cpu_line = next(line for line in out.splitlines() if line.startswith("CPU: "))
    assert cpu_line.startswith(f"CPU: {cli.cpu_model()} (")
    with open("/proc/cpuinfo") as f:
        model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    if model:
        assert cli.cpu_model() == model
    if NATIVE_CPU_BACKENDS:  # the library sits in this package's _native/: no second location to explain
        assert f"library: {package_dir / '_native'}" in out and "native CPU library:" not in out


def test_report_says_what_cpu_inference_products_compute(capsys, monkeypatch):
    from lowbit.backends.cpu import native

    monkeypatch.delenv("LOWBIT_CPU_PRECISION", raising=False)
    assert cli.main(["report"]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("CPU inference"))
    assert line.startswith("CPU inference precision: fast (default): ")
    if NATIVE_CPU_BACKENDS and native.cpu_isa() in ("avx2", "avx512"):
        assert ("16-bit fixed point" in line) == native.fixed_point_products()
    previous = lowbit.set_cpu_precision("float32")
    try:
        assert "float32" in cli.cpu_products()
    finally:
        lowbit.set_cpu_precision(previous)


def test_report_explains_a_library_from_elsewhere(monkeypatch, tmp_path, capsys):
    from lowbit.backends.cpu import native

    other = tmp_path / "site-packages" / "lowbit" / "_native" / native.LIBRARY_NAME
    other.parent.mkdir(parents=True)
    other.write_bytes(b"")
    monkeypatch.setattr(native, "library_path", lambda: other)
    package_dir = cli.Path(lowbit.__file__).resolve().parent
    note = cli._library_note(package_dir)
    assert note.startswith(f"native CPU library: {other}, from another install than this package ({package_dir}")
    monkeypatch.setenv(native.ENV_LIBRARY, str(other))
    assert cli._library_note(package_dir) == f"native CPU library: {other} (from {native.ENV_LIBRARY})"
