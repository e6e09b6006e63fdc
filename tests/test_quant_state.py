"""QuantState: bitsandbytes' serialization keys, round trips, device moves and corrupted input."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from lowbit import QuantState
from lowbit import functional as F
from lowbit.core.quant_state import pack_dict_to_tensor

W = torch.randn(96, 130, generator=torch.Generator().manual_seed(0))


@pytest.fixture(params=[False, True], ids=["plain", "double_quant"])
def quantized(request):
    return F.quantize_4bit(W.to(torch.bfloat16), quant_type="nf4", compress_statistics=request.param)


def test_packed_keys_are_bitsandbytes_keys(quantized):
    _, state = quantized
    packed = state.as_dict(packed=True)
    expected = {"absmax", "quant_map", "quant_state.bitsandbytes__nf4"}
    if state.nested:
        expected |= {"nested_absmax", "nested_quant_map"}
    assert set(packed) == expected
    assert all(isinstance(v, torch.Tensor) for v in packed.values())
    meta = json.loads(bytes(packed["quant_state.bitsandbytes__nf4"].tolist()).decode())
    assert meta["quant_type"] == "nf4" and meta["blocksize"] == 64 and meta["dtype"] == "bfloat16"
    assert meta["shape"] == [96, 130]
    if state.nested:
        assert meta["nested_blocksize"] == 256 and meta["nested_dtype"] == "float32"


def test_round_trip_through_dict(quantized):
    packed, state = quantized
    loaded = QuantState.from_dict(state.as_dict(packed=True), device="cpu")
    assert loaded == state
    assert torch.equal(F.dequantize_4bit(packed, loaded), F.dequantize_4bit(packed, state))
    # with a module prefix, as in a state dict
    prefixed = {f"layer.weight.{k}": v for k, v in state.as_dict(packed=True).items()}
    assert QuantState.from_dict(prefixed) == state


def test_round_trip_through_safetensors(quantized, tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    _, state = quantized
    path = tmp_path / "state.safetensors"
    safetensors.save_file(state.as_dict(packed=True), str(path))
    assert QuantState.from_dict(safetensors.load_file(str(path))) == state


def test_unpacked_dict_round_trip(quantized):
    _, state = quantized
    assert QuantState.from_dict(state.as_dict(packed=False)) == state


def test_copy_and_equality(quantized):
    _, state = quantized
    twin = copy.deepcopy(state)
    assert twin == state and twin is not state
    twin.absmax = twin.absmax.clone()
    twin.absmax[0] += 1
    assert twin != state


def test_to_moves_every_tensor(quantized):
    _, state = quantized
    assert state.to("cpu") is state
    assert state.absmax.device.type == "cpu" and state.code.device.type == "cpu"


def test_legacy_list_access(quantized):
    _, state = quantized
    assert state[0] is state.absmax and state[1] == W.shape and state[3] == 64 and state[5] == "nf4"


def test_fsdp_style_attribute_lookup(quantized):
    _, state = quantized
    assert torch.equal(state.bitsandbytes__nf4, state.as_dict(packed=True)["quant_state.bitsandbytes__nf4"])
    with pytest.raises(AttributeError):
        getattr(state, "bitsandbytes__fp4")  # noqa: B009  (the lookup itself is under test)


def _corrupt(state: QuantState, **changes):
    packed = state.as_dict(packed=True)
    key = "quant_state.bitsandbytes__nf4"
    meta = json.loads(bytes(packed[key].tolist()).decode())
    for name, value in changes.items():
        if name in meta:
            meta[name] = value
        else:
            packed[name] = value
    packed[key] = pack_dict_to_tensor(meta)
    return packed


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"quant_type": "nf3"}, "'quant_type' must be one of"),
        ({"blocksize": 63}, "'blocksize' must be one of"),
        ({"dtype": "floaty"}, "'dtype' must be one of 'float32', 'float16', 'bfloat16', got 'floaty'"),
        ({"shape": [96, -1]}, "'shape' must be a non-empty list of positive ints"),
        ({"shape": [96, 131]}, "'absmax' has 195 elements, expected 197"),
        ({"absmax": torch.ones(3)}, "'absmax' has 3 elements"),
        ({"quant_map": torch.ones(15)}, "'quant_map' has 15 elements"),
        ({"absmax": torch.full((195,), float("nan"))}, "'absmax' contains NaN"),
        ({"bogus": torch.ones(1)}, "unexpected keys"),
    ],
)
def test_corrupted_state_is_rejected(changes, match):
    _, state = F.quantize_4bit(W, quant_type="nf4")
    with pytest.raises(ValueError, match=match):
        QuantState.from_dict(_corrupt(state, **changes))


def test_missing_or_garbled_packed_entry():
    _, state = F.quantize_4bit(W, quant_type="nf4")
    packed = state.as_dict(packed=True)
    del packed["quant_state.bitsandbytes__nf4"]
    with pytest.raises(ValueError, match="found neither"):
        QuantState.from_dict(packed)
    packed["quant_state.bitsandbytes__nf4"] = torch.tensor([0xFF, 0x00], dtype=torch.uint8)
    with pytest.raises(ValueError, match="not valid JSON"):
        QuantState.from_dict(packed)


def test_nested_state_missing_fields():
    _, state = F.quantize_4bit(W, quant_type="nf4", compress_statistics=True)
    packed = state.as_dict(packed=True)
    del packed["nested_quant_map"]
    with pytest.raises(ValueError, match="nested state is missing 'nested_quant_map'"):
        QuantState.from_dict(packed)


@pytest.mark.parametrize("nested", [False, True], ids=["plain", "nested"])
@pytest.mark.parametrize("blocksize", [128, 16384])  # 16384: an 8-bit-only blocksize
def test_8bit_blockwise_state_round_trips_through_dict(nested, blocksize):
    x = torch.randn(300, 70, dtype=torch.bfloat16)
    q, state = F.quantize_blockwise(x, blocksize=blocksize, nested=nested)
    fields = state.as_dict()
    assert fields["quant_type"] is None and fields["quant_map"].numel() == 256
    rebuilt = QuantState.from_dict(fields)
    assert rebuilt == state and rebuilt.dtype == torch.bfloat16 and rebuilt.nested == nested
    assert torch.equal(F.dequantize_blockwise(q, rebuilt), F.dequantize_blockwise(q, state))
    # the code size follows the format: 256 entries for 8-bit, 16 for NF4/FP4
    with pytest.raises(ValueError, match="'quant_map' has 16 elements, expected 256"):
        QuantState.from_dict({**fields, "quant_map": torch.zeros(16)})
    with pytest.raises(ValueError, match="'quant_map' has 256 elements, expected 16"):
        QuantState.from_dict({**fields, "quant_type": "nf4", "shape": [300, 70], "blocksize": 128})
    with pytest.raises(ValueError, match="'blocksize' must be one of"):  # 16384 is 8-bit only
        QuantState.from_dict({**fields, "quant_type": "nf4", "blocksize": 16384})
