"""The formats: codebooks, thresholds and the dynamic 8-bit maps, pinned value by value."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lowbit.backends.cpu import native
from lowbit.core import formats
from lowbit.functional import create_dynamic_map
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
        ("interleave", (formats.INTERLEAVE_ROWS, formats.INTERLEAVE_WORD_WEIGHTS)),
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
