"""The Triton kernels' float conversions (lowbit/backends/triton/runtime.py), on the values the
parity cases rarely produce: float32 -> bfloat16/float16 ties, carries into the exponent,
overflow, subnormals, Inf and NaN (``cast_to``), and every bfloat16 bit pattern widened to float32
(``to_float32``), each against torch. Runs where the triton backend serves CPU tensors, i.e.
under Triton's interpreter (TRITON_INTERPRET=1, ``nox -s triton``)."""

from __future__ import annotations

import pytest
import torch

from support import CPU_BACKENDS

pytestmark = pytest.mark.skipif(
    "triton" not in CPU_BACKENDS, reason="needs Triton's interpreter (TRITON_INTERPRET=1; nox -s triton)"
)
triton = pytest.importorskip("triton", reason="Triton is not installed (nox -s triton installs it)")
tl = triton.language

from lowbit.backends.triton.runtime import cast_to, to_float32  # noqa: E402


@triton.jit
def _cast(X, Y, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(Y + offs, cast_to(tl.load(X + offs, mask=offs < n), Y.dtype.element_ty), mask=offs < n)


@triton.jit
def _widen(X, Y, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(Y + offs, to_float32(tl.load(X + offs, mask=offs < n)), mask=offs < n)


def _floats(bit_patterns: list[int]) -> torch.Tensor:
    return torch.tensor(bit_patterns, dtype=torch.int64).to(torch.int32).view(torch.float32)


SPECIAL = _floats([
    0x3F808000, 0x3F818000,  # bfloat16 ties: to the even neighbour, down and up
    0x3F7FFF80, 0x3F7FFFFF,  # rounding that carries into the exponent
    0x7F7FFFFF, 0x7F7F8000, 0x477FF000, 0x477FEFFF,  # overflow to Inf (bfloat16; float16 at 65520)
    0x00008000, 0x00018000, 0x0001FFFF, 0x80000001, 0x00400000,  # float32 subnormals
    0x33000000, 0x33000001, 0x387FC000,  # float16 underflow and subnormal rounding
    0x00000000, 0x80000000, 0x7F800000, 0xFF800000,
])  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cast_to_rounds_like_torch(dtype):
    x = torch.cat([SPECIAL, torch.randn(4000, generator=torch.Generator().manual_seed(0)) * 1e3])
    got = torch.empty(x.numel(), dtype=dtype)
    _cast[(1,)](x, got, x.numel(), BLOCK=triton.next_power_of_2(x.numel()))
    want = x.to(dtype)
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))


def test_cast_to_keeps_nan_a_nan():
    x = _floats([0x7FC00000, 0xFFC00001, 0x7F800001, 0x7FFFFFFF])
    got = torch.empty(4, dtype=torch.bfloat16)
    _cast[(1,)](x, got, 4, BLOCK=4)
    assert got.isnan().all()


def test_to_float32_widens_every_bfloat16_exactly():
    x = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    got = torch.empty(x.numel(), dtype=torch.float32)
    block = 16384
    _widen[(triton.cdiv(x.numel(), block),)](x, got, x.numel(), BLOCK=block)
    assert torch.equal(got.view(torch.int32), x.float().view(torch.int32))
