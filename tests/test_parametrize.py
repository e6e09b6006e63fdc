"""lowbit.nn.parametrize: 4-bit quantization of parameters that are not in an nn.Linear, such as
the fused 3-D expert stacks of transformers v5 mixture-of-experts blocks."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.utils.parametrize as P
from torch import nn
from torch.utils.checkpoint import checkpoint

import lowbit
from lowbit import functional as F
from lowbit.core.quant_state import QuantState
from lowbit.nn import parametrize
from lowbit.nn.parametrize import (
    Bnb4bitParametrization,
    replace_parameter_4bit,
    replace_parameter_4bit_prequantized,
)
from support import CPU_BACKENDS

EXPERTS, HIDDEN, INTER = 4, 64, 48


@pytest.fixture(params=CPU_BACKENDS, autouse=True, ids=lambda name: f"backend={name}")
def backend(request):
    with lowbit.backends.use(request.param):
        yield request.param


class Experts(nn.Module):
    """transformers v5's fused experts layout: one 3-D parameter per projection, read by bmm."""

    def __init__(self, dtype=torch.float32, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.gate_up_proj = nn.Parameter((torch.randn(EXPERTS, 2 * INTER, HIDDEN, generator=g) * 0.1).to(dtype))
        self.down_proj = nn.Parameter((torch.randn(EXPERTS, HIDDEN, INTER, generator=g) * 0.1).to(dtype))

    def forward(self, x):  # x: [EXPERTS, tokens, HIDDEN]
        gate, up = torch.bmm(x, self.gate_up_proj.transpose(1, 2)).chunk(2, dim=-1)
        # reads gate_up_proj a second time: dequantized once per forward all the same
        scale = self.gate_up_proj.abs().mean()
        return torch.bmm(nn.functional.silu(gate) * up, self.down_proj.transpose(1, 2)) * scale


def _quantized_experts(dtype=torch.float32, nested=False, quant_type="nf4", blocksize=None):
    module = Experts(dtype)
    dense = copy.deepcopy(module)
    for name in ("gate_up_proj", "down_proj"):
        replace_parameter_4bit(module, name, compress_statistics=nested, quant_type=quant_type, blocksize=blocksize)
    return module, dense


def _state(module, name) -> QuantState:
    return module.parametrizations[name][0].quant_state


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
@pytest.mark.parametrize("quant_type,blocksize", [("nf4", None), ("fp4", 128)])
def test_expert_stack_reads_back_as_its_dequantized_weight(dtype, nested, quant_type, blocksize):
    module, dense = _quantized_experts(dtype, nested, quant_type, blocksize)
    for name in ("gate_up_proj", "down_proj"):
        packed = module.parametrizations[name].original
        want_packed, want_state = F.quantize_4bit(
            getattr(dense, name).data, blocksize=blocksize, compress_statistics=nested, quant_type=quant_type
        )
        assert packed.dtype == torch.uint8 and not packed.requires_grad and torch.equal(packed, want_packed)
        assert _state(module, name) == want_state
        value = getattr(module, name)
        assert value.shape == getattr(dense, name).shape and value.dtype == dtype and not value.requires_grad
        assert torch.equal(value, F.dequantize_4bit(want_packed, want_state))
    # the module's own forward runs on the dequantized weights, and input gradients flow
    reference = copy.deepcopy(dense)
    with torch.no_grad():
        reference.gate_up_proj.copy_(module.gate_up_proj)
        reference.down_proj.copy_(module.down_proj)
    x = torch.randn(EXPERTS, 5, HIDDEN, generator=torch.Generator().manual_seed(1)).to(dtype).requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    out = module(x)
    assert torch.equal(out, reference(x_ref))
    out.float().square().mean().backward()
    reference(x_ref).float().square().mean().backward()
    assert torch.equal(x.grad, x_ref.grad)


def test_forward_dequantizes_each_parameter_once(monkeypatch):
    module, _ = _quantized_experts()
    calls = []
    dequantize = F.dequantize_4bit
    monkeypatch.setattr(parametrize.F, "dequantize_4bit", lambda *a, **k: calls.append(1) or dequantize(*a, **k))
    x = torch.randn(EXPERTS, 3, HIDDEN)
    module(x)
    assert len(calls) == 2  # gate_up_proj is read twice, dequantized once
    assert P._cache == {} and P._cache_enabled == 0  # nothing stays cached after the forward
    for _ in range(2):
        assert module.gate_up_proj.shape == (EXPERTS, 2 * INTER, HIDDEN)
    assert len(calls) == 4  # outside a forward every read dequantizes (no stale cache)


def test_cache_is_balanced_under_checkpointing_and_errors():
    module, _ = _quantized_experts()
    head = nn.Linear(HIDDEN, HIDDEN)
    model = nn.Sequential(module, head)
    x = torch.randn(EXPERTS, 3, HIDDEN, requires_grad=True)
    for _ in range(3):  # non-reentrant checkpointing stops its recompute early, skipping plain hooks
        checkpoint(model, x, use_reentrant=False).sum().backward()
        assert P._cache_enabled == 0 and P._cache == {}
    with pytest.raises(RuntimeError):
        module(torch.randn(EXPERTS, 3, HIDDEN + 1))  # the forward raises: the cache is left all the same
    assert P._cache_enabled == 0 and P._cache == {}


def test_state_dict_holds_bitsandbytes_entries_and_loads_back(tmp_path):
    module, _ = _quantized_experts(torch.bfloat16, nested=True)
    state_dict = module.state_dict()
    for name in ("gate_up_proj", "down_proj"):
        expected = {name: module.parametrizations[name].original} | {
            f"{name}.{k}": v for k, v in _state(module, name).as_dict(packed=True).items()
        }
        for key, value in expected.items():
            assert torch.equal(state_dict[key], value), key
    assert not any(k.startswith("parametrizations.") for k in state_dict)

    safetensors_torch = pytest.importorskip("safetensors.torch")
    safetensors_torch.save_file({k: v.contiguous() for k, v in state_dict.items()}, tmp_path / "m.safetensors")
    target, _ = _quantized_experts(torch.bfloat16, nested=False, quant_type="fp4")  # other settings
    target.load_state_dict(safetensors_torch.load_file(tmp_path / "m.safetensors"))
    for name in ("gate_up_proj", "down_proj"):
        assert torch.equal(getattr(target, name), getattr(module, name))
        assert _state(target, name) == _state(module, name)


def test_load_of_mismatched_entries_names_the_key_and_changes_nothing():
    module, _ = _quantized_experts()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    bad = dict(before)
    bad["down_proj.absmax"] = bad["down_proj.absmax"][:-1]
    with pytest.raises(RuntimeError, match="down_proj: cannot load the 4-bit parametrized tensor"):
        module.load_state_dict(bad)
    other = Experts()
    replace_parameter_4bit(other, "down_proj")
    small = nn.Module()
    small.down_proj = nn.Parameter(torch.randn(EXPERTS, HIDDEN, INTER // 2))
    replace_parameter_4bit(small, "down_proj")
    with pytest.raises(RuntimeError, match="down_proj: cannot load .* shape"):
        other.load_state_dict(small.state_dict(), strict=False)
    for key, value in module.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_prequantized_replacement():
    dense = Experts(torch.float16)
    packed, state = F.quantize_4bit(dense.down_proj.data, quant_type="fp4", compress_statistics=True)
    module = Experts(torch.float16, seed=3)
    module.down_proj = nn.Parameter(packed, requires_grad=False)
    replace_parameter_4bit_prequantized(module, "down_proj", state.as_dict(packed=True), device="cpu")
    assert torch.equal(module.down_proj, F.dequantize_4bit(packed, state))
    other = Experts()
    other.down_proj = nn.Parameter(packed[:-1], requires_grad=False)
    with pytest.raises(ValueError, match="down_proj holds"):
        replace_parameter_4bit_prequantized(other, "down_proj", state.as_dict(packed=True), device="cpu")


class AddDelta(nn.Module):
    """A trainable additive update, standing in for a LoRA parametrization stacked on top."""

    def __init__(self, shape):
        super().__init__()
        self.delta = nn.Parameter(torch.zeros(shape))

    def forward(self, weight):
        return weight + self.delta


def test_another_parametrization_stacks_on_top_and_trains():
    module, _ = _quantized_experts()
    base = module.down_proj.clone()
    P.register_parametrization(module, "down_proj", AddDelta(base.shape))
    with torch.no_grad():
        module.parametrizations.down_proj[1].delta.fill_(0.5)
    assert torch.equal(module.down_proj, base + 0.5)
    module(torch.randn(EXPERTS, 3, HIDDEN)).square().mean().backward()
    assert module.parametrizations.down_proj[1].delta.grad.abs().sum() > 0
    keys = set(module.state_dict())
    assert {"down_proj", "down_proj.absmax", "parametrizations.down_proj.1.delta"} <= keys


def test_bad_arguments():
    module = Experts()
    module.register_buffer("scale", torch.ones(3))
    with pytest.raises(AttributeError, match="Module does not have parameter 'nonexistent'"):
        replace_parameter_4bit(module, "nonexistent")
    with pytest.raises(TypeError, match="Parameter 'scale' is not an instance of nn.Parameter"):
        replace_parameter_4bit(module, "scale")
    with pytest.raises(ValueError, match="quant_type"):
        replace_parameter_4bit(module, "down_proj", quant_type="int4")
    with pytest.raises(ValueError, match="blocksize"):
        replace_parameter_4bit(module, "down_proj", blocksize=100)
    replace_parameter_4bit(module, "down_proj")
    with pytest.raises(ValueError, match="already parametrized"):
        replace_parameter_4bit(module, "down_proj")
    with pytest.raises(TypeError, match="quant_state"):
        Bnb4bitParametrization(F.quantize_blockwise(torch.randn(64))[1])
