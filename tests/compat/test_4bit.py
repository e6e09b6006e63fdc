"""NF4 / FP4: quantize_4bit (plain and double-quantized) and dequantize_4bit against bitsandbytes."""

from __future__ import annotations

import functools
from itertools import product

import pytest
import torch

import lowbit

from .conftest import (
    BLOCKSIZES_4BIT,
    FLOAT_DTYPES,
    QUANT_TYPES,
    B,
    Case,
    L,
    assert_identical,
    assert_same_state,
    convert_state,
    dtype_name,
    shape_name,
    storage_fits,
)

pytestmark = pytest.mark.compat

#: Odd lengths, lengths that are not a multiple of any blocksize, a tail block of one element.
SHAPES = [(1,), (3,), (63,), (65,), (7, 9), (4096 * 3 + 1,), (128, 257)]
#: ~1M elements, not a multiple of 64; at blocksize 4096 it has 257 blocks, so its nested absmax
#: has a full 256-block and a one-element tail.
LARGE_SHAPE = (1000, 1049)
STORAGES = (torch.uint8, torch.bfloat16, torch.float16, torch.float32)


def _quantize(lib, case: Case):
    return lib.quantize_4bit(
        case.input(),
        blocksize=case.blocksize,
        compress_statistics=case.nested,
        quant_type=case.quant_type,
        quant_storage=case.storage,
    )


@functools.cache
def _bnb_quantized(case: Case):
    """bitsandbytes' (packed, state) for a case, shared by every backend's run of it."""
    return _quantize(B, case)


@functools.cache
def _bnb_dequantized(case: Case) -> torch.Tensor:
    packed, state = _bnb_quantized(case)
    return B.dequantize_4bit(packed, state)


# ------------------------------------------------------------------------------------------
# 1. quantize_4bit
# ------------------------------------------------------------------------------------------
def _quantize_cases():
    for quant_type, blocksize, dtype, shape in product(QUANT_TYPES, BLOCKSIZES_4BIT, FLOAT_DTYPES, SHAPES):
        yield Case(shape, dtype, blocksize, "mixed", quant_type)
    # the storage dtype only changes how the same bytes are viewed
    for quant_type, blocksize, dtype, shape, storage in product(
        QUANT_TYPES, (32, 4096), FLOAT_DTYPES, SHAPES, STORAGES[1:]
    ):
        if storage_fits(shape, storage):
            yield Case(shape, dtype, blocksize, "mixed", quant_type, storage=storage)
    for quant_type, blocksize, dtype, shape in product(
        QUANT_TYPES, (32, 64, 256, 4096), FLOAT_DTYPES, SHAPES
    ):
        yield Case(shape, dtype, blocksize, "denormal", quant_type)
    for quant_type, dtype, shape in product(QUANT_TYPES, FLOAT_DTYPES, SHAPES):
        yield Case(shape, dtype, 64, "zeros", quant_type)
    for quant_type, dtype in product(QUANT_TYPES, FLOAT_DTYPES):
        yield Case(LARGE_SHAPE, dtype, 64, "mixed", quant_type)
    yield Case(LARGE_SHAPE, torch.float32, 4096, "mixed", "nf4")


@pytest.mark.parametrize("case", [c.param() for c in _quantize_cases()])
def test_quantize_4bit(backend, case):
    expected_packed, expected_state = _bnb_quantized(case)
    packed, state = _quantize(L, case)
    assert_identical(packed, expected_packed, "packed")
    assert_same_state(state, expected_state)


@pytest.mark.parametrize(
    "shape, storage",
    [
        pytest.param(shape, storage, id=f"{shape_name(shape)}-store_{dtype_name(storage)}")
        for shape, storage in product(SHAPES, STORAGES)
        if not storage_fits(shape, storage)
    ],
)
def test_quantize_4bit_storage_that_does_not_fit_raises(backend, shape, storage):
    """Where the packed bytes do not fill whole storage elements bitsandbytes raises, and so must lowbit."""
    x = torch.randn(shape)
    with pytest.raises(RuntimeError):
        B.quantize_4bit(x, quant_type="nf4", quant_storage=storage)
    with pytest.raises(ValueError, match="quant_storage"):
        L.quantize_4bit(x, quant_type="nf4", quant_storage=storage)


# ------------------------------------------------------------------------------------------
# 2. quantize_4bit(compress_statistics=True): nested absmax, offset, state2
# ------------------------------------------------------------------------------------------
def _nested_cases():
    for quant_type, blocksize, dtype, shape in product(
        QUANT_TYPES, BLOCKSIZES_4BIT, FLOAT_DTYPES, SHAPES[2:]
    ):
        yield Case(shape, dtype, blocksize, "mixed", quant_type, nested=True)
    for quant_type, blocksize, dtype, shape in product(
        QUANT_TYPES, (32, 64, 4096), FLOAT_DTYPES, [(4096 * 3 + 1,), (128, 257)]
    ):
        yield Case(shape, dtype, blocksize, "denormal", quant_type, nested=True)
    for quant_type, blocksize in product(QUANT_TYPES, (64, 4096)):
        yield Case(LARGE_SHAPE, torch.float16, blocksize, "mixed", quant_type, nested=True)


@pytest.mark.parametrize("case", [c.param() for c in _nested_cases()])
def test_quantize_4bit_double_quant(backend, case):
    expected_packed, expected_state = _bnb_quantized(case)
    packed, state = _quantize(L, case)
    assert expected_state.state2 is not None and state.state2 is not None
    assert_identical(packed, expected_packed, "packed")
    # absmax (uint8 nested codes), offset, state2.absmax, state2.code, state2.blocksize/dtype
    assert_same_state(state, expected_state)


# ------------------------------------------------------------------------------------------
# The codebooks, bit for bit
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_4bit_codebook_bits(backend, quant_type):
    """The codebook as get_4bit_type returns it, as a QuantState holds it and as a checkpoint stores it."""
    expected = B.get_4bit_type(quant_type, device="cpu")
    assert_identical(L.get_4bit_type(quant_type, device="cpu"), expected, "get_4bit_type")
    _, state = L.quantize_4bit(torch.randn(256), quant_type=quant_type)
    assert_identical(state.code, expected, "QuantState.code")
    assert_identical(state.as_dict(packed=True)["quant_map"], expected, "the serialized quant_map")


# ------------------------------------------------------------------------------------------
# 3. dequantize_4bit, both directions
# ------------------------------------------------------------------------------------------
# Dequantized values are compared bit for bit except for the sign of zero: bitsandbytes 0.50.2
# itself decodes FP4 code 8 as -0.0 in the scalar loop of its C kernel and as +0.0 in its
# vectorized loop and its torch fallback, depending on the shape ((2, 4) -> -0.0, (2, 32) -> +0.0).
#
# Its CPU dequantize_4bit runs the C kernel for an even last dimension and a torch.compile'd
# fallback (one compilation per shape, dtype and blocksize) for an odd one and, on AVX-512
# machines, for blocksize >= 2048. The grid covers both paths with fewer than 20 compilations.
# 1-D shapes of even length are in test_dequantize_4bit_1d_even_length.
def _dequantize_cases():
    for quant_type, dtype, nested in product(QUANT_TYPES, FLOAT_DTYPES, (False, True)):
        for blocksize in BLOCKSIZES_4BIT:
            yield Case((128, 258), dtype, blocksize, "mixed", quant_type, nested=nested)
        for blocksize in (32, 64, 256):
            yield Case((6, 10), dtype, blocksize, "mixed", quant_type, nested=nested)
        yield Case((2, 3, 4), dtype, 64, "mixed", quant_type, nested=nested)
        for shape in [(63,), (7, 9), (128, 257)] + (
            [(3,), (4096 * 3 + 1,)] if dtype == torch.float32 else []
        ):
            yield Case(shape, dtype, 64, "mixed", quant_type, nested=nested)
        yield Case((128, 258), dtype, 64, "denormal", quant_type, nested=nested)
        if nested:
            yield Case((1024, 1026), dtype, 64, "mixed", quant_type, nested=True)
    for quant_type, storage in product(QUANT_TYPES, STORAGES[1:]):
        yield Case((128, 258), torch.float16, 64, "mixed", quant_type, storage=storage)
    yield Case(LARGE_SHAPE, torch.float16, 4096, "mixed", "nf4", nested=True)


@pytest.mark.parametrize("case", [c.param() for c in _dequantize_cases()])
def test_dequantize_4bit(backend, case):
    packed, bnb_state = _bnb_quantized(case)
    actual = L.dequantize_4bit(packed, convert_state(bnb_state, lowbit.QuantState))
    expected = _bnb_dequantized(case)
    assert_identical(
        actual, expected, "lowbit's dequantize of bitsandbytes' packed data", ignore_zero_sign=True
    )

    packed, state = _quantize(L, case)
    actual = L.dequantize_4bit(packed, state)
    expected = B.dequantize_4bit(packed, convert_state(state, B.QuantState))
    assert_identical(
        actual, expected, "bitsandbytes' dequantize of lowbit's packed data", ignore_zero_sign=True
    )


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("shape", [(64,), (4098,)], ids=shape_name)
def test_dequantize_4bit_1d_even_length(backend, quant_type, shape):
    """bitsandbytes 0.50.2's CPU C-kernel path returns a 1-D tensor of even length with shape
    (1, n) (it views 1-D shapes as one row and never reshapes back; its torch fallback and its
    CUDA kernels return (n,)). lowbit returns the quantized shape; the values are identical."""
    case = Case(shape, torch.float32, 64, "mixed", quant_type)
    packed, state = _quantize(L, case)
    actual = L.dequantize_4bit(packed, state)
    expected = B.dequantize_4bit(packed, convert_state(state, B.QuantState))
    assert actual.shape == shape
    assert_identical(actual, expected.reshape(shape), "values", ignore_zero_sign=True)
