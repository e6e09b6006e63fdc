"""The formats: codebooks, thresholds and the dynamic 8-bit maps, pinned value by value."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lowbit.backends.cpu import native
from lowbit.core import formats
from lowbit.functional import (
    create_dynamic_map,
    create_fp8_map,
    create_linear_map,
    create_normal_map,
    dequantize_blockwise,
    quantize_blockwise,
)
from support import NATIVE_CPU_BACKENDS

# The 256 values of each map, generated once and frozen (bitsandbytes 0.50.2 gives the same).
PINNED_MAPS = json.loads((Path(__file__).parent / "data" / "dynamic_maps.json").read_text())


def _assert_pinned(code: torch.Tensor, which: str) -> None:
    pinned = torch.tensor(PINNED_MAPS[which], dtype=torch.float32)
    mismatched = (code != pinned).nonzero().flatten().tolist()
    assert not mismatched, f"{which} dynamic map differs at indices {mismatched[:10]}"


def test_signed_dynamic_map_values():
    code = create_dynamic_map(signed=True)
    assert code.dtype == torch.float32 and code.numel() == 256
    assert code[127].item() == 0.0 and code[255].item() == 1.0
    assert code[0].item() == pytest.approx(-0.992968738, abs=1e-9)
    assert code[128].item() == pytest.approx(5.5e-07, rel=1e-6)
    assert bool((code[1:] > code[:-1]).all())
    _assert_pinned(code, "signed")


def test_unsigned_dynamic_map_values():
    code = create_dynamic_map(signed=False)
    assert code[0].item() == 0.0 and code[255].item() == 1.0
    assert code[1].item() == pytest.approx(3.25e-07, rel=1e-6)
    assert bool((code[1:] > code[:-1]).all())
    _assert_pinned(code, "unsigned")


def test_dynamic_map_rejects_impossible_sizes():
    with pytest.raises(ValueError, match="total_bits"):
        create_dynamic_map(signed=False, max_exponent_bits=6)


def test_nf4_code_is_sorted_and_spans_unit_interval():
    code = torch.tensor(formats.NF4_CODE)
    assert bool((code[1:] > code[:-1]).all()) and code[0] == -1 and code[-1] == 1 and code[7] == 0


def test_fp4_code_magnitudes():
    code = formats.FP4_CODE
    expected = {0: 0.0, 1: 0.0052083333, 2: 0.6666667, 3: 1.0, 4: 0.3333333, 5: 0.5, 6: 0.1666667, 7: 0.25}
    for bits, magnitude in expected.items():
        assert code[bits] == pytest.approx(magnitude, abs=1e-7)
        assert code[bits | 8] == pytest.approx(-magnitude, abs=1e-7)  # bit 3 is the sign


# Code maps as bitsandbytes 0.50.2 builds them (tests/data/code_maps.json says how).
PINNED_CODE_MAPS = json.loads((Path(__file__).parent / "data" / "code_maps.json").read_text())["maps"]


@pytest.mark.parametrize(
    "pinned", PINNED_CODE_MAPS, ids=[f"{m['function']}-{'-'.join(map(str, m['kwargs'].values()))}" for m in PINNED_CODE_MAPS]
)
def test_code_maps_are_bitsandbytes_tables_bit_for_bit(pinned):
    code = getattr(formats, pinned["function"])(**pinned["kwargs"])
    want = torch.tensor(pinned["values"], dtype=torch.float32)
    assert code.dtype == torch.float32 and code.shape == want.shape
    assert torch.equal(code.view(torch.int32), want.view(torch.int32))  # zero signs included


def test_normal_map_holds_the_nf4_code():
    code = create_normal_map()
    assert code.dtype == torch.float32 and code.numel() == 256
    assert bool((code[1:] >= code[:-1]).all()) and code.max() == 1.0
    assert sorted(set(code.tolist())) == list(formats.NF4_CODE)  # 15 quantiles and zero
    assert int((code == 0).sum()) == 256 - 15
    symmetric = create_normal_map(use_extra_value=False)
    nonzero = symmetric[symmetric != 0]
    assert nonzero.numel() == 14 and torch.equal(nonzero, -nonzero.flip(0))


def test_fp8_map_of_a_2_bit_exponent_by_hand():
    # E2M1, bias 2: subnormals 0 and 0.5 * 2**-2; exponent fields 1..3 give (1 + m/2) * 2**(3 - e)
    code = create_fp8_map(signed=True, exponent_bits=2, precision_bits=1, total_bits=4)
    magnitudes = [0.125, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    expected = sorted({0.0} | {s * m / 6.0 for m in magnitudes for s in (1, -1)})
    assert sorted(set(code.tolist())) == pytest.approx(expected, abs=1e-7)
    assert code.numel() == 256 and int((code == 0).sum()) == 256 - 14
    assert bool((code[1:] >= code[:-1]).all())


def test_fp8_map_e4m3_round_trips_through_blockwise_quantization():
    code = create_fp8_map(signed=True, exponent_bits=4, precision_bits=3, total_bits=8)
    assert code.numel() == 256 and code.max() == 1.0 and code.min() == -1.0
    x = torch.randn(4096, generator=torch.Generator().manual_seed(0))
    q, state = quantize_blockwise(x, code=code, blocksize=256)
    relative = (dequantize_blockwise(q, state) - x).abs() / x.abs().clamp(min=0.05)
    assert relative.mean() < 0.05
    with pytest.raises(ValueError, match="exponent_bits \\+ precision_bits"):
        create_fp8_map(signed=True, exponent_bits=4, precision_bits=4, total_bits=8)


def test_linear_map_layouts():
    signed = create_linear_map(signed=True)  # 255 steps from -1 to 1 (0 on the grid) and one padding 0
    assert torch.equal(signed[:127], torch.linspace(-1, 1, 255)[:127])
    assert signed[127] == 0 and torch.equal(signed[128:], torch.linspace(-1, 1, 255)[127:])
    assert torch.equal(create_linear_map(signed=False), torch.linspace(0, 1, 256))
    assert torch.equal(create_linear_map(signed=True, add_zero=False), torch.linspace(-1, 1, 256))
    four_bit = create_linear_map(signed=True, total_bits=4)  # 15 values, 241 zeros in the middle
    grid = torch.linspace(-1, 1, 15)
    assert torch.equal(four_bit, torch.cat([grid[:7], torch.zeros(241), grid[7:]]))


@pytest.mark.parametrize("quant_type", formats.QUANT_TYPES)
def test_order_sorts_the_code(quant_type):
    code = torch.tensor(formats.CODES[quant_type])
    ordered = code[list(formats.ORDERS[quant_type])]
    assert bool((ordered[1:] >= ordered[:-1]).all())
    assert sorted(formats.ORDERS[quant_type]) == list(range(16))


def test_fp4_threshold_values():
    # docs/design.md §4: |x| > 0.8333333 -> 011, > 0.5833333 -> 010, ... , > 0.0026042 -> 001
    positive = formats.sorted_midpoints("fp4")[7:].tolist()
    assert positive == pytest.approx([0.0, 0.0026042, 0.0859375, 0.2083333, 0.2916667, 0.4166667, 0.5833333, 0.8333333], abs=1e-6)


@pytest.mark.skipif(not NATIVE_CPU_BACKENDS, reason="native CPU library not built")
@pytest.mark.parametrize(
    "table, expected",
    [
        ("nf4_code", formats.NF4_CODE),
        ("fp4_code", formats.FP4_CODE),
        ("nf4_order", formats.NF4_ORDER),
        ("fp4_order", formats.FP4_ORDER),
        ("blocksizes", formats.BLOCKSIZES),
        ("nf4_midpoints", tuple(formats.sorted_midpoints("nf4").tolist())),
        ("fp4_midpoints", tuple(formats.sorted_midpoints("fp4").tolist())),
        ("interleave", (formats.INTERLEAVE_ROWS, formats.INTERLEAVE_WORD_WEIGHTS, formats.FIXED_CHUNK,
                        formats.FIXED_CODE_ONE, formats.FIXED_ACTIVATION_ONE, formats.FIXED_TINY_CHUNK)),
    ],
)
def test_c_constants_match_python(table, expected):
    """csrc/common/lowbit_formats.h and lowbit/core/formats.py define the same format."""
    got = torch.tensor(native.table(table), dtype=torch.float32)
    want = torch.tensor([float(v) for v in expected], dtype=torch.float32)
    assert torch.equal(got, want), f"{table}: C {got.tolist()} != Python {want.tolist()}"
    assert torch.equal(torch.signbit(got), torch.signbit(want)), f"{table}: signs of zero differ"


def test_packed_numel():
    assert formats.packed_numel(7, torch.uint8) == 4
    assert formats.packed_numel(8, torch.float32) == 1
    assert formats.num_blocks(65, 64) == 2



def test_8bit_blocksizes_match_the_c_limit():
    """formats.BLOCKSIZES_8BIT: the 4-bit blocksizes, then powers of two up to the C header's limit."""
    import re

    header = Path(__file__).resolve().parents[1] / "csrc" / "common" / "lowbit_formats.h"
    if not header.is_file():
        pytest.skip("needs the source checkout (csrc/)")
    limit = int(re.search(r"#define LOWBIT_MAX_BLOCKSIZE_8BIT (\d+)", header.read_text()).group(1))
    assert formats.BLOCKSIZES_8BIT[: len(formats.BLOCKSIZES)] == formats.BLOCKSIZES
    assert formats.BLOCKSIZES_8BIT == tuple(32 << i for i in range(limit.bit_length() - 5))


def test_native_optimizer_ids_match_the_c_enum():
    """formats.NATIVE_OPTIMIZER_IDS numbers optimizers as csrc/common/lowbit_optim.h does."""
    import re

    header = Path(__file__).resolve().parents[1] / "csrc" / "common" / "lowbit_optim.h"
    if not header.is_file():
        pytest.skip("needs the source checkout (csrc/)")
    enum = re.search(r"enum Optimizer : int32_t \{([^}]*)\}", header.read_text()).group(1)
    c_ids = {name.lower(): int(value) for name, value in re.findall(r"k(\w+) = (\d+)", enum)}
    primary = {name: formats.NATIVE_OPTIMIZER_IDS[name] for name in c_ids}
    assert primary == c_ids
    assert set(formats.NATIVE_OPTIMIZER_IDS.values()) == set(c_ids.values())


def test_no_bitsandbytes_avx512bf16_repacked_layout():
    from lowbit.functional import has_avx512bf16

    assert has_avx512bf16() is False  # callers keep the standard packed layout lowbit's kernels read


def test_int8_matmul_max_k_matches_the_c_constant():
    """formats.INT8_MATMUL_MAX_K is kInt8MatmulMaxK of csrc/common/lowbit_int8.h, and is the largest
    K for which K products of (-128)(-128) still fit int32."""
    import re

    header = Path(__file__).resolve().parents[1] / "csrc" / "common" / "lowbit_int8.h"
    if not header.is_file():
        pytest.skip("needs the source checkout (csrc/)")
    shift, minus = re.search(r"kInt8MatmulMaxK = \(int64_t\{1\} << (\d+)\) - (\d+);", header.read_text()).groups()
    assert formats.INT8_MATMUL_MAX_K == (1 << int(shift)) - int(minus)
    assert formats.INT8_MATMUL_MAX_K * 128 * 128 <= 2**31 - 1 < (formats.INT8_MATMUL_MAX_K + 1) * 128 * 128
