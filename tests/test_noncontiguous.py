"""Non-contiguous tensors are accepted by every op, with the result of their contiguous copy.

bitsandbytes accepts any layout; lowbit's dispatcher (``core/ops.py``) makes inputs contiguous
once, and computes an argument the op writes to (``out``, optimizer state) in a contiguous copy
that it copies back. The strided views here interleave the real values with NaN (7 for integer
tensors), so a kernel that read the raw storage would give a different answer.
"""

from __future__ import annotations

import pytest
import torch
from test_op_schemas import SAMPLES, _op

import lowbit
from lowbit import functional as F
from support import CPU_BACKENDS


def _strided(value):
    """A non-contiguous view with ``value``'s contents (tensors of 2+ elements; others as they are)."""
    if not isinstance(value, torch.Tensor) or value.numel() < 2:
        return value
    filler = torch.full_like(value, float("nan") if value.is_floating_point() else 7)
    view = torch.stack([value, filler], dim=-1)[..., 0]
    assert not view.is_contiguous()
    return view


def _clone(args):
    return tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)


def _assert_same(got, want, context: str) -> None:
    if isinstance(want, (tuple, list)):
        assert isinstance(got, (tuple, list)) and len(got) == len(want), context
        for i, (g, w) in enumerate(zip(got, want)):
            _assert_same(g, w, f"{context}[{i}]")
    elif isinstance(want, torch.Tensor):
        assert got.shape == want.shape and got.dtype == want.dtype, context
        assert torch.equal(got, want) or (got.isnan() == want.isnan()).all() and torch.equal(
            got.nan_to_num(), want.nan_to_num()
        ), context
    else:
        assert got == want, context


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_every_op_takes_non_contiguous_tensors(name, backend):
    want_args = _clone(SAMPLES[name])
    strided_args = tuple(_strided(a) for a in _clone(SAMPLES[name]))
    with lowbit.backends.use(backend):
        want = _op(name)(*want_args)
        got = _op(name)(*strided_args)
    _assert_same(got, want, f"{name} result")
    # every tensor argument ends equal: inputs untouched, written ones (out, optimizer state) filled
    for i, (g, w) in enumerate(zip(strided_args, want_args)):
        _assert_same(g, w, f"{name} argument {i}")


def test_functional_api_takes_transposed_and_sliced_tensors():
    W = torch.randn(96, 64)
    for quant_type in ("nf4", "fp4"):
        packed_t, state_t = F.quantize_4bit(W.t(), quant_type=quant_type, compress_statistics=True)
        packed, state = F.quantize_4bit(W.t().contiguous(), quant_type=quant_type, compress_statistics=True)
        assert torch.equal(packed_t, packed) and state_t == state
        out = torch.empty(96, 64).t()  # written through a contiguous copy
        assert F.dequantize_4bit(packed, state, out=out) is out
        assert torch.equal(out, F.dequantize_4bit(packed, state))
    q_t, s_t = F.quantize_blockwise(W[:, ::2], blocksize=256)
    q, s = F.quantize_blockwise(W[:, ::2].contiguous(), blocksize=256)
    assert torch.equal(q_t, q) and torch.equal(s_t.absmax, s.absmax)
    assert torch.equal(F.dequantize_blockwise(q.t(), s), F.dequantize_blockwise(q.t().contiguous(), s))
