"""The op schemas of DESIGN.md §5 as ``torch.library`` custom ops in the ``lowbit`` namespace.

Each op gets:
* a schema (what ``torch.ops.lowbit.<op>`` accepts),
* a fake implementation (shapes and dtypes only) so ``torch.compile(fullgraph=True)`` traces it,
* a check that validates the arguments in Python (``core/checks.py``) before any backend runs,
* a dispatcher that sends the call to the backend active for the input's device type
  (``core/registry.py``).

Kernels receive exactly the schema's arguments, positionally, already validated.
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


def _define(
    schema: str,
    fake: Callable[..., Any],
    check: Callable[..., None],
    after: Optional[Callable[..., None]] = None,
) -> None:
    """Define ``lowbit::<schema>`` and route it through the registry."""
    name = schema.split("(", 1)[0]
    _lib.define(schema)
    _DEFINED.append(name)

    def dispatch(*args: Any) -> Any:
        check(*args)
        result = registry.kernel_for(name, _device_type(args))(*args)
        if after is not None:
            after(result, *args)
        return result

    dispatch.__name__ = f"lowbit_{name.replace('.', '_')}"
    _lib.impl(name, dispatch, "CompositeExplicitAutograd")
    torch.library.register_fake(f"lowbit::{name}", fake, lib=_lib)


def _nothing(*_: Any) -> None:
    return None


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
    after=lambda result, *_: checks.finite_absmax(result[1]),
)


def _check_dequantize_4bit(A, absmax, blocksize, quant_type, shape, dtype, out=None) -> None:
    A = checks.tensor(A, "A")
    checks.blocksize(blocksize)
    checks.quant_type(quant_type)
    n = math.prod(checks.shape(shape, "shape"))
    checks.float_dtype(dtype, "dtype")
    if A.numel() * A.element_size() != (n + 1) // 2:
        raise ValueError(
            f"A holds {A.numel() * A.element_size()} bytes but shape {tuple(shape)} needs {(n + 1) // 2} packed bytes"
        )
    checks.tensor(absmax, "absmax", (torch.float32,), numel=formats.num_blocks(n, blocksize), device=A.device)
    if out is not None:
        _check_out(out, tuple(shape), dtype, A.device)


def _check_out(out, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> None:
    checks.tensor(out, "out", (dtype,), device=device)
    if tuple(out.shape) != tuple(shape):
        raise ValueError(f"out has shape {tuple(out.shape)}, expected {tuple(shape)}")


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


def _check_4bit_matmul(A, B, shapeB, absmax, code, blocksize, bias_or_out=None, *, is_out=False) -> None:
    A = checks.tensor(A, "A", formats.FLOAT_DTYPES)
    shapeB = checks.shape(shapeB, "shapeB")
    if len(shapeB) != 2:
        raise ValueError(f"shapeB must be 2-D (out_features, in_features), got {shapeB}")
    if A.shape[-1] != shapeB[1]:
        raise ValueError(f"A has {A.shape[-1]} features in its last dimension but shapeB={shapeB} expects {shapeB[1]}")
    B = checks.tensor(B, "B", device=A.device)
    n = shapeB[0] * shapeB[1]
    if B.numel() * B.element_size() != (n + 1) // 2:
        raise ValueError(f"B holds {B.numel() * B.element_size()} bytes but shapeB {shapeB} needs {(n + 1) // 2}")
    checks.blocksize(blocksize)
    checks.tensor(absmax, "absmax", (torch.float32,), numel=formats.num_blocks(n, blocksize), device=A.device)
    checks.code(code, "code", 16, A.device)
    if is_out:
        _check_out(bias_or_out, (*A.shape[:-1], shapeB[0]), A.dtype, A.device)
    elif bias_or_out is not None:
        checks.tensor(bias_or_out, "bias", numel=shapeB[0], device=A.device)


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
    B = checks.tensor(B, "B")
    N, K = _check_interleavable(shapeB, blocksize)
    if B.numel() * B.element_size() != N * K // 2:
        raise ValueError(f"B holds {B.numel() * B.element_size()} bytes but shapeB {shapeB} needs {N * K // 2}")
    checks.tensor(absmax, "absmax", (torch.float32,), numel=N * K // blocksize, device=B.device)


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
    checks.blocksize(blocksize)


def _fake_quantize_blockwise(A, code, blocksize):
    return A.new_empty(A.shape, dtype=torch.uint8), A.new_empty(
        (formats.num_blocks(A.numel(), blocksize),), dtype=torch.float32
    )


_define(
    "quantize_blockwise(Tensor A, Tensor code, int blocksize) -> (Tensor, Tensor)",
    _fake_quantize_blockwise,
    _check_quantize_blockwise,
    after=lambda result, *_: checks.finite_absmax(result[1]),
)


def _check_dequantize_blockwise(A, absmax, code, blocksize, dtype, out=None) -> None:
    A = checks.tensor(A, "A", (torch.uint8,))
    checks.blocksize(blocksize)
    checks.tensor(absmax, "absmax", (torch.float32,), numel=formats.num_blocks(A.numel(), blocksize), device=A.device)
    checks.code(code, "code", 256, A.device)
    checks.float_dtype(dtype, "dtype")
    if out is not None:
        _check_out(out, tuple(A.shape), dtype, A.device)


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
def _check_threshold(threshold) -> None:
    if not isinstance(threshold, (int, float)) or not math.isfinite(threshold) or threshold < 0:
        raise ValueError(f"threshold must be a finite number >= 0, got {threshold!r}")


def _check_int8_vectorwise_quant(A, threshold=0.0) -> None:
    A = checks.tensor(A, "A", formats.FLOAT_DTYPES)
    if A.dim() < 1:
        raise ValueError("A must have at least one dimension")
    _check_threshold(threshold)
    if not bool(torch.isfinite(A).all()):
        raise ValueError("A contains NaN or Inf values; they cannot be quantized")


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
    A = checks.tensor(A, "A", (torch.int8,))
    checks.tensor(stats, "stats", (torch.float32,), numel=checks.rows(A), device=A.device)


_define(
    "int8_vectorwise_dequant(Tensor A, Tensor stats) -> Tensor",
    lambda A, stats: A.new_empty(A.shape, dtype=torch.float32),
    _check_int8_vectorwise_dequant,
)


def _check_int8_double_quant(A, threshold=0.0) -> None:
    _check_int8_vectorwise_quant(A, threshold)


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
    _check_int8_double_quant,
)


def _check_int8_linear_matmul(A, B, out=None) -> None:
    A = checks.tensor(A, "A", (torch.int8,))
    B = checks.tensor(B, "B", (torch.int8,), device=A.device)
    if B.dim() != 2 or B.shape[1] != A.shape[-1]:
        raise ValueError(f"B must be 2-D (out_features, {A.shape[-1]}), got shape {tuple(B.shape)}")
    if out is not None:
        _check_out(out, (*A.shape[:-1], B.shape[0]), torch.int32, A.device)


_define(
    "int8_linear_matmul(Tensor A, Tensor B) -> Tensor",
    lambda A, B: A.new_empty((*A.shape[:-1], B.shape[0]), dtype=torch.int32),
    _check_int8_linear_matmul,
)
_define("int8_linear_matmul.out(Tensor A, Tensor B, Tensor(a!) out) -> ()", _nothing, _check_int8_linear_matmul)


def _check_int8_mm_dequant(A, row_stats, col_stats, dtype=None, bias=None) -> None:
    A = checks.tensor(A, "A", (torch.int32,))
    checks.tensor(row_stats, "row_stats", (torch.float32,), numel=checks.rows(A), device=A.device)
    checks.tensor(col_stats, "col_stats", (torch.float32,), numel=A.shape[-1], device=A.device)
    if dtype is not None:
        checks.float_dtype(dtype, "dtype")
    if bias is not None:
        checks.tensor(bias, "bias", numel=A.shape[-1], device=A.device)


_define(
    "int8_mm_dequant(Tensor A, Tensor row_stats, Tensor col_stats, ScalarType? dtype=None, Tensor? bias=None) "
    "-> Tensor",
    lambda A, row_stats, col_stats, dtype=None, bias=None: A.new_empty(A.shape, dtype=dtype or torch.float16),
    _check_int8_mm_dequant,
)


def _check_int8_scaled_mm(A, B, row_stats, col_stats, bias=None, dtype=None) -> None:
    _check_int8_linear_matmul(A, B)
    checks.tensor(row_stats, "row_stats", (torch.float32,), numel=checks.rows(A), device=A.device)
    checks.tensor(col_stats, "col_stats", (torch.float32,), numel=B.shape[0], device=A.device)
    if dtype is not None:
        checks.float_dtype(dtype, "dtype")
    if bias is not None:
        checks.tensor(bias, "bias", numel=B.shape[0], device=A.device)


_define(
    "int8_scaled_mm(Tensor A, Tensor B, Tensor row_stats, Tensor col_stats, Tensor? bias=None, "
    "ScalarType? dtype=None) -> Tensor",
    lambda A, B, row_stats, col_stats, bias=None, dtype=None: A.new_empty(
        (*A.shape[:-1], B.shape[0]), dtype=dtype or torch.float16
    ),
    _check_int8_scaled_mm,
)


def _check_int8_mixed_scaled_mm(A, CA, CB, SCA, SCB, outlier_cols=None, bias=None) -> None:
    A = checks.tensor(A, "A", formats.FLOAT_DTYPES)
    checks.tensor(CA, "CA", (torch.int8,), numel=A.numel(), device=A.device)
    _check_int8_scaled_mm(CA, CB, SCA, SCB, bias, A.dtype)
    if outlier_cols is not None:
        checks.tensor(outlier_cols, "outlier_cols", (torch.int64, torch.int32), nonempty=False, device=A.device)


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
    if name in OPTIMIZERS_TWO_STATES:
        if state2 is None:
            raise ValueError(f"optimizer {name!r} needs state2")
        checks.tensor(state2, "state2", (state1_dtype,), numel=p.numel(), device=p.device)


def _check_step(step) -> None:
    if not isinstance(step, int) or step < 1:
        raise ValueError(f"step must be an int >= 1, got {step!r}")


def _check_optimizer_update_32bit(
    name, g, p, state1, state2, unorm_vec, max_unorm, param_norm, beta1, beta2, beta3, alpha, eps,
    weight_decay, step, lr, gnorm_scale, skip_zeros=False,
) -> None:  # fmt: skip
    _check_optimizer_common(name, g, p, state1, state2, torch.float32)
    _check_step(step)
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
    blocks = formats.num_blocks(p.numel(), OPTIMIZER_8BIT_BLOCKSIZE)
    copies = 2 if name == "ademamix" else 1
    checks.code(qmap1, "qmap1", 256, p.device)
    checks.tensor(absmax1, "absmax1", (torch.float32,), numel=copies * blocks, device=p.device)
    if name in OPTIMIZERS_TWO_STATES:
        checks.code(qmap2, "qmap2", 256, p.device)
        checks.tensor(absmax2, "absmax2", (torch.float32,), numel=blocks, device=p.device)


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
