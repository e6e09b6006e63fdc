"""The quantization formats, defined once for Python (docs/design.md §4).

The same constants live in ``csrc/common/lowbit_formats.h`` for the native backends;
``tests/test_formats.py`` checks the two against each other through the C ABI.

Everything here is bit-compatible with bitsandbytes 0.50.2 on CPU. Where that library's
behaviour is surprising, the surprise is kept on purpose (byte-identical checkpoints are the
point) and explained next to the constant that encodes it.
"""

from __future__ import annotations

import functools

import torch
from torch._subclasses.fake_tensor import unset_fake_temporarily

#: Blocksizes accepted by the 4-bit and 8-bit blockwise formats.
BLOCKSIZES: tuple[int, ...] = (32, 64, 128, 256, 512, 1024, 2048, 4096)
#: 8-bit blockwise also takes larger blocks, as bitsandbytes' CPU path does (LOWBIT_MAX_BLOCKSIZE_8BIT
#: in lowbit_formats.h): the CPU kernels run them, the GPU backends hand them to the reference kernel.
BLOCKSIZES_8BIT: tuple[int, ...] = BLOCKSIZES + (8192, 16384, 32768, 65536)
DEFAULT_BLOCKSIZE_4BIT = 64
DEFAULT_BLOCKSIZE_8BIT = 4096
#: Blocksize of the nested (double-quantized) absmax and of 8-bit optimizer state.
NESTED_BLOCKSIZE = 256

QUANT_TYPES: tuple[str, ...] = ("nf4", "fp4")
FLOAT_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)
#: Storage dtypes for packed 4-bit data. Non-uint8 storage views the same bytes (FSDP needs the
#: packed weight to share the dtype of the rest of the model).
QUANT_STORAGE_DTYPES: tuple[torch.dtype, ...] = (
    torch.uint8,
    torch.int8,
    torch.float16,
    torch.bfloat16,
    torch.float32,
    torch.float64,
    torch.int16,
    torch.int32,
    torch.int64,
)

#: Entries of every 8-bit code table; a code of fewer bits is padded with zeros to this size.
CODE8_SIZE = 256
#: Outermost quantile of N(0, 1) that the NF4 code covers (QLoRA): ppf(0.9677083) = 1.848.
NF4_QUANTILE_OFFSET = 0.9677083


# NF4: quantiles of N(0, 1) normalised to [-1, 1] (QLoRA), index = code.
NF4_CODE: tuple[float, ...] = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)

# FP4 (E2M1 variant, exponent bias 2): bit 3 is the sign, bits 2..0 a magnitude. The raw values
# are divided by 12 in float32 so that the largest magnitude is 1. Code 8 is +0.0, not -0.0:
# bitsandbytes writes it as the integer literal `-0` (which is 0), and its saved quant_map and
# dequantized zeros carry a positive sign.
_FP4_RAW = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, 0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0)
FP4_CODE: tuple[float, ...] = tuple(
    (torch.tensor(_FP4_RAW, dtype=torch.float32) / torch.tensor(12.0)).tolist()
)

# Codes sorted by value. Encoding picks the sorted position by midpoint thresholds and maps it
# back through this order. For FP4, +0 (code 0) sits before -0 (code 8): bitsandbytes derives
# the order from an argsort that puts them so, with the consequence that a value in
# (0, 0.0026] encodes as code 8 ("-0") and exact zero as code 0. Both decode to zero.
NF4_ORDER: tuple[int, ...] = tuple(range(16))
FP4_ORDER: tuple[int, ...] = (11, 10, 13, 12, 15, 14, 9, 0, 8, 1, 6, 7, 4, 5, 2, 3)

CODES = {"nf4": NF4_CODE, "fp4": FP4_CODE}
ORDERS = {"nf4": NF4_ORDER, "fp4": FP4_ORDER}

#: Smallest absmax used as a divisor (a float32 subnormal, as in bitsandbytes). All-zero blocks
#: therefore quantize to the code of 0.0 instead of NaN.
ABSMAX_FLOOR = 1e-38

#: 8-bit blockwise quantization maps x/absmax in [-1, 1] onto this many uniform bins and looks
#: the code index up in a table built from the code's midpoints (bitsandbytes' CPU kernel).
BLOCKWISE_LUT_BINS = 65536

#: LLM.int8: dequantize an int32 product with row_stats * col_stats * (1/127^2).
INT8_MM_DEQUANT_SCALE = 6.200124e-05
#: 1/127 in float32, the int8 vectorwise dequantization factor.
INT8_DEQUANT_SCALE = 7.874015718698502e-3
#: Largest inner size K of int8_linear_matmul: its int32 accumulator is exact while K * 128^2 < 2^31
#: (every product of two int8 values has |a*b| <= 2^14); beyond, -128 * -128 summed 2^17 times
#: wraps to -2^31. Every backend refuses larger K (kInt8MatmulMaxK in csrc/common/lowbit_int8.h).
INT8_MATMUL_MAX_K = 2**17 - 1


# The interleaved 4-bit layout (CPU inference), defined with csrc/common/lowbit_formats.h: rows in
# groups of INTERLEAVE_ROWS (the last group holds what is left), and within a group the 4-byte words
# of the packed bytes (INTERLEAVE_WORD_WEIGHTS weights each) and the per-block absmax stored
# transposed, so that one 64-byte load holds the same 8 weights of 16 output rows. Sizes do not
# change. A weight takes it when its layer is placed for CPU inference and leaves it, bit-exactly,
# for saving and training; checkpoints always hold the standard layout.
LAYOUT_STANDARD = "standard"
LAYOUT_INTERLEAVED = "interleaved"
LAYOUTS: tuple[str, ...] = (LAYOUT_STANDARD, LAYOUT_INTERLEAVED)
INTERLEAVE_ROWS = 16
INTERLEAVE_WORD_WEIGHTS = 8
# The fast product on that layout may run in 16-bit fixed point (docs/design.md §10): each code
# value as round(code / max|code| * FIXED_CODE_ONE), each element of A as
# round(a * FIXED_ACTIVATION_ONE / amax), amax the largest magnitude in its row's chunk of
# FIXED_CHUNK elements (or of the block, when smaller), products summed exactly per chunk.
FIXED_CHUNK = 64
FIXED_CODE_ONE = 4096
FIXED_ACTIVATION_ONE = 8191
# a chunk whose amax is below this is scaled by its inverse first (exact): 8191 / amax would
# overflow float32 for subnormal amax
FIXED_TINY_CHUNK = 2.0**-64


def can_interleave(shape, blocksize: int) -> bool:
    """Whether an (N, K) 4-bit weight has an interleaved layout: blocks must not straddle rows."""
    return len(shape) == 2 and shape[0] > 0 and shape[1] > 0 and shape[1] % blocksize == 0


def interleave_rows(x: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """The layout's permutation of an (N, units, *unit) tensor: within each group of
    INTERLEAVE_ROWS rows, (rows, units) transposed to (units, rows); ``inverse`` undoes it.
    Packed bytes are (N, K/8, 4) (a unit is one word), absmax (N, K/blocksize)."""
    N, units, unit = x.shape[0], x.shape[1], x.shape[2:]
    flat = x.reshape(N * units, *unit)
    full = N - N % INTERLEAVE_ROWS
    parts = []
    # (first row, groups, rows per group): the whole groups, then the last, shorter one
    for n0, groups, rows in ((0, full // INTERLEAVE_ROWS, INTERLEAVE_ROWS), (full, 1, N - full)):
        if groups * rows == 0:
            continue
        shape = (groups, units, rows) if inverse else (groups, rows, units)
        part = flat[n0 * units : (n0 + groups * rows) * units]
        parts.append(part.view(*shape, *unit).transpose(1, 2).reshape(-1, *unit))
    return torch.cat(parts).view(x.shape)


def code_tensor(quant_type: str, device: torch.device | str | None = None) -> torch.Tensor:
    """The 16-entry float32 codebook of ``quant_type`` (index = 4-bit code)."""
    return _code_tensor(quant_type, torch.device(device or "cpu"))


@functools.cache
def _code_tensor(quant_type: str, device: torch.device) -> torch.Tensor:
    with unset_fake_temporarily():  # a cached constant must hold real values, even if first built in a trace
        return torch.tensor(CODES[quant_type], dtype=torch.float32, device=device)


def sorted_midpoints(quant_type: str) -> torch.Tensor:
    """The 15 float32 thresholds between neighbouring codes, ascending.

    A scaled value ``s`` encodes to ``ORDERS[quant_type][count(midpoints < s)]``: a value exactly
    on a threshold takes the lower sorted position.
    """
    ordered = torch.tensor(CODES[quant_type], dtype=torch.float32)[list(ORDERS[quant_type])]
    return (ordered[:-1] + ordered[1:]) / 2


def create_dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    """The dynamic-exponent 8-bit code (Dettmers, "8-bit approximations for parallelism").

    Each exponent level ``i`` holds a linear fraction grid of ``10**(i - max_exponent_bits + 1)``
    times the midpoints of ``linspace(0.1, 1)``; the sign (when ``signed``) doubles the levels;
    0 and 1 are added and the result sorted. Computed in float32 exactly as bitsandbytes does so
    that the 256 values agree bit for bit (tests pin them).
    """
    for name, value, low, high in (("total_bits", total_bits, 2, 8), ("max_exponent_bits", max_exponent_bits, 1, 8)):
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ValueError(f"create_dynamic_map: {name} must be an int in [{low}, {high}], got {value!r}")
    # which (signed, max_exponent_bits, total_bits) fill exactly 2**total_bits values is decided by the
    # count check below (bitsandbytes' own test uses signed (8, 8): its first level adds no value)
    values: list[float] = []
    non_sign_bits = total_bits - 1
    additional_items = 2 ** (non_sign_bits - max_exponent_bits) - 1
    for level in range(max_exponent_bits):
        n_fraction = int(2 ** (level + non_sign_bits - max_exponent_bits + (0 if signed else 1)) + 1)
        values += _scaled_means(n_fraction, 10 ** (-(max_exponent_bits - 1) + level), signed)
    if additional_items > 0:
        # the level where every exponent bit is zero and no indicator bit is present
        values += _scaled_means(additional_items + 1, 10 ** (-(max_exponent_bits - 1) + level), signed)
    values += [0.0, 1.0]
    if len(values) != 2**total_bits:
        raise ValueError(
            f"create_dynamic_map: signed={signed}, max_exponent_bits={max_exponent_bits} "
            f"gives {len(values)} values, not 2**total_bits={2**total_bits}"
        )
    # a code of fewer bits is padded with zeros to the 256 entries every 8-bit kernel indexes
    values += [0.0] * (CODE8_SIZE - len(values))
    values.sort()
    return torch.tensor(values, dtype=torch.float32)


def create_linear_map(signed: bool = True, total_bits: int = 8, add_zero: bool = True) -> torch.Tensor:
    """``2**total_bits`` evenly spaced values over [-1, 1] (``signed``) or [0, 1], as an 8-bit code.

    Signed codes with ``add_zero`` (and every code below 8 bits) drop one value so that 0 lies on
    the grid. Codes below 8 bits are padded to 256 entries with zeros inserted in the middle of the
    grid (bitsandbytes' layout, so the table is the same byte for byte).
    """
    n = 2**total_bits
    if signed and (add_zero or total_bits < 8):
        n -= 1
    values = torch.linspace(-1.0 if signed else 0.0, 1.0, n)
    half = n // 2
    return torch.cat([values[:half], torch.zeros(CODE8_SIZE - n), values[half:]])


def create_normal_map(offset: float = NF4_QUANTILE_OFFSET, use_extra_value: bool = True) -> torch.Tensor:
    """The NormalFloat code as a 256-entry table: quantiles of N(0, 1) at evenly spaced
    probabilities from ``offset`` to 0.5 (8 positive and 7 negative, or 7 and 7 without
    ``use_extra_value``), plus zeros, sorted and divided by the largest. Its distinct values are
    ``NF4_CODE``. The quantiles are computed in float64 (``torch.special.ndtri``, no scipy)."""
    probabilities = torch.linspace(offset, 0.5, 9 if use_extra_value else 8)[:-1].double()
    positive = torch.special.ndtri(probabilities)
    negative = -torch.special.ndtri(torch.linspace(offset, 0.5, 8)[:-1].double())
    n_zeros = CODE8_SIZE - positive.numel() - negative.numel()
    values = torch.cat([positive, torch.zeros(n_zeros, dtype=torch.float64), negative]).float().sort().values
    return values / values.max()


def create_fp8_map(
    signed: bool = True, exponent_bits: int = 5, precision_bits: int = 2, total_bits: int = 8
) -> torch.Tensor:
    """A float code of ``exponent_bits`` exponent and ``precision_bits`` mantissa bits (plus a sign
    bit when ``signed``) as a sorted 256-entry table divided by its largest value.

    Exponent field 0 is subnormal (``fraction * 2**-bias``); field ``e > 0`` is
    ``(1 + fraction) * 2**(bias + 1 - e)`` with ``bias = 2**(exponent_bits - 1)``, i.e. the exponent
    runs downwards. This is bitsandbytes' definition, kept for identical tables.
    """
    if exponent_bits + precision_bits != total_bits - int(signed):
        raise ValueError(
            f"create_fp8_map: exponent_bits + precision_bits must be total_bits - {int(signed)} "
            f"(sign bit {'included' if signed else 'absent'}), got {exponent_bits} + {precision_bits} "
            f"for total_bits={total_bits}"
        )
    bias = 2 ** (exponent_bits - 1)
    values: list[float] = []
    for exponent in range(2**exponent_bits):
        for mantissa in range(2**precision_bits):
            fraction = mantissa / 2**precision_bits
            value = fraction * 2.0**-bias if exponent == 0 else (1 + fraction) * 2.0 ** (bias + 1 - exponent)
            values += [value, -value] if signed else [value]
    values += [0.0] * (CODE8_SIZE - len(values))
    values.sort()  # stable: +0.0 stays before -0.0, as in bitsandbytes' table
    code = torch.tensor(values, dtype=torch.float32)
    return code / code.max()


def _scaled_means(n_boundaries: int, scale: float, signed: bool) -> list[float]:
    boundaries = torch.linspace(0.1, 1, n_boundaries, dtype=torch.float32)
    means = (boundaries[:-1] + boundaries[1:]) / 2.0
    out = (scale * means).tolist()
    if signed:
        out += (-scale * means).tolist()
    return out


@functools.lru_cache(maxsize=4)
def _dynamic_map_cached(signed: bool) -> torch.Tensor:
    with unset_fake_temporarily():  # see _code_tensor
        return create_dynamic_map(signed=signed)


def dynamic_map(signed: bool = True, device: torch.device | str | None = None) -> torch.Tensor:
    """The default 8-bit code (signed: tensors and first moments; unsigned: second moments)."""
    return _dynamic_map_cached(signed).to(device or "cpu", copy=True)


def packed_numel(n: int, quant_storage: torch.dtype) -> int:
    """Number of ``quant_storage`` elements holding ``n`` packed 4-bit values."""
    itemsize = torch.empty((), dtype=quant_storage).element_size()
    return (n + 1) // (2 * itemsize)


def num_blocks(n: int, blocksize: int) -> int:
    return -(-n // blocksize)


#: Native optimizer numbers (``lowbit::optim::Optimizer`` in csrc/common/lowbit_optim.h, the
#: ``optimizer`` argument of the CPU and GPU C ABIs), aliases resolved as the reference does:
#: adamw and lamb run adam's update, lars momentum's (the trust ratio is separate).
NATIVE_OPTIMIZER_IDS = {
    "adam": 0, "adamw": 0, "lamb": 0,
    "momentum": 1, "lars": 1,
    "rmsprop": 2, "adagrad": 3, "lion": 4, "ademamix": 5,
}  # fmt: skip
#: Native optimizers whose 32-bit step applies a trust ratio when max_unorm > 0 (LAMB, LARS, rmsprop).
NATIVE_TRUST_RATIO_IDS = (0, 1, 2)
