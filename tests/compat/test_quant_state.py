"""QuantState interchange: 4-bit state dicts written by one library load and dequantize in the other."""

from __future__ import annotations

from itertools import product

import pytest
import safetensors.torch
import torch

import lowbit

from .conftest import (
    FLOAT_DTYPES,
    QUANT_TYPES,
    B,
    Case,
    L,
    assert_identical,
    assert_same_state,
    dtype_name,
)

pytestmark = pytest.mark.compat

SHAPE = (128, 258)  # an even last dimension: bitsandbytes dequantizes it with its C kernel
BLOCKSIZE = 64

CASES = [
    pytest.param(
        quant_type, nested, dtype, id=f"{quant_type}-{'nested' if nested else 'plain'}-{dtype_name(dtype)}"
    )
    for quant_type, nested, dtype in product(QUANT_TYPES, (False, True), FLOAT_DTYPES)
]


def _quantize(lib, quant_type, nested, dtype):
    x = Case(SHAPE, dtype, BLOCKSIZE, "mixed", quant_type, nested=nested).input()
    return lib.quantize_4bit(x, blocksize=BLOCKSIZE, compress_statistics=nested, quant_type=quant_type)


def _dequantize(lib, packed, state):
    return lib.dequantize_4bit(packed, state)


def _assert_same_dequant(actual, expected, what):
    # the sign of a zero is not stable within bitsandbytes itself (see test_4bit.py)
    assert_identical(actual, expected, what, ignore_zero_sign=True)


@pytest.mark.parametrize("quant_type, nested, dtype", CASES)
def test_packed_state_dicts_are_identical(backend, quant_type, nested, dtype):
    """Same input, same keys, and every tensor (the JSON-packed one included) byte-identical."""
    _, bnb_state = _quantize(B, quant_type, nested, dtype)
    _, state = _quantize(L, quant_type, nested, dtype)
    expected = bnb_state.as_dict(packed=True)
    actual = state.as_dict(packed=True)
    assert sorted(actual) == sorted(expected)
    packed_key = f"quant_state.bitsandbytes__{quant_type}"
    assert bytes(actual[packed_key].tolist()) == bytes(expected[packed_key].tolist()), "JSON-packed fields"
    for key in expected:
        assert_identical(actual[key], expected[key], key)


@pytest.mark.parametrize("quant_type, nested, dtype", CASES)
def test_bitsandbytes_state_dict_loads_in_lowbit(backend, quant_type, nested, dtype):
    packed, bnb_state = _quantize(B, quant_type, nested, dtype)
    saved = bnb_state.as_dict(packed=True)
    loaded = lowbit.QuantState.from_dict(dict(saved), device="cpu")
    assert_same_state(loaded, B.QuantState.from_dict(dict(saved), device="cpu"), "loaded state")
    _assert_same_dequant(
        _dequantize(L, packed, loaded),
        _dequantize(B, packed, bnb_state),
        "lowbit's dequantize of the loaded state",
    )


@pytest.mark.parametrize("quant_type, nested, dtype", CASES)
def test_lowbit_state_dict_loads_in_bitsandbytes(backend, quant_type, nested, dtype):
    packed, state = _quantize(L, quant_type, nested, dtype)
    saved = state.as_dict(packed=True)
    loaded = B.QuantState.from_dict(dict(saved), device="cpu")
    assert_same_state(lowbit.QuantState.from_dict(dict(saved), device="cpu"), loaded, "loaded state")
    _assert_same_dequant(
        _dequantize(L, packed, state),
        _dequantize(B, packed, loaded),
        "bitsandbytes' dequantize of the loaded state",
    )


@pytest.mark.parametrize("nested", (False, True), ids=("plain", "nested"))
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("writer", ("bitsandbytes", "lowbit"))
def test_safetensors_checkpoint_interchange(backend, tmp_path, writer, quant_type, nested):
    """A Linear4bit-style checkpoint ('weight', 'weight.<state key>') through a safetensors file,
    written by one library and loaded by both: all three dequantize identically."""
    lib = B if writer == "bitsandbytes" else L
    packed, state = _quantize(lib, quant_type, nested, torch.bfloat16)
    path = tmp_path / "weight.safetensors"
    tensors = {"weight": packed, **{f"weight.{k}": v for k, v in state.as_dict(packed=True).items()}}
    safetensors.torch.save_file(tensors, str(path))

    loaded = safetensors.torch.load_file(str(path))
    weight = loaded.pop("weight")
    assert_identical(weight, packed, "weight read back")
    reference = _dequantize(lib, packed, state)
    for name, module in (("bitsandbytes", B), ("lowbit", L)):
        state_loaded = module.QuantState.from_dict(dict(loaded), device="cpu")
        _assert_same_dequant(
            _dequantize(module, weight, state_loaded), reference, f"{name} reading {writer}'s file"
        )
