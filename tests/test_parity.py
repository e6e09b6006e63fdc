"""Every native backend against the reference backend, op by op, on the same inputs.

Agreement required (docs/design.md §5): quantize and dequantize bit-exact (bytes and absmax),
int8 products exact, float matmuls within what accumulation order explains.
Each backend's kernel is called directly, bypassing dispatch, so the reference cannot mask it.
The native CPU backend is checked once per instruction set this machine can run (scalar, avx2,
avx512: ``isa`` in the test ids), switching its kernels with ``native.use_cpu_isa``. The triton
backend takes part under Triton's interpreter (TRITON_INTERPRET=1, ``nox -s triton``) with the
same cases on smaller sizes (:data:`INTERPRETED`).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
from collections.abc import Iterator
from typing import NamedTuple

import pytest
import torch

from lowbit.backends.cpu import native
from lowbit.backends.reference.quantize_4bit import decode_4bit
from lowbit.core import formats, registry
from support import FLOAT_DTYPES, NATIVE_CPU_BACKENDS, fixed_point_bound

#: The CPU instruction sets the native backend can run here (its kernels exist once per ISA).
CPU_ISAS = native.supported_isas() if native.load_error() is None else []


class Sizes(NamedTuple):
    """The sizes the cases are generated for."""

    lengths: tuple[int, ...]  # of the 4-bit and 8-bit blockwise tensors
    product_shapes: tuple[tuple[int, int], ...]  # (N, K) of the 4-bit products' weights
    optimizer_lengths: tuple[int, ...]  # of the optimizer steps' parameters


LENGTHS = (1, 2, 3, 63, 64, 65, 1000, 4096 * 3 + 7, 300_001)


def _input(n: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * 3
    if n > 200:
        x[:128] = 0  # all-zero blocks
        x[130:140] = torch.tensor([1e-30, -1e-30, 1e-38, 3e-39, -0.0, 0.0, 1.0, -1.0, 65504.0, -65504.0])
    return x.to(dtype)


def _cases_quantize_4bit(sizes: Sizes) -> Iterator[tuple]:
    for qt, bs, dtype, n in itertools.product(formats.QUANT_TYPES, formats.BLOCKSIZES, FLOAT_DTYPES, sizes.lengths):
        storage = torch.uint8 if n % 4 else torch.float16
        yield (_input(n, dtype, n + bs), bs, qt, storage)


def _cases_dequantize_4bit(sizes: Sizes) -> Iterator[tuple]:
    reference = registry.get("reference").kernels.get("quantize_4bit")
    for qt, bs, dtype, n in itertools.product(
        formats.QUANT_TYPES, (32, 64, 256, 4096), FLOAT_DTYPES, sizes.lengths
    ):
        packed, absmax = reference(_input(n, torch.float32, n), bs, qt, torch.uint8)
        yield (packed, absmax, bs, qt, [n], dtype)


#: The 8-bit-only blocksizes above 4096 with lengths around them: (blocksize, length) pairs.
LARGE_8BIT = [(bs, n) for bs in formats.BLOCKSIZES_8BIT if bs not in formats.BLOCKSIZES for n in (1, 2 * bs + 3)]


def _cases_quantize_blockwise(sizes: Sizes) -> Iterator[tuple]:
    blocks = [(bs, n) for bs in formats.BLOCKSIZES for n in sizes.lengths] + LARGE_8BIT
    for signed, (bs, n), dtype in itertools.product((True, False), blocks, FLOAT_DTYPES):
        x = _input(n, dtype, n * bs)
        yield (x if signed else x.abs(), formats.dynamic_map(signed=signed), bs)


def _cases_dequantize_blockwise(sizes: Sizes) -> Iterator[tuple]:
    g = torch.Generator().manual_seed(0)
    blocks = [(bs, n) for bs in (64, 256, 4096) for n in sizes.lengths] + LARGE_8BIT
    for (bs, n), dtype in itertools.product(blocks, FLOAT_DTYPES):
        q = torch.randint(0, 256, (n,), generator=g, dtype=torch.uint8)
        absmax = torch.rand(formats.num_blocks(n, bs), generator=g) * 10
        yield (q, absmax, formats.dynamic_map(), bs, dtype)


def _with_out(
    cases: Iterator[tuple], shape_of_output, dtype_of_output=lambda args: args[-1]
) -> Iterator[tuple]:
    for args in cases:
        yield (*args, torch.full(shape_of_output(args), float("nan"), dtype=dtype_of_output(args)))


# The interleaved layout (CPU inference): interleavable shapes (K % blocksize == 0 at some blocksizes),
# whole 16-row groups and a shorter last group, single rows.
INTERLEAVED_SHAPES = ((37, 256), (16, 576), (5, 4096), (1, 128), (33, 1024))


def _interleaved_weights() -> Iterator[tuple]:
    """(quant_type, blocksize, shape, dtype, standard B, absmax, interleaved B, absmax) for every
    interleavable combination."""
    g = torch.Generator().manual_seed(2)
    reference = registry.get("reference").kernels
    combos = itertools.product(formats.QUANT_TYPES, formats.BLOCKSIZES, INTERLEAVED_SHAPES, FLOAT_DTYPES)
    for qt, bs, (N, K), dtype in combos:
        if not formats.can_interleave((N, K), bs):
            continue
        B, absmax = reference.get("quantize_4bit")(torch.randn(N, K, generator=g), bs, qt, torch.uint8)
        yield (qt, bs, (N, K), dtype, B, absmax, *reference.get("interleave_4bit")(B, absmax, [N, K], bs))


def _cases_interleave_4bit(sizes: Sizes) -> Iterator[tuple]:  # small shapes for every backend
    for _, bs, shape, dtype, B, absmax, _, _ in _interleaved_weights():
        if dtype == torch.float32:
            yield (B.reshape(-1).view(torch.float16).unsqueeze(1), absmax, list(shape), bs)  # any storage dtype


def _cases_deinterleave_4bit(sizes: Sizes) -> Iterator[tuple]:  # small shapes for every backend
    for _, bs, shape, dtype, _, _, Bi, absmax_i in _interleaved_weights():
        if dtype == torch.float32:
            yield (Bi, absmax_i, list(shape), bs)


CASES = {
    "interleave_4bit": _cases_interleave_4bit,
    "deinterleave_4bit": _cases_deinterleave_4bit,
    "quantize_4bit": _cases_quantize_4bit,
    "dequantize_4bit": _cases_dequantize_4bit,
    "dequantize_4bit.out": lambda sizes: _with_out(_cases_dequantize_4bit(sizes), lambda a: a[4]),
    "quantize_blockwise": _cases_quantize_blockwise,
    "dequantize_blockwise": _cases_dequantize_blockwise,
    "dequantize_blockwise.out": lambda sizes: _with_out(_cases_dequantize_blockwise(sizes), lambda a: a[0].shape),
}

# Weight shapes (N, K) for the 4-bit products. Across blocksizes 32..4096 they cover every path of
# csrc/cpu/gemv_4bit.cpp: K % blocksize == 0 with blocks larger and smaller than the kernels'
# 64/128-weight chunks, K % blocksize != 0 (blocks straddling rows), K % 8 != 0 (rows starting
# mid-byte), K not a multiple of the chunk (a partial last chunk), odd N and a single output row.
PRODUCT_SHAPES = ((5, 4096), (7, 256), (3, 576), (6, 160), (33, 136), (9, 1000), (3, 1001), (1, 40), (11, 8), (2, 4104))


def _product_cases(sizes: Sizes, rows: Iterator[tuple[int, ...]], with_bias: bool) -> Iterator[tuple]:
    """(A, B, shapeB, absmax, code, blocksize[, bias]) for every quant type x blocksize x shape x dtype;
    the leading shape of A cycles through ``rows``."""
    g = torch.Generator().manual_seed(1)
    combos = itertools.product(formats.QUANT_TYPES, formats.BLOCKSIZES, sizes.product_shapes, FLOAT_DTYPES)
    for (qt, bs, (N, K), dtype), lead in zip(combos, itertools.cycle(rows)):
        W = torch.randn(N, K, generator=g)
        B, absmax = registry.get("reference").kernels.get("quantize_4bit")(W, bs, qt, torch.uint8)
        A = torch.randn(*lead, K, generator=g).to(dtype)
        args = (A, B, [N, K], absmax, formats.code_tensor(qt), bs)
        if with_bias:
            yield (*args, None if N % 2 else torch.randn(N, generator=g).to(dtype))
        else:
            yield args


def _cases_gemv_4bit(sizes: Sizes) -> Iterator[tuple]:
    # 1..8 rows (the fused kernel), more (the GEMM path), and a 3-D A
    return _product_cases(sizes, [(m,) for m in range(1, 9)] + [(9,), (2, 3)], with_bias=False)


def _cases_matmul_4bit(sizes: Sizes) -> Iterator[tuple]:
    return _product_cases(sizes, [(1,), (8,), (2, 3), (17,), (4, 33)], with_bias=True)


def _cases_matmul_4bit_interleaved(sizes: Sizes) -> Iterator[tuple]:  # small shapes for every backend
    """Every pass size of rows of A (1..8, then several passes) with and without bias, both
    precisions."""
    g = torch.Generator().manual_seed(3)
    leads = itertools.cycle([(1,), (2,), (3,), (4,), (5,), (6,), (7,), (8,), (9,), (17,), (2, 3), (64,)])
    for case, ((qt, bs, shape, dtype, _, _, Bi, absmax_i), lead) in enumerate(zip(_interleaved_weights(), leads)):
        A = torch.randn(*lead, shape[1], generator=g).to(dtype)
        bias = torch.randn(shape[0], generator=g).to(dtype) if case % 2 else None
        yield (A, Bi, list(shape), absmax_i, formats.code_tensor(qt), bs, bias, case % 3 != 0)


#: Float matmuls: checked within the accumulation-order tolerance of _close (not bit for bit).
PRODUCT_CASES = {
    "gemv_4bit": _cases_gemv_4bit,
    "gemv_4bit.out": lambda sizes: _with_out(
        _cases_gemv_4bit(sizes), lambda a: (*a[0].shape[:-1], a[2][0]), lambda a: a[0].dtype
    ),
    "matmul_4bit": _cases_matmul_4bit,
    "matmul_4bit_interleaved": _cases_matmul_4bit_interleaved,
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


def _close(
    got: torch.Tensor, want: torch.Tensor, args: tuple, context: str, relative: float = 0.0, absolute=0.0
) -> None:
    """A product within what accumulation order explains.

    Both sides compute sum_k A[m, k] * W[n, k] in float32, in different orders (blocked BLAS vs
    per-lane sums scaled by absmax once per block, with FMA). Each partial sum is bounded by
    S = sum_k |A[m, k] * W[n, k]|, and the rounding errors of K additions behave like a random
    walk: observed differences stay below 1.3 * sqrt(K) * 2^-24 * S, so the bound is
    8 * sqrt(K) * 2^-24 * S (a dropped or doubled term, ~S/K, still exceeds it for K <= 4096).
    A 16-bit output rounds each side's float32 once more: plus one unit in the last place of the
    output dtype. A bias adds its magnitude to S. ``relative`` adds relative * S (roundings of the
    operands that the two sides do differently), ``absolute`` a bound per output.
    """
    A, B, shapeB, absmax, code, blocksize = args[:6]
    N, K = shapeB
    assert got.dtype == want.dtype and got.shape == want.shape, f"{context}: {got.dtype}{tuple(got.shape)}"
    W = decode_4bit(B, absmax, code, blocksize, N * K).view(N, K).double()
    S = A.double().reshape(-1, K).abs() @ W.abs().t()
    bias = args[6] if len(args) > 6 and isinstance(args[6], torch.Tensor) else None
    if bias is not None:
        S = S + bias.double().abs()
    tol = (8 * math.sqrt(K) * 2.0**-24 + relative) * S
    if isinstance(absolute, torch.Tensor):
        absolute = absolute.reshape(-1, N)
    tol = tol + absolute
    g, w = got.double().reshape(-1, N), want.double().reshape(-1, N)
    if got.dtype != torch.float32:
        # one ulp of the larger side: |x| in [2^e, 2^(e+1)) has ulp 2^(e - mantissa bits)
        larger = torch.maximum(g.abs(), w.abs()).clamp(min=torch.finfo(got.dtype).smallest_normal)
        tol = tol + torch.exp2((torch.frexp(larger)[1] - 1 - _MANTISSA_BITS[got.dtype]).double())
    bad = ((g - w).abs() > tol) | (g.isnan() != w.isnan())
    assert not bad.any(), (
        f"{context}: {int(bad.sum())} outputs differ, worst {(g - w).abs().max().item():.3g}"
    )


def _close_interleaved(got: torch.Tensor, want: torch.Tensor, args: tuple, context: str) -> None:
    """_close on the standard layout. With exact=False (the fast precision) the reference computes
    the 16-bit fixed-point product, and a backend may compute that, float32 products, or round
    each weight and element of A to bf16 once (2^-9 relative each): 2^-7 of S plus twice the fixed
    point's bound covers any two of them."""
    A, B, shapeB, absmax, code, blocksize, bias, exact = args
    B, absmax = registry.get("reference").kernels.get("deinterleave_4bit")(B, absmax, shapeB, blocksize)
    standard = (A, B, shapeB, absmax, code, blocksize, bias)
    if exact:
        _close(got, want, standard, context)
    else:
        bound = fixed_point_bound(A, absmax, code, shapeB)
        _close(got, want, standard, context, 2.0**-7, absolute=2 * bound.view(*got.shape[:-1], -1))


#: How each float product is compared with the reference (default: _close).
PRODUCT_COMPARE = {"matmul_4bit_interleaved": _close_interleaved}


@contextlib.contextmanager
def _running(backend: str, isa: str):
    """Run the block with the native CPU kernels of ``isa`` ("-" for backends without ISAs)."""
    if isa == "-":
        yield
    else:
        with native.use_cpu_isa(isa):
            yield


@functools.lru_cache(maxsize=1)  # the backend varies fastest in the test order: compute each reference once
def _reference_results(op: str, sizes: Sizes) -> list[tuple]:
    reference = registry.get("reference").kernels.get(op)
    cases = {**CASES, **PRODUCT_CASES}[op]
    results = []
    for args in cases(sizes):
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
    untested = (
        set(registry.get(backend).kernels.names()) - set(CASES) - set(PRODUCT_CASES) - set(OPTIMIZER_CASES)
        - set(INT8_CASES)
    )
    assert not untested, f"{backend} implements {sorted(untested)} without parity cases in test_parity.py"


def _run_cases(backend: str, isa: str, op: str, compare, results=None) -> None:
    """Run every case of ``op`` (``results(op)``: (args, reference output) pairs; the 4-bit/8-bit
    cases in the backend's sizes by default) on ``backend``'s kernel and ``compare`` with the
    reference output."""
    kernel = registry.get(backend).kernels.get(op)
    if kernel is None:
        pytest.skip(f"{backend} has no {op} kernel (dispatch falls back to the reference)")
    count = 0
    with _running(backend, isa):
        pairs = results(op) if results else _reference_results(op, _sizes(backend))
        for count, (args, want) in enumerate(pairs, start=1):
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
    _run_cases(backend, isa, op, PRODUCT_COMPARE.get(op, _close))


# ------------------------------------------------------------------------------------------------
# Optimizer steps (in place): csrc/cpu/optimizers.cpp against lowbit/backends/reference/optimizers.py
# ------------------------------------------------------------------------------------------------
#
# What must agree, and why not everything bit for bit: the native kernels reproduce the reference's
# float32 operations one by one, including the fused multiply-adds of torch's add_(alpha=...) and
# addcmul_ (csrc/common/lowbit_optim.h), except the square root: torch.sqrt on the CPU runs MKL's
# vsSqrt, which is within 0.75 ulp but not correctly rounded, while every native backend rounds
# correctly. No state depends on a square root within one step, so
#   * states (32-bit), 8-bit codes and absmax: bit-identical, every optimizer;
#   * parameters of momentum/lars and lion (no square root): bit-identical;
#   * parameters of adam/adamw/ademamix/rmsprop/adagrad: within one unit in the last place of p's
#     dtype plus 2^-20 of the step's magnitude (|p_ref - p_in| + lr*wd*|p_in|): a one-ulp
#     difference of the square root changes the update by at most ~2^-22 relatively;
#   * lamb/lars (32-bit, max_unorm > 0): the update norm is a float32 reduction whose summation
#     order differs from torch.norm's (native: double sums), so unorm_vec agrees within 1e-5
#     relative and the parameters within one ulp plus 2^-16 of the step.
# A NaN matches a NaN (torch's and the CPU's NaN payloads differ).

from lowbit.core.ops import OPTIMIZER_8BIT_BLOCKSIZE, OPTIMIZERS, OPTIMIZERS_TWO_STATES  # noqa: E402

OPTIMIZER_LENGTHS = (1, 255, 257, 4096 * 3 + 7, 70_001)
#: The sizes of every backend but those under Triton's interpreter.
FULL = Sizes(LENGTHS, PRODUCT_SHAPES, OPTIMIZER_LENGTHS)
#: Triton's interpreter runs a kernel one program at a time in Python (~0.1 ms per tensor operation
#: per program): there the same cases run on smaller tensors, keeping every tail, dtype and
#: blocksize, and inputs that span several of the interpreter's 16384-element tiles.
INTERPRETED = Sizes(
    lengths=(1, 3, 64, 65, 1000, 40_001),
    # K % blocksize == 0 or not, blocks straddling rows (K = 8), rows starting mid-byte (odd K),
    # several K steps with a partial last one (4104), several programs along N (33)
    product_shapes=((7, 256), (3, 1001), (33, 136), (11, 8), (2, 4104)),
    optimizer_lengths=(1, 257, 40_001),
)
INTERPRETED_BACKENDS = ("triton",)


def _sizes(backend: str) -> Sizes:
    return INTERPRETED if backend in INTERPRETED_BACKENDS else FULL


_SQRT_OPTIMIZERS = ("adam", "adamw", "lamb", "ademamix", "rmsprop", "adagrad")
_TRUST_OPTIMIZERS = ("lamb", "lars")


def _optim_states(name: str, n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Plausible float states: first moments signed, second moments (and rmsprop/adagrad's
    state1) non-negative; the first 256 values zero (an all-zero 8-bit block) when n > 512."""
    copies = 2 if name == "ademamix" else 1
    s1 = torch.randn(copies * n, generator=g) * 0.01
    if name in ("rmsprop", "adagrad"):
        s1 = s1.abs() * 0.1
    s2 = torch.rand(n, generator=g) * 1e-4
    if n > 512:
        s1.view(copies, n)[:, :256] = 0
        s2[:256] = 0
    return s1, s2


def _optim_hyper(name: str, case: int) -> dict:
    return dict(
        beta1=0.9, beta2=0.999, beta3=0.9999, alpha=5.0, eps=1e-8,
        weight_decay=0.0 if case % 2 else 1e-2, step=1 if case % 3 == 0 else 3 + case % 5,
        lr=1e-3 if name != "momentum" else 1e-2, gnorm_scale=1.0 if case % 4 else 0.5,
    )  # fmt: skip


def _cases_optimizer_update_32bit(sizes: Sizes) -> Iterator[tuple]:
    for case, (name, dtype, n) in enumerate(itertools.product(OPTIMIZERS, FLOAT_DTYPES, sizes.optimizer_lengths)):
        g = torch.Generator().manual_seed(1000 + case)
        p = torch.randn(n, generator=g).to(dtype)
        grad = (torch.randn(n, generator=g) * 0.1).to(dtype)
        s1, s2 = _optim_states(name, n, g)
        h = _optim_hyper(name, case)
        max_unorm = 0.02 if name in _TRUST_OPTIMIZERS else 0.0
        param_norm = float(p.float().norm())
        yield (
            name, grad, p, s1, s2 if name in OPTIMIZERS_TWO_STATES else None, torch.zeros(1), max_unorm, param_norm,
            h["beta1"], h["beta2"], h["beta3"], h["alpha"], h["eps"], h["weight_decay"], h["step"], h["lr"],
            h["gnorm_scale"],
        )  # fmt: skip


#: Gradient elements that must not spread beyond their own element in an 8-bit step (the
#: non-finite policy of csrc/common/lowbit_optim.h): NaN, +-Inf, and 1e30, whose square overflows.
NONFINITE_GRADIENTS = {3: float("nan"), 100: float("inf"), 200: float("-inf"), 256: 1e30}


def _cases_optimizer_update_8bit_blockwise(sizes: Sizes) -> Iterator[tuple]:
    quantize = registry.get("reference").kernels.get("quantize_blockwise")
    signed, unsigned = formats.dynamic_map(signed=True), formats.dynamic_map(signed=False)
    for case, (name, dtype, n) in enumerate(itertools.product(OPTIMIZERS, FLOAT_DTYPES, sizes.optimizer_lengths)):
        g = torch.Generator().manual_seed(2000 + case)
        p = torch.randn(n, generator=g).to(dtype)
        grad = (torch.randn(n, generator=g) * 0.1).to(dtype)
        if n > 4096:  # the long cases: a bad element in the first two blocks, the others stay clean
            for index, value in NONFINITE_GRADIENTS.items():
                grad[index] = value
        s1, s2 = _optim_states(name, n, g)
        copies = 2 if name == "ademamix" else 1
        q1, a1 = zip(*(quantize(s, signed, OPTIMIZER_8BIT_BLOCKSIZE) for s in s1.view(copies, n)))
        q1, a1 = torch.cat(q1), torch.cat(a1)
        two = name in OPTIMIZERS_TWO_STATES
        q2, a2 = quantize(s2, unsigned, OPTIMIZER_8BIT_BLOCKSIZE) if two else (None, None)
        h = _optim_hyper(name, case)
        yield (
            name, grad, p, q1, q2, h["beta1"], h["beta2"], h["beta3"], h["alpha"], h["eps"], h["step"], h["lr"],
            signed, unsigned if two else None, a1, a2, h["weight_decay"], h["gnorm_scale"],
        )  # fmt: skip


#: op -> (cases, indices of the arguments the step writes)
OPTIMIZER_CASES = {
    "optimizer_update_32bit": (_cases_optimizer_update_32bit, (2, 3, 4, 5)),  # p, state1, state2, unorm_vec
    "optimizer_update_8bit_blockwise": (_cases_optimizer_update_8bit_blockwise, (2, 3, 4, 14, 15)),  # p, states, absmax
}


def _clone_args(args: tuple) -> tuple:
    return tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)


@functools.lru_cache(maxsize=1)
def _optimizer_reference_results(op: str, sizes: Sizes) -> list[tuple]:
    reference = registry.get("reference").kernels.get(op)
    cases, written = OPTIMIZER_CASES[op]
    results = []
    for args in cases(sizes):
        after = _clone_args(args)
        reference(*after)
        results.append((args, tuple(after[i] for i in written)))
    return results


def _same_bits_or_both_nan(got: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    same = _bits(got) == _bits(want)
    if got.is_floating_point():
        same |= got.isnan() & want.isnan()
    return same


def _param_tolerance(name: str, args: tuple, p_in: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    lr, wd = (args[15], args[13]) if len(args) == 17 else (args[11], args[16])
    w, p0 = want.double(), p_in.double()
    step = (w - p0).abs() + p0.abs() * lr * wd
    rel = 2.0**-16 if name in _TRUST_OPTIMIZERS and len(args) == 17 else 2.0**-20
    mantissa = {torch.float32: 23, **_MANTISSA_BITS}[want.dtype]
    exponent = torch.frexp(w.abs().clamp(min=torch.finfo(want.dtype).smallest_normal))[1]
    ulp = torch.exp2((exponent - 1 - mantissa).double())  # of |want|, as in _close
    return ulp + rel * step


def _compare_optimizer_step(op: str, args: tuple, got: tuple, want: tuple, context: str) -> None:
    name = args[0]
    labels = ("p", "state1", "state2", "unorm_vec") if op == "optimizer_update_32bit" else (
        "p", "state1", "state2", "absmax1", "absmax2")  # fmt: skip
    for label, g_t, w_t in zip(labels, got, want):
        if w_t is None:
            continue
        where = f"{context}: {label}"
        assert g_t.dtype == w_t.dtype and g_t.shape == w_t.shape, where
        if label == "unorm_vec":
            if args[6] > 0.0:
                torch.testing.assert_close(g_t, w_t, rtol=1e-5, atol=0, msg=where)
            continue
        if label != "p" or name not in _SQRT_OPTIMIZERS + _TRUST_OPTIMIZERS:
            differ = int((~_same_bits_or_both_nan(g_t, w_t)).sum())
            assert differ == 0, f"{where}: {differ} of {w_t.numel()} elements differ"
            continue
        tol = _param_tolerance(name, args, args[2], w_t)
        bad = ((g_t.double() - w_t.double()).abs() > tol) & ~_same_bits_or_both_nan(g_t, w_t)
        assert not bad.any(), (
            f"{where}: {int(bad.sum())} of {w_t.numel()} outside tolerance, worst "
            f"{(g_t.double() - w_t.double()).abs().max().item():.3g}"
        )


@pytest.mark.parametrize(("backend", "isa"), _BACKEND_ISA)
@pytest.mark.parametrize("op", sorted(OPTIMIZER_CASES))
def test_optimizer_steps_match_reference(backend, isa, op):
    kernel = registry.get(backend).kernels.get(op)
    if kernel is None:
        pytest.skip(f"{backend} has no {op} kernel (dispatch falls back to the reference)")
    written = OPTIMIZER_CASES[op][1]
    count = 0
    with _running(backend, isa):
        for count, (args, want) in enumerate(_optimizer_reference_results(op, _sizes(backend)), start=1):
            mine = _clone_args(args)
            kernel(*mine)
            context = f"{backend}[{isa}].{op} case {count}: {args[0]} {args[2].dtype} n={args[2].numel()}"
            _compare_optimizer_step(op, args, tuple(mine[i] for i in written), want, context)
    assert count > 0


def _bad_optimizer_args(op: str) -> Iterator[tuple[str, tuple]]:
    """(name of the argument that is wrong, arguments) for adamw with a 300-element parameter."""
    n = 300
    p, g = torch.zeros(n), torch.zeros(n)
    if op == "optimizer_update_32bit":
        good = ("adamw", g, p, torch.zeros(n), torch.zeros(n), None, 0.0, 0.0, 0.9, 0.999, 0.0, 0.0, 1e-8, 0.0, 1, 1e-3, 1.0)
        s1, s2 = 3, 4
        dtype = torch.float32
    else:
        code = formats.dynamic_map()
        good = ("adamw", g, p, torch.zeros(n, dtype=torch.uint8), torch.zeros(n, dtype=torch.uint8), 0.9, 0.999, 0.0,
                0.0, 1e-8, 1, 1e-3, code, formats.dynamic_map(signed=False), torch.zeros(2), torch.zeros(2), 0.0, 1.0)  # fmt: skip
        s1, s2 = 3, 4
        dtype = torch.uint8

    def with_(i, value):
        return good[:i] + (value,) + good[i + 1 :]

    yield "state1", with_(s1, torch.zeros(n + 1, dtype=dtype))  # size
    yield "state2", with_(s2, torch.zeros(n, dtype=torch.float16))  # dtype
    yield "g", with_(1, torch.zeros(n, dtype=torch.float16))  # dtype differs from p
    yield "g", with_(1, torch.zeros(n, device="meta"))  # device (checked by the op layer's check: see below)
    yield "state2", with_(s2, None)  # adamw needs it
    if op == "optimizer_update_8bit_blockwise":
        yield "absmax1", with_(14, torch.zeros(3))
        yield "qmap1", with_(12, formats.dynamic_map().flip(0).contiguous())  # unsorted


@pytest.mark.skipif(not NATIVE_CPU_BACKENDS, reason="no native CPU backend is built")
@pytest.mark.parametrize("op", sorted(OPTIMIZER_CASES))
def test_optimizer_bad_inputs_name_the_argument(op, monkeypatch):
    """Rejected by the op layer before a native kernel (and so any pointer) is reached."""
    import lowbit

    kernel_calls = []
    cpu_kernels = registry.get("cpu").kernels
    monkeypatch.setitem(cpu_kernels._kernels, op, lambda *a: kernel_calls.append(a))
    with lowbit.backends.use("cpu"):
        for argument, args in _bad_optimizer_args(op):
            # a meta tensor sends torch.ops to the fake kernel (nothing runs): call the op's check
            on_meta = any(isinstance(a, torch.Tensor) and a.device.type == "meta" for a in args)
            call = getattr(lowbit.core.ops, f"_check_{op}") if on_meta else getattr(torch.ops.lowbit, op)
            with pytest.raises((ValueError, TypeError), match=argument):
                call(*args)
    assert not kernel_calls


# ------------------------------------------------------------------------------------------------
# LLM.int8: csrc/cpu/int8.cpp against lowbit/backends/reference/int8.py, every output bit-exact
# ------------------------------------------------------------------------------------------------
# The int32 product is exact on every ISA (VNNI, int16 madd, scalar); quantization, dequantization
# and the epilogues repeat the reference's float32 operations one by one (csrc/common/lowbit_int8.h).

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

INT8_THRESHOLDS = (0.0, 6.0, 6.1, 1e10, 1e-50)  # 1e10: +Inf in fp16; 1e-50: 0 in every dtype (reference)
# (M, K, N) of the int8 products: tails of every vector width (K % 16/32/64), partial tiles (M % 6,
# N % 4), an M block beyond 96 rows, K blocks beyond 4096, and K = 2**17 - 1 (the largest K whose
# products of -128 * -128 still fit int32).
INT8_MATMUL_SHAPES = (
    (1, 1, 1), (3, 5, 7), (2, 64, 4), (6, 63, 5), (7, 65, 9), (13, 129, 17), (32, 4096, 33), (70, 200, 13),
    (97, 130, 6), (100, 4200, 5), (5, 8192 + 17, 3), (2, 2**17 - 1, 3),
)  # fmt: skip


def _int8_matrix(shape, g: torch.Generator, extremes: bool = True) -> torch.Tensor:
    """Random int8 values with -128 and 127 over-represented (one element in eight)."""
    x = torch.randint(-128, 128, shape, dtype=torch.int8, generator=g)
    if extremes:
        pick = torch.randint(0, 16, shape, generator=g)
        x[pick == 0] = -128
        x[pick == 1] = 127
    return x


def _cases_int8_linear_matmul() -> Iterator[tuple]:
    g = torch.Generator().manual_seed(11)
    for i, (M, K, N) in enumerate(INT8_MATMUL_SHAPES):
        A = _int8_matrix((M, K), g)
        B = _int8_matrix((N, K), g)
        if i % 4 == 0 or K == 2**17 - 1:  # the largest products: -128 * -128 everywhere
            A.fill_(-128)
            B.fill_(-128)
        yield (A, B)
    yield (_int8_matrix((2, 3, 100), g), _int8_matrix((9, 100), g))  # 3-D A


def _int8_float_input(shape, dtype: torch.dtype, g: torch.Generator) -> torch.Tensor:
    """randn * 2 with outliers (|x| >= 6) in a few columns, an all-zero row, a row of outliers only,
    a row of subnormal values (1 / rowmax overflows float32) and -0.0."""
    x = torch.randn(shape, generator=g) * 2
    x2 = x.view(-1, shape[-1])
    rows, cols = x2.shape
    if cols > 3:
        x2[:, 3] *= 4
        x2[::3, cols // 2] = 7.5
        x2[0, 1] = 6.0  # exactly on the default threshold
    if rows > 2:
        x2[1] = 0.0
        x2[1, 0] = -0.0
        x2[2] = torch.where(torch.arange(cols) % 2 == 0, 9.0, -12.0)
    if rows > 4:
        x2[4] = torch.linspace(-1e-40, 1e-40, cols)
    return x.to(dtype)


INT8_QUANT_SHAPES = ((1, 1), (1, 17), (3, 16), (5, 100), (64, 33), (7, 1000), (2, 3, 40))


def _cases_int8_vectorwise_quant() -> Iterator[tuple]:
    g = torch.Generator().manual_seed(12)
    for shape, dtype, threshold in itertools.product(INT8_QUANT_SHAPES, FLOAT_DTYPES, INT8_THRESHOLDS):
        yield (_int8_float_input(shape, dtype, g), threshold)


def _cases_int8_vectorwise_dequant() -> Iterator[tuple]:
    g = torch.Generator().manual_seed(13)
    for shape in INT8_QUANT_SHAPES:
        A = _int8_matrix(shape, g)
        stats = torch.rand(A.numel() // shape[-1], generator=g) * 10
        stats[0] = 0.0
        yield (A, stats)


def _cases_int8_mm_dequant() -> Iterator[tuple]:
    g = torch.Generator().manual_seed(14)
    biases = (None, torch.float32, torch.float16, torch.bfloat16, torch.float64, "2-D")
    for i, (shape, dtype, bias_kind) in enumerate(
        itertools.product(((1, 1), (3, 17), (9, 100), (2, 3, 33)), (None, *FLOAT_DTYPES), biases)
    ):
        A = torch.randint(-(2**31), 2**31 - 1, shape, dtype=torch.int32, generator=g)
        if i % 3 == 0:
            A = A // 65536  # values a product of int8 rows takes
        rows, cols = A.numel() // shape[-1], shape[-1]
        row_stats = torch.rand(rows, generator=g) * 8
        col_stats = torch.rand(cols, generator=g) * 0.1
        col_stats[0] = 0.0
        if bias_kind is None:
            bias = None
        elif bias_kind == "2-D":
            bias = torch.randn(1, cols, generator=g)
        else:
            bias = torch.randn(cols, generator=g).to(bias_kind)
        yield (A, row_stats, col_stats, dtype, bias)


def _cases_int8_scaled_mm() -> Iterator[tuple]:
    g = torch.Generator().manual_seed(15)
    for i, (A, B) in enumerate(_cases_int8_linear_matmul()):
        if A.shape[-1] > 5000:
            continue
        rows, N = A.numel() // A.shape[-1], B.shape[0]
        bias = torch.randn(N, generator=g).to(FLOAT_DTYPES[i % 3]) if i % 2 else None
        yield (A, B, torch.rand(rows, generator=g) * 5, torch.rand(N, generator=g) * 0.1, bias,
               (None, *FLOAT_DTYPES)[i % 4])  # fmt: skip


def _cases_int8_mixed_scaled_mm() -> Iterator[tuple]:
    g = torch.Generator().manual_seed(16)
    reference = registry.get("reference").kernels
    for i, (shape, dtype, threshold) in enumerate(
        itertools.product(((4, 64), (2, 3, 40), (17, 130)), FLOAT_DTYPES, (0.0, 6.0))
    ):
        A = _int8_float_input(shape, dtype, g)
        K = shape[-1]
        W = torch.randn(11, K, generator=g)
        CB, SCB, _ = reference.get("int8_vectorwise_quant")(W, 0.0)
        CA, SCA, outliers = reference.get("int8_vectorwise_quant")(A, threshold)
        bias = torch.randn(11, generator=g).to(dtype) if i % 2 else None
        yield (A, CA, CB, SCA, SCB, outliers, bias)


INT8_CASES = {
    "int8_linear_matmul": _cases_int8_linear_matmul,
    "int8_linear_matmul.out": lambda: (  # out pre-filled with garbage: every element must be written
        (A, B, torch.full((*A.shape[:-1], B.shape[0]), -12345, dtype=torch.int32))
        for A, B in _cases_int8_linear_matmul()
    ),
    "int8_vectorwise_quant": _cases_int8_vectorwise_quant,
    "int8_double_quant": _cases_int8_vectorwise_quant,
    "int8_vectorwise_dequant": _cases_int8_vectorwise_dequant,
    "int8_mm_dequant": _cases_int8_mm_dequant,
    "int8_scaled_mm": _cases_int8_scaled_mm,
    "int8_mixed_scaled_mm": _cases_int8_mixed_scaled_mm,
}


def _int8_exact(got, want, context: str) -> None:
    """_exact, also for the optional outputs (outlier columns: None when threshold is 0)."""
    if want is None or isinstance(want, torch.Tensor):
        assert (got is None) == (want is None), f"{context}: {got!r} vs {want!r}"
        if want is not None:
            _exact(got, want, context)
        return
    assert len(got) == len(want), context
    for i, (a, b) in enumerate(zip(got, want)):
        _int8_exact(a, b, f"{context}[{i}]")


@functools.lru_cache(maxsize=1)
def _int8_reference_results(op: str) -> list[tuple]:
    reference = registry.get("reference").kernels.get(op)
    results = []
    for args in INT8_CASES[op]():
        if op.endswith(".out"):
            want = args[-1].clone()
            reference(*args[:-1], want)
        else:
            want = reference(*args)
        results.append((args, want))
    return results


def _run_int8_cases(backend: str, isa: str, op: str) -> None:
    _run_cases(
        backend, isa, op, lambda got, want, args, context: _int8_exact(got, want, context), _int8_reference_results
    )


@pytest.mark.parametrize(("backend", "isa"), _BACKEND_ISA)
@pytest.mark.parametrize("op", sorted(INT8_CASES))
def test_int8_bit_exact_with_reference(backend, isa, op):
    _run_int8_cases(backend, isa, op)


def _cpu_isas_with_vnni_off() -> list[str]:
    if "cpu" not in NATIVE_CPU_BACKENDS or "avx512_vnni" not in native.supported_cpu_features():
        return []
    return ["avx512"]


@pytest.mark.parametrize("isa", _cpu_isas_with_vnni_off() or [pytest.param("-", marks=pytest.mark.skip("no VNNI"))])
@pytest.mark.parametrize("op", ["int8_linear_matmul", "int8_scaled_mm"])
def test_int8_products_without_vnni(isa, op):
    """The AVX-512 int16 (vpmaddwd) path that CPUs without AVX512_VNNI take."""
    before = native.cpu_features()
    with native.use_cpu_features([]):
        assert native.cpu_features() == []
        _run_int8_cases("cpu", isa, op)
    assert native.cpu_features() == before and "avx512_vnni" in before


def _int8_isa_modes() -> list[tuple[str, tuple[str, ...]]]:
    """(isa, features) for every ISA the native library runs here, avx512 with and without VNNI."""
    if "cpu" not in NATIVE_CPU_BACKENDS:
        return []
    modes = [(isa, tuple(native.supported_cpu_features())) for isa in CPU_ISAS]
    if native.supported_cpu_features():
        modes.append((CPU_ISAS[-1], ()))
    return modes


@pytest.mark.skipif("cpu" not in NATIVE_CPU_BACKENDS, reason="native CPU backend not built")
@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    M=st.integers(1, 70),
    K=st.integers(1, 700).filter(lambda k: k % 64 != 0),
    N=st.integers(0, 20).map(lambda n: 2 * n + 1),
    seed=st.integers(0, 2**31 - 1),
)
def test_int8_random_shapes(M, K, N, seed):
    """Random shapes (K not a multiple of 64, N odd): the product, and the quantize -> product ->
    dequantize chain of LLM.int8, bit-exact on every ISA."""
    g = torch.Generator().manual_seed(seed)
    A, B = _int8_matrix((M, K), g), _int8_matrix((N, K), g)
    x = _int8_float_input((M, K), FLOAT_DTYPES[seed % 3], g)
    reference, cpu = registry.get("reference").kernels, registry.get("cpu").kernels
    want_mm = reference.get("int8_linear_matmul")(A, B)
    want_q = reference.get("int8_vectorwise_quant")(x, 6.0)
    col_stats = torch.rand(N, generator=g)
    want_out = reference.get("int8_mm_dequant")(
        reference.get("int8_linear_matmul")(want_q[0], B), want_q[1], col_stats, x.dtype, None
    )
    for isa, features in _int8_isa_modes():
        with native.use_cpu_isa(isa), native.use_cpu_features(list(features)):
            context = f"[{isa} {features}] M={M} K={K} N={N} seed={seed}"
            _int8_exact(cpu.get("int8_linear_matmul")(A, B), want_mm, f"int8_linear_matmul {context}")
            q = cpu.get("int8_vectorwise_quant")(x, 6.0)
            _int8_exact(q, want_q, f"int8_vectorwise_quant {context}")
            got_out = cpu.get("int8_mm_dequant")(
                cpu.get("int8_linear_matmul")(q[0], B), q[1], col_stats, x.dtype, None
            )
            _int8_exact(got_out, want_out, f"int8_mm_dequant {context}")


def _bad_int8_args() -> Iterator[tuple[str, str, tuple]]:
    """(op, name of the wrong argument, arguments)."""
    a8, b8 = torch.zeros(4, 64, dtype=torch.int8), torch.zeros(5, 64, dtype=torch.int8)
    x = torch.randn(4, 64)
    acc = torch.zeros(4, 5, dtype=torch.int32)
    yield "int8_linear_matmul", "A must have dtype int8", (x, b8)
    yield "int8_linear_matmul", "B must have dtype int8", (a8, b8.float())
    yield "int8_linear_matmul", "B must be 2-D", (a8, torch.zeros(5, 63, dtype=torch.int8))  # K mismatch
    yield "int8_linear_matmul.out", "out has shape", (a8, b8, torch.zeros(4, 6, dtype=torch.int32))
    yield "int8_linear_matmul.out", "out must have dtype int32", (a8, b8, torch.zeros(4, 5, dtype=torch.int64))
    yield "int8_vectorwise_quant", "A must have dtype", (a8, 0.0)
    yield "int8_vectorwise_quant", "threshold must be", (x, float("nan"))
    yield "int8_vectorwise_dequant", "stats must have dtype float32", (a8, torch.ones(4, dtype=torch.float16))
    yield "int8_vectorwise_dequant", "stats has 3 elements, expected 4", (a8, torch.ones(3))
    yield "int8_mm_dequant", "A must have dtype int32", (acc.float(), torch.ones(4), torch.ones(5), None, None)
    yield "int8_mm_dequant", "row_stats has 5 elements, expected 4", (acc, torch.ones(5), torch.ones(5), None, None)
    yield "int8_mm_dequant", "bias has 4 elements, expected 5", (acc, torch.ones(4), torch.ones(5), None, torch.ones(4))
    yield "int8_mm_dequant", "dtype must be", (acc, torch.ones(4), torch.ones(5), torch.int8, None)
    yield "int8_scaled_mm", "col_stats has 4 elements, expected 5", (a8, b8, torch.ones(4), torch.ones(4), None, None)


@pytest.mark.skipif("cpu" not in NATIVE_CPU_BACKENDS, reason="native CPU backend not built")
def test_int8_bad_inputs_name_the_argument(monkeypatch):
    """Rejected by the op layer with the argument's name, before a native kernel (and so any
    pointer) is reached."""
    import lowbit

    kernel_calls = []
    cpu_kernels = registry.get("cpu").kernels
    for op in INT8_CASES:
        monkeypatch.setitem(cpu_kernels._kernels, op, lambda *a: kernel_calls.append(a))
    with lowbit.backends.use("cpu"):
        for op, message, args in _bad_int8_args():
            name, _, overload = op.partition(".")
            call = getattr(getattr(torch.ops.lowbit, name), overload or "default")
            with pytest.raises((ValueError, TypeError), match=message):
                call(*args)
    assert not kernel_calls


def _fixed_point_modes() -> list[tuple[str, tuple[str, ...]]]:
    """(isa, features) whose fast precision is the 16-bit fixed point for every row count: avx2
    (with AVX-VNNI's vpdpwssd too where the CPU has it), and avx512 with VNNI but without AMX
    (which takes 8 rows and more in bf16)."""
    if "cpu" not in NATIVE_CPU_BACKENDS:
        return []
    modes = [("avx2", ())] if "avx2" in CPU_ISAS else []
    if modes and "avx_vnni" in native.supported_cpu_features():
        modes.append(("avx2", ("avx_vnni",)))
    if "avx512" in CPU_ISAS and "avx512_vnni" in native.supported_cpu_features():
        modes.append(("avx512", ("avx512_vnni",)))
    return modes


@pytest.mark.parametrize("isa, features", _fixed_point_modes())
def test_fast_precision_is_the_fixed_point_product(isa, features):
    """exact=False on avx2 and avx512-VNNI computes the reference's fixed-point definition
    (formats.FIXED_*): the integer sums are exact, so the two differ only by the float32 rounding
    of the scaling (within _close's tolerance, far below the fixed point's own error), for every
    pass size of rows, blocksizes below, at and above the chunk, row tails, 16-bit activations,
    a code whose largest magnitude is not 1, zero rows and outliers. NaN or infinity in a row's
    activations makes that row's outputs NaN, and only that row's."""
    g = torch.Generator().manual_seed(5)
    reference, cpu = registry.get("reference").kernels, registry.get("cpu").kernels
    half_nf4 = formats.code_tensor("nf4")[torch.randperm(16, generator=g)] * 0.5
    ran_fixed = False
    for case, (qt, bs, (N, K), dtype) in enumerate(
        itertools.product(formats.QUANT_TYPES, (32, 64, 256), ((37, 256), (16, 512)), FLOAT_DTYPES)
    ):
        code = half_nf4 if case % 4 == 3 else formats.code_tensor(qt)
        B, absmax = reference.get("quantize_4bit")(torch.randn(N, K, generator=g), bs, qt, torch.uint8)
        Bi, absmax_i = reference.get("interleave_4bit")(B, absmax, [N, K], bs)
        rows = 1 + case % 11
        A = torch.randn(rows, K, generator=g)
        A[0, 5] = 300.0  # an outlier: its chunk's other activations keep 13 bits less
        if rows > 2:
            A[1] = 0.0
        A = A.to(dtype)
        bias = torch.randn(N, generator=g).to(dtype) if case % 2 else None
        args = (A, Bi, [N, K], absmax_i, code, bs, bias, False)
        want = reference.get("matmul_4bit_interleaved")(*args)
        with native.use_cpu_isa(isa), native.use_cpu_features(list(features)):
            got = cpu.get("matmul_4bit_interleaved")(*args)
            exact = cpu.get("matmul_4bit_interleaved")(*args[:-1], True)
        context = f"[{isa}] {qt} bs={bs} N={N} K={K} rows={rows} {dtype}"
        _close(got, want, (A, B, [N, K], absmax, code, bs, bias), context)
        ran_fixed = ran_fixed or (dtype == torch.float32 and not torch.equal(got, exact))
    assert ran_fixed, "exact=False computed float32 products: the fixed-point path did not run"

    B, absmax = reference.get("quantize_4bit")(torch.randn(16, 256, generator=g), 64, "nf4", torch.uint8)
    Bi, absmax_i = reference.get("interleave_4bit")(B, absmax, [16, 256], 64)
    A = torch.randn(3, 256, generator=g)
    A[1, 7], A[2, 200] = float("nan"), float("inf")
    nf4 = formats.code_tensor("nf4")
    with native.use_cpu_isa(isa), native.use_cpu_features(list(features)):
        got = cpu.get("matmul_4bit_interleaved")(A, Bi, [16, 256], absmax_i, nf4, 64, None, False)
    assert got[1:].isnan().all() and got[0].isfinite().all()

    # chunks below 2^-64 (scaled by 2^64 first, exactly; subnormal ones would overflow 8191 / amax,
    # and their factors may underflow to zero) and a NaN code value (no fixed-point form: float32
    # products, which carry it)
    A = torch.randn(2, 256, generator=g) * 1e-25
    A[1, :64] *= 1e-15
    bad_code = nf4.clone()
    bad_code[3] = float("nan")
    reference_nan = reference.get("matmul_4bit_interleaved")(A, Bi, [16, 256], absmax_i, bad_code, 64, None, True)
    with native.use_cpu_isa(isa), native.use_cpu_features(list(features)):
        tiny = cpu.get("matmul_4bit_interleaved")(A, Bi, [16, 256], absmax_i, nf4, 64, None, False)
        with_nan = cpu.get("matmul_4bit_interleaved")(A, Bi, [16, 256], absmax_i, bad_code, 64, None, False)
    want = reference.get("matmul_4bit_interleaved")(A, Bi, [16, 256], absmax_i, nf4, 64, None, False)
    assert tiny.isfinite().all() and (tiny != 0).any()
    _close(tiny, want, (A, B, [16, 256], absmax, nf4, 64, None), f"[{isa}] subnormal activations")
    assert torch.equal(with_nan.isnan(), reference_nan.isnan()) and with_nan.isnan().any()
