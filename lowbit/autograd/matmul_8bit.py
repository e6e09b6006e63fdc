"""LLM.int8 ``matmul(A, B, state=MatmulLtState())``: ``A @ B.T + bias`` with an int8 weight.

The weight lives in the state as ``CB`` (int8, one row per output feature) and ``SCB`` (float32
row scales); a float ``B`` is quantized into it on the way in. Two products, chosen as
bitsandbytes 0.50 chooses them, so that outputs are bit-identical to it:

* LLM.int8 (inference, and training on GPUs): ``A`` is quantized row-wise to int8 (in float16,
  as bitsandbytes does), multiplied in int32 and rescaled; with ``threshold > 0`` the columns of
  ``A`` holding a value >= threshold are zeroed there and multiplied in 16 bit instead;
* dequantized (training on CPU/XPU): ``A @ (CB * SCB / 127).T`` in ``A``'s dtype.

Gradients: ``A`` (through the dequantized weight), ``bias``, and a float ``B`` (exact
``grad_output.T @ A``: the straight-through estimate bitsandbytes uses for fp16 weights).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any, Callable, ClassVar, Optional

import torch
import torch.nn.functional as F

from ..core import formats
from .matmul_4bit import check_bias_and_devices, to_out


@dataclasses.dataclass(eq=False)
class MatmulLtState:
    """The int8 weight of an LLM.int8 product and how to use it (bitsandbytes' fields)."""

    force_no_igemmlt: bool = False
    CB: Optional[torch.Tensor] = None
    SB: Optional[torch.Tensor] = None
    SCB: Optional[torch.Tensor] = None
    SBt: Optional[torch.Tensor] = None
    CBt: Optional[torch.Tensor] = None
    subB: Optional[torch.Tensor] = None
    outlier_pool: Any = None
    has_accumulated_gradients: bool = False
    threshold: float = 0.0
    idx: Optional[torch.Tensor] = None
    is_training: bool = True
    has_fp16_weights: bool = True
    use_pool: bool = False

    # Tile-layout fields of old bitsandbytes releases, still read by some serving code: always None.
    _deprecated_fields: ClassVar[frozenset] = frozenset({"CxB", "CxBt", "formatB", "_tile_indices"})

    def __getattr__(self, name: str):
        if name in MatmulLtState._deprecated_fields:
            warnings.warn(f"MatmulLtState.{name} is deprecated and always None", FutureWarning, stacklevel=2)
            return None
        raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'")

    def reset_grads(self) -> None:
        self.CB = self.SB = self.SCB = self.SBt = self.CBt = None


# ------------------------------------------------------------------------------------------
# pieces shared by both products and by the backward pass
# ------------------------------------------------------------------------------------------
def _weight_from_state(B: torch.Tensor, state: Optional[MatmulLtState]) -> bool:
    """Whether the product takes its weight from ``state.CB`` (an int8 ``B`` whose int8 weight
    the state already holds) rather than from ``B``."""
    return (
        state is not None
        and B.dtype == torch.int8
        and isinstance(state.CB, torch.Tensor)
        and state.SCB is not None
    )


def _prepare_weight(B: torch.Tensor, state: MatmulLtState) -> None:
    """Make ``state.CB`` / ``state.SCB`` hold ``B`` as row-wise int8."""
    if B.dtype == torch.int8:
        if state.CB is None or state.SCB is None:
            scales = state.SCB if state.SCB is not None else getattr(B, "SCB", None)
            if scales is None:
                raise ValueError(
                    "matmul: B is an int8 weight, but neither state.SCB nor B.SCB holds its row scales"
                )
            state.CB, state.SCB = B, scales
    elif state.has_fp16_weights or state.CB is None:
        # A float weight may have changed since the last call (it is being trained): quantize it
        # every time instead of trusting a cached copy.
        state.CB, state.SCB, _ = torch.ops.lowbit.int8_vectorwise_quant(
            B.detach().contiguous().to(torch.float16), 0.0
        )


def _dequantized_weight(CB: torch.Tensor, SCB: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``CB * SCB / 127`` in ``dtype``, with bitsandbytes' order of operations (same bits)."""
    return CB.to(dtype, copy=True).mul_(SCB.unsqueeze(1).mul(1.0 / 127.0))


def _int8_product(A: torch.Tensor, bias: Optional[torch.Tensor], state: MatmulLtState) -> torch.Tensor:
    A2d = A.reshape(-1, A.shape[-1]).contiguous()
    CA, SCA, outlier_cols = torch.ops.lowbit.int8_vectorwise_quant(
        A2d.to(torch.float16), float(state.threshold)
    )
    if state.threshold > 0.0:
        output, _ = torch.ops.lowbit.int8_mixed_scaled_mm(
            A2d, CA, state.CB, SCA, state.SCB, outlier_cols, bias
        )
        state.idx = outlier_cols
    else:
        output = torch.ops.lowbit.int8_scaled_mm(CA, state.CB, SCA, state.SCB, bias, A.dtype)
    return output.reshape(*A.shape[:-1], state.CB.shape[0])


def _dequantized_product(A: torch.Tensor, bias: Optional[torch.Tensor], state: MatmulLtState) -> torch.Tensor:
    return F.linear(A, _dequantized_weight(state.CB, state.SCB, A.dtype), bias)


def _forward(ctx, product: Callable, A, B, out, bias, state: MatmulLtState):
    _prepare_weight(B, state)
    output = product(A, bias, state)
    # CB/SCB as they were for this product: a later call may re-quantize a float weight
    ctx.save_for_backward(A if ctx.needs_input_grad[1] else None, state.CB, state.SCB)
    ctx.weight_dtype = B.dtype
    return to_out(output, out)


class _MatMul8bit(torch.autograd.Function):
    @staticmethod
    def backward(ctx, grad_output):
        A, CB, SCB = ctx.saved_tensors
        grad_2d = grad_output.reshape(-1, grad_output.shape[-1])
        grad_A = grad_B = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_A = torch.matmul(grad_output, _dequantized_weight(CB, SCB, grad_output.dtype))
        if ctx.needs_input_grad[1]:
            grad_B = (grad_2d.t() @ A.reshape(-1, A.shape[-1]).to(grad_2d.dtype)).to(ctx.weight_dtype)
        if ctx.needs_input_grad[3]:
            grad_bias = grad_2d.sum(0)
        return grad_A, grad_B, None, grad_bias, None


class MatMul8bitLt(_MatMul8bit):
    """The LLM.int8 product (int8 activations x int8 weight, outliers in 16 bit)."""

    @staticmethod
    def forward(ctx, A, B, out=None, bias=None, state: Optional[MatmulLtState] = None):
        return _forward(ctx, _int8_product, A, B, out, bias, state)


class MatMul8bitFp(_MatMul8bit):
    """The product with the dequantized int8 weight (training on CPU/XPU)."""

    @staticmethod
    def forward(ctx, A, B, out=None, bias=None, state: Optional[MatmulLtState] = None):
        return _forward(ctx, _dequantized_product, A, B, out, bias, state)


# ------------------------------------------------------------------------------------------
# entry point
# ------------------------------------------------------------------------------------------
def _check_arguments(A, B, state, threshold, bias) -> None:
    for name, value in (("A", A), ("B", B)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"matmul: {name} must be a torch.Tensor, got {type(value).__name__}")
    if A.dtype not in formats.FLOAT_DTYPES or A.dim() == 0:
        raise ValueError(
            f"matmul: A must be a float32, float16 or bfloat16 tensor with at least 1 dimension, "
            f"got {A.dtype} {tuple(A.shape)}"
        )
    if state is not None and not isinstance(state, MatmulLtState):
        raise TypeError(f"matmul: state must be a MatmulLtState or None, got {type(state).__name__}")
    if _weight_from_state(B, state):
        # the product uses state.CB; B may be it in either orientation (bitsandbytes ignores B's
        # layout here, and older callers pass CB.t())
        CB = state.CB
        if CB.dim() != 2 or CB.shape[1] != A.shape[-1] or tuple(B.shape) not in (tuple(CB.shape), tuple(CB.t().shape)):
            raise ValueError(
                f"matmul: state.CB must be a 2-D [out_features, {A.shape[-1]}] int8 weight for A of shape "
                f"{tuple(A.shape)} and B that weight or its transpose; got CB {tuple(CB.shape)}, B {tuple(B.shape)}"
            )
    elif B.dim() != 2 or B.shape[1] != A.shape[-1]:
        raise ValueError(
            f"matmul: B must be a 2-D [out_features, {A.shape[-1]}] weight for A of shape {tuple(A.shape)}, "
            f"got {tuple(B.shape)}"
        )
    if (
        isinstance(threshold, bool)
        or not isinstance(threshold, (int, float))
        or not math.isfinite(threshold)
        or threshold < 0
    ):
        raise ValueError(f"matmul: threshold must be a finite number >= 0, got {threshold!r}")
    check_bias_and_devices("matmul", A, B, bias)


def matmul(
    A: torch.Tensor,
    B: torch.Tensor,
    out: Optional[torch.Tensor] = None,
    state: Optional[MatmulLtState] = None,
    threshold: float = 0.0,
    bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """LLM.int8 ``A @ B.T + bias``; ``B`` is an int8 weight (``Int8Params``) or a float one.

    ``threshold > 0`` (stored in ``state``) enables outlier decomposition.
    """
    _check_arguments(A, B, state, threshold, bias)
    state = MatmulLtState() if state is None else state
    if threshold > 0.0:
        state.threshold = threshold
    if bias is not None and bias.dtype != A.dtype:
        bias = bias.to(A.dtype)  # outside the autograd.Function, so the cast is differentiable

    # As bitsandbytes: training on CPU/XPU multiplies by the dequantized weight (quantizing every
    # activation there buys nothing); an empty A has nothing to quantize.
    dequantized = A.numel() == 0 or (state.is_training and A.device.type in ("cpu", "xpu"))
    needs_grad = torch.is_grad_enabled() and (
        A.requires_grad or B.requires_grad or (bias is not None and bias.requires_grad)
    )
    if needs_grad:
        # `out` is filled by a differentiable copy (handed to the Function it would come back as
        # a new tensor object)
        return to_out((MatMul8bitFp if dequantized else MatMul8bitLt).apply(A, B, None, bias, state), out)
    _prepare_weight(B, state)
    return to_out((_dequantized_product if dequantized else _int8_product)(A, bias, state), out)
