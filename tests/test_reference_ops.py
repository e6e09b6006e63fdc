"""What each op computes, checked on the reference backend against its definition (docs/design.md §4-5).

Parity of the other backends with these results is in test_parity.py; agreement with
bitsandbytes itself is in compat/.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lowbit
from lowbit import functional as F
from lowbit.core import formats
from support import FLOAT_DTYPES, randn

pytestmark = pytest.mark.usefixtures("reference_backend")


@pytest.fixture
def reference_backend():
    with lowbit.backends.use("reference"):
        yield


def _nibbles(packed: torch.Tensor, n: int) -> torch.Tensor:
    b = packed.reshape(-1).view(torch.uint8)
    return torch.stack((b >> 4, b & 15), 1).reshape(-1)[:n].long()


@pytest.mark.parametrize("quant_type", formats.QUANT_TYPES)
@pytest.mark.parametrize("blocksize", formats.BLOCKSIZES)
def test_quantize_4bit_picks_the_nearest_code(quant_type, blocksize):
    g = torch.Generator().manual_seed(blocksize)
    A = randn(3 * blocksize + 5, generator=g)
    packed, state = F.quantize_4bit(A, blocksize=blocksize, quant_type=quant_type)
    assert packed.shape == ((A.numel() + 1) // 2, 1) and packed.dtype == torch.uint8
    blocks = torch.nn.functional.pad(A, (0, 4 * blocksize - A.numel())).view(4, blocksize)
    assert torch.equal(state.absmax, blocks.abs().amax(1))
    scaled = A / state.absmax.repeat_interleave(blocksize)[: A.numel()]
    code = torch.tensor(formats.CODES[quant_type])
    chosen = code[_nibbles(packed, A.numel())]
    best = (scaled.unsqueeze(1) - code).abs().min(1).values
    # the chosen code is a nearest one (ties and float rounding allow 1 ulp of slack)
    assert torch.allclose((scaled - chosen).abs(), best, atol=1e-6)


def test_4bit_packing_layout():
    # element 2i in the high nibble; an odd tail gets the code of 0.0 (NF4: 7) in the low nibble
    A = torch.tensor([1.0, -1.0, 0.0])
    packed, _ = F.quantize_4bit(A, blocksize=64, quant_type="nf4")
    assert packed.flatten().tolist() == [0xF0, 0x77]


def test_fp4_sign_of_zero_matches_bitsandbytes():
    # exact zero -> code 0; a tiny positive value -> code 8 ("-0"): see formats.FP4_ORDER
    A = torch.tensor([0.0, 0.001, -0.001, 1.0])
    packed, _ = F.quantize_4bit(A, blocksize=32, quant_type="fp4")
    assert packed.flatten().tolist() == [0x08, 0x03]


def test_all_zero_blocks():
    A = torch.zeros(130)
    A[64:128] = 1.0
    for quant_type, zero_byte in (("nf4", 0x77), ("fp4", 0x00)):
        packed, state = F.quantize_4bit(A, blocksize=64, quant_type=quant_type)
        assert packed[0].item() == zero_byte
        assert state.absmax[0].item() == 0.0
        # the tail block's absmax is floored at 1e-38 (as bitsandbytes stores it)
        assert state.absmax[2].item() == pytest.approx(1e-38, rel=1e-6)
        assert torch.equal(F.dequantize_4bit(packed, state), A)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("quant_type", formats.QUANT_TYPES)
def test_dequantize_4bit_is_code_times_absmax(dtype, quant_type):
    g = torch.Generator().manual_seed(7)
    A = randn(33, 65, dtype=dtype, generator=g)
    packed, state = F.quantize_4bit(A, blocksize=64, quant_type=quant_type)
    out = F.dequantize_4bit(packed, state)
    assert out.shape == A.shape and out.dtype == dtype
    code = torch.tensor(formats.CODES[quant_type])
    expected = code[_nibbles(packed, A.numel())] * state.absmax.repeat_interleave(64)[: A.numel()]
    assert torch.equal(out, expected.to(dtype).view(A.shape))


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 3000),
    blocksize=st.sampled_from(formats.BLOCKSIZES),
    quant_type=st.sampled_from(formats.QUANT_TYPES),
    scale=st.floats(1e-6, 1e6),
    double_quant=st.booleans(),
)
def test_4bit_roundtrip_error_is_bounded(n, blocksize, quant_type, scale, double_quant):
    A = torch.randn(n, generator=torch.Generator().manual_seed(n)) * scale
    packed, state = F.quantize_4bit(A, blocksize=blocksize, quant_type=quant_type, compress_statistics=double_quant)
    restored = F.dequantize_4bit(packed, state)
    # the largest gap between neighbouring codes is 0.333 (FP4 0.667..1.0): half of it bounds the
    # error relative to the block's absmax; double quantization adds a small absmax error
    absmax = A.abs().max().item()
    assert (restored - A).abs().max().item() <= (0.17 + (0.02 if double_quant else 0)) * absmax + 1e-30


@pytest.mark.parametrize("storage", [torch.uint8, torch.bfloat16, torch.float16, torch.float32, torch.int32])
def test_quant_storage_views_the_same_bytes(storage):
    A = randn(4096, generator=torch.Generator().manual_seed(3))
    ref, _ = F.quantize_4bit(A, quant_type="nf4")
    packed, state = F.quantize_4bit(A, quant_type="nf4", quant_storage=storage)
    assert packed.dtype == storage and packed.shape == (formats.packed_numel(A.numel(), storage), 1)
    assert torch.equal(packed.view(torch.uint8).reshape(-1), ref.reshape(-1))
    assert torch.equal(F.dequantize_4bit(packed, state), F.dequantize_4bit(ref, state))


def test_double_quant_state():
    A = randn(64 * 1000, generator=torch.Generator().manual_seed(5))
    packed, state = F.quantize_4bit(A, quant_type="nf4", compress_statistics=True)
    _, plain = F.quantize_4bit(A, quant_type="nf4")
    assert state.nested and state.absmax.dtype == torch.uint8 and state.state2.blocksize == 256
    assert state.offset.item() == pytest.approx(plain.absmax.mean().item())
    restored_absmax = F.dequantize_blockwise(state.absmax, state.state2) + state.offset
    assert torch.allclose(restored_absmax, plain.absmax, rtol=0.02)


def test_blockwise_lookup_semantics():
    code = F.create_dynamic_map()
    A = torch.zeros(512)
    A[0] = 1.0
    A[256:] = 0  # an all-zero block
    q, state = F.quantize_blockwise(A, blocksize=256)
    # 0.0 falls into the 65536-bin table's bin 32768, whose table entry is index 131 (2.125e-5)
    assert q[0].item() == 255 and q[1].item() == 131
    assert code[131].item() == pytest.approx(2.125e-05, rel=1e-5)
    assert torch.equal(q[256:], torch.zeros(256, dtype=torch.uint8)) and state.absmax[1].item() == 0.0


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_blockwise_roundtrip(dtype):
    A = randn(10_000, dtype=dtype, generator=torch.Generator().manual_seed(9))
    q, state = F.quantize_blockwise(A, blocksize=256)
    out = F.dequantize_blockwise(q, state)
    assert out.dtype == dtype and out.shape == A.shape
    expected = state.code[q.long()] * state.absmax.repeat_interleave(256)[: A.numel()]
    assert torch.equal(out, expected.to(dtype))
    assert (out.float() - A.float()).abs().max() < 0.02 * A.float().abs().max()


def test_blockwise_nested():
    A = randn(4096 * 300, generator=torch.Generator().manual_seed(2))
    q, state = F.quantize_blockwise(A, blocksize=4096, nested=True)
    assert state.nested
    out = F.dequantize_blockwise(q, state)
    assert (out - A).abs().max() < 0.03 * A.abs().max()


def test_int8_vectorwise_quant_with_outliers():
    A = torch.tensor([[1.0, -2.0, 8.0, 0.5], [0.25, 4.0, -1.0, 0.0], [0.0, 0.0, 0.0, 0.0]], dtype=torch.float16)
    q, row_stats, outlier_cols = F.int8_vectorwise_quant(A, threshold=6.0)
    assert outlier_cols.tolist() == [2]
    assert row_stats.tolist() == [2.0, 4.0, 0.0]  # outliers do not count towards the row scale
    assert q.tolist() == [[64, -127, 0, 32], [8, 127, 0, 0], [0, 0, 0, 0]]  # column 2 is zeroed in every row
    assert A[0, 2].item() == 8.0  # the input is not modified


def test_int8_vectorwise_without_threshold():
    A = randn(16, 32, generator=torch.Generator().manual_seed(1))
    q, row_stats, outlier_cols = F.int8_vectorwise_quant(A)
    assert outlier_cols is None
    restored = F.int8_vectorwise_dequant(q, row_stats)
    assert (restored - A).abs().max() <= row_stats.max() / 127 / 2 + 1e-6


def test_int8_linear_matmul_is_exact():
    g = torch.Generator().manual_seed(4)
    A = torch.randint(-128, 128, (5, 4096), generator=g, dtype=torch.int8)
    B = torch.randint(-128, 128, (7, 4096), generator=g, dtype=torch.int8)
    out = F.int8_linear_matmul(A, B)
    assert out.dtype == torch.int32
    assert torch.equal(out.long(), A.long() @ B.long().t())


def test_int8_mm_dequant_and_scaled_mm():
    g = torch.Generator().manual_seed(6)
    A, W = randn(4, 64, generator=g), randn(8, 64, generator=g)
    qa, sa, _ = F.int8_vectorwise_quant(A)
    qw, sw, _ = F.int8_vectorwise_quant(W)
    out = F.int8_mm_dequant(F.int8_linear_matmul(qa, qw), sa, sw)
    assert out.dtype == torch.float16
    assert torch.allclose(out.float(), A @ W.t(), atol=0.05 * math.sqrt(64))
    bias = torch.ones(8)
    scaled = torch.ops.lowbit.int8_scaled_mm(qa, qw, sa, sw, bias, torch.float32)
    assert torch.allclose(scaled, out.float() + 1, atol=1e-2)


def test_int8_mixed_scaled_mm_adds_outlier_columns_back():
    g = torch.Generator().manual_seed(8)
    A, W = randn(6, 32, generator=g), randn(10, 32, generator=g)
    A[:, 3] = 20.0
    CA, SCA, outlier_cols = F.int8_vectorwise_quant(A, threshold=6.0)
    CB, SCB, _ = F.int8_vectorwise_quant(W)
    out, sub_a = torch.ops.lowbit.int8_mixed_scaled_mm(A, CA, CB, SCA, SCB, outlier_cols, None)
    assert outlier_cols.tolist() == [3] and sub_a.shape == (6, 1)
    assert torch.allclose(out, A @ W.t(), atol=0.5)


def test_int8_double_quant():
    A = randn(8, 16, generator=torch.Generator().manual_seed(3))
    q_row, q_col, row_stats, col_stats, _ = F.int8_double_quant(A)
    assert torch.equal(col_stats, A.abs().amax(0))
    assert torch.equal(q_col, torch.round(A * 127 / col_stats).to(torch.int8))
    assert torch.equal(q_row, F.int8_vectorwise_quant(A)[0])


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("rows", [1, 3, 8, 17])
def test_gemv_and_matmul_4bit_match_dense(dtype, rows):
    g = torch.Generator().manual_seed(rows)
    W = randn(96, 256, generator=g)
    packed, state = F.quantize_4bit(W, quant_type="nf4", compress_statistics=True)
    A = randn(rows, 256, dtype=dtype, generator=g)
    dense = A.float() @ F.dequantize_4bit(packed, state).float().t()
    out = F.gemv_4bit(A, packed, state=state)
    assert out.dtype == dtype and out.shape == (rows, 96)
    assert torch.allclose(out.float(), dense, rtol=1e-2, atol=1e-2)
    absmax = F.dequantize_blockwise(state.absmax, state.state2) + state.offset
    bias = randn(96, dtype=dtype, generator=g)
    mm = torch.ops.lowbit.matmul_4bit(A, packed, list(state.shape), absmax, state.code, 64, bias)
    assert torch.allclose(mm.float(), dense + bias.float(), rtol=1e-2, atol=1e-2)
