"""Write the transformers + bitsandbytes checkpoints under tests/data/hf_bnb/ (run with bitsandbytes).

    python tests/data/make_hf_bnb_checkpoints.py   # needs torch, transformers>=5, bitsandbytes==0.50.2

Each checkpoint is a tiny randomly initialized Llama (seeded) quantized and saved by
transformers + bitsandbytes exactly as a user would, plus ``expected.safetensors``: a fixed batch
of token ids and, from the checkpoint reloaded by bitsandbytes, ``logits`` (its quantized forward)
and ``logits_dequantized`` (the model after ``model.dequantize(dtype=torch.float32)``, i.e. the
float32 product of bitsandbytes' dequantized weights). tests/test_integrations_hf.py loads them
with lowbit in an environment without bitsandbytes and compares.

bitsandbytes 0.50.2's 4-bit forward on a CPU with AVX512-BF16 repacks the weight and multiplies
in bfloat16 whatever the compute dtype, so its quantized logits differ from the float32 product
by ~1e-3; lowbit computes in the compute dtype. The dequantized logits are the exact reference.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile

import bitsandbytes
import torch
import transformers
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hf_bnb")

VARIANTS = {
    "nf4-dq": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
    "fp4-bf16": dict(
        load_in_4bit=True,
        bnb_4bit_quant_type="fp4",
        bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_quant_storage=torch.bfloat16,
    ),
    "int8": dict(load_in_8bit=True),
}


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # a few large weights, so LLM.int8's outlier path has work to do
        model.model.layers[0].mlp.down_proj.weight[:, :3] *= 8
    return model


def main() -> int:
    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, bitsandbytes {bitsandbytes.__version__}"
    )
    source = tempfile.mkdtemp()
    tiny_llama().save_pretrained(source)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    for name, settings in VARIANTS.items():
        model = AutoModelForCausalLM.from_pretrained(
            source, quantization_config=BitsAndBytesConfig(**settings)
        )
        out = os.path.join(HERE, name)
        shutil.rmtree(out, ignore_errors=True)
        model.save_pretrained(out)
        os.remove(os.path.join(out, "generation_config.json"))
        expected = {"input_ids": ids}
        with torch.no_grad():
            expected["logits"] = AutoModelForCausalLM.from_pretrained(out)(ids).logits.float()
            dense = AutoModelForCausalLM.from_pretrained(out).dequantize(dtype=torch.float32)
            expected["logits_dequantized"] = dense(ids).logits.float()
        save_file({k: v.contiguous() for k, v in expected.items()}, os.path.join(out, "expected.safetensors"))
        print(name, sorted(os.listdir(out)))
    shutil.rmtree(source)
    return 0


if __name__ == "__main__":
    sys.exit(main())
