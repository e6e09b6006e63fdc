"""benchmarks/gpu.py, the one command for a lent GPU: the parts that run without one (planning which
toolchain builds which library, parsing, the summary line, the QLoRA step on the CPU backend, the
dry run's reason)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu  # noqa: E402


@pytest.mark.parametrize(
    ("torch_cuda", "capability", "nvcc", "clang", "tree", "toolchain", "library"),
    [
        ("13.0", (9, 0), 13, False, None, "nvcc", "liblowbit_cuda13.so"),
        ("12.8", (9, 0), 13, True, Path("/t"), "clang-cuda", "liblowbit_cuda12.so"),  # nvcc 13 cannot make cuda12
        ("12.8", (8, 0), 12, False, None, "nvcc", "liblowbit_cuda12.so"),  # a CUDA 12 toolkit on the machine
        ("12.8", (7, 0), 13, False, None, None, "liblowbit_cuda12.so"),  # nothing here builds it: use the carried one
        ("13.0", (7, 0), 13, False, None, None, "liblowbit_cuda13.so"),  # nvcc 13 has no sm_70
        (None, (0, 0), 13, True, None, None, ""),
    ],
)
def test_build_plan_follows_torchs_cuda_major(torch_cuda, capability, nvcc, clang, tree, toolchain, library):
    plan = gpu.plan_build(torch_cuda, capability, nvcc, clang, tree)
    assert (plan.toolchain, plan.library) == (toolchain, library)
    assert plan.archs == f"{capability[0]}{capability[1]}"
    if toolchain == "clang-cuda":
        assert plan.extra == ("--cuda-path", "/t")
    if torch_cuda is None:
        assert "torch has no CUDA" in plan.reason


def test_tool_major_and_pytest_counts():
    assert gpu.tool_major("Cuda compilation tools, release 13.0, V13.0.88") == 13
    assert gpu.tool_major("Cuda compilation tools, release 12.8, V12.8.93") == 12
    assert gpu.tool_major("clang version 19") is None
    out = "....\n=========== 120 passed, 3 skipped in 61.20s (0:01:01) ===========\n"
    assert gpu.parse_pytest_counts(out) == "120 passed, 3 skipped"
    assert gpu.parse_pytest_counts("1 failed, 7 passed in 2.00s") == "1 failed, 7 passed"
    assert gpu.parse_pytest_counts("ImportError") == "no pytest summary"


def test_summary_is_one_line_with_every_step_and_bandwidth():
    results = {
        "build": "ok (nvcc sm_90, 70 s)", "parity": "150 passed", "qlora": "ok", "copy_gbps": 3000.0,
        "timings": {"gemv_4bit bf16": {"lowbit_gbps": 2400.0, "lowbit_pct_copy": 80.0},
                    "AdamW8bit": {"lowbit_gbps": 1500.0, "lowbit_pct_copy": 50.0}},
    }  # fmt: skip
    line = gpu.summary_line(results)
    assert "\n" not in line and line.startswith(gpu.SUMMARY_PREFIX)
    assert line == (
        "GPU SUMMARY: build ok (nvcc sm_90, 70 s); parity 150 passed; qlora ok; "
        "gemv_4bit bf16 2400 GB/s (80% of copy); AdamW8bit 1500 GB/s (50% of copy); copy 3000 GB/s"
    )
    assert gpu.summary_line({}) == "GPU SUMMARY: build not run; parity not run; qlora not run"
    assert gpu.gbps(3e9, 1.5) == 2.0


def test_qlora_step_compares_a_backend_with_the_reference():
    """The same step the script runs on the GPU, here on the native CPU backend."""
    cpu = next(s for s in __import__("lowbit").backends.available() if s.name == "cpu")
    if not cpu.available:
        pytest.skip(f"native CPU backend unavailable: {cpu.reason}")
    assert gpu.step_qlora("cpu", "cpu") == "ok"


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible: the script would run for real")
@pytest.mark.parametrize("dry_run", [True, False])
def test_without_a_gpu_the_script_says_why_and_runs_nothing(dry_run):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu.py"), *(["--dry-run"] if dry_run else [])],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert result.returncode == (0 if dry_run else 2), result.stderr
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("GPU SUMMARY: skipped: ")
    assert "has no CUDA" in last or "no GPU visible" in last
