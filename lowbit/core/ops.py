"""The op schemas of docs/design.md §5 as ``torch.library`` custom ops in the ``lowbit`` namespace.

Each op gets:
* a schema (what ``torch.ops.lowbit.<op>`` accepts),
* a fake implementation (shapes and dtypes only) so ``torch.compile(fullgraph=True)`` traces it,
* a check that validates the arguments in Python (``core/checks.py``) before any backend runs,
* a dispatcher that sends the call to the backend active for the input's device type
  (``core/registry.py``).

Kernels receive exactly the schema's arguments, positionally, already validated and contiguous:
the dispatcher makes a non-contiguous input contiguous once (bitsandbytes accepts any layout), and
a non-contiguous argument the op writes to (``out``, optimizer state) is computed in a contiguous
copy that is copied back into it afterwards. Neither reads tensor data on the host.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Optional

import torch

from . import checks, formats, registry

_lib = torch.library.Library("lowbit", "DEF")
_DEFINED: list[str] = []

#: Optimizers of optimizer_update_32bit / optimizer_update_8bit_blockwise, by number of states.
OPTIMIZERS_ONE_STATE = ("momentum", "lars", "rmsprop", "adagrad", "lion")
OPTIMIZERS_TWO_STATES = ("adam", "adamw", "lamb", "ademamix")
OPTIMIZERS = OPTIMIZERS_ONE_STATE + OPTIMIZERS_TWO_STATES
OPTIMIZER_8BIT_BLOCKSIZE = formats.NESTED_BLOCKSIZE


def _device_type(args: Sequence[Any]) -> str:
    for arg in args:
        if isinstance(arg, torch.Tensor):
            return arg.device.type
    raise TypeError("lowbit op called without a tensor argument")


def _written_arguments(schema: str) -> dict[int, str]:
    """Position -> name of the arguments that ``schema`` marks as written (``Tensor(a!)``)."""
    parsed = torch._C.parse_schema("lowbit::" + schema)
    return {
        i: arg.name
        for i, arg in enumerate(parsed.arguments)
        if arg.alias_info is not None and arg.alias_info.is_write
    }


def _contiguous_args(
    args: tuple[Any, ...], written: dict[int, str]
) -> tuple[tuple[Any, ...], list[tuple[torch.Tensor, torch.Tensor]]]:
    """``args`` with every tensor contiguous, and the (original, contiguous copy) pairs of the
    written arguments that had to be copied: the caller copies each result back. A copied written
    argument that shares memory with another argument is refused, as a contiguous one is by the
    op's check (the copy back would overwrite an input)."""
    copied: list[tuple[torch.Tensor, torch.Tensor]] = []
    if all(not isinstance(a, torch.Tensor) or a.is_contiguous() for a in args):
        return args, copied
    out = list(args)
    for i, arg in enumerate(args):
        if isinstance(arg, torch.Tensor) and not arg.is_contiguous():
            out[i] = arg.contiguous()
            if i in written:
                for other in args:
                    if isinstance(other, torch.Tensor) and other is not arg and checks.overlaps(arg, other):
                        raise ValueError(
                            f"{written[i]} overlaps another argument of the op; pass a separate tensor"
                        )
                copied.append((arg, out[i]))
    return tuple(out), copied


def _define(
    schema: str,
    fake: Callable[..., Any],
    check: Callable[..., None],
    after: Optional[Callable[..., None]] = None,
) -> None:
    """Define ``lowbit::<schema>`` and route it through the registry.

    ``check`` runs on every path, the fake (meta) kernel included: an argument on the meta device
    next to real tensors selects the fake kernel, which must not hand back uninitialized memory
    for a call the real kernel would refuse. ``after(result, *args)`` checks the result's values
    (where :func:`checks.on_host` allows reading them)."""
    name = schema.split("(", 1)[0]
    _lib.define(schema)
    _DEFINED.append(name)
    written = _written_arguments(schema)

    def dispatch(*args: Any) -> Any:
        args, copied = _contiguous_args(args, written)
        check(*args)
        result = registry.kernel_for(name, _device_type(args))(*args)
        for original, contiguous in copied:
            original.copy_(contiguous)
        if after is not None:
            after(result, *args)
        return result

    def checked_fake(*args: Any) -> Any:
        args, _ = _contiguous_args(args, written)
        check(*args)
        return fake(*args)

    dispatch.__name__ = f"lowbit_{name.replace('.', '_')}"
    _lib.impl(name, dispatch, "CompositeExplicitAutograd")
    torch.library.register_fake(f"lowbit::{name}", checked_fake, lib=_lib)


def _nothing(*_: Any) -> None:
    return None


def _packed(value: object, name: str, device: Optional[torch.device] = None) -> torch.Tensor:
    """Packed 4-bit data: its bytes, in any of the quant_storage dtypes (never bool, complex...)."""
    return checks.tensor(value, name, formats.QUANT_STORAGE_DTYPES, device=device)


def _absmax(
    value: object, n: int, blocksize: int, device: torch.device, of: str, name: str = "absmax", dtype=torch.float32
) -> torch.Tensor:
    """One absmax (float32, or the uint8 code of a nested one) per block of the ``n`` values
    described by ``of``, 1-D: every backend indexes it as a flat array."""
    value = checks.tensor(value, name, (dtype,), device=device, ndim=1)
    n_blocks = formats.num_blocks(n, blocksize)
    if value.numel() != n_blocks:
        raise ValueError(
            f"{name} has {value.numel()} elements, expected {n_blocks}: one per block of {blocksize} "
            f"of the {n} values of {of}"
        )
    return value


def _stats(value: object, name: str, n: int, device: torch.device, of: str) -> torch.Tensor:
    """float32 scales, one per row or column (``of`` says which)."""
    value = checks.tensor(value, name, (torch.float32,), device=device)
    if value.numel() != n:
        raise ValueError(f"{name} has {value.numel()} elements, expected {n} (one per {of})")
    return value


#: dtypes a bias may have (it is added in float32, or in float64 when given as float64)
_BIAS_DTYPES = (*formats.FLOAT_DTYPES, torch.float64)


def _bias(value: object, n: int, device: torch.device) -> None:
    if value is not None:
        checks.tensor(value, "bias", _BIAS_DTYPES, numel=n, device=device, ndim=1)


# ----------------------------------------------------------------------------------------
# 4-bit blockwise (NF4 / FP4)
# ----------------------------------------------------------------------------------------
def _check_quantize_4bit(A, blocksize, quant_type, quant_storage) -> None:
    checks.tensor(A, "A", formats.FLOAT_DTYPES)
    checks.blocksize(blocksize)
    checks.quant_type(quant_type)
    if quant_storage not in formats.QUANT_STORAGE_DTYPES:
        raise ValueError(f"quant_storage must be one of {formats.QUANT_STORAGE_DTYPES}, got {quant_storage!r}")
    n_bytes = (A.numel() + 1) // 2
    itemsize = torch.empty((), dtype=quant_storage).element_size()
    if n_bytes % itemsize:
        raise ValueError(
            f"quant_storage={quant_storage} cannot hold the {n_bytes} packed bytes of A ({A.numel()} values): "
            f"the byte count must be a multiple of {itemsize}"
        )


def _fake_quantize_4bit(A, blocksize, quant_type, quant_storage):
    n = A.numel()
    packed = A.new_empty((formats.packed_numel(n, quant_storage), 1), dtype=quant_storage)
    absmax = A.new_empty((formats.num_blocks(n, blocksize),), dtype=torch.float32)
    return packed, absmax


_define(
    "quantize_4bit(Tensor A, int blocksize, str quant_type, ScalarType quant_storage) -> (Tensor, Tensor)",
    _fake_quantize_4bit,
    _check_quantize_4bit,
    after=lambda result, *_: checks.finite_values(result[1], "A"),
)


def _check_dequantize_4bit(A, absmax, blocksize, quant_type, shape, dtype, out=None) -> None:
    A = _packed(A, "A")
    checks.blocksize(blocksize)
    checks.quant_type(quant_type)
    n = math.prod(checks.shape(shape, "shape"))
    checks.float_dtype(dtype, "dtype")
    if A.numel() * A.element_size() != (n + 1) // 2:
        raise ValueError(
            f"A holds {A.numel() * A.element_size()} bytes but shape {tuple(shape)} needs {(n + 1) // 2} packed bytes"
        )
    _absmax(absmax, n, blocksize, A.device, f"shape {list(shape)}")
    if out is not None:
        checks.out(out, "out", shape, dtype, A.device, {"A": A, "absmax": absmax}, "the shape argument")


def _fake_dequantize_4bit(A, absmax, blocksize, quant_type, shape, dtype):
    return A.new_empty(shape, dtype=dtype)


_define(
    "dequantize_4bit(Tensor A, Tensor absmax, int blocksize, str quant_type, int[] shape, ScalarType dtype) -> Tensor",
    _fake_dequantize_4bit,
    _check_dequantize_4bit,
)
_define(
    "dequantize_4bit.out(Tensor A, Tensor absmax, int blocksize, str quant_type, int[] shape, ScalarType dtype, "
    "Tensor(a!) out) -> ()",
    _nothing,
    _check_dequantize_4bit,
)


def _check_4bit_operands(A, B, shapeB) -> tuple[torch.Tensor, tuple[int, ...], int]:
    """A float ``A`` [..., K] and the packed bytes ``B`` of a [N, K] = ``shapeB`` weight; returns
    ``(A, shapeB, N * K)``."""
    A = checks.tensor(A, "A", formats.FLOAT_DTYPES, min_ndim=1)
    shapeB = checks.shape(shapeB, "shapeB")
    if len(shapeB) != 2:
        raise ValueError(f"shapeB must be 2-D (out_features, in_features), got {shapeB}")
    if A.shape[-1] != shapeB[1]:
        raise ValueError(f"A has {A.shape[-1]} features in its last dimension but shapeB={shapeB} expects {shapeB[1]}")
    B = _packed(B, "B", A.device)
    n = shapeB[0] * shapeB[1]
    if B.numel() * B.element_size() != (n + 1) // 2:
        raise ValueError(f"B holds {B.numel() * B.element_size()} bytes but shapeB {shapeB} needs {(n + 1) // 2}")
    return A, shapeB, n


def _check_4bit_weight(A, B, shapeB, code, blocksize) -> tuple[torch.Tensor, tuple[int, ...], int]:
    """The operands above plus the weight's code and blocksize (what lowbit's 4-bit products share)."""
    A, shapeB, n = _check_4bit_operands(A, B, shapeB)
    checks.blocksize(blocksize)
    checks.code(code, "code", 16, A.device)
    return A, shapeB, n


def _check_4bit_matmul(A, B, shapeB, absmax, code, blocksize, bias_or_out=None, *, is_out=False) -> None:
    A, shapeB, n = _check_4bit_weight(A, B, shapeB, code, blocksize)
    _absmax(absmax, n, blocksize, A.device, f"shapeB {list(shapeB)}")
    if is_out:
        if isinstance(bias_or_out, torch.Tensor) and bias_or_out.dtype != A.dtype:
            raise ValueError(f"out must have A's dtype {A.dtype}, got {bias_or_out.dtype}")
        inputs = {"A": A, "B": B, "absmax": absmax, "code": code}
        checks.out(bias_or_out, "out", (*A.shape[:-1], shapeB[0]), A.dtype, A.device, inputs, "A's rows by shapeB[0]")
    else:
        _bias(bias_or_out, shapeB[0], A.device)


def _fake_4bit_matmul(A, B, shapeB, absmax, code, blocksize, bias=None):
    return A.new_empty((*A.shape[:-1], shapeB[0]))


_define(
    "gemv_4bit(Tensor A, Tensor B, int[] shapeB, Tensor absmax, Tensor code, int blocksize) -> Tensor",
    _fake_4bit_matmul,
    _check_4bit_matmul,
)
_define(
    "gemv_4bit.out(Tensor A, Tensor B, int[] shapeB, Tensor absmax, Tensor code, int blocksize, Tensor(a!) out) -> ()",
    _nothing,
    lambda *args: _check_4bit_matmul(*args, is_out=True),
)
_define(
    "matmul_4bit(Tensor A, Tensor B, int[] shapeB, Tensor absmax, Tensor code, int blocksize, Tensor? bias=None) "
    "-> Tensor",
    _fake_4bit_matmul,
    _check_4bit_matmul,
)


def _check_gemm_4bit(
    A, B, shapeB, absmax, blocksize, quant_type, bias=None, absmax_8bit=None, absmax_code=None, absmax_offset=None
) -> None:
    A, shapeB, n = _check_4bit_operands(A, B, shapeB)
    checks.blocksize(blocksize)
    checks.quant_type(quant_type)
    blocks = formats.num_blocks(n, blocksize)
    if absmax_8bit is None and (absmax_code is not None or absmax_offset is not None):
        raise ValueError("absmax_code and absmax_offset are only used with absmax_8bit")
    if absmax_8bit is None:
        _absmax(absmax, n, blocksize, A.device, f"shapeB {list(shapeB)}")
    else:
        # double quantization: absmax_8bit (one byte per block) against absmax_code, in blocks of
        # NESTED_BLOCKSIZE whose scales are absmax, around absmax_offset
        checks.tensor(absmax_8bit, "absmax_8bit", (torch.uint8,), numel=blocks, device=A.device, ndim=1)
        _absmax(absmax, blocks, formats.NESTED_BLOCKSIZE, A.device, "absmax_8bit")
        checks.code(absmax_code, "absmax_code", formats.CODE8_SIZE, A.device)
        offset = checks.tensor(absmax_offset, "absmax_offset", formats.FLOAT_DTYPES, numel=1, device=A.device)
        if offset.dim() > 1:
            raise ValueError(f"absmax_offset must be a scalar (0-d or one element), got shape {tuple(offset.shape)}")
        checks.finite_values(absmax_offset, "absmax_offset")
    _bias(bias, shapeB[0], A.device)


_define(
    "gemm_4bit(Tensor A, Tensor B, int[] shapeB, Tensor absmax, int blocksize, str quant_type, Tensor? bias=None, "
    "Tensor? absmax_8bit=None, Tensor? absmax_code=None, Tensor? absmax_offset=None) -> Tensor",
    lambda A, B, shapeB, *_, **__: A.new_empty((*A.shape[:-1], shapeB[0])),
    _check_gemm_4bit,
)


def _check_matmul_4bit_nested(A, B, shapeB, absmax, code2, absmax2, blocksize2, offset, code, blocksize, bias=None):
    A, shapeB, n = _check_4bit_weight(A, B, shapeB, code, blocksize)
    n_blocks = formats.num_blocks(n, blocksize)
    _absmax(absmax, n, blocksize, A.device, f"shapeB {list(shapeB)}", dtype=torch.uint8)
    checks.code(code2, "code2", 256, A.device)
    checks.blocksize(blocksize2, "blocksize2")
    _absmax(absmax2, n_blocks, blocksize2, A.device, f"absmax ({n_blocks} blocks)", name="absmax2")
    checks.tensor(offset, "offset", (torch.float32,), numel=1, device=A.device)
    _bias(bias, shapeB[0], A.device)


_define(
    "matmul_4bit_nested(Tensor A, Tensor B, int[] shapeB, Tensor absmax, Tensor code2, Tensor absmax2, "
    "int blocksize2, Tensor offset, Tensor code, int blocksize, Tensor? bias=None) -> Tensor",
    lambda A, B, shapeB, *_: A.new_empty((*A.shape[:-1], shapeB[0])),
    _check_matmul_4bit_nested,
)


# ----------------------------------------------------------------------------------------
# The interleaved 4-bit layout (CPU inference; formats.interleave_rows defines it)
# ----------------------------------------------------------------------------------------
def _check_interleavable(shapeB, blocksize) -> list[int]:
    shapeB = checks.shape(shapeB, "shapeB")
    checks.blocksize(blocksize)
    if not formats.can_interleave(shapeB, blocksize):
        raise ValueError(
            f"shapeB={shapeB} has no interleaved layout at blocksize {blocksize}: it needs 2-D (N, K), N, K > 0 "
            f"and K % blocksize == 0"
        )
    return shapeB


def _check_interleave_4bit(B, absmax, shapeB, blocksize) -> None:
    B = _packed(B, "B")
    N, K = _check_interleavable(shapeB, blocksize)
    if B.numel() * B.element_size() != N * K // 2:
        raise ValueError(f"B holds {B.numel() * B.element_size()} bytes but shapeB {shapeB} needs {N * K // 2}")
    _absmax(absmax, N * K, blocksize, B.device, f"shapeB {list(shapeB)}")


def _fake_interleave_4bit(B, absmax, shapeB, blocksize):
    return torch.empty_like(B), torch.empty_like(absmax)


for _name in ("interleave_4bit", "deinterleave_4bit"):
    _define(
        f"{_name}(Tensor B, Tensor absmax, int[] shapeB, int blocksize) -> (Tensor, Tensor)",
        _fake_interleave_4bit,
        _check_interleave_4bit,
    )


def _check_matmul_4bit_interleaved(A, B, shapeB, absmax, code, blocksize, bias=None, exact=True) -> None:
    _check_interleavable(shapeB, blocksize)
    _check_4bit_matmul(A, B, shapeB, absmax, code, blocksize, bias)
    if not isinstance(exact, bool):
        raise TypeError(f"exact must be a bool, got {type(exact).__name__}")


_define(
    "matmul_4bit_interleaved(Tensor A, Tensor B, int[] shapeB, Tensor absmax, Tensor code, int blocksize, "
    "Tensor? bias=None, bool exact=True) -> Tensor",
    lambda A, B, shapeB, absmax, code, blocksize, bias=None, exact=True: A.new_empty((*A.shape[:-1], shapeB[0])),
    _check_matmul_4bit_interleaved,
)


# ----------------------------------------------------------------------------------------
# 8-bit blockwise (dynamic code)
# ----------------------------------------------------------------------------------------
def _check_quantize_blockwise(A, code, blocksize) -> None:
    A = checks.tensor(A, "A", formats.FLOAT_DTYPES)
    checks.code(code, "code", 256, A.device)
    checks.blocksize(blocksize, allowed=formats.BLOCKSIZES_8BIT)


def _fake_quantize_blockwise(A, code, blocksize):
    return A.new_empty(A.shape, dtype=torch.uint8), A.new_empty(
        (formats.num_blocks(A.numel(), blocksize),), dtype=torch.float32
    )


_define(
    "quantize_blockwise(Tensor A, Tensor code, int blocksize) -> (Tensor, Tensor)",
    _fake_quantize_blockwise,
    _check_quantize_blockwise,
    after=lambda result, *_: checks.finite_values(result[1], "A"),
)


def _check_dequantize_blockwise(A, absmax, code, blocksize, dtype, out=None) -> None:
    A = checks.tensor(A, "A", (torch.uint8,))
    checks.blocksize(blocksize, allowed=formats.BLOCKSIZES_8BIT)
    _absmax(absmax, A.numel(), blocksize, A.device, "A")
    checks.code(code, "code", 256, A.device)
    checks.float_dtype(dtype, "dtype")
    if out is not None:
        checks.out(out, "out", A.shape, dtype, A.device, {"A": A, "absmax": absmax, "code": code}, "the shape of A")


_define(
    "dequantize_blockwise(Tensor A, Tensor absmax, Tensor code, int blocksize, ScalarType dtype) -> Tensor",
    lambda A, absmax, code, blocksize, dtype: A.new_empty(A.shape, dtype=dtype),
    _check_dequantize_blockwise,
)
_define(
    "dequantize_blockwise.out(Tensor A, Tensor absmax, Tensor code, int blocksize, ScalarType dtype, "
    "Tensor(a!) out) -> ()",
    _nothing,
    _check_dequantize_blockwise,
)


# ----------------------------------------------------------------------------------------
# LLM.int8
# ----------------------------------------------------------------------------------------
def _check_int8_vectorwise_quant(A, threshold=0.0) -> None:
    A = checks.tensor(A, "A", formats.FLOAT_DTYPES, min_ndim=1)
    checks.number(threshold, "threshold", 0.0)
    checks.finite_values(A, "A")


def _fake_int8_vectorwise_quant(A, threshold=0.0):
    q = A.new_empty(A.shape, dtype=torch.int8)
    row_stats = A.new_empty((checks.rows(A),), dtype=torch.float32)
    if threshold == 0.0:
        return q, row_stats, None
    n_outliers = torch.library.get_ctx().new_dynamic_size()
    return q, row_stats, A.new_empty((n_outliers,), dtype=torch.int64)


_define(
    "int8_vectorwise_quant(Tensor A, float threshold=0.0) -> (Tensor, Tensor, Tensor?)",
    _fake_int8_vectorwise_quant,
    _check_int8_vectorwise_quant,
)


def _check_int8_vectorwise_dequant(A, stats) -> None:
    A = checks.tensor(A, "A", (torch.int8,), min_ndim=1)
    _stats(stats, "stats", checks.rows(A), A.device, f"row of A, shape {tuple(A.shape)}")


_define(
    "int8_vectorwise_dequant(Tensor A, Tensor stats) -> Tensor",
    lambda A, stats: A.new_empty(A.shape, dtype=torch.float32),
    _check_int8_vectorwise_dequant,
)


def _fake_int8_double_quant(A, threshold=0.0):
    rows = checks.rows(A)
    n_outliers = torch.library.get_ctx().new_dynamic_size()
    return (
        A.new_empty(A.shape, dtype=torch.int8),
        A.new_empty(A.shape, dtype=torch.int8),
        A.new_empty((rows,), dtype=torch.float32),
        A.new_empty((A.shape[-1],), dtype=torch.float32),
        A.new_empty((n_outliers,), dtype=torch.int64),
    )


_define(
    "int8_double_quant(Tensor A, float threshold=0.0) -> (Tensor, Tensor, Tensor, Tensor, Tensor?)",
    _fake_int8_double_quant,
    _check_int8_vectorwise_quant,
)


def _check_int8_linear_matmul(A, B, out=None, names=("A", "B")) -> None:
    A = checks.tensor(A, names[0], (torch.int8,), min_ndim=1)
    B = checks.tensor(B, names[1], (torch.int8,), device=A.device)
    if B.dim() != 2 or B.shape[1] != A.shape[-1]:
        raise ValueError(
            f"{names[1]} must be 2-D (out_features, {A.shape[-1]}) to match the last dimension of {names[0]} "
            f"(shape {tuple(A.shape)}), got shape {tuple(B.shape)}"
        )
    if A.shape[-1] > formats.INT8_MATMUL_MAX_K:
        raise ValueError(
            f"{names[0]}'s last dimension (K = {A.shape[-1]}) exceeds {formats.INT8_MATMUL_MAX_K}, the largest inner size "
            "whose int32 accumulation of int8 products cannot overflow"
        )
    if out is not None:
        checks.out(out, "out", (*A.shape[:-1], B.shape[0]), torch.int32, A.device, {"A": A, "B": B}, "A's rows by B's rows")


_define(
    "int8_linear_matmul(Tensor A, Tensor B) -> Tensor",
    lambda A, B: A.new_empty((*A.shape[:-1], B.shape[0]), dtype=torch.int32),
    _check_int8_linear_matmul,
)
_define("int8_linear_matmul.out(Tensor A, Tensor B, Tensor(a!) out) -> ()", _nothing, _check_int8_linear_matmul)


def _check_int8_mm_dequant(A, row_stats, col_stats, dtype=None, bias=None) -> None:
    A = checks.tensor(A, "A", (torch.int32,), min_ndim=1)
    _stats(row_stats, "row_stats", checks.rows(A), A.device, f"row of A, shape {tuple(A.shape)}")
    _stats(col_stats, "col_stats", A.shape[-1], A.device, f"column of A, shape {tuple(A.shape)}")
    if dtype is not None:
        checks.float_dtype(dtype, "dtype")
    _bias(bias, A.shape[-1], A.device)


_define(
    "int8_mm_dequant(Tensor A, Tensor row_stats, Tensor col_stats, ScalarType? dtype=None, Tensor? bias=None) "
    "-> Tensor",
    lambda A, row_stats, col_stats, dtype=None, bias=None: A.new_empty(A.shape, dtype=dtype or torch.float16),
    _check_int8_mm_dequant,
)


def _check_int8_scaled_mm(
    A, B, row_stats, col_stats, bias=None, dtype=None, names=("A", "B", "row_stats", "col_stats")
) -> None:
    _check_int8_linear_matmul(A, B, names=names[:2])
    _stats(row_stats, names[2], checks.rows(A), A.device, f"row of {names[0]}, shape {tuple(A.shape)}")
    _stats(col_stats, names[3], B.shape[0], A.device, f"row of {names[1]}, shape {tuple(B.shape)}")
    if dtype is not None:
        checks.float_dtype(dtype, "dtype")
    _bias(bias, B.shape[0], A.device)


_define(
    "int8_scaled_mm(Tensor A, Tensor B, Tensor row_stats, Tensor col_stats, Tensor? bias=None, "
    "ScalarType? dtype=None) -> Tensor",
    lambda A, B, row_stats, col_stats, bias=None, dtype=None: A.new_empty(
        (*A.shape[:-1], B.shape[0]), dtype=dtype or torch.float16
    ),
    _check_int8_scaled_mm,
)


def _check_outlier_cols(outlier_cols: object, n_cols: int, device: torch.device) -> None:
    cols = checks.tensor(outlier_cols, "outlier_cols", (torch.int64, torch.int32), nonempty=False, device=device, ndim=1)
    # index values: checked where they are on the host (a negative index would wrap around)
    if checks.on_host(cols) and cols.numel() and not bool(((cols >= 0) & (cols < n_cols)).all()):
        raise ValueError(f"outlier_cols must hold column indices in [0, {n_cols}), got {cols.tolist()}")


def _check_int8_mixed_scaled_mm(A, CA, CB, SCA, SCB, outlier_cols=None, bias=None) -> None:
    A = checks.tensor(A, "A", formats.FLOAT_DTYPES, min_ndim=1)
    checks.tensor(CA, "CA", (torch.int8,), device=A.device)
    if CA.shape != A.shape:
        raise ValueError(f"CA must have A's shape {tuple(A.shape)}, got {tuple(CA.shape)}")
    _check_int8_scaled_mm(CA, CB, SCA, SCB, bias, A.dtype, names=("CA", "CB", "SCA", "SCB"))
    if outlier_cols is not None:
        _check_outlier_cols(outlier_cols, A.shape[-1], A.device)


def _fake_int8_mixed_scaled_mm(A, CA, CB, SCA, SCB, outlier_cols=None, bias=None):
    n_outliers = torch.library.get_ctx().new_dynamic_size()
    sub_a = A.new_empty((checks.rows(A), n_outliers))
    return A.new_empty((*A.shape[:-1], CB.shape[0])), sub_a


_define(
    "int8_mixed_scaled_mm(Tensor A, Tensor CA, Tensor CB, Tensor SCA, Tensor SCB, Tensor? outlier_cols=None, "
    "Tensor? bias=None) -> (Tensor, Tensor?)",
    _fake_int8_mixed_scaled_mm,
    _check_int8_mixed_scaled_mm,
)


# ----------------------------------------------------------------------------------------
# Optimizers
# ----------------------------------------------------------------------------------------
def _check_optimizer_common(name, g, p, state1, state2, state1_dtype) -> None:
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer_name must be one of {OPTIMIZERS}, got {name!r}")
    p = checks.tensor(p, "p", formats.FLOAT_DTYPES)
    checks.tensor(g, "g", (p.dtype,), numel=p.numel(), device=p.device)
    state_numel = 2 * p.numel() if name == "ademamix" else p.numel()
    checks.tensor(state1, "state1", (state1_dtype,), numel=state_numel, device=p.device)
    buffers = {"g": g, "p": p, "state1": state1}
    if name in OPTIMIZERS_TWO_STATES:
        if state2 is None:
            raise ValueError(f"optimizer {name!r} needs state2")
        buffers["state2"] = checks.tensor(state2, "state2", (state1_dtype,), numel=p.numel(), device=p.device)
    _check_disjoint(buffers)


def _check_disjoint(buffers: dict[str, torch.Tensor]) -> None:
    """Buffers an update writes must not share memory with each other (kernels read and write
    them element by element, so an alias would read values already updated)."""
    names = list(buffers)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            if checks.overlaps(buffers[a], buffers[b]):
                raise ValueError(f"{a} and {b} share memory; the optimizer update needs separate tensors")


def _check_step(step) -> None:
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise ValueError(f"step must be an int >= 1, got {step!r}")


def _check_hyperparameters(beta1, beta2, beta3, alpha, eps, weight_decay, lr, gnorm_scale) -> None:
    for name, value in (("beta1", beta1), ("beta2", beta2), ("beta3", beta3)):
        checks.number(value, name, 0.0, 1.0)
    for name, value in (
        ("alpha", alpha), ("eps", eps), ("weight_decay", weight_decay), ("lr", lr), ("gnorm_scale", gnorm_scale)
    ):  # fmt: skip
        checks.number(value, name, 0.0)


def _check_optimizer_update_32bit(
    name, g, p, state1, state2, unorm_vec, max_unorm, param_norm, beta1, beta2, beta3, alpha, eps,
    weight_decay, step, lr, gnorm_scale, skip_zeros=False,
) -> None:  # fmt: skip
    _check_optimizer_common(name, g, p, state1, state2, torch.float32)
    _check_step(step)
    _check_hyperparameters(beta1, beta2, beta3, alpha, eps, weight_decay, lr, gnorm_scale)
    checks.number(max_unorm, "max_unorm", 0.0)
    checks.number(param_norm, "param_norm", 0.0)
    if max_unorm > 0.0:
        checks.tensor(unorm_vec, "unorm_vec", (torch.float32,), numel=1, device=p.device)


_define(
    "optimizer_update_32bit(str optimizer_name, Tensor(a0!) g, Tensor(a1!) p, Tensor(a2!) state1, "
    "Tensor(a3!)? state2, Tensor(a4!)? unorm_vec, float max_unorm, float param_norm, float beta1, float beta2, "
    "float beta3, float alpha, float eps, float weight_decay, int step, float lr, float gnorm_scale, "
    "bool skip_zeros=False) -> ()",
    _nothing,
    _check_optimizer_update_32bit,
)


def _check_optimizer_update_8bit_blockwise(
    name, g, p, state1, state2, beta1, beta2, beta3, alpha, eps, step, lr, qmap1, qmap2, absmax1, absmax2,
    weight_decay, gnorm_scale, skip_zeros=False,
) -> None:  # fmt: skip
    _check_optimizer_common(name, g, p, state1, state2, torch.uint8)
    _check_step(step)
    _check_hyperparameters(beta1, beta2, beta3, alpha, eps, weight_decay, lr, gnorm_scale)
    blocks = formats.num_blocks(p.numel(), OPTIMIZER_8BIT_BLOCKSIZE)
    copies = 2 if name == "ademamix" else 1
    checks.code(qmap1, "qmap1", 256, p.device)
    buffers = {"p": p, "state1": state1, "absmax1": absmax1}
    checks.tensor(absmax1, "absmax1", (torch.float32,), numel=copies * blocks, device=p.device)
    if absmax1.dim() != 1 and tuple(absmax1.shape) != (copies, blocks):  # one absmax per block, flat
        raise ValueError(f"absmax1 must be 1-D or ({copies}, {blocks}), got shape {tuple(absmax1.shape)}")
    if name in OPTIMIZERS_TWO_STATES:
        checks.code(qmap2, "qmap2", 256, p.device)
        checks.tensor(absmax2, "absmax2", (torch.float32,), numel=blocks, device=p.device, ndim=1)
        buffers.update(state2=state2, absmax2=absmax2)
    _check_disjoint(buffers)


_define(
    "optimizer_update_8bit_blockwise(str optimizer_name, Tensor(a0!) g, Tensor(a1!) p, Tensor(a2!) state1, "
    "Tensor(a3!)? state2, float beta1, float beta2, float beta3, float alpha, float eps, int step, float lr, "
    "Tensor(a4!) qmap1, Tensor(a5!)? qmap2, Tensor(a6!) absmax1, Tensor(a7!)? absmax2, float weight_decay, "
    "float gnorm_scale, bool skip_zeros=False) -> ()",
    _nothing,
    _check_optimizer_update_8bit_blockwise,
)

#: Every op defined above (overloads included), for parity tests and `python -m lowbit`.
OP_NAMES: tuple[str, ...] = tuple(_DEFINED)
