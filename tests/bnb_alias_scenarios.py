"""Code written for bitsandbytes, run on lowbit through ``lowbit.compat.install()`` in a fresh
interpreter (install() must come before transformers / peft are imported, so the tests in
test_integrations_compat.py run this file as a child process).

    python bnb_alias_scenarios.py tiny <workdir> <result.json>
    python bnb_alias_scenarios.py smollm2 <workdir> <result.json>

Each scenario uses only transformers' / peft's own bitsandbytes code paths (BitsAndBytesConfig,
Bnb4BitHfQuantizer, peft.tuners.lora.bnb, Trainer's bitsandbytes optimizers) and writes what it
observed as JSON; the tests assert on it.
"""

from __future__ import annotations

import json
import os
import sys
import warnings

import lowbit.compat

lowbit.compat.install()  # before anything imports transformers

import torch  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    BitsAndBytesConfig,
    LlamaConfig,
    LlamaForCausalLM,
    Trainer,
    TrainingArguments,
)
from transformers.utils import logging as hf_logging  # noqa: E402

import lowbit  # noqa: E402
from lowbit.integrations.transformers import LowbitConfig  # noqa: E402

hf_logging.set_verbosity_error()
hf_logging.disable_progress_bar()
warnings.simplefilter("ignore")


#: Tokens of Hamlet the SmolLM2 scenario measures perplexity on (one window; seconds per format).
SMOLLM2_TOKENS = 256


def _class_names(model: torch.nn.Module, kind: str) -> list[str]:
    return sorted({f"{type(m).__module__}.{type(m).__name__}" for m in model.modules() if kind in type(m).__name__})


@torch.no_grad()
def _logits(model, ids) -> torch.Tensor:
    return model(ids).logits.float()


def _probes() -> dict:
    from accelerate.utils import is_4bit_bnb_available, is_8bit_bnb_available
    from peft.import_utils import is_bnb_4bit_available, is_bnb_available
    from transformers.utils.import_utils import is_bitsandbytes_available

    return {
        "transformers": is_bitsandbytes_available(),
        "transformers_0.48": is_bitsandbytes_available("0.48"),
        "accelerate_4bit": is_4bit_bnb_available(),
        "accelerate_8bit": is_8bit_bnb_available(),
        "peft": is_bnb_available() and is_bnb_4bit_available(),
    }


def _load_both_ways(path: str, ids: torch.Tensor, **settings) -> dict:
    """Load ``path`` with transformers' BitsAndBytesConfig (its own bitsandbytes quantizer) and with
    lowbit's LowbitConfig; save the first and load it back."""
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=BitsAndBytesConfig(**settings)).eval()
    reference = AutoModelForCausalLM.from_pretrained(path, quantization_config=LowbitConfig(**settings)).eval()
    saved = os.path.join(os.path.dirname(path), "saved-" + ("4bit" if settings.get("load_in_4bit") else "8bit"))
    model.save_pretrained(saved)
    reloaded = AutoModelForCausalLM.from_pretrained(saved).eval()
    with open(os.path.join(saved, "config.json")) as f:
        saved_method = json.load(f)["quantization_config"]["quant_method"]
    return {
        "quantizer": type(model.hf_quantizer).__name__,
        "reloaded_quantizer": type(reloaded.hf_quantizer).__name__,
        "linear_classes": _class_names(model, "Linear"),
        "same_as_lowbitconfig": torch.equal(_logits(model, ids), _logits(reference, ids)),
        "reload_same": torch.equal(_logits(reloaded, ids), _logits(model, ids)),
        "saved_quant_method": saved_method,
    }


def _qlora(path: str, ids: torch.Tensor) -> dict:
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)
    model = prepare_model_for_kbit_training(AutoModelForCausalLM.from_pretrained(path, quantization_config=config))
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    base = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    packed_before = base.weight.data.clone()
    trainable = [p for p in model.parameters() if p.requires_grad]
    lora_b_before = [p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    losses = []
    for _ in range(6):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    lora_b_after = [p.detach() for n, p in model.named_parameters() if "lora_B" in n]
    return {
        "lora_classes": _class_names(model, "Linear4bit"),
        "base_class": f"{type(base).__module__}.{type(base).__name__}",
        "losses": losses,
        "base_unchanged": torch.equal(base.weight.data, packed_before),
        "lora_b_changed": all(not torch.equal(a, b) for a, b in zip(lora_b_before, lora_b_after)),
        "trainable_all_lora": all("lora_" in n for n, p in model.named_parameters() if p.requires_grad),
    }


def _trainer_paged_adamw_8bit(path: str, ids: torch.Tensor, workdir: str) -> dict:
    class Rows(torch.utils.data.Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            return {"input_ids": ids[i % len(ids)], "labels": ids[i % len(ids)]}

    model = LlamaForCausalLM.from_pretrained(path)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = TrainingArguments(
        output_dir=os.path.join(workdir, "trainer"), optim="paged_adamw_8bit", max_steps=2, learning_rate=1e-3,
        per_device_train_batch_size=4, report_to=[], use_cpu=True, save_strategy="no", logging_strategy="no",
        disable_tqdm=True,
    )  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=Rows())
    result = trainer.train()
    optimizer = trainer.optimizer.optimizer  # accelerate wraps it
    state_dtypes = sorted({str(s["state1"].dtype) for s in optimizer.state.values() if "state1" in s})
    return {
        "optimizer": f"{type(optimizer).__module__}.{type(optimizer).__name__}",
        "optim_bits": optimizer.args.optim_bits,
        "is_paged": optimizer.is_paged,
        "state1_dtypes": state_dtypes,
        "steps": trainer.state.global_step,
        "loss": result.training_loss,
        "changed": sum(not torch.equal(p.detach(), before[n]) for n, p in model.named_parameters()),
        "parameters": len(before),
    }


def tiny(workdir: str) -> dict:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )  # fmt: skip
    path = os.path.join(workdir, "tiny-llama")
    LlamaForCausalLM(config).save_pretrained(path)
    ids = torch.randint(0, 128, (4, 24), generator=torch.Generator().manual_seed(1))
    return {
        "probes": _probes(),
        "bnb_version": sys.modules["bitsandbytes"].__version__ if "bitsandbytes" in sys.modules else None,
        "4bit": _load_both_ways(
            path, ids, load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        ),  # fmt: skip
        "8bit": _load_both_ways(path, ids, load_in_8bit=True),
        "qlora": _qlora(path, ids),
        "trainer": _trainer_paged_adamw_8bit(path, ids, workdir),
    }


def smollm2(workdir: str) -> dict:
    """SmolLM2-135M-Instruct through BitsAndBytesConfig in 4 and 8 bits: layers, and the perplexity of
    Hamlet's first SMOLLM2_TOKENS tokens, beside the same model's through lowbit's LowbitConfig."""
    from transformers import AutoTokenizer

    from lowbit.integrations import assets

    path = assets.smollm2_dir(log=None)
    hamlet = assets.hamlet_ids(AutoTokenizer.from_pretrained(path))
    out = {}
    for name, settings in (
        ("nf4-dq", {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True}),
        ("int8", {"load_in_8bit": True}),
    ):
        model = AutoModelForCausalLM.from_pretrained(path, quantization_config=BitsAndBytesConfig(**settings)).eval()
        layer = lowbit.nn.Linear4bit if settings.get("load_in_4bit") else lowbit.nn.Linear8bitLt
        own = AutoModelForCausalLM.from_pretrained(path, quantization_config=LowbitConfig(**settings)).eval()
        out[name] = {
            "quantizer": type(model.hf_quantizer).__name__,
            "quantized_layers": sum(isinstance(m, layer) for m in model.modules()),
            "perplexity": assets.perplexity(model, hamlet[:SMOLLM2_TOKENS], window=SMOLLM2_TOKENS)[0],
            "lowbitconfig_perplexity": assets.perplexity(own, hamlet[:SMOLLM2_TOKENS], window=SMOLLM2_TOKENS)[0],
        }
        del model, own
    return out


if __name__ == "__main__":
    scenario, workdir, result_file = sys.argv[1:4]
    result = {"tiny": tiny, "smollm2": smollm2}[scenario](workdir)
    with open(result_file, "w") as f:
        json.dump(result, f, indent=1)
