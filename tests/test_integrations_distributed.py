"""QLoRA on a lowbit 4-bit model (NF4 + double quant, ``bnb_4bit_quant_storage=torch.bfloat16``)
trained by 2 processes on CPU with gloo, under DDP and under FSDP2 (``fully_shard``): the loss of
every step equals the single-process loss on the whole batch (examples/qlora_distributed.py).

Needs transformers and peft: skipped without them, a failure under ``nox -s integration``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from support import subprocess_env

REQUIRED = os.environ.get("LOWBIT_INTEGRATION") == "1"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "examples", "qlora_distributed.py")
STEPS = 6

if not REQUIRED and not all(importlib.util.find_spec(m) for m in ("transformers", "peft")):
    pytest.skip("needs transformers and peft (pip install lowbit[hf])", allow_module_level=True)


def _run(strategy: str, workdir, tmp_path) -> dict:
    """``workdir`` None: the script's default, one temporary folder that rank 0 picks for all."""
    out = tmp_path / f"{strategy}.json"
    args = ["--strategy", strategy, "--steps", str(STEPS), "--out", str(out)]
    if workdir is not None:
        args += ["--workdir", str(workdir)]
    if strategy == "single":
        command = [sys.executable, SCRIPT, *args]
    else:
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            SCRIPT,
            *args,
        ]
    env = subprocess_env(PYTHONWARNINGS="ignore")
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, f"{' '.join(command)}\n{result.stdout}\n{result.stderr}"
    with open(out) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("single")
    return _run("single", tmp_path_factory.mktemp("model"), tmp), tmp.parent


def test_single_process_learns(single):
    losses = single[0]["losses"]
    assert len(losses) == STEPS and losses[-1] < losses[0] - 0.3
    assert single[0]["weight_dtype"] == "torch.bfloat16" and single[0]["weight_type"] == "Params4bit"


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_processes_match_single(single, strategy, tmp_path):
    reference, _ = single
    result = _run(strategy, None, tmp_path)
    assert result["world"] == 2
    assert result["losses"] == pytest.approx(reference["losses"], rel=1e-4, abs=1e-5)
    assert result["weight_dtype"] == "torch.bfloat16"
    if strategy == "fsdp2":
        # the packed 4-bit weight is sharded like any bfloat16 parameter: half of it per rank
        assert result["weight_type"] == "DTensor"
        assert result["local_numel"] * 2 == result["numel"]
