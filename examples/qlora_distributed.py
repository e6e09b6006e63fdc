"""QLoRA on a lowbit 4-bit model with DDP or FSDP2 (``fully_shard``), on CPUs (gloo) or GPUs (nccl).

    # 2 processes, each on half of every batch; prints the loss per step
    torchrun --nproc_per_node 2 examples/qlora_distributed.py --strategy fsdp2
    torchrun --nproc_per_node 2 examples/qlora_distributed.py --strategy ddp
    # the same training in one process on the whole batch (the reference)
    python examples/qlora_distributed.py --strategy single
    # one process per GPU, launched by accelerate (or torchrun) with the same script
    accelerate launch --multi_gpu --num_processes 2 examples/qlora_distributed.py --strategy fsdp2 --device cuda

The base weights are NF4 with double quantization and ``bnb_4bit_quant_storage=torch.bfloat16``
(the packed bytes viewed as bfloat16, so that FSDP can shard and all-gather them like any
bfloat16 parameter; their quantization state stays on every rank in the layer). LoRA adapters
(float32) are the only trainable parameters. With the same seed on every rank the adapters start
equal, each rank takes its own rows of the global batch, and gradients are averaged, so the loss
of every step equals the single-process loss on the whole batch up to float32 reduction order.

``--model tiny`` (default) builds a small randomly initialized Llama in-process (seconds);
``--model smollm2`` uses SmolLM2-135M-Instruct (``lowbit.integrations.assets``) on Hamlet.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings

import torch
import torch.distributed as dist


def build_model(kind: str, quant_storage: torch.dtype, workdir: str, device: torch.device):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from lowbit.integrations.transformers import LowbitConfig

    if kind == "tiny":
        path = os.path.join(workdir, "tiny-llama")
        if not os.path.isdir(path):
            torch.manual_seed(0)
            config = LlamaConfig(
                vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                tie_word_embeddings=False,
            )  # fmt: skip
            LlamaForCausalLM(config).save_pretrained(path)
    else:
        from lowbit.integrations import assets

        path = assets.smollm2_dir(log=None)
    config = LowbitConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
        bnb_4bit_quant_storage=quant_storage,
    )
    return AutoModelForCausalLM.from_pretrained(
        path, quantization_config=config, device_map={"": device}
    ), path


def batches(kind: str, path: str, steps: int, global_batch: int, seq: int, vocab: int) -> list[torch.Tensor]:
    """``steps`` batches of ``global_batch`` sequences, the same on every rank."""
    if kind == "tiny":
        # a learnable batch: each sequence repeats a short random motif; the same batch every step
        motif = torch.randint(0, vocab, (global_batch, 8), generator=torch.Generator().manual_seed(1))
        return [motif.repeat(1, seq // 8 + 1)[:, :seq]] * steps
    from transformers import AutoTokenizer

    from lowbit.integrations import assets

    ids = assets.hamlet_ids(AutoTokenizer.from_pretrained(path), None)
    per_step = global_batch * seq
    return [ids[i * per_step : (i + 1) * per_step].view(global_batch, seq) for i in range(steps)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--strategy", choices=("single", "ddp", "fsdp2"), default="fsdp2")
    parser.add_argument("--model", choices=("tiny", "smollm2"), default="tiny")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--global-batch", type=int, default=4, help="sequences per step, over all ranks")
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument(
        "--quant-storage", default="bfloat16", choices=("bfloat16", "float16", "float32", "uint8")
    )
    parser.add_argument(
        "--workdir", default=None, help="where the tiny model is written (default: a temp dir)"
    )
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="cuda: one GPU per process (LOCAL_RANK), nccl",
    )
    parser.add_argument("--out", default=None, help="write {'losses': [...], ...} as JSON here (rank 0)")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", message=".*use_cache=True.*")

    distributed = args.strategy != "single"
    if args.device == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if distributed:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = 0, 1
    if args.global_batch % world:
        parser.error(f"--global-batch {args.global_batch} must be divisible by the {world} processes")
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))

    from peft import LoraConfig

    from lowbit.integrations import peft as lowbit_peft

    workdir = args.workdir
    if workdir is None:  # one temporary folder for all ranks (of this host): rank 0's
        chosen = [tempfile.mkdtemp(prefix="lowbit-qlora-") if rank == 0 else None]
        if distributed:
            dist.broadcast_object_list(chosen, src=0)
        workdir = chosen[0]
    if distributed and args.model == "tiny":
        if rank == 0:
            build_model(args.model, getattr(torch, args.quant_storage), workdir, device)  # write it once
        dist.barrier()
    model, path = build_model(args.model, getattr(torch, args.quant_storage), workdir, device)
    model.config.use_cache = False
    for param in model.parameters():
        param.requires_grad_(False)
    torch.manual_seed(42)  # identical adapters on every rank
    lora = LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )  # fmt: skip
    model = lowbit_peft.get_peft_model(model, lora)

    if args.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(model)
    elif args.strategy == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for layer in model.base_model.model.model.layers:
            fully_shard(layer)
        fully_shard(model)

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=0.0)
    data = batches(args.model, path, args.steps, args.global_batch, args.seq, 256)
    rows = args.global_batch // world
    losses = []
    started = time.perf_counter()
    model.train()
    for step, batch in enumerate(data):
        local = batch[rank * rows : (rank + 1) * rows].to(device)
        loss = model(input_ids=local, labels=local).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        value = loss.detach().clone()
        if distributed:
            dist.all_reduce(value)
            value /= world
        losses.append(value.item())
        if rank == 0:
            print(f"step {step:3d}  loss {losses[-1]:.6f}", flush=True)
    elapsed = time.perf_counter() - started
    if rank == 0:
        storage = next(p for n, p in model.named_parameters() if "q_proj.base_layer.weight" in n)
        local = storage.to_local() if hasattr(storage, "to_local") else storage
        print(
            f"{args.strategy}: {world} process(es), {len(trainable)} trainable tensors; a 4-bit weight is a "
            f"{type(storage).__name__} of {storage.dtype}, {local.numel()} of its {storage.numel()} elements on "
            f"this rank; {elapsed:.1f} s"
        )
        if args.out:
            with open(args.out, "w") as f:
                json.dump(
                    {
                        "strategy": args.strategy, "world": world, "losses": losses, "seconds": elapsed,
                        "weight_type": type(storage).__name__, "weight_dtype": str(storage.dtype),
                        "local_numel": local.numel(), "numel": storage.numel(),
                    },
                    f,
                )  # fmt: skip
    if distributed:
        # tear down together, and free DDP's reducer (it holds gloo work) before its process group:
        # otherwise a rank may exit mid-teardown ("terminate called without an active exception")
        dist.barrier()
        del model, optimizer
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
