"""Checkpoints between transformers + lowbit and transformers + bitsandbytes 0.50.2, both ways.

Needs bitsandbytes, transformers and accelerate: ``nox -s compat`` (``LOWBIT_INTEGRATION=1``
makes a missing package a failure). The other direction without bitsandbytes installed is
tests/test_integrations_hf.py (tests/data/hf_bnb/, written by tests/data/make_hf_bnb_checkpoints.py);
here the same script's settings are re-run with the real package to check that those fixtures are
what bitsandbytes writes.
"""

from __future__ import annotations

import importlib
import json
import os
import sys

import pytest
import torch

REQUIRED = os.environ.get("LOWBIT_INTEGRATION") == "1"
for _module in ("bitsandbytes", "transformers", "accelerate"):
    if REQUIRED:
        importlib.import_module(_module)
    else:
        pytest.importorskip(_module, reason=f"{_module} is not installed (nox -s compat)")

import bitsandbytes  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import AutoModelForCausalLM, BitsAndBytesConfig  # noqa: E402

import lowbit.integrations.transformers as lt  # noqa: E402
from lowbit.integrations.transformers import LowbitConfig  # noqa: E402

DATA = os.path.join(os.path.dirname(__file__), "data")
sys.path.insert(0, DATA)
import make_hf_bnb_checkpoints as fixtures  # noqa: E402

sys.path.remove(DATA)

SETTINGS = {
    "nf4-dq": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
    "fp4-bf16storage": dict(
        load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_quant_storage=torch.bfloat16
    ),
    "int8": dict(load_in_8bit=True),
}


pytestmark = pytest.mark.usefixtures("hf_quiet")


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("tiny"))
    fixtures.tiny_llama().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal dtype, shape and bytes (packed 4-bit data viewed as bfloat16 may hold NaN patterns)."""
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))
    )


@torch.no_grad()
def logits(model, ids):
    return model.eval()(ids).logits.float()


def test_bitsandbytes_version():
    assert bitsandbytes.__version__ == "0.50.2"


@pytest.mark.parametrize("name", list(SETTINGS))
def test_lowbit_checkpoint_loads_in_bitsandbytes(source, ids, tmp_path, name):
    """Quantize with lowbit, save, point config.json at bitsandbytes: transformers + bitsandbytes
    load the same tensors and compute the same dequantized model."""
    model = AutoModelForCausalLM.from_pretrained(source, quantization_config=LowbitConfig(**SETTINGS[name]))
    model.save_pretrained(tmp_path)
    lt.bitsandbytes_config_json(tmp_path)
    ours = logits(model, ids)
    theirs_model = AutoModelForCausalLM.from_pretrained(tmp_path)
    layer = theirs_model.model.layers[0].mlp.down_proj
    assert type(layer).__module__.startswith("bitsandbytes")
    if name == "int8":
        torch.testing.assert_close(logits(theirs_model, ids), ours, atol=0, rtol=0)  # LLM.int8, bit for bit
    theirs_dense = logits(AutoModelForCausalLM.from_pretrained(tmp_path).dequantize(dtype=torch.float32), ids)
    ours_dense = logits(lt.dequantize_model(model, torch.float32), ids)
    torch.testing.assert_close(theirs_dense, ours_dense, atol=0, rtol=0)


@pytest.mark.parametrize("name", list(SETTINGS))
def test_bitsandbytes_checkpoint_loads_in_lowbit(source, ids, tmp_path, name):
    model = AutoModelForCausalLM.from_pretrained(
        source, quantization_config=BitsAndBytesConfig(**SETTINGS[name])
    )
    model.save_pretrained(tmp_path)
    ours = lt.from_pretrained(AutoModelForCausalLM, tmp_path)
    assert type(ours.model.layers[0].mlp.down_proj).__module__.startswith("lowbit")
    theirs_state = load_file(str(tmp_path / "model.safetensors"))
    ours_state = ours.state_dict()
    assert set(theirs_state) == set(ours_state)
    for key, value in theirs_state.items():
        mine = ours_state[key]
        if key.endswith(".absmax") and value.dtype != mine.dtype:
            # bitsandbytes on CPU keeps a bfloat16 weight's absmax in bfloat16, shape (1, n): lowbit float32, (n,)
            assert torch.equal(value.float().reshape(-1), mine), key
            continue
        assert same_bytes(value, mine), key
    theirs_dense = logits(AutoModelForCausalLM.from_pretrained(tmp_path).dequantize(dtype=torch.float32), ids)
    torch.testing.assert_close(
        logits(lt.dequantize_model(ours, torch.float32), ids), theirs_dense, atol=0, rtol=0
    )


@pytest.mark.parametrize("name", list(fixtures.VARIANTS))
def test_committed_fixtures_are_what_bitsandbytes_writes(source, tmp_path, name):
    """tests/data/hf_bnb/<name> holds the tensors bitsandbytes 0.50.2 writes today."""
    model = AutoModelForCausalLM.from_pretrained(
        source, quantization_config=BitsAndBytesConfig(**fixtures.VARIANTS[name])
    )
    model.save_pretrained(tmp_path)
    fresh = load_file(str(tmp_path / "model.safetensors"))
    committed = load_file(os.path.join(DATA, "hf_bnb", name, "model.safetensors"))
    assert fresh.keys() == committed.keys()
    for key in fresh:
        assert same_bytes(fresh[key], committed[key]), key
    with open(os.path.join(DATA, "hf_bnb", name, "config.json")) as f:
        assert json.load(f)["quantization_config"]["quant_method"] == "bitsandbytes"
