"""Code written for bitsandbytes, on lowbit through ``lowbit.compat.install()``, with bitsandbytes
NOT installed: transformers' own ``BitsAndBytesConfig`` quantizers, PEFT's bitsandbytes LoRA layers
(QLoRA) and ``TrainingArguments(optim="paged_adamw_8bit")``.

install() has to precede the import of transformers / peft, so each scenario runs in a child
interpreter (tests/bnb_alias_scenarios.py) and reports what it saw. The tiny-model scenario needs
transformers + peft (skipped without them, a failure under ``nox -s integration``); the SmolLM2 one
runs under ``nox -s integration`` only (LOWBIT_INTEGRATION=1), like test_integrations_smollm2.py.
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
SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bnb_alias_scenarios.py")

missing = [m for m in ("transformers", "peft", "accelerate") if importlib.util.find_spec(m) is None]
if missing and not REQUIRED:
    pytest.skip(f"{', '.join(missing)} not installed (pip install lowbit[hf])", allow_module_level=True)
if importlib.util.find_spec("bitsandbytes") is not None:
    message = "bitsandbytes is installed here; these tests show lowbit standing in for it when it is not"
    pytest.fail(message, pytrace=False) if REQUIRED else pytest.skip(message, allow_module_level=True)


def _run(scenario: str, tmp_path) -> dict:
    result_file = tmp_path / "result.json"
    completed = subprocess.run(
        [sys.executable, SCRIPT, scenario, str(tmp_path), str(result_file)],
        # reference parity: the pinned figures below are LowbitConfig's with float32 products
        capture_output=True, text=True, timeout=1200, env=subprocess_env(LOWBIT_CPU_PRECISION="float32"),
    )  # fmt: skip
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-6000:]
    return json.loads(result_file.read_text())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    return _run("tiny", tmp_path_factory.mktemp("bnb-alias-tiny"))


def test_libraries_see_bitsandbytes_installed(tiny):
    assert tiny["probes"] == {
        "transformers": True, "transformers_0.48": True, "accelerate_4bit": True, "accelerate_8bit": True, "peft": True,
    }  # fmt: skip
    assert tiny["bnb_version"].startswith("0.50.2+lowbit.")


@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_bitsandbytes_config_loads_through_transformers_own_quantizer(tiny, bits):
    result = tiny[bits]
    layer = "Linear4bit" if bits == "4bit" else "Linear8bitLt"
    assert result["quantizer"] == f"Bnb{bits[0]}BitHfQuantizer"  # transformers' class, not lowbit's
    assert result["linear_classes"] == [f"lowbit.nn.linear.{layer}", "torch.nn.modules.linear.Linear"]  # + lm_head
    assert result["same_as_lowbitconfig"]  # bit-identical logits to lowbit's own quantizer
    # save_pretrained writes a bitsandbytes checkpoint, which loads back the same way
    assert result["saved_quant_method"] == "bitsandbytes" and result["reloaded_quantizer"] == result["quantizer"]
    assert result["reload_same"]


def test_peft_qlora_trains_on_its_bitsandbytes_layers(tiny):
    qlora = tiny["qlora"]
    assert qlora["lora_classes"] == ["lowbit.nn.linear.Linear4bit", "peft.tuners.lora.bnb.Linear4bit"]
    assert qlora["base_class"] == "lowbit.nn.linear.Linear4bit" and qlora["trainable_all_lora"]
    losses = qlora["losses"]
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert qlora["base_unchanged"] and qlora["lora_b_changed"]


def test_trainer_paged_adamw_8bit_runs_lowbits_optimizer(tiny):
    trainer = tiny["trainer"]
    assert trainer["optimizer"] == "lowbit.optim.adamw.AdamW"
    assert trainer["optim_bits"] == 8 and trainer["is_paged"]
    assert "torch.uint8" in trainer["state1_dtypes"]  # 8-bit state (small tensors keep 32-bit, min_8bit_size)
    assert trainer["steps"] == 2 and trainer["changed"] == trainer["parameters"]
    assert 0 < trainer["loss"] < 10


@pytest.mark.skipif(not REQUIRED, reason="SmolLM2 runs under nox -s integration (LOWBIT_INTEGRATION=1)")
def test_smollm2_in_4_and_8_bits_with_bitsandbytes_config(tmp_path):
    result = _run("smollm2", tmp_path)
    nf4, int8 = result["nf4-dq"], result["int8"]
    assert nf4["quantizer"] == "Bnb4BitHfQuantizer" and int8["quantizer"] == "Bnb8BitHfQuantizer"
    assert nf4["quantized_layers"] == 210 and int8["quantized_layers"] == 210  # 30 layers x 7, lm_head kept
    # Hamlet's first 256 tokens: what LowbitConfig gives with the same settings, on this machine
    # (the same layers, so the same number; on the first 1024-token window both give 25.158 and
    # 20.850, fp32 20.095)
    for result in (nf4, int8):
        assert result["perplexity"] == pytest.approx(result["lowbitconfig_perplexity"], abs=1e-6)
    assert nf4["perplexity"] == pytest.approx(22.013, abs=0.005)
    # int8's outlier columns go through torch's float16 product, whose CPU kernels round differently
    # between CPUs: 16.487 on an Intel Xeon (SPR), 16.473 on an AMD EPYC (Zen 5)
    assert int8["perplexity"] == pytest.approx(16.48, abs=0.03)
