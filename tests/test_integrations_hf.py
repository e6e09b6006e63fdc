"""transformers and PEFT integration on tiny in-process models (no downloads, seconds).

Skipped where transformers is not installed (the plain ``nox -s tests`` environment); ``nox -s
integration`` installs ``lowbit[hf]`` and sets ``LOWBIT_INTEGRATION=1``, which turns every skip
into a failure.

The checkpoints under tests/data/hf_bnb/ were written by transformers + bitsandbytes 0.50.2
(tests/data/make_hf_bnb_checkpoints.py); here they load with lowbit, without bitsandbytes.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import json
import os
import sys

import pytest
import torch

REQUIRED = os.environ.get("LOWBIT_INTEGRATION") == "1"


def need(module: str):
    if REQUIRED:
        return importlib.import_module(module)
    return pytest.importorskip(module, reason=f"{module} is not installed (pip install lowbit[hf])")


transformers = need("transformers")
safetensors_torch = need("safetensors.torch")

from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM  # noqa: E402

import lowbit  # noqa: E402
import lowbit.integrations.transformers as lt  # noqa: E402
from lowbit.integrations.transformers import LowbitConfig, LowbitHfQuantizer  # noqa: E402
from lowbit.nn import Int8Params, Linear4bit, Linear8bitLt, Params4bit  # noqa: E402

DATA = os.path.join(os.path.dirname(__file__), "data", "hf_bnb")
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BNB_4BIT_KEYS = {"weight", "weight.absmax", "weight.quant_map"}
BNB_NESTED_KEYS = {"weight.nested_absmax", "weight.nested_quant_map"}


pytestmark = pytest.mark.usefixtures("hf_quiet")


@pytest.fixture(autouse=True)
def _reference_parity_precision():
    """These tests hold lowbit's layers to float references and to bitsandbytes' outputs within
    float32 rounding: the CPU inference products' reference-parity precision. The default "fast"
    precision is tested in test_parity.py, test_interleaved.py and tests/compat (perplexity)."""
    previous = lowbit.set_cpu_precision("float32")
    yield
    lowbit.set_cpu_precision(previous)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> str:
    """A randomly initialized 2-layer Llama saved as an ordinary float32 checkpoint."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight[:, :3] *= 8  # outliers for LLM.int8
    path = str(tmp_path_factory.mktemp("tiny-llama"))
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))


def load(path, config=None, **kwargs):
    if config is not None:
        kwargs["quantization_config"] = config
    return AutoModelForCausalLM.from_pretrained(path, **kwargs).eval()


@torch.no_grad()
def logits(model, ids):
    return model(ids).logits.float()


def nf4(**kwargs):
    return LowbitConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", **kwargs)


# ------------------------------------------------------------------------------------------
# the config and the registry
# ------------------------------------------------------------------------------------------
def test_registered_through_transformers_registry():
    from transformers.quantizers.auto import (
        AUTO_QUANTIZATION_CONFIG_MAPPING,
        AUTO_QUANTIZER_MAPPING,
        AutoHfQuantizer,
        AutoQuantizationConfig,
    )

    assert AUTO_QUANTIZER_MAPPING["lowbit"] is LowbitHfQuantizer
    assert AUTO_QUANTIZATION_CONFIG_MAPPING["lowbit"] is LowbitConfig
    config = AutoQuantizationConfig.from_dict(nf4(bnb_4bit_use_double_quant=True).to_dict())
    assert isinstance(config, LowbitConfig) and config.load_in_4bit and config.bnb_4bit_use_double_quant
    assert isinstance(AutoHfQuantizer.from_config(config), LowbitHfQuantizer)
    lt._register()  # registering twice is harmless
    assert AUTO_QUANTIZER_MAPPING["lowbit"] is LowbitHfQuantizer


def test_config_has_bitsandbytes_fields():
    ours = set(inspect.signature(LowbitConfig.__init__).parameters) - {"self", "kwargs"}
    theirs = set(inspect.signature(BitsAndBytesConfig.__init__).parameters) - {"self", "kwargs"}
    assert theirs <= ours
    settings = dict(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_storage=torch.bfloat16,
        llm_int8_skip_modules=["lm_head"], llm_int8_threshold=5.0,
    )  # fmt: skip
    bnb, ours = BitsAndBytesConfig(**settings), LowbitConfig(**settings)
    for name in ours._fields():
        assert getattr(ours, name) == getattr(bnb, name), name
    assert ours.quantization_method() == bnb.quantization_method() == "nf4"
    assert LowbitConfig(load_in_8bit=True).quantization_method() == "llm_int8"
    # conversions both ways
    from_bnb = LowbitConfig.from_bitsandbytes(bnb)
    assert from_bnb.to_dict() == ours.to_dict()
    assert LowbitConfig.from_bitsandbytes(bnb.to_dict()).to_dict() == ours.to_dict()
    back = BitsAndBytesConfig.from_dict(ours.to_bitsandbytes_dict())
    assert back.to_dict() == bnb.to_dict()


def test_config_serialization():
    config = nf4(bnb_4bit_compute_dtype="bfloat16", bnb_4bit_quant_storage="bfloat16")
    saved = config.to_dict()
    assert saved["quant_method"] == "lowbit" and saved["bits"] == 4
    assert "load_in_4bit" not in saved and "load_in_8bit" not in saved  # would route to bitsandbytes
    assert saved["bnb_4bit_compute_dtype"] == "bfloat16"
    json.dumps(saved)
    again = LowbitConfig.from_dict(saved)
    assert again.to_dict() == saved and again.bnb_4bit_quant_storage == torch.bfloat16
    assert json.loads(config.to_json_string())["bits"] == 4


@pytest.mark.parametrize(
    "kwargs, error",
    [
        (dict(), ValueError),
        (dict(load_in_4bit=True, load_in_8bit=True), ValueError),
        (dict(load_in_4bit=True, bnb_4bit_quant_type="int4"), ValueError),
        (dict(load_in_4bit=True, bnb_4bit_quant_storage="float64"), ValueError),
        (dict(load_in_4bit=True, bnb_4bit_compute_dtype="nonsense"), ValueError),
        (dict(load_in_4bit=1), TypeError),
        (dict(load_in_8bit=True, llm_int8_skip_modules="lm_head"), TypeError),
        (dict(bits=3), ValueError),
    ],
)
def test_config_rejects(kwargs, error):
    with pytest.raises(error):
        LowbitConfig(**kwargs)


# ------------------------------------------------------------------------------------------
# quantizing while loading, saving, reloading
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "config",
    [
        nf4(),
        nf4(bnb_4bit_use_double_quant=True),
        LowbitConfig(load_in_4bit=True),  # fp4, bitsandbytes' default
        nf4(bnb_4bit_quant_storage=torch.bfloat16, bnb_4bit_use_double_quant=True),
        nf4(bnb_4bit_compute_dtype=torch.bfloat16),
    ],
    ids=["nf4", "nf4-dq", "fp4", "nf4-dq-bf16storage", "nf4-bf16compute"],
)
def test_load_4bit(tiny_dir, ids, config):
    model = load(tiny_dir, config)
    assert model.is_loaded_in_4bit and model.is_quantized
    linears = [m for n, m in model.named_modules() if n.endswith(LINEARS)]
    assert len(linears) == 2 * len(LINEARS)
    for module in linears:
        assert type(module) is Linear4bit
        weight = module.weight
        assert isinstance(weight, Params4bit) and weight._is_quantized()
        assert weight.dtype == config.bnb_4bit_quant_storage
        assert weight.quant_type == config.bnb_4bit_quant_type
        assert weight.compress_statistics == config.bnb_4bit_use_double_quant
        assert module.compute_dtype == config.bnb_4bit_compute_dtype
        assert weight.numel() * weight.element_size() * 2 == module.in_features * module.out_features
    assert type(model.lm_head) is torch.nn.Linear  # the output embedding stays in float, as for bitsandbytes
    quantized = logits(model, ids)
    dense = logits(lt.dequantize_model(copy.deepcopy(model), torch.float32), ids)
    tolerance = 1e-5 if config.bnb_4bit_compute_dtype == torch.float32 else 5e-2
    torch.testing.assert_close(quantized, dense, atol=tolerance, rtol=0)
    float_model = load(tiny_dir)
    error = (quantized - logits(float_model, ids)).abs().max().item()
    assert 0 < error < 0.5  # quantized, but still the same model


@pytest.mark.parametrize(
    "config",
    [nf4(bnb_4bit_use_double_quant=True), LowbitConfig(load_in_4bit=True), LowbitConfig(load_in_8bit=True)],
    ids=["nf4-dq", "fp4", "int8"],
)
def test_save_writes_bitsandbytes_tensors_and_reloads(tiny_dir, ids, tmp_path, config):
    model = load(tiny_dir, config)
    before = logits(model, ids)
    model.save_pretrained(tmp_path)
    with open(tmp_path / "config.json") as f:
        saved_config = json.load(f)["quantization_config"]
    assert saved_config["quant_method"] == "lowbit" and saved_config["bits"] == (
        4 if config.load_in_4bit else 8
    )
    tensors = safetensors_torch.load_file(str(tmp_path / "model.safetensors"))
    prefix = "model.layers.0.mlp.down_proj."
    keys = {k[len(prefix) :] for k in tensors if k.startswith(prefix)}
    if config.load_in_4bit:
        packed = f"weight.quant_state.bitsandbytes__{config.bnb_4bit_quant_type}"
        expected = BNB_4BIT_KEYS | {packed} | (BNB_NESTED_KEYS if config.bnb_4bit_use_double_quant else set())
        assert keys == expected
        assert tensors[prefix + "weight"].dtype == torch.uint8
        state = json.loads(bytes(tensors[prefix + packed].tolist()))
        assert state["shape"] == [64, 128] and state["quant_type"] == config.bnb_4bit_quant_type
    else:
        assert keys == {"weight", "SCB", "weight_format"}
        assert (
            tensors[prefix + "weight"].dtype == torch.int8 and tensors[prefix + "SCB"].dtype == torch.float32
        )
    reloaded = load(tmp_path)
    assert isinstance(reloaded.hf_quantizer, LowbitHfQuantizer)
    torch.testing.assert_close(logits(reloaded, ids), before, atol=0, rtol=0)
    original_state, reloaded_state = model.state_dict(), reloaded.state_dict()
    assert original_state.keys() == reloaded_state.keys()
    for key, value in original_state.items():
        assert torch.equal(value, reloaded_state[key]), key


def test_load_8bit(tiny_dir, ids):
    model = load(tiny_dir, LowbitConfig(load_in_8bit=True))
    assert model.is_loaded_in_8bit
    module = model.model.layers[0].mlp.down_proj
    assert type(module) is Linear8bitLt and isinstance(module.weight, Int8Params)
    assert module.weight.dtype == torch.int8 and module.state.threshold == 6.0
    error = (logits(model, ids) - logits(load(tiny_dir), ids)).abs().max().item()
    assert 0 < error < 0.1


def test_skip_modules(tiny_dir):
    """transformers' matching, as for bitsandbytes: a module-path prefix or a name suffix."""
    model = load(tiny_dir, nf4(llm_int8_skip_modules=["up_proj", "model.layers.0", "lm_head"]))
    assert type(model.model.layers[1].mlp.up_proj) is torch.nn.Linear
    assert type(model.model.layers[1].self_attn.q_proj) is Linear4bit
    assert all(
        type(m) is torch.nn.Linear for m in model.model.layers[0].modules() if isinstance(m, torch.nn.Linear)
    )


def test_transformers_dequantize(tiny_dir, ids):
    model = load(tiny_dir, nf4(bnb_4bit_use_double_quant=True))
    before = logits(model, ids)
    model = model.dequantize(dtype=torch.float32)
    assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    assert (
        not getattr(model, "is_quantized", False)
        and getattr(model.config, "quantization_config", None) is None
    )
    torch.testing.assert_close(logits(model, ids), before, atol=1e-6, rtol=0)


def test_num_parameters_without_bitsandbytes(tiny_dir):
    assert load(tiny_dir, nf4()).num_parameters() == load(tiny_dir).num_parameters()


# ------------------------------------------------------------------------------------------
# checkpoints written by transformers + bitsandbytes
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["nf4-dq", "fp4-bf16", "int8"])
def test_bitsandbytes_checkpoint_loads_without_bitsandbytes(name):
    path = os.path.join(DATA, name)
    with open(os.path.join(path, "config.json")) as f:
        assert json.load(f)["quantization_config"]["quant_method"] == "bitsandbytes"
    expected = safetensors_torch.load_file(os.path.join(path, "expected.safetensors"))
    imported_before = "bitsandbytes" in sys.modules
    model = lt.from_pretrained(AutoModelForCausalLM, path).eval()
    assert isinstance(model.hf_quantizer, LowbitHfQuantizer)
    assert imported_before or "bitsandbytes" not in sys.modules  # lowbit never imports it
    layer = model.model.layers[1].mlp.gate_proj
    ids = expected["input_ids"]
    out = logits(model, ids)
    if name == "int8":
        assert type(layer) is Linear8bitLt
        # LLM.int8 on CPU: the same int8 products as bitsandbytes, bit for bit
        torch.testing.assert_close(out, expected["logits"], atol=0, rtol=0)
    elif name == "nf4-dq":
        assert type(layer) is Linear4bit and layer.weight.compress_statistics
        # float32 compute: exactly bitsandbytes' dequantized weights times the input
        torch.testing.assert_close(out, expected["logits_dequantized"], atol=1e-6, rtol=0)
    else:
        assert type(layer) is Linear4bit and layer.weight.dtype == torch.bfloat16  # quant_storage
        torch.testing.assert_close(out, expected["logits_dequantized"], atol=2e-2, rtol=0)  # bf16 compute
    dense = lt.dequantize_model(model, torch.float32)
    torch.testing.assert_close(logits(dense, ids), expected["logits_dequantized"], atol=1e-6, rtol=0)


def test_bitsandbytes_checkpoint_explicit_config(tmp_path):
    """``from_pretrained(..., quantization_config=LowbitConfig())`` on a bitsandbytes checkpoint:
    the checkpoint's own settings win (as transformers does for a pre-quantized model)."""
    model = lt.from_pretrained(
        AutoModelForCausalLM,
        os.path.join(DATA, "nf4-dq"),
        quantization_config=LowbitConfig(load_in_8bit=True),
    )
    assert type(model.model.layers[0].mlp.up_proj) is Linear4bit
    with pytest.raises(TypeError):
        lt.from_pretrained(
            AutoModelForCausalLM,
            os.path.join(DATA, "nf4-dq"),
            quantization_config=BitsAndBytesConfig(load_in_4bit=True),
        )


def test_lowbit_checkpoint_config_for_bitsandbytes(tiny_dir, ids, tmp_path):
    model = load(tiny_dir, nf4(bnb_4bit_use_double_quant=True))
    model.save_pretrained(tmp_path)
    lt.bitsandbytes_config_json(tmp_path)
    with open(tmp_path / "config.json") as f:
        saved = json.load(f)["quantization_config"]
    assert saved["quant_method"] == "bitsandbytes" and saved["load_in_4bit"] is True
    assert BitsAndBytesConfig.from_dict(saved).bnb_4bit_use_double_quant
    # and lowbit still loads it (now as a bitsandbytes checkpoint)
    torch.testing.assert_close(
        logits(lt.from_pretrained(AutoModelForCausalLM, tmp_path), ids), logits(model, ids), atol=0, rtol=0
    )
    with pytest.raises(ValueError):
        lt.bitsandbytes_config_json(tmp_path)  # no longer a lowbit config


# ------------------------------------------------------------------------------------------
# device maps
# ------------------------------------------------------------------------------------------
def _per_module_map(model_config, placement):
    device_map = {
        "model.embed_tokens": "cpu",
        "model.norm": "cpu",
        "model.rotary_emb": "cpu",
        "lm_head": "cpu",
    }
    for i in range(model_config.num_hidden_layers):
        device_map[f"model.layers.{i}"] = placement(i)
    return device_map


@pytest.mark.parametrize("device_map", [{"": "cpu"}, "auto", "per-module"])
def test_device_map_cpu(tiny_dir, ids, device_map):
    need("accelerate")
    reference = logits(load(tiny_dir, nf4()), ids)
    if device_map == "per-module":
        device_map = _per_module_map(transformers.AutoConfig.from_pretrained(tiny_dir), lambda i: "cpu")
    model = load(tiny_dir, nf4(), device_map=device_map)
    assert type(model.model.layers[1].mlp.up_proj) is Linear4bit
    torch.testing.assert_close(logits(model, ids), reference, atol=0, rtol=0)


def test_device_map_disk_offload(tiny_dir, ids, tmp_path):
    """Layers mapped to "disk" are offloaded by accelerate in float (not quantized); the others
    are quantized on the CPU. Same result as keeping those layers in float on the CPU."""
    need("accelerate")
    device_map = _per_module_map(
        transformers.AutoConfig.from_pretrained(tiny_dir), lambda i: "disk" if i == 1 else "cpu"
    )
    model = load(tiny_dir, nf4(), device_map=device_map, offload_folder=str(tmp_path))
    assert type(model.model.layers[0].mlp.up_proj) is Linear4bit
    assert type(model.model.layers[1].mlp.up_proj) is torch.nn.Linear
    assert model.model.layers[1].mlp.up_proj.weight.device.type == "meta"  # on disk until used
    reference = load(tiny_dir, nf4(llm_int8_skip_modules=["model.layers.1", "lm_head"]))
    torch.testing.assert_close(logits(model, ids), logits(reference, ids), atol=1e-6, rtol=0)


def test_device_map_auto_offloads_to_disk(tiny_dir, ids, tmp_path):
    """device_map="auto" with a CPU memory budget: accelerate spills the last layers to disk; lowbit
    keeps those in float (the map is only known after the layers were replaced) and quantizes the rest."""
    need("accelerate")
    model = load(
        tiny_dir, nf4(), device_map="auto", max_memory={"cpu": 100_000}, offload_folder=str(tmp_path)
    )
    placement = model.hf_device_map
    assert placement["model.layers.0"] == "cpu" and placement["model.layers.1"] == "disk", placement
    assert type(model.model.layers[0].mlp.up_proj) is Linear4bit
    assert type(model.model.layers[1].mlp.up_proj) is torch.nn.Linear
    reference = load(tiny_dir, nf4(llm_int8_skip_modules=["model.layers.1", "lm_head"]))
    torch.testing.assert_close(logits(model, ids), logits(reference, ids), atol=1e-6, rtol=0)


def test_fp32_cpu_offload_flag_on_cpu_only_map(tiny_dir):
    """llm_int8_enable_fp32_cpu_offload keeps "cpu" modules in float only when an accelerator computes."""
    need("accelerate")
    model = load(tiny_dir, nf4(llm_int8_enable_fp32_cpu_offload=True), device_map={"": "cpu"})
    assert type(model.model.layers[0].mlp.up_proj) is Linear4bit
    quantizer = LowbitHfQuantizer(nf4(llm_int8_enable_fp32_cpu_offload=True), pre_quantized=False)
    skeleton = LlamaForCausalLM(transformers.AutoConfig.from_pretrained(tiny_dir))
    quantizer._process_model_before_weight_loading(
        skeleton, device_map={"model.layers.0": 0, "model.layers.1": "cpu", "": 0}
    )
    assert "model.layers.1" in quantizer.modules_to_not_convert
    assert type(skeleton.model.layers[1].mlp.up_proj) is torch.nn.Linear
    assert type(skeleton.model.layers[0].mlp.up_proj) is Linear4bit


# ------------------------------------------------------------------------------------------
# PEFT / QLoRA
# ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def peft():
    return need("peft")


def _train(model, ids, steps=25, lr=3e-3):
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.eval()
    return losses


def _lora(peft, **kwargs):
    return peft.LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.0, target_modules=list(LINEARS), task_type="CAUSAL_LM", **kwargs
    )


@pytest.mark.parametrize(
    "config", [nf4(bnb_4bit_use_double_quant=True), LowbitConfig(load_in_8bit=True)], ids=["nf4-dq", "int8"]
)
def test_qlora_trains_saves_reloads_merges(peft, tiny_dir, ids, tmp_path, config):
    from lowbit.integrations import peft as lowbit_peft

    model = peft.prepare_model_for_kbit_training(load(tiny_dir, config))
    model = lowbit_peft.get_peft_model(model, _lora(peft))
    wrapper = model.base_model.model.model.layers[0].self_attn.q_proj
    expected_class = lowbit_peft.LoraLinear4bit if config.load_in_4bit else lowbit_peft.LoraLinear8bitLt
    assert type(wrapper) is expected_class
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    torch.manual_seed(0)
    losses = _train(model, ids)
    assert losses[-1] < 0.8 * losses[0], losses
    trained = logits(model, ids)

    model.save_pretrained(tmp_path / "adapters")
    assert (tmp_path / "adapters" / "adapter_model.safetensors").exists()
    adapters = safetensors_torch.load_file(str(tmp_path / "adapters" / "adapter_model.safetensors"))
    assert adapters and all("lora_" in k for k in adapters)  # adapters only, no base weights
    reloaded = lowbit_peft.from_pretrained(load(tiny_dir, config), str(tmp_path / "adapters"))
    assert type(reloaded.base_model.model.model.layers[0].self_attn.q_proj) is expected_class
    torch.testing.assert_close(logits(reloaded, ids), trained, atol=0, rtol=0)

    # merge into the quantized weights (quantized again, as PEFT does for bitsandbytes)
    merged = copy.deepcopy(reloaded).merge_and_unload()
    assert type(merged.model.layers[0].self_attn.q_proj) is type(
        reloaded.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    )
    base_only = logits(load(tiny_dir, config), ids)
    merged_logits = logits(merged, ids)
    assert (merged_logits - trained).abs().max() < (base_only - trained).abs().max()

    # exact merge into a float model: the same as the adapters on the dequantized base
    # (for 4-bit with float32 compute that is the trained model itself; LLM.int8 also rounds activations)
    unmerged = logits(lt.dequantize_model(copy.deepcopy(reloaded)), ids)
    if config.load_in_4bit:
        torch.testing.assert_close(unmerged, trained, atol=1e-5, rtol=0)
    dense = lowbit_peft.merge_and_unload(reloaded)
    assert type(dense.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    torch.testing.assert_close(logits(dense, ids), unmerged, atol=1e-4, rtol=0)
    dense.save_pretrained(tmp_path / "dense")
    with open(tmp_path / "dense" / "config.json") as f:
        assert "quantization_config" not in json.load(f)
    torch.testing.assert_close(logits(load(tmp_path / "dense"), ids), logits(dense, ids), atol=0, rtol=0)


def test_lora_unmerge_and_disable(peft, tiny_dir, ids):
    from lowbit.integrations import peft as lowbit_peft

    model = lowbit_peft.get_peft_model(load(tiny_dir, nf4()), _lora(peft))
    torch.manual_seed(0)
    _train(model, ids, steps=5)
    trained = logits(model, ids)
    with model.disable_adapter():
        base = logits(model, ids)
    assert not torch.equal(base, trained)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    layer.merge()
    assert layer.merged
    layer.unmerge()
    assert not layer.merged


def test_dora_is_refused_clearly(peft, tiny_dir):
    from lowbit.integrations import peft as lowbit_peft

    with pytest.raises(ValueError, match="DoRA"):
        lowbit_peft.get_peft_model(load(tiny_dir, nf4()), _lora(peft, use_dora=True))


def test_register_lowbit_modules(peft):
    from lowbit.integrations import peft as lowbit_peft

    config = lowbit_peft.register_lowbit_modules(_lora(peft))
    assert config._custom_modules[Linear4bit] is lowbit_peft.LoraLinear4bit
    assert config._custom_modules[Linear8bitLt] is lowbit_peft.LoraLinear8bitLt
    with pytest.raises(TypeError):
        lowbit_peft.register_lowbit_modules({"r": 8})


def test_trainer_runs_qlora(peft, tiny_dir, ids, tmp_path):
    """transformers.Trainer on a lowbit QLoRA model (its FLOP count calls num_parameters, which
    transformers implements with bitsandbytes for 4-bit models; lowbit's model overrides it)."""
    from transformers import Trainer, TrainingArguments

    from lowbit.integrations import peft as lowbit_peft

    model = lowbit_peft.get_peft_model(
        peft.prepare_model_for_kbit_training(load(tiny_dir, nf4())), _lora(peft)
    )
    rows = [{"input_ids": row, "labels": row} for row in ids.repeat(2, 1)]
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=4, learning_rate=3e-3,
        logging_steps=1, report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True,
    )  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=rows)
    result = trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert result.global_step == 4 and len(losses) == 4 and trainer.state.total_flos > 0


def test_replace_bitsandbytes(tiny_dir, ids, tmp_path):
    """Opt-in: code written for bitsandbytes runs on lowbit, and saves bitsandbytes checkpoints."""
    from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING

    original = dict(AUTO_QUANTIZER_MAPPING)
    lt.replace_bitsandbytes()
    try:
        lt.replace_bitsandbytes()  # idempotent
        model = load(tiny_dir, BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"))
        assert type(model.model.layers[0].mlp.up_proj) is Linear4bit
        assert isinstance(model.config.quantization_config, BitsAndBytesConfig)
        reference = logits(load(tiny_dir, nf4()), ids)
        torch.testing.assert_close(logits(model, ids), reference, atol=0, rtol=0)
        model.save_pretrained(tmp_path)
        with open(tmp_path / "config.json") as f:
            assert json.load(f)["quantization_config"]["quant_method"] == "bitsandbytes"
        torch.testing.assert_close(logits(load(tmp_path), ids), reference, atol=0, rtol=0)
        bnb_int8 = load(os.path.join(DATA, "int8"))
        expected = safetensors_torch.load_file(os.path.join(DATA, "int8", "expected.safetensors"))
        torch.testing.assert_close(
            logits(bnb_int8, expected["input_ids"]), expected["logits"], atol=0, rtol=0
        )
    finally:
        lt.restore_bitsandbytes()
    assert AUTO_QUANTIZER_MAPPING == original
