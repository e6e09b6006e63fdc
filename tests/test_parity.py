"""Every native backend against the reference backend, op by op, on the same inputs.

Agreement required (DESIGN.md §5): quantize and dequantize bit-exact (bytes and absmax),
int8 products exact, float matmuls within what accumulation order explains.
Each backend's kernel is called directly, bypassing dispatch, so the reference cannot mask it.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest
import torch

from lowbit.core import formats, registry
from support import FLOAT_DTYPES, NATIVE_CPU_BACKENDS

LENGTHS = (1, 2, 3, 63, 64, 65, 1000, 4096 * 3 + 7, 300_001)


def _input(n: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * 3
    if n > 200:
        x[:128] = 0  # all-zero blocks
        x[130:140] = torch.tensor([1e-30, -1e-30, 1e-38, 3e-39, -0.0, 0.0, 1.0, -1.0, 65504.0, -65504.0])
    return x.to(dtype)


def _cases_quantize_4bit() -> Iterator[tuple]:
    for qt, bs, dtype, n in itertools.product(formats.QUANT_TYPES, formats.BLOCKSIZES, FLOAT_DTYPES, LENGTHS):
        storage = torch.uint8 if n % 4 else torch.float16
        yield (_input(n, dtype, n + bs), bs, qt, storage)


def _cases_dequantize_4bit() -> Iterator[tuple]:
    reference = registry.get("reference").kernels.get("quantize_4bit")
    for qt, bs, dtype, n in itertools.product(formats.QUANT_TYPES, (32, 64, 256, 4096), FLOAT_DTYPES, LENGTHS):
        packed, absmax = reference(_input(n, torch.float32, n), bs, qt, torch.uint8)
        yield (packed, absmax, bs, qt, [n], dtype)


def _cases_quantize_blockwise() -> Iterator[tuple]:
    for signed, bs, dtype, n in itertools.product((True, False), formats.BLOCKSIZES, FLOAT_DTYPES, LENGTHS):
        x = _input(n, dtype, n * bs)
        yield (x if signed else x.abs(), formats.dynamic_map(signed=signed), bs)


def _cases_dequantize_blockwise() -> Iterator[tuple]:
    g = torch.Generator().manual_seed(0)
    for bs, dtype, n in itertools.product((64, 256, 4096), FLOAT_DTYPES, LENGTHS):
        q = torch.randint(0, 256, (n,), generator=g, dtype=torch.uint8)
        absmax = torch.rand(formats.num_blocks(n, bs), generator=g) * 10
        yield (q, absmax, formats.dynamic_map(), bs, dtype)


def _with_out(cases: Iterator[tuple], shape_of_output) -> Iterator[tuple]:
    for args in cases:
        yield (*args, torch.full(shape_of_output(args), float("nan"), dtype=args[-1]))


CASES = {
    "quantize_4bit": _cases_quantize_4bit,
    "dequantize_4bit": _cases_dequantize_4bit,
    "dequantize_4bit.out": lambda: _with_out(_cases_dequantize_4bit(), lambda a: a[4]),
    "quantize_blockwise": _cases_quantize_blockwise,
    "dequantize_blockwise": _cases_dequantize_blockwise,
    "dequantize_blockwise.out": lambda: _with_out(_cases_dequantize_blockwise(), lambda a: a[0].shape),
}


_SAME_WIDTH_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bit patterns, so that -0.0 vs 0.0 and NaN payloads count as differences."""
    return t.view(_SAME_WIDTH_INT[t.element_size()]) if t.is_floating_point() else t


def _exact(got, want, context: str) -> None:
    if isinstance(want, torch.Tensor):
        assert got.dtype == want.dtype and got.shape == want.shape, f"{context}: {got.dtype}{tuple(got.shape)}"
        differ = (_bits(got) != _bits(want)).sum().item()
        assert differ == 0, f"{context}: {differ} elements differ"
    else:
        assert len(got) == len(want), context
        for i, (a, b) in enumerate(zip(got, want)):
            _exact(a, b, f"{context}[{i}]")


@pytest.mark.skipif(not NATIVE_CPU_BACKENDS, reason="no native CPU backend is built")
@pytest.mark.parametrize("backend", NATIVE_CPU_BACKENDS)
def test_every_native_kernel_has_parity_cases(backend):
    untested = set(registry.get(backend).kernels.names()) - set(CASES)
    assert not untested, f"{backend} implements {sorted(untested)} without parity cases in test_parity.py"


@pytest.mark.parametrize("backend", NATIVE_CPU_BACKENDS or [pytest.param("cpu", marks=pytest.mark.skip("not built"))])
@pytest.mark.parametrize("op", sorted(CASES))
def test_bit_exact_with_reference(backend, op):
    kernel = registry.get(backend).kernels.get(op)
    if kernel is None:
        pytest.skip(f"{backend} has no {op} kernel (dispatch falls back to the reference)")
    reference = registry.get("reference").kernels.get(op)
    count = 0
    for count, args in enumerate(CASES[op](), start=1):
        if op.endswith(".out"):
            got_out, want_out = args[-1].clone(), args[-1].clone()
            kernel(*args[:-1], got_out)
            reference(*args[:-1], want_out)
            got, want = got_out, want_out
        else:
            got, want = kernel(*args), reference(*args)
        context = f"{backend}.{op} case {count}: " + ", ".join(
            f"{tuple(a.shape)} {a.dtype}" if isinstance(a, torch.Tensor) else repr(a) for a in args
        )
        _exact(got, want, context)
    assert count > 0
