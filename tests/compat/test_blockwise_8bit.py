"""8-bit blockwise quantization with the dynamic maps, against bitsandbytes."""

from __future__ import annotations

import functools
from itertools import product

import pytest

import lowbit

from .conftest import (
    BLOCKSIZES_8BIT,
    FLOAT_DTYPES,
    B,
    Case,
    L,
    assert_identical,
    assert_same_state,
    convert_state,
)

pytestmark = pytest.mark.compat

SHAPES = [(1,), (3,), (63,), (65,), (7, 9), (4096 * 3 + 1,), (128, 257)]
#: "signed": bitsandbytes' default code; "unsigned": the map of Adam's second moment, fed
#: non-negative input.
CODES = ("signed", "unsigned")
#: Blocksizes of the denormal and the dequantize cases.
DEQUANT_BLOCKSIZES = (64, 256, 4096)


@pytest.mark.parametrize(
    "signed, max_exponent_bits, total_bits",
    [
        (True, 7, 8),
        (False, 7, 8),
        (True, 6, 8),
        (True, 5, 8),
        (True, 3, 4),
    ],
    ids=lambda v: str(v),
)
def test_create_dynamic_map(signed, max_exponent_bits, total_bits):
    expected = B.create_dynamic_map(signed=signed, max_exponent_bits=max_exponent_bits, total_bits=total_bits)
    actual = L.create_dynamic_map(signed=signed, max_exponent_bits=max_exponent_bits, total_bits=total_bits)
    assert_identical(actual, expected, "create_dynamic_map")


def _cases():
    for code, blocksize, dtype, shape in product(CODES, BLOCKSIZES_8BIT, FLOAT_DTYPES, SHAPES):
        yield Case(shape, dtype, blocksize, "mixed", code=code)
    # float32/bfloat16 blocks whose absmax is so small that 1/absmax overflows to inf
    for code, blocksize, dtype, shape in product(CODES, DEQUANT_BLOCKSIZES, FLOAT_DTYPES, SHAPES):
        yield Case(shape, dtype, blocksize, "denormal", code=code)
    for code, dtype, shape in product(CODES, FLOAT_DTYPES, [(3,), (65,), (128, 257)]):
        yield Case(shape, dtype, 64, "zeros", code=code)


def _nested_cases():
    for blocksize, dtype, shape in product((64, 256, 4096), FLOAT_DTYPES, [(4096 * 3 + 1,), (128, 257)]):
        yield Case(shape, dtype, blocksize, "mixed", code="signed", nested=True)


def _quantize(lib, case: Case):
    code = B.create_dynamic_map(signed=case.code == "signed")
    return lib.quantize_blockwise(case.input(), code=code, blocksize=case.blocksize, nested=case.nested)


@functools.cache
def _bnb_quantized(case: Case):
    """bitsandbytes' (quantized, state) for a case, shared by every backend's run of it."""
    return _quantize(B, case)


@pytest.mark.parametrize("case", [c.param() for c in (*_cases(), *_nested_cases())])
def test_quantize_blockwise(backend, case):
    expected_q, expected_state = _bnb_quantized(case)
    q, state = _quantize(L, case)
    assert_identical(q, expected_q, "quantized")
    assert_same_state(state, expected_state)


@pytest.mark.parametrize(
    "case",
    [
        c.param()
        for c in (*_cases(), *_nested_cases())
        if c.kind != "denormal" and c.blocksize in DEQUANT_BLOCKSIZES
    ],
)
def test_dequantize_blockwise(backend, case):
    """Both directions: lowbit decodes bitsandbytes' output, bitsandbytes decodes lowbit's."""
    q, bnb_state = _bnb_quantized(case)
    expected = B.dequantize_blockwise(q, bnb_state)
    actual = L.dequantize_blockwise(q, convert_state(bnb_state, lowbit.QuantState))
    assert_identical(actual, expected, "lowbit's dequantize of bitsandbytes' output")

    q, state = _quantize(L, case)
    actual = L.dequantize_blockwise(q, state)
    expected = B.dequantize_blockwise(q, convert_state(state, B.QuantState))
    assert_identical(actual, expected, "bitsandbytes' dequantize of lowbit's output")
