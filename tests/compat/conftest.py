"""Shared fixtures and helpers of the bitsandbytes compatibility suite (docs/design.md §4-5).

The op-level tests (test_4bit, test_blockwise_8bit, test_int8, test_quant_state) run the same
input through bitsandbytes 0.50.2 and through lowbit and assert that the results are identical
bit for bit: same dtype, same shape, same bytes, with no tolerance.

The suite needs bitsandbytes. It does not skip without it: if the import fails (or the version
is not the one lowbit targets) every compat test fails with the reason, so a broken compat
environment cannot pass silently. Deselect the suite with ``-m "not compat"`` where
bitsandbytes is not installed.

Each lowbit call runs once per CPU-capable backend (``backend`` fixture), whichever backend
``import lowbit`` picked, so a native backend is held to the same bytes as the reference one.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
import zlib
from typing import Optional

import pytest
import torch
import torch._dynamo

with warnings.catch_warnings():
    # "native CPU backend unavailable" is reported in the session header instead.
    warnings.simplefilter("ignore")
    import lowbit
    import lowbit.functional as L

BNB_VERSION = "0.50.2"

try:
    import bitsandbytes
    import bitsandbytes.functional as B
except Exception as err:  # ImportError, or a broken native library
    bitsandbytes = B = None
    BNB_PROBLEM: Optional[str] = (
        f"the compat suite needs bitsandbytes {BNB_VERSION}, but `import bitsandbytes` failed: "
        f"{type(err).__name__}: {err}. Install it (pip install bitsandbytes=={BNB_VERSION}) or run "
        f'the rest of the tests with -m "not compat".'
    )
else:
    BNB_PROBLEM = (
        None
        if bitsandbytes.__version__ == BNB_VERSION
        else f"the compat suite targets bitsandbytes {BNB_VERSION}, found {bitsandbytes.__version__}"
    )

# bitsandbytes' CPU dequantize_4bit for odd last dimensions (and, on AVX-512 machines, for
# blocksize >= 2048) runs a torch.compile'd function with dynamic=False: one compilation per
# shape. Let all of them compile (the suite keeps their number small) instead of falling back
# to eager with a warning halfway through.
_RECOMPILE_SETTING = (
    "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
)
setattr(torch._dynamo.config, _RECOMPILE_SETTING, max(getattr(torch._dynamo.config, _RECOMPILE_SETTING), 256))

#: Every backend that runs lowbit's ops on CPU tensors and can load here.
CPU_BACKENDS: list[str] = [
    s.name for s in lowbit.backends.available() if s.available and s.device_type in ("cpu", "any")
]

BLOCKSIZES_4BIT = (32, 64, 128, 256, 512, 1024, 2048, 4096)
BLOCKSIZES_8BIT = (64, 128, 256, 512, 1024, 2048, 4096)
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
QUANT_TYPES = ("nf4", "fp4")


# ------------------------------------------------------------------------------------------
# pytest plumbing
# ------------------------------------------------------------------------------------------
def pytest_report_header(config):
    bnb = f"bitsandbytes {bitsandbytes.__version__}" if bitsandbytes is not None else "bitsandbytes MISSING"
    unavailable = [
        f"{s.name} ({s.reason})"
        for s in lowbit.backends.available()
        if not s.available and s.device_type in ("cpu", "any")
    ]
    line = f"lowbit compat: {bnb}; CPU backends compared: {', '.join(CPU_BACKENDS) or 'NONE'}"
    return [line + (f"; unavailable: {'; '.join(unavailable)}" if unavailable else "")]


@pytest.fixture(autouse=True)
def _require_bitsandbytes():
    if BNB_PROBLEM is not None:
        pytest.fail(BNB_PROBLEM, pytrace=False)


@pytest.fixture(params=CPU_BACKENDS, ids=lambda name: f"backend={name}")
def backend(request):
    """Run the test body with lowbit's CPU ops on one backend."""
    with lowbit.backends.use(request.param):
        assert lowbit.backends.active("cpu") == request.param
        yield request.param


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def shape_name(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape))


def case_seed(*parts: object) -> int:
    """A stable per-case seed (independent of test order and of PYTHONHASHSEED)."""
    return zlib.crc32("|".join(map(str, parts)).encode())


# ------------------------------------------------------------------------------------------
# inputs
# ------------------------------------------------------------------------------------------
def _sorted_code_midpoints(quant_type: str) -> torch.Tensor:
    """bitsandbytes' own 4-bit decision thresholds (midpoints of the sorted codebook)."""
    ordered = B.get_4bit_type(quant_type, device="cpu").sort().values
    return (ordered[:-1] + ordered[1:]) / 2


def _with_edge_cases(x: torch.Tensor, blocksize: int) -> torch.Tensor:
    """``x`` (float32, flat) with the cases where quantizers tend to disagree, block by block:

    * exact zeros (every 11th element) and tiny values, |x| < 0.003 * block absmax (every 13th,
      both signs: these straddle FP4's smallest threshold 0.0026 and its "-0" code);
    * the block maximum present with both signs (x and -x both equal to ±absmax);
    * every 4th block (index 1, 5, ...) all zeros: absmax 0, including a zero tail block;
    * every 4th full block (index 2, 6, ...) with absmax exactly 1.0, holding NF4's and FP4's
      decision thresholds exactly (in float32), so a value on a threshold must pick the same side.
    """
    n = x.numel()
    n_blocks = -(-n // blocksize)
    blocks = torch.nn.functional.pad(x, (0, n_blocks * blocksize - n)).view(n_blocks, blocksize).clone()
    width = torch.full((n_blocks,), blocksize)
    width[-1] = n - (n_blocks - 1) * blocksize
    rows = torch.arange(n_blocks)

    blocks[:, 5::11] = 0.0
    tiny_cols = torch.arange(3, blocksize, 13)
    factors = torch.tensor([1e-3, -2.6e-3, 2.9e-3, -5e-4])[torch.arange(tiny_cols.numel()) % 4]
    blocks[:, tiny_cols] = blocks.abs().amax(dim=1, keepdim=True) * factors

    peak = blocks.abs().argmax(dim=1)  # never in the padding: padding only holds tiny values
    mirror = (peak + 1) % width
    has_pair = width >= 2
    blocks[rows[has_pair], mirror[has_pair]] = -blocks[rows[has_pair], peak[has_pair]]

    blocks[1::4] = 0.0
    thresholds = torch.cat(
        [torch.tensor([1.0, -1.0]), _sorted_code_midpoints("nf4"), _sorted_code_midpoints("fp4")]
    )
    exact = rows[(rows % 4 == 2) & (width == blocksize)]
    scaled = blocks[exact]
    scaled = 0.9 * scaled / scaled.abs().amax(dim=1, keepdim=True).clamp(min=1e-30)
    scaled[:, : thresholds.numel()] = thresholds
    blocks[exact] = scaled
    return blocks.reshape(-1)[:n]


def _denormal_scales(n: int, blocksize: int, dtype: torch.dtype) -> torch.Tensor:
    """Per-element scale putting each block in (or next to) ``dtype``'s subnormal range.

    float32/bfloat16: absmax ~1e-39 (1/absmax overflows to inf for some blocks), ~1e-44 (a few
    distinct subnormals, many values round to 0), ~1.5e-38 (just above the smallest normal) and
    ~3e-39. float16: a few units of its smallest subnormal 2**-24, 2**-20, 2**-15 and 2**-13.
    """
    if dtype == torch.float16:
        per_block = torch.tensor([3 * 2.0**-24, 2.0**-20, 2.0**-15, 2.0**-13])
    else:
        per_block = torch.tensor([1e-39, 1e-44, 1.5e-38, 3e-39])
    block_index = torch.arange(n) // blocksize
    return per_block[block_index % per_block.numel()]


def make_input(
    shape: tuple[int, ...],
    dtype: torch.dtype,
    kind: str,
    blocksize: int,
    seed: int,
    nonnegative: bool = False,
) -> torch.Tensor:
    """A test tensor. ``kind``: 'randn', 'mixed' (randn + :func:`_with_edge_cases`),
    'denormal' (the mixed tensor scaled into the subnormal range) or 'zeros'.

    Deterministic in its arguments. Many cases share an input, so each is built once and the
    same tensor is returned every time: treat it as read-only."""
    return _cached_input(tuple(shape), dtype, kind, blocksize, seed, nonnegative)


@functools.cache
def _cached_input(shape, dtype, kind, blocksize, seed, nonnegative) -> torch.Tensor:
    n = math.prod(shape)
    x = torch.randn(n, generator=torch.Generator().manual_seed(seed))
    if kind == "mixed":
        x = _with_edge_cases(x, blocksize)
    elif kind == "denormal":
        x = _with_edge_cases(x, blocksize) * _denormal_scales(n, blocksize, dtype)
    elif kind == "zeros":
        x = torch.zeros(n)
    elif kind != "randn":
        raise ValueError(f"unknown input kind {kind!r}")
    if nonnegative:
        x = x.abs()
    return x.to(dtype).reshape(shape)


@dataclasses.dataclass(frozen=True)
class Case:
    """One blockwise-quantization case (4-bit when ``quant_type`` is set, 8-bit when ``code`` is).

    Hashable, so results that do not depend on the lowbit backend (the input, bitsandbytes'
    output) can be computed once and reused for every backend.
    """

    shape: tuple[int, ...]
    dtype: torch.dtype
    blocksize: int
    kind: str = "mixed"
    quant_type: Optional[str] = None  # 'nf4' / 'fp4'
    code: Optional[str] = None  # 'signed' / 'unsigned' dynamic map
    storage: torch.dtype = torch.uint8
    nested: bool = False

    @property
    def id(self) -> str:
        parts = [self.quant_type or self.code, f"bs{self.blocksize}", dtype_name(self.dtype)]
        parts += [shape_name(self.shape), self.kind]
        if self.storage != torch.uint8:
            parts.append(f"store_{dtype_name(self.storage)}")
        if self.nested:
            parts.append("nested")
        return "-".join(parts)

    def param(self):
        return pytest.param(self, id=self.id)

    def input(self) -> torch.Tensor:
        """The input tensor; the same for cases that differ only in what is done with it."""
        seed = case_seed(self.shape, self.dtype, self.kind, self.blocksize)
        return make_input(
            self.shape, self.dtype, self.kind, self.blocksize, seed, nonnegative=self.code == "unsigned"
        )


def storage_fits(shape: tuple[int, ...], quant_storage: torch.dtype) -> bool:
    """Whether the packed bytes of ``shape`` fill whole ``quant_storage`` elements."""
    n_bytes = (math.prod(shape) + 1) // 2
    return n_bytes % torch.empty((), dtype=quant_storage).element_size() == 0


# ------------------------------------------------------------------------------------------
# comparisons
# ------------------------------------------------------------------------------------------
_SAME_SIZE_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _positive_zeros(t: torch.Tensor) -> torch.Tensor:
    return torch.where(t == 0, torch.zeros_like(t), t) if t.is_floating_point() else t


def _as_bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().contiguous().reshape(-1).view(_SAME_SIZE_INT[t.element_size()])


def assert_identical(
    actual: Optional[torch.Tensor],
    expected: Optional[torch.Tensor],
    what: str,
    ignore_zero_sign: bool = False,
) -> None:
    """``actual`` (lowbit) and ``expected`` (bitsandbytes) have the same dtype, shape and bits.

    Bitwise, so stricter than ``torch.equal``: +0.0 vs -0.0 counts as a difference too (the
    message says when a difference is only that), unless ``ignore_zero_sign``: use that only
    where bitsandbytes itself gives either sign for the same zero, and say why."""
    if actual is None or expected is None:
        assert actual is None and expected is None, (
            f"{what}: lowbit gives {actual!r}, bitsandbytes gives {expected!r}"
        )
        return
    assert actual.dtype == expected.dtype, (
        f"{what}: dtype lowbit={actual.dtype} bitsandbytes={expected.dtype}"
    )
    assert actual.shape == expected.shape, (
        f"{what}: shape lowbit={tuple(actual.shape)} bitsandbytes={tuple(expected.shape)}"
    )
    a, e = _as_bits(actual), _as_bits(expected)
    if torch.equal(a, e):
        return
    if ignore_zero_sign:
        a, e = _as_bits(_positive_zeros(actual)), _as_bits(_positive_zeros(expected))
        if torch.equal(a, e):
            return
    differ = (a != e).nonzero().view(-1)
    first = int(differ[0])
    flat_a, flat_e = actual.detach().cpu().reshape(-1), expected.detach().cpu().reshape(-1)
    value_note = (
        " (equal as values: only the sign of zero or NaN bits differ)" if torch.equal(flat_a, flat_e) else ""
    )
    raise AssertionError(
        f"{what}: {differ.numel()} of {a.numel()} elements differ{value_note}; first at flat index {first}: "
        f"lowbit={flat_a[first].item()!r} (bits {int(a[first]):#x}) "
        f"bitsandbytes={flat_e[first].item()!r} (bits {int(e[first]):#x})"
    )


def assert_same_state(actual, expected, what: str = "state") -> None:
    """Two QuantStates (lowbit's, bitsandbytes') describe the same quantization, bit for bit.

    The 4-bit codebook is compared up to the sign of its zeros here; test_4bit_codebook_bits
    compares it bit for bit, once."""
    assert_identical(actual.absmax, expected.absmax, f"{what}.absmax")
    assert_identical(
        actual.code, expected.code, f"{what}.code", ignore_zero_sign=expected.quant_type is not None
    )
    assert actual.shape == expected.shape, (
        f"{what}.shape: lowbit={actual.shape} bitsandbytes={expected.shape}"
    )
    assert actual.dtype == expected.dtype, (
        f"{what}.dtype: lowbit={actual.dtype} bitsandbytes={expected.dtype}"
    )
    assert actual.blocksize == expected.blocksize, f"{what}.blocksize"
    assert actual.quant_type == expected.quant_type, f"{what}.quant_type"
    assert (actual.state2 is None) == (expected.state2 is None), f"{what}: nested on one side only"
    if expected.state2 is not None:
        assert_identical(actual.offset, expected.offset, f"{what}.offset")
        assert_same_state(actual.state2, expected.state2, f"{what}.state2")


def convert_state(state, cls):
    """The same QuantState rebuilt as ``cls`` (``lowbit.QuantState`` or bitsandbytes')."""
    if state is None:
        return None
    return cls(
        absmax=state.absmax,
        shape=state.shape,
        code=state.code,
        blocksize=state.blocksize,
        quant_type=state.quant_type,
        dtype=state.dtype,
        offset=state.offset,
        state2=convert_state(state.state2, cls),
    )


__all__ = [
    "BLOCKSIZES_4BIT",
    "BLOCKSIZES_8BIT",
    "CPU_BACKENDS",
    "Case",
    "FLOAT_DTYPES",
    "QUANT_TYPES",
    "B",
    "L",
    "assert_identical",
    "assert_same_state",
    "case_seed",
    "convert_state",
    "dtype_name",
    "make_input",
    "shape_name",
    "storage_fits",
]
