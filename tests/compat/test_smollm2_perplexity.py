"""The demo's figures with bitsandbytes: SmolLM2-135M-Instruct quantized through transformers by
``LowbitConfig`` and by ``BitsAndBytesConfig`` (same fields) scores the same perplexity on Hamlet,
format by format, to 0.01 (issue 7; ``python -m lowbit demo`` prints lowbit's side).

bitsandbytes 0.50.2 has two CPU paths for 4-bit layers: on CPUs with AVX512-BF16 an eval-mode
``Linear4bit`` repacks its weight and runs a bf16 kernel (activations rounded to bf16, a different
arithmetic from its CUDA path and from lowbit's float32 one); elsewhere it dequantizes and runs a
float32 ``F.linear``. The comparison is of the formats, so it pins bitsandbytes to the portable
path with the layer's own switch (``support_avx512bf16_for_cpu``), the one every CPU without
AVX512-BF16 takes.

Needs transformers and the offline model and text (``nox -s compat`` installs them; with
``LOWBIT_INTEGRATION=1`` anything missing is a failure, otherwise a skip).
"""

from __future__ import annotations

import os

import pytest
import torch

import lowbit
from lowbit.integrations import assets

REQUIRED = os.environ.get("LOWBIT_INTEGRATION") == "1"
WINDOWS = 2  # the demo's default: 2 windows of 1024 tokens
FIELDS = {
    "int8": dict(load_in_8bit=True),
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
    "nf4-dq": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
    "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4"),
}

_missing = assets.install_instructions()
if _missing:
    if REQUIRED:
        pytest.fail("the SmolLM2 comparison needs:\n" + "\n".join(_missing), pytrace=False)
    pytest.skip("SmolLM2, Hamlet or lowbit[hf] not installed: " + "; ".join(_missing), allow_module_level=True)

from transformers import AutoModelForCausalLM, BitsAndBytesConfig  # noqa: E402

from lowbit.integrations.transformers import LowbitConfig  # noqa: E402

pytestmark = pytest.mark.usefixtures("hf_quiet")


def _perplexity(path: str, config, ids: torch.Tensor, library: str) -> float:
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=config).eval()
    layers = {type(m).__module__.split(".")[0] for m in model.modules() if "Linear" in type(m).__name__}
    assert library in layers, f"{config.__class__.__name__} built {layers} layers"
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):  # bitsandbytes' layers only: see the docstring
            module.support_avx512bf16_for_cpu = False
    return assets.perplexity(model, ids, max_windows=WINDOWS)[0]


@pytest.mark.parametrize("name", list(FIELDS))
def test_lowbit_and_bitsandbytes_perplexity_agree(smollm2, hamlet, name):
    """The formats agree with lowbit's reference-parity precision ("float32"); its default "fast"
    CPU inference precision (16-bit fixed point, bf16 on AMX tiles: docs/design.md §4) moves the
    4-bit figures by less than 0.1 %."""
    fields = FIELDS[name]
    previous = lowbit.set_cpu_precision("float32")
    try:
        ours = _perplexity(smollm2, LowbitConfig(**fields), hamlet, "lowbit")
    finally:
        lowbit.set_cpu_precision(previous)
    theirs = _perplexity(smollm2, BitsAndBytesConfig(**fields), hamlet, "bitsandbytes")
    assert abs(ours - theirs) <= 0.01, f"{name}: lowbit {ours:.4f}, bitsandbytes {theirs:.4f}"
    if name in ("nf4", "fp4"):  # the precision concerns the 4-bit products (nf4-dq: nf4's, same codes)
        fast = _perplexity(smollm2, LowbitConfig(**fields), hamlet, "lowbit")
        assert abs(fast - ours) <= 1e-3 * ours, f"{name}: fast precision {fast:.4f}, float32 {ours:.4f}"
