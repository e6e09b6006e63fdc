"""Where the time of one decode step goes: SmolLM2-135M-Instruct through transformers, float32 and
lowbit NF4, one greedy step after a 64-token prompt (benchmarks/README.md, "Decode profile").

    python benchmarks/decode_profile.py [--tokens 64] [--threads 2]

Each step is timed whole, and the time spent inside the model's modules is attributed to the
innermost module that ran it: the 4-bit (or float) linear layers of the 30 blocks split into the
native kernel (its C call) and everything else a lowbit layer does in Python, the output
projection (lm_head, float32 in both), attention (scaled_dot_product_attention and the KV cache),
RMSNorms, and what remains (rotary embedding, residual adds, SiLU*up, transformers' bookkeeping).
Printed per format as ms per token (medians over the steps) and shares.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent


def category(module, qualified: str) -> str:
    """Where a module's own time (its children's excluded) is counted."""
    import torch

    from lowbit.nn import Linear4bit

    if isinstance(module, Linear4bit):
        return "linear layers: lowbit Python"
    if qualified == "lm_head":
        return "lm_head (float32)"
    if isinstance(module, torch.nn.Linear):
        return "linear layers: torch F.linear"
    kind = type(module).__name__
    if kind.endswith("Attention"):
        return "attention (sdpa, KV cache, head reshapes)"
    if kind.endswith("RMSNorm"):
        return "RMSNorm"
    return "rest (rotary, residuals, MLP glue, transformers)"


def profile(model, prompt, tokens: int):
    """Decode ``tokens`` steps; returns their seconds and, per category, the seconds of each step."""
    import torch
    from transformers import DynamicCache

    from lowbit.core import registry

    spent: dict[str, float] = defaultdict(float)
    active: list[list[float]] = []  # per running module: [start, seconds of its children]

    def before(module, *_):
        active.append([time.perf_counter(), 0.0])

    def after(label: str):
        start, children = active.pop()
        total = time.perf_counter() - start
        spent[label] += total - children
        if active:
            active[-1][1] += total

    hooks = []
    for qualified, module in model.named_modules():
        label = category(module, qualified)
        hooks.append(module.register_forward_pre_hook(before))
        hooks.append(module.register_forward_hook(lambda m, i, o, label=label: after(label)))
    kernel_for, kernel_time = registry.kernel_for, [0.0]

    def timed_kernel_for(op_name: str, device_type: str):
        kernel = kernel_for(op_name, device_type)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return kernel(*args, **kwargs)
            finally:
                kernel_time[0] += time.perf_counter() - start

        return timed

    registry.kernel_for = timed_kernel_for
    cache = DynamicCache()
    steps, shares = [], defaultdict(list)
    try:
        with torch.no_grad():
            token = model(prompt, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
            for step in range(tokens + 2):
                spent.clear()
                kernel_time[0] = 0.0
                start = time.perf_counter()
                model(token, past_key_values=cache, use_cache=True)
                cache.crop(-1)
                elapsed = time.perf_counter() - start
                if step < 2:
                    continue  # warm-up
                steps.append(elapsed)
                if kernel_time[0]:
                    spent["linear layers: lowbit Python"] -= kernel_time[0]
                    spent["linear layers: native kernel (incl. ctypes call)"] += kernel_time[0]
                spent["outside the modules"] += elapsed - sum(spent.values())
                for label, seconds in spent.items():
                    shares[label].append(seconds)
    finally:
        registry.kernel_for = kernel_for
        for hook in hooks:
            hook.remove()
    return steps, shares


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=64, help="decode steps timed per format")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)

    import torch

    torch.set_num_threads(args.threads)
    try:
        import lowbit  # noqa: F401
    except ImportError:
        sys.path.insert(0, str(HERE.parent))
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from lowbit.core import registry
    from lowbit.integrations import assets
    from lowbit.integrations.transformers import LowbitConfig

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    path = assets.smollm2_dir(log=None)
    prompt = assets.hamlet_ids(AutoTokenizer.from_pretrained(path))[:64][None]
    nf4 = LowbitConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    print(f"SmolLM2-135M-Instruct, one decode step after a 64-token prompt; torch {torch.__version__}, "
          f"{args.threads} threads, lowbit cpu backend: {registry.active('cpu')}; load {os.getloadavg()[0]:.1f}")  # fmt: skip

    for name, load in (("fp32", {"dtype": torch.float32}), ("nf4", {"quantization_config": nf4})):
        model = AutoModelForCausalLM.from_pretrained(path, device_map="cpu", **load).eval()
        steps, shares = profile(model, prompt, args.tokens)
        median = statistics.median(steps)
        print(f"\n{name}: {median * 1e3:.2f} ms per token ({1 / median:.1f} tokens/s), median of {len(steps)} steps")
        for label, values in sorted(shares.items(), key=lambda kv: -statistics.median(kv[1])):
            ms = statistics.median(values) * 1e3
            if ms >= 0.005:
                print(f"  {label:<48} {ms:8.2f} ms  {ms / (median * 1e3):6.1%}")
        del model
    return 0


if __name__ == "__main__":
    sys.exit(main())
