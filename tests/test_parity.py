"""Every native backend against the reference backend, op by op, on the same inputs.

Agreement required (DESIGN.md §5): quantize and dequantize bit-exact (bytes and absmax),
int8 products exact, float matmuls within what accumulation order explains.
Each backend's kernel is called directly, bypassing dispatch, so the reference cannot mask it.
The native CPU backend is checked once per instruction set this machine can run (scalar, avx2,
avx512: ``isa`` in the test ids), switching its kernels with ``native.use_cpu_isa``.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
from collections.abc import Iterator

import pytest
import torch

from lowbit.backends.cpu import native
from lowbit.backends.reference.quantize_4bit import decode_4bit
from lowbit.core import formats, registry
from support import FLOAT_DTYPES, NATIVE_CPU_BACKENDS

#: The CPU instruction sets the native backend can run here (its kernels exist once per ISA).
CPU_ISAS = native.supported_isas() if native.load_error() is None else []

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
    for qt, bs, dtype, n in itertools.product(
        formats.QUANT_TYPES, (32, 64, 256, 4096), FLOAT_DTYPES, LENGTHS
    ):
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


def _with_out(
    cases: Iterator[tuple], shape_of_output, dtype_of_output=lambda args: args[-1]
) -> Iterator[tuple]:
    for args in cases:
        yield (*args, torch.full(shape_of_output(args), float("nan"), dtype=dtype_of_output(args)))


CASES = {
    "quantize_4bit": _cases_quantize_4bit,
    "dequantize_4bit": _cases_dequantize_4bit,
    "dequantize_4bit.out": lambda: _with_out(_cases_dequantize_4bit(), lambda a: a[4]),
    "quantize_blockwise": _cases_quantize_blockwise,
    "dequantize_blockwise": _cases_dequantize_blockwise,
    "dequantize_blockwise.out": lambda: _with_out(_cases_dequantize_blockwise(), lambda a: a[0].shape),
}

# Weight shapes (N, K) for the 4-bit products. Across blocksizes 32..4096 they cover every path of
# csrc/cpu/gemv_4bit.cpp: K % blocksize == 0 with blocks larger and smaller than the kernels'
# 64/128-weight chunks, K % blocksize != 0 (blocks straddling rows), K % 8 != 0 (rows starting
# mid-byte), K not a multiple of the chunk (a partial last chunk), odd N and a single output row.
PRODUCT_SHAPES = ((5, 4096), (7, 256), (3, 576), (6, 160), (33, 136), (9, 1000), (3, 1001), (1, 40), (11, 8), (2, 4104))


def _product_cases(rows: Iterator[tuple[int, ...]], with_bias: bool) -> Iterator[tuple]:
    """(A, B, shapeB, absmax, code, blocksize[, bias]) for every quant type x blocksize x shape x dtype;
    the leading shape of A cycles through ``rows``."""
    g = torch.Generator().manual_seed(1)
    combos = itertools.product(formats.QUANT_TYPES, formats.BLOCKSIZES, PRODUCT_SHAPES, FLOAT_DTYPES)
    for (qt, bs, (N, K), dtype), lead in zip(combos, itertools.cycle(rows)):
        W = torch.randn(N, K, generator=g)
        B, absmax = registry.get("reference").kernels.get("quantize_4bit")(W, bs, qt, torch.uint8)
        A = torch.randn(*lead, K, generator=g).to(dtype)
        args = (A, B, [N, K], absmax, formats.code_tensor(qt), bs)
        if with_bias:
            yield (*args, None if N % 2 else torch.randn(N, generator=g).to(dtype))
        else:
            yield args


def _cases_gemv_4bit() -> Iterator[tuple]:
    # 1..8 rows (the fused kernel), more (the GEMM path), and a 3-D A
    return _product_cases([(m,) for m in range(1, 9)] + [(9,), (2, 3)], with_bias=False)


def _cases_matmul_4bit() -> Iterator[tuple]:
    return _product_cases([(1,), (8,), (2, 3), (17,), (4, 33)], with_bias=True)


#: Float matmuls: checked within the accumulation-order tolerance of _close (not bit for bit).
PRODUCT_CASES = {
    "gemv_4bit": _cases_gemv_4bit,
    "gemv_4bit.out": lambda: _with_out(
        _cases_gemv_4bit(), lambda a: (*a[0].shape[:-1], a[2][0]), lambda a: a[0].dtype
    ),
    "matmul_4bit": _cases_matmul_4bit,
}


_SAME_WIDTH_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bit patterns, so that -0.0 vs 0.0 and NaN payloads count as differences."""
    return t.view(_SAME_WIDTH_INT[t.element_size()]) if t.is_floating_point() else t


def _exact(got, want, context: str) -> None:
    if isinstance(want, torch.Tensor):
        assert got.dtype == want.dtype and got.shape == want.shape, (
            f"{context}: {got.dtype}{tuple(got.shape)}"
        )
        differ = (_bits(got) != _bits(want)).sum().item()
        assert differ == 0, f"{context}: {differ} elements differ"
    else:
        assert len(got) == len(want), context
        for i, (a, b) in enumerate(zip(got, want)):
            _exact(a, b, f"{context}[{i}]")


_MANTISSA_BITS = {torch.float16: 10, torch.bfloat16: 7}


def _close(got: torch.Tensor, want: torch.Tensor, args: tuple, context: str) -> None:
    """A product within what accumulation order explains.

    Both sides compute sum_k A[m, k] * W[n, k] in float32, in different orders (blocked BLAS vs
    per-lane sums scaled by absmax once per block, with FMA). Each partial sum is bounded by
    S = sum_k |A[m, k] * W[n, k]|, and the rounding errors of K additions behave like a random
    walk: observed differences stay below 1.3 * sqrt(K) * 2^-24 * S, so the bound is
    8 * sqrt(K) * 2^-24 * S (a dropped or doubled term, ~S/K, still exceeds it for K <= 4096).
    A 16-bit output rounds each side's float32 once more: plus one unit in the last place of the
    output dtype. A bias adds its magnitude to S.
    """
    A, B, shapeB, absmax, code, blocksize = args[:6]
    N, K = shapeB
    assert got.dtype == want.dtype and got.shape == want.shape, f"{context}: {got.dtype}{tuple(got.shape)}"
    W = decode_4bit(B, absmax, code, blocksize, N * K).view(N, K).double()
    S = A.double().reshape(-1, K).abs() @ W.abs().t()
    bias = args[6] if len(args) > 6 and isinstance(args[6], torch.Tensor) else None
    if bias is not None:
        S = S + bias.double().abs()
    tol = 8 * math.sqrt(K) * 2.0**-24 * S
    g, w = got.double().reshape(-1, N), want.double().reshape(-1, N)
    if got.dtype != torch.float32:
        # one ulp of the larger side: |x| in [2^e, 2^(e+1)) has ulp 2^(e - mantissa bits)
        larger = torch.maximum(g.abs(), w.abs()).clamp(min=torch.finfo(got.dtype).smallest_normal)
        tol = tol + torch.exp2((torch.frexp(larger)[1] - 1 - _MANTISSA_BITS[got.dtype]).double())
    bad = ((g - w).abs() > tol) | (g.isnan() != w.isnan())
    assert not bad.any(), (
        f"{context}: {int(bad.sum())} outputs differ, worst {(g - w).abs().max().item():.3g}"
    )


@contextlib.contextmanager
def _running(backend: str, isa: str):
    """Run the block with the native CPU kernels of ``isa`` ("-" for backends without ISAs)."""
    if isa == "-":
        yield
    else:
        with native.use_cpu_isa(isa):
            yield


@functools.lru_cache(maxsize=1)  # the ISA varies fastest in the test order: compute each reference once
def _reference_results(op: str) -> list[tuple]:
    reference = registry.get("reference").kernels.get(op)
    cases = {**CASES, **PRODUCT_CASES}[op]
    results = []
    for args in cases():
        if op.endswith(".out"):
            want = args[-1].clone()
            reference(*args[:-1], want)
        else:
            want = reference(*args)
        results.append((args, want))
    return results


def _isa_params(backend: str) -> list[str]:
    return CPU_ISAS if backend == "cpu" else ["-"]


_BACKEND_ISA = [(b, isa) for b in NATIVE_CPU_BACKENDS for isa in _isa_params(b)] or [
    pytest.param("cpu", "-", marks=pytest.mark.skip("not built"))
]


@pytest.mark.skipif(not NATIVE_CPU_BACKENDS, reason="no native CPU backend is built")
@pytest.mark.parametrize("backend", NATIVE_CPU_BACKENDS)
def test_every_native_kernel_has_parity_cases(backend):
    untested = set(registry.get(backend).kernels.names()) - set(CASES) - set(PRODUCT_CASES)
    assert not untested, f"{backend} implements {sorted(untested)} without parity cases in test_parity.py"


def _run_cases(backend: str, isa: str, op: str, compare) -> None:
    kernel = registry.get(backend).kernels.get(op)
    if kernel is None:
        pytest.skip(f"{backend} has no {op} kernel (dispatch falls back to the reference)")
    count = 0
    with _running(backend, isa):
        for count, (args, want) in enumerate(_reference_results(op), start=1):
            if op.endswith(".out"):
                got = args[-1].clone()
                args = args[:-1]
                kernel(*args, got)
            else:
                got = kernel(*args)
            context = f"{backend}[{isa}].{op} case {count}: " + ", ".join(
                f"{tuple(a.shape)} {a.dtype}" if isinstance(a, torch.Tensor) else repr(a) for a in args
            )
            compare(got, want, args, context)
    assert count > 0


@pytest.mark.parametrize(("backend", "isa"), _BACKEND_ISA)
@pytest.mark.parametrize("op", sorted(CASES))
def test_bit_exact_with_reference(backend, isa, op):
    _run_cases(backend, isa, op, lambda got, want, args, context: _exact(got, want, context))


@pytest.mark.parametrize(("backend", "isa"), _BACKEND_ISA)
@pytest.mark.parametrize("op", sorted(PRODUCT_CASES))
def test_products_close_to_reference(backend, isa, op):
    _run_cases(backend, isa, op, _close)
