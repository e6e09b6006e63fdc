"""User-facing ops with ``bitsandbytes.functional``'s names and signatures.

Each function validates its arguments, calls the ``torch.ops.lowbit`` op (which runs on the
active backend) and builds or reads the :class:`QuantState`. Double quantization
(``compress_statistics`` / ``nested``) is composed here from the blockwise ops, in the same
order of operations as bitsandbytes, so the nested absmax bytes agree too.
"""

from __future__ import annotations

from typing import Optional

import torch

from .core import checks, formats
from .core.formats import create_dynamic_map, create_fp8_map, create_linear_map, create_normal_map
from .core.quant_state import QuantState

__all__ = [
    "QuantState",
    "block_absmax_of",
    "create_dynamic_map",
    "create_fp8_map",
    "create_linear_map",
    "create_normal_map",
    "deinterleave_4bit",
    "dequantize_4bit",
    "dequantize_blockwise",
    "dequantize_fp4",
    "dequantize_nf4",
    "gemv_4bit",
    "get_4bit_type",
    "has_avx512bf16",
    "int8_double_quant",
    "int8_linear_matmul",
    "int8_mm_dequant",
    "int8_vectorwise_dequant",
    "int8_vectorwise_quant",
    "interleave_4bit",
    "quantize_4bit",
    "quantize_blockwise",
    "quantize_fp4",
    "quantize_nf4",
]


def has_avx512bf16() -> bool:
    """Whether the library repacks 4-bit weights into bitsandbytes' AVX512-BF16 CPU layout: never in
    lowbit, whose CPU kernels read the standard packed layout on every ISA (bitsandbytes answers
    False too when its library lacks that path). Code that checks it keeps the standard layout."""
    return False


def get_4bit_type(typename: str, device: Optional[torch.device | str] = None, blocksize: int = 64) -> torch.Tensor:
    """The 16-value codebook of ``typename`` ('nf4' or 'fp4') as float32, index = 4-bit code."""
    checks.quant_type(typename, "typename")
    return formats.code_tensor(typename, device).clone()


# ----------------------------------------------------------------------------------------
# 8-bit blockwise
# ----------------------------------------------------------------------------------------
def quantize_blockwise(
    A: torch.Tensor,
    code: Optional[torch.Tensor] = None,
    absmax: Optional[torch.Tensor] = None,
    out: Optional[torch.Tensor] = None,
    blocksize: int = formats.DEFAULT_BLOCKSIZE_8BIT,
    nested: bool = False,
) -> tuple[torch.Tensor, QuantState]:
    """Quantize ``A`` to 8 bits in blocks of ``blocksize`` values against ``code``
    (default: the signed dynamic map). Returns the uint8 tensor and its state."""
    checks.tensor(A, "A", formats.FLOAT_DTYPES, contiguous=False)
    if code is None:
        code = formats.dynamic_map(signed=True, device=A.device)
    checks.tensor(code, "code", (torch.float32,), contiguous=False)
    checks.blocksize(blocksize, allowed=formats.BLOCKSIZES_8BIT)
    _check_outputs(A, out, A.shape, torch.uint8, absmax, formats.num_blocks(A.numel(), blocksize), nested)
    code = checks.moved(code, "code", A.device)
    q, block_absmax = torch.ops.lowbit.quantize_blockwise(A, code, blocksize)
    if nested:
        offset = block_absmax.mean()
        block_absmax -= offset
        nested_absmax, state2 = quantize_blockwise(block_absmax, blocksize=blocksize, nested=False)
        state = QuantState(
            absmax=nested_absmax,
            code=code.to(A.device, copy=True),
            blocksize=blocksize,
            dtype=A.dtype,
            offset=offset,
            state2=state2,
        )
    else:
        state = QuantState(absmax=block_absmax, code=code.to(A.device, copy=True), blocksize=blocksize, dtype=A.dtype)
    if out is not None:
        q = out.copy_(q)
    if absmax is not None:
        state.absmax = absmax.copy_(state.absmax)
    return q, state


def _check_outputs(A, out, out_shape, out_dtype, absmax, n_blocks: int, nested: bool) -> None:
    """The ``out=``/``absmax=`` buffers of a quantizer, checked before anything is computed: exactly
    the shape and dtype of what is copied into them (the absmax of a nested state is uint8 codes)."""
    if out is not None:
        checks.out(out, "out", out_shape, out_dtype, A.device, {"A": A}, "what A quantizes to", contiguous=False)
    if absmax is not None:
        absmax_dtype = torch.uint8 if nested else torch.float32
        checks.out(
            absmax, "absmax", (n_blocks,), absmax_dtype, A.device, {"A": A, "out": out}, "one per block of A",
            contiguous=False,
        )  # fmt: skip


def _require_fields(state: object, name: str, fields: tuple[str, ...]) -> None:
    """``state`` is a QuantState with ``fields`` set (a hand-built state may lack some)."""
    if not isinstance(state, QuantState):
        raise TypeError(f"{name} must be a QuantState, got {type(state).__name__}")
    missing = [field for field in fields if getattr(state, field) is None]
    if missing:
        raise ValueError(f"{name} has no {', '.join(missing)}; it cannot be used here")
    if state.nested:
        _require_fields(state.state2, f"{name}.state2", ("code", "blocksize", "dtype"))


def codebook_of(state: QuantState, device: torch.device) -> torch.Tensor:
    """The 16-entry codebook of a 4-bit state on ``device``: ``state.code``, which must be the
    codebook of ``state.quant_type`` (what dequantize_4bit decodes with; checked once per code
    tensor), or that codebook when a hand-built state carries none."""
    if state.code is None:
        return formats.code_tensor(state.quant_type, device)
    checks.code_matches(state.code, state.quant_type, "quant_state.code")
    return checks.moved(state.code, "quant_state.code", device)


def block_absmax_of(state: QuantState) -> torch.Tensor:
    """The float32 per-block absmax of ``state``, undoing double quantization if present
    (what the 4-bit and blockwise ops take as ``absmax``)."""
    if state.interleaved:
        raise ValueError("block_absmax_of: the state is in the interleaved layout; deinterleave_4bit it first")
    if not state.nested:
        return state.absmax
    return _decode_nested_absmax(state.absmax, state.state2, state.offset)


def _decode_nested_absmax(codes: torch.Tensor, state2: QuantState, offset: torch.Tensor) -> torch.Tensor:
    """The float32 absmax that the uint8 ``codes`` of double quantization stand for."""
    absmax = dequantize_blockwise(codes, state2)
    absmax += offset
    return absmax.float()


def _every_code_value(state: QuantState) -> torch.Tensor:
    """(nested blocks, 256): the float32 absmax that each uint8 code of the double-quantized
    ``state`` decodes to, in each nested block (its state2 and offset)."""
    state2, size = state.state2, formats.CODE8_SIZE
    nested_blocks = state2.absmax.numel()
    every_code = torch.arange(size, dtype=torch.uint8, device=state2.absmax.device).repeat(nested_blocks)
    # one nested block of all 256 codes each: 256 is an 8-bit blocksize too
    return _decode_nested_absmax(every_code, state2.replace(blocksize=size), state.offset).view(nested_blocks, size)


def _absmax_codes_recoverable(state: QuantState) -> bool:
    """Whether the codes of the double-quantized ``state`` can be read back from the absmax they
    decode to by _recover_absmax_codes: true when in each nested block the codes' values do not
    decrease with the code (bitsandbytes' dynamic map is sorted) and each block's code decodes
    to more than the code below it; false for NaN, a zero or negative scale, or a used code whose
    value rounds to its neighbour's (a nested scale ~1e-6 of the offset or less)."""
    values = _every_code_value(state)
    if not bool((values[:, 1:] >= values[:, :-1]).all()):
        return False
    codes = _by_nested_block(state.absmax.long(), state)  # the padding (code 0) passes
    below = values.gather(1, (codes - 1).clamp_(min=0))
    return bool(((codes == 0) | (below < values.gather(1, codes))).all())


def _recover_absmax_codes(absmax: torch.Tensor, state: QuantState) -> torch.Tensor:
    """The uint8 codes of the double-quantized ``state`` that decode to the float32 ``absmax``:
    in each nested block, the smallest code of that value (the code itself where
    _absmax_codes_recoverable holds)."""
    codes = torch.searchsorted(_every_code_value(state), _by_nested_block(absmax, state))
    return codes.reshape(-1)[: absmax.numel()].to(torch.uint8)


def _by_nested_block(per_block: torch.Tensor, state: QuantState) -> torch.Tensor:
    """One value per block of the double-quantized ``state`` as (nested blocks, state2.blocksize),
    the last nested block padded with zeros."""
    nested_blocks, size = state.state2.absmax.numel(), state.state2.blocksize
    flat = per_block.reshape(-1)
    return torch.nn.functional.pad(flat, (0, nested_blocks * size - flat.numel())).view(nested_blocks, size)


def nested_absmax_args(state: QuantState, device: torch.device) -> Optional[tuple]:
    """``(absmax, code2, absmax2, blocksize2, offset)`` of a nested ``state``: what the op
    ``matmul_4bit_nested`` takes to decode the absmax inside the product, to the values
    :func:`block_absmax_of` computes. None when it cannot: not nested, a state2 whose decoding
    rounds to another dtype than float32 (or lacks fields: block_absmax_of says which), a float64
    offset, or tensors not on ``device`` (block_absmax_of moves them)."""
    if not state.nested:
        return None
    state2, offset = state.state2, state.offset
    if state2.dtype != torch.float32 or None in (state2.code, state2.blocksize) or offset.dtype != torch.float32:
        return None
    if any(t.device != device for t in (state.absmax, state2.code, state2.absmax, offset)):
        return None
    return state.absmax, state2.code, state2.absmax, state2.blocksize, offset


def product_4bit(A: torch.Tensor, B: torch.Tensor, state: QuantState, bias=None) -> torch.Tensor:
    """The fused ``A @ W.T (+ bias)`` (op ``matmul_4bit``) with ``W`` the packed ``B`` of ``state``;
    a nested state goes to ``matmul_4bit_nested`` where it can, which decodes its absmax in the
    product (one kernel launch on the GPU backends instead of three)."""
    shapeB, code = list(state.shape), codebook_of(state, A.device)
    nested = nested_absmax_args(state, A.device)
    if nested is not None:
        return torch.ops.lowbit.matmul_4bit_nested(A, B, shapeB, *nested, code, state.blocksize, bias)
    return torch.ops.lowbit.matmul_4bit(A, B, shapeB, block_absmax_of(state), code, state.blocksize, bias)


def dequantize_blockwise(
    A: torch.Tensor,
    quant_state: Optional[QuantState] = None,
    absmax: Optional[torch.Tensor] = None,
    code: Optional[torch.Tensor] = None,
    out: Optional[torch.Tensor] = None,
    blocksize: int = formats.DEFAULT_BLOCKSIZE_8BIT,
    nested: bool = False,
) -> torch.Tensor:
    """Inverse of :func:`quantize_blockwise`; needs ``quant_state`` or ``absmax``."""
    checks.tensor(A, "A", (torch.uint8,), contiguous=False)
    if quant_state is None:
        if absmax is None:
            raise ValueError("dequantize_blockwise needs quant_state or absmax")
        if code is None:
            code = formats.dynamic_map(signed=True, device=A.device)
        if isinstance(absmax, torch.Tensor) and absmax.dim() > 1:
            absmax = absmax.reshape(-1)  # bitsandbytes indexes any shape flat (e.g. AdEMAMix's stacked state)
        quant_state = QuantState(absmax=absmax, code=code, blocksize=blocksize, dtype=torch.float32)
    _require_fields(quant_state, "quant_state", ("code", "blocksize", "dtype"))
    block_absmax = block_absmax_of(quant_state)
    code = checks.moved(quant_state.code, "code", A.device)
    if out is not None:
        torch.ops.lowbit.dequantize_blockwise.out(A, block_absmax, code, quant_state.blocksize, quant_state.dtype, out)
        return out
    return torch.ops.lowbit.dequantize_blockwise(A, block_absmax, code, quant_state.blocksize, quant_state.dtype)


# ----------------------------------------------------------------------------------------
# 4-bit NF4 / FP4
# ----------------------------------------------------------------------------------------
def quantize_4bit(
    A: torch.Tensor,
    absmax: Optional[torch.Tensor] = None,
    out: Optional[torch.Tensor] = None,
    blocksize: Optional[int] = None,
    compress_statistics: bool = False,
    quant_type: str = "fp4",
    quant_storage: torch.dtype = torch.uint8,
) -> tuple[torch.Tensor, QuantState]:
    """Quantize ``A`` to packed 4-bit values (two per byte) in blocks of ``blocksize``.

    ``compress_statistics=True`` additionally quantizes the per-block absmax to 8 bits
    (blocksize 256) around its mean (double quantization).
    """
    blocksize = formats.DEFAULT_BLOCKSIZE_4BIT if blocksize is None else blocksize
    checks.tensor(A, "A", formats.FLOAT_DTYPES, contiguous=False)
    checks.blocksize(blocksize)
    if quant_storage in formats.QUANT_STORAGE_DTYPES:
        n_packed = formats.packed_numel(A.numel(), quant_storage)
        n_blocks = formats.num_blocks(A.numel(), blocksize)
        _check_outputs(A, out, (n_packed, 1), quant_storage, absmax, n_blocks, bool(compress_statistics))
    packed, block_absmax = torch.ops.lowbit.quantize_4bit(A, blocksize, quant_type, quant_storage)
    code = get_4bit_type(quant_type, device=A.device)
    if compress_statistics:
        offset = block_absmax.mean()
        nested_absmax, state2 = quantize_blockwise(block_absmax - offset, blocksize=formats.NESTED_BLOCKSIZE)
        state = QuantState(
            absmax=nested_absmax,
            shape=A.shape,
            dtype=A.dtype,
            blocksize=blocksize,
            code=code,
            quant_type=quant_type,
            offset=offset,
            state2=state2,
        )
    else:
        state = QuantState(
            absmax=block_absmax, shape=A.shape, dtype=A.dtype, blocksize=blocksize, code=code, quant_type=quant_type
        )
    if out is not None:
        packed = out.copy_(packed)
    if absmax is not None:
        state.absmax = absmax.copy_(state.absmax)
    return packed, state


def quantize_nf4(A, absmax=None, out=None, blocksize=None, compress_statistics=False, quant_storage=torch.uint8):
    return quantize_4bit(A, absmax, out, blocksize, compress_statistics, "nf4", quant_storage)


def quantize_fp4(A, absmax=None, out=None, blocksize=None, compress_statistics=False, quant_storage=torch.uint8):
    return quantize_4bit(A, absmax, out, blocksize, compress_statistics, "fp4", quant_storage)


def dequantize_4bit(
    A: torch.Tensor,
    quant_state: Optional[QuantState] = None,
    absmax: Optional[torch.Tensor] = None,
    out: Optional[torch.Tensor] = None,
    blocksize: Optional[int] = None,
    quant_type: str = "fp4",
) -> torch.Tensor:
    """Inverse of :func:`quantize_4bit`; needs ``quant_state``, or ``absmax`` and ``out``."""
    checks.tensor(A, "A", contiguous=False)
    if quant_state is None:
        if absmax is None or out is None:
            raise ValueError("dequantize_4bit needs quant_state, or both absmax and out")
        checks.tensor(out, "out", formats.FLOAT_DTYPES, nonempty=False, contiguous=False)
        quant_state = QuantState(
            absmax=absmax,
            shape=out.shape,
            dtype=out.dtype,
            blocksize=formats.DEFAULT_BLOCKSIZE_4BIT if blocksize is None else blocksize,
            quant_type=quant_type,
        )
    _require_fields(quant_state, "quant_state", _FIELDS_4BIT)
    if quant_state.interleaved:
        A, quant_state = deinterleave_4bit(A, quant_state)
    block_absmax = block_absmax_of(quant_state)
    args = (A, block_absmax, quant_state.blocksize, quant_state.quant_type, list(quant_state.shape), quant_state.dtype)
    if out is not None:
        torch.ops.lowbit.dequantize_4bit.out(*args, out)
    else:
        out = torch.ops.lowbit.dequantize_4bit(*args)
    # A packed weight passed transposed, as [1, n_bytes], comes back transposed (bitsandbytes does this).
    if A.dim() == 2 and A.shape[0] == 1 and A.shape[1] > 1:
        return out.t()
    return out


#: What a 4-bit QuantState needs to be dequantized or multiplied.
_FIELDS_4BIT = ("shape", "blocksize", "quant_type", "dtype")


def dequantize_nf4(A, quant_state=None, absmax=None, out=None, blocksize=None):
    return dequantize_4bit(A, quant_state, absmax, out, blocksize, "nf4")


def dequantize_fp4(A, quant_state=None, absmax=None, out=None, blocksize=None):
    return dequantize_4bit(A, quant_state, absmax, out, blocksize, "fp4")


def gemv_4bit(
    A: torch.Tensor,
    B: torch.Tensor,
    out: Optional[torch.Tensor] = None,
    transposed_A: bool = False,
    transposed_B: bool = False,
    state: Optional[QuantState] = None,
) -> torch.Tensor:
    """``A @ dequantize_4bit(B).T`` for a few rows of A, without materializing the weight."""
    if state is None:
        raise ValueError("gemv_4bit needs state, the QuantState returned by quantize_4bit")
    _require_fields(state, "state", _FIELDS_4BIT)
    checks.tensor(A, "A", formats.FLOAT_DTYPES, contiguous=False)
    if state.interleaved:
        result = torch.ops.lowbit.matmul_4bit_interleaved(
            A, B, list(state.shape), state.absmax, codebook_of(state, A.device), state.blocksize
        )
        return result if out is None else out.copy_(result)
    if out is None and nested_absmax_args(state, A.device) is not None:
        return product_4bit(A, B, state)
    args = (A, B, list(state.shape), block_absmax_of(state), codebook_of(state, A.device), state.blocksize)
    if out is not None:
        torch.ops.lowbit.gemv_4bit.out(*args, out)
        return out
    return torch.ops.lowbit.gemv_4bit(*args)


def interleave_4bit(A: torch.Tensor, quant_state: QuantState) -> tuple[torch.Tensor, QuantState]:
    """The packed weight ``A`` (its standard bytes and state) in the interleaved layout for CPU
    inference (``formats.interleave_rows``): new bytes of the same size and dtype, and a state
    whose float32 absmax is in the layout's order, decoded once here when the weight is
    double-quantized. ``deinterleave_4bit`` gives back the standard bytes and state bit for bit.
    Needs K % blocksize == 0 (``formats.can_interleave``)."""
    if not isinstance(quant_state, QuantState):
        raise TypeError(f"quant_state must be a QuantState, got {type(quant_state).__name__}")
    if quant_state.interleaved:
        raise ValueError("interleave_4bit: the weight is already in the interleaved layout")
    decoded = block_absmax_of(quant_state)
    packed, absmax = torch.ops.lowbit.interleave_4bit(A, decoded, list(quant_state.shape), quant_state.blocksize)
    # the codes of double quantization go when deinterleave_4bit can read them back from their
    # decoded values (checked once here, on the 256 values per nested block); else they stay
    codes = quant_state.absmax if quant_state.nested else None
    if codes is not None and _absmax_codes_recoverable(quant_state):
        codes = None
    return packed, quant_state.replace(absmax=absmax, layout=formats.LAYOUT_INTERLEAVED, absmax_codes=codes)


def deinterleave_4bit(A: torch.Tensor, quant_state: QuantState) -> tuple[torch.Tensor, QuantState]:
    """Inverse of :func:`interleave_4bit`: the standard (bitsandbytes) bytes and state."""
    if not isinstance(quant_state, QuantState):
        raise TypeError(f"quant_state must be a QuantState, got {type(quant_state).__name__}")
    if not quant_state.interleaved:
        raise ValueError("deinterleave_4bit: the weight is not in the interleaved layout")
    packed, absmax = torch.ops.lowbit.deinterleave_4bit(
        A, quant_state.absmax, list(quant_state.shape), quant_state.blocksize
    )
    standard = absmax
    if quant_state.nested:
        codes = quant_state.absmax_codes
        standard = codes if codes is not None else _recover_absmax_codes(absmax, quant_state)
    return packed, quant_state.replace(absmax=standard, layout=formats.LAYOUT_STANDARD, absmax_codes=None)


# ----------------------------------------------------------------------------------------
# LLM.int8
# ----------------------------------------------------------------------------------------
def int8_vectorwise_quant(A: torch.Tensor, threshold: float = 0.0):
    """Row-wise int8 quantization; with ``threshold > 0`` columns holding |x| >= threshold are
    returned as outlier columns (and zeroed in the int8 matrix)."""
    return torch.ops.lowbit.int8_vectorwise_quant(A, threshold)


def int8_vectorwise_dequant(A: torch.Tensor, stats: torch.Tensor) -> torch.Tensor:
    return torch.ops.lowbit.int8_vectorwise_dequant(A, stats)


def int8_double_quant(
    A: torch.Tensor,
    col_stats: Optional[torch.Tensor] = None,
    row_stats: Optional[torch.Tensor] = None,
    out_col: Optional[torch.Tensor] = None,
    out_row: Optional[torch.Tensor] = None,
    threshold: float = 0.0,
):
    """Row-wise and column-wise int8 quantization: (q_row, q_col, row_stats, col_stats, outlier_cols)."""
    for name, value in (("col_stats", col_stats), ("row_stats", row_stats), ("out_col", out_col), ("out_row", out_row)):
        if value is not None:
            raise ValueError(f"{name} must be None: int8_double_quant does not take pre-allocated outputs")
    return torch.ops.lowbit.int8_double_quant(A, threshold)


def int8_linear_matmul(
    A: torch.Tensor, B: torch.Tensor, out: Optional[torch.Tensor] = None, dtype: torch.dtype = torch.int32
) -> torch.Tensor:
    """Exact ``A @ B.T`` of int8 matrices, in int32."""
    if dtype != torch.int32:
        raise ValueError(f"dtype must be torch.int32, got {dtype}")
    if out is not None:
        torch.ops.lowbit.int8_linear_matmul.out(A, B, out)
        return out
    return torch.ops.lowbit.int8_linear_matmul(A, B)


def int8_mm_dequant(
    A: torch.Tensor,
    row_stats: torch.Tensor,
    col_stats: torch.Tensor,
    out: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Scale an int32 product back to float16: ``A * row_stats * col_stats / 127**2 + bias``."""
    result = torch.ops.lowbit.int8_mm_dequant(A, row_stats, col_stats, torch.float16, bias)
    if out is None:
        return result
    # the result is complete before `out` is written, so `out` may even alias A
    return checks.out(out, "out", result.shape, result.dtype, result.device, {}, contiguous=False).copy_(result)
