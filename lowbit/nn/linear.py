"""Quantized linear layers: ``Linear4bit`` (QLoRA NF4/FP4) and ``Linear8bitLt`` (LLM.int8).

Same constructor arguments and attributes as bitsandbytes. Build the layer, load float weights,
then ``.to(device)`` (``.cpu()`` included) quantizes; so does the first forward pass, and so
does loading a quantized checkpoint (see ``checkpoint.py``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from collections.abc import Iterator
from typing import Optional

import torch
from torch import nn

from ..autograd import MatmulLtState, matmul, matmul_4bit
from ..autograd.matmul_4bit import InterleavedProduct
from ..core import checks, formats, registry
from .checkpoint import QuantizedWeightMixin
from .int8params import Int8Params
from .params4bit import Params4bit

logger = logging.getLogger("lowbit")


@contextlib.contextmanager
def _bias_in(bias: Optional[torch.Tensor], dtype: torch.dtype) -> Iterator[Optional[torch.Tensor]]:
    """The bias in the compute dtype, for one product. As bitsandbytes, the Parameter itself is cast
    in place on first use (its dtype, and the dtype a checkpoint saves it in, follow the input's);
    a product that raises (bad input) undoes the cast, so a refused call changes nothing. Where the
    cast has no data (torch.compile or FakeTensorMode tracing, a meta bias) it is per call: a trace
    must not rebind the real Parameter's ``.data``."""
    if bias is None or bias.dtype == dtype:
        yield bias
        return
    if torch.compiler.is_compiling():
        yield bias.to(dtype)
        return
    cast = bias.data.to(dtype)
    if not checks.has_data(cast):
        yield bias.to(dtype)
        return
    original, bias.data = bias.data, cast
    try:
        yield bias
    except BaseException:
        bias.data = original
        raise


class _InferencePlan:
    """What a ``Linear4bit`` call on its interleaved weight established, kept for the calls after it.

    Decoding calls each layer once per token with the same kind of input; there the full path's
    checks, attribute reads of the weight (a parameter subclass: each passes through
    ``__torch_function__``) and lookups cost more than the product of a small layer. The plan
    holds the product's arguments and what they were computed from; a call reuses them only while
    the layer still holds that weight object with that state (every layout change, load or
    requantization installs a new state), and the input needs no check, cast or gradient.
    """

    __slots__ = ("weight", "state", "dtype", "in_shape", "product")

    def __init__(self, weight: Params4bit, dtype: torch.dtype, in_features: int):
        self.weight = weight
        self.state = weight.quant_state
        self.dtype = dtype
        self.in_shape = torch.Size([in_features])
        self.product = InterleavedProduct(weight, self.state)


class Linear4bit(QuantizedWeightMixin, nn.Linear):
    """A linear layer with a 4-bit (NF4 or FP4) weight, computed in ``compute_dtype``.

    ``compute_dtype=None`` takes the input's dtype on the first call (float32 / bfloat16 inputs).
    ``compress_statistics=True`` double-quantizes the absmax (~0.37 bit per weight saved).
    ``quant_storage`` is the dtype the packed bytes are viewed as (uint8, or a float dtype for FSDP).

    CPU inference: the first forward in eval mode (``model.eval()``, no gradient for the input) on
    the CPU puts the weight in the interleaved layout (``functional.interleave_4bit``) when the
    native CPU backend runs, in place of its standard bytes: products then read it in one fused
    pass for any number of tokens. ``train()``, a move to another device and ``state_dict`` see
    the standard bytes again (the first two convert back, ``state_dict`` saves a converted copy).
    """

    weight_class = Params4bit
    #: set by a call on the interleaved weight (a class default: layers pickled before it existed
    #: load without it)
    _inference_plan: Optional[_InferencePlan] = None

    def __init__(
        self,
        input_features: int,
        output_features: int,
        bias: bool = True,
        compute_dtype: Optional[torch.dtype] = None,
        compress_statistics: bool = True,
        quant_type: str = "fp4",
        quant_storage: torch.dtype = torch.uint8,
        device=None,
    ):
        if compute_dtype is not None and compute_dtype not in formats.FLOAT_DTYPES:
            raise ValueError(
                f"compute_dtype must be None or one of {formats.FLOAT_DTYPES}, got {compute_dtype!r}"
            )
        super().__init__(input_features, output_features, bias, device)
        self.weight = Params4bit(
            self.weight.data,
            requires_grad=False,
            compress_statistics=compress_statistics,
            quant_type=quant_type,
            quant_storage=quant_storage,
            module=self,
        )
        self.compute_dtype = compute_dtype
        self.compute_type_is_set = compute_dtype is not None
        self.quant_state = None
        self.quant_storage = quant_storage

    def weight_shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    def set_compute_type(self, x: torch.Tensor) -> None:
        """Adopt a float32/bfloat16 input's dtype; warn about float16 input with float32 compute."""
        if x.dtype in (torch.float32, torch.bfloat16):
            self.compute_dtype = x.dtype
        elif x.dtype == torch.float16 and self.compute_dtype in (None, torch.float32):
            if not torch.compiler.is_compiling():
                logger.warning(
                    "Input type into Linear4bit is torch.float16, but bnb_4bit_compute_dtype=torch.float32 "
                    "(default). This will lead to slow inference%s.",
                    "" if x.dim() == 0 or x.numel() == x.shape[-1] else " or training speed",
                )

    def _weight_for_forward(self) -> Params4bit:
        state = self.quant_state
        if getattr(self.weight, "quant_state", None) is None and state is not None:
            # FSDP and other wrappers may hand back the packed data without its state (a plain
            # tensor, or the subclass without attributes); the layer kept a reference to it.
            weight = Params4bit(
                self.weight.data,
                blocksize=state.blocksize,
                compress_statistics=state.nested,
                quant_type=state.quant_type,
                quant_storage=self.weight.dtype,
                module=self,
            )
            weight._set_state(state)
            self.weight = weight
        return self.quantized_weight()

    def _place_for_cpu_inference(self, x: torch.Tensor, weight: Params4bit) -> None:
        state = weight.quant_state
        if self.training or state is None or state.interleaved:  # every call: the cheap tests first
            return
        if (
            torch.compiler.is_compiling()  # placed by an eager call, or never: no graph break
            or weight.device.type != "cpu"
            or (x.requires_grad and torch.is_grad_enabled())
            or not formats.can_interleave(state.shape, state.blocksize)
            or tuple(state.shape) != self.weight_shape()
            or not registry.has_native_kernel("matmul_4bit_interleaved", "cpu")
        ):
            return
        weight._interleave()

    def train(self, mode: bool = True):
        weight = self.weight
        if mode:
            self._inference_plan = None  # it would keep the interleaved bytes alive
            if isinstance(weight, Params4bit) and weight.interleaved:
                weight._deinterleave()  # training dequantizes the standard bytes
        return super().train(mode)

    # A device move or a load replaces the weight's bytes or the weight: drop the plan at once
    # rather than at the next call, so that it keeps no old bytes alive.
    def _apply(self, fn, *args, **kwargs):
        self._inference_plan = None
        return super()._apply(fn, *args, **kwargs)

    def _load_from_state_dict(self, *args, **kwargs):
        self._inference_plan = None
        return super()._load_from_state_dict(*args, **kwargs)

    def __getstate__(self):
        state = super().__getstate__()
        state["_inference_plan"] = None  # rebuilt by the first call (copies get their own weight)
        return state

    def _planned_forward(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """The output through the plan of an earlier call, or None where this call needs the full path."""
        plan = self._inference_plan
        if plan is None:
            return None
        params = self._parameters
        bias = params.get("bias")
        if not (
            params.get("weight") is plan.weight
            and plan.weight.quant_state is plan.state
            and type(x) is torch.Tensor  # subclasses (fake tensors, ...) take the full path
            and x.dtype is plan.dtype is self.compute_dtype  # no casts, no compute-type choice
            and x.is_cpu
            and x.shape[-1:] == plan.in_shape
            and x.numel() > 0  # as matmul_4bit routes it: no rows, no product
            and "bias" in params  # else self.bias may be a plain attribute
            and (bias is None or bias.dtype is plan.dtype)
            and not (torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)))
        ):
            return None
        return plan.product.on_values(x.contiguous(), bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.compiler.is_compiling():  # traced code takes the full path to the op
            out = self._planned_forward(x)
            if out is not None:
                return out
            self._inference_plan = None  # the full path may change what it was computed from
        self._check_input(x)
        weight = self._weight_for_forward()
        self._place_for_cpu_inference(x, weight)
        if not self.compute_type_is_set:
            self.set_compute_type(x)
            self.compute_type_is_set = True
        input_dtype = x.dtype
        if self.compute_dtype is not None:
            x = x.to(self.compute_dtype)
        with _bias_in(self.bias, x.dtype) as bias:
            out = matmul_4bit(x, weight, quant_state=weight.quant_state, bias=bias)
        if isinstance(weight, Params4bit) and weight.interleaved and checks.has_data(out):  # not traced, not fake
            self._inference_plan = _InferencePlan(weight, self.compute_dtype, self.in_features)
        return out.to(input_dtype)


class LinearFP4(Linear4bit):
    """``Linear4bit`` with ``quant_type="fp4"``."""

    def __init__(
        self,
        input_features,
        output_features,
        bias=True,
        compute_dtype=None,
        compress_statistics=True,
        quant_storage=torch.uint8,
        device=None,
    ):
        super().__init__(
            input_features,
            output_features,
            bias,
            compute_dtype,
            compress_statistics,
            "fp4",
            quant_storage,
            device,
        )


class LinearNF4(Linear4bit):
    """``Linear4bit`` with ``quant_type="nf4"`` (normal-float: equal-area bins of N(0, 1), QLoRA)."""

    def __init__(
        self,
        input_features,
        output_features,
        bias=True,
        compute_dtype=None,
        compress_statistics=True,
        quant_storage=torch.uint8,
        device=None,
    ):
        super().__init__(
            input_features,
            output_features,
            bias,
            compute_dtype,
            compress_statistics,
            "nf4",
            quant_storage,
            device,
        )


class Linear8bitLt(QuantizedWeightMixin, nn.Linear):
    """LLM.int8 linear layer.

    ``has_fp16_weights=False``: the weight is stored as int8 (quantized by ``.to(device)``, the
    first forward, or loaded as such); ``True``: it stays in floating point and is trained, and
    every product quantizes it. ``threshold > 0`` multiplies input columns holding a value of at
    least ``threshold`` in 16 bit (outlier decomposition); 6.0 is the usual choice.
    """

    weight_class = Int8Params

    def __init__(
        self,
        input_features: int,
        output_features: int,
        bias: bool = True,
        has_fp16_weights: bool = True,
        threshold: float = 0.0,
        index=None,
        device=None,
    ):
        if (
            isinstance(threshold, bool)
            or not isinstance(threshold, (int, float))
            or not 0.0 <= threshold < math.inf
        ):
            raise ValueError(f"threshold must be a finite number >= 0, got {threshold!r}")
        super().__init__(input_features, output_features, bias, device)
        self.state = MatmulLtState()
        self.index = index
        self.state.threshold = threshold
        self.state.has_fp16_weights = has_fp16_weights
        if threshold > 0.0 and not has_fp16_weights:
            self.state.use_pool = True
        self.weight = Int8Params(
            self.weight.data, has_fp16_weights=has_fp16_weights, requires_grad=has_fp16_weights
        )

    def weight_shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    def init_8bit_state(self) -> None:
        """Point the matmul state at the int8 weight (bitsandbytes' name for it)."""
        self.state.CB = self.weight.CB
        self.state.SCB = self.weight.SCB

    def _holds_int8_weight(self) -> bool:
        # False also for a plain Parameter put in place of the weight (tied weights)
        return isinstance(self.weight, Int8Params) and self.weight._is_quantized()

    def _apply(self, fn, *args, **kwargs):
        result = super()._apply(fn, *args, **kwargs)
        if self._holds_int8_weight():
            self.init_8bit_state()  # the state follows the weight to its new device
        return result

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # The scales may have been handed to the state only (bitsandbytes' init_8bit_state clears
        # them from the weight); save them from there too.
        weight = self.weight
        if self._holds_int8_weight() and weight.SCB is None and self.state.SCB is not None:
            weight.SCB = self.state.SCB
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        weight = self.quantized_weight()
        self.state.is_training = self.training
        state = self.state
        if self._holds_int8_weight():
            self.init_8bit_state()
        elif not isinstance(weight, Int8Params):
            # a plain float Parameter (tied weights) may change between calls: quantize it each
            # time, never from a cached int8 copy
            state = dataclasses.replace(state, has_fp16_weights=True, CB=None, SCB=None)
        with _bias_in(self.bias, x.dtype) as bias:
            return matmul(x, weight, bias=bias, state=state)
