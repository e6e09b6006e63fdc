"""``matmul_4bit``: a product with an NF4/FP4 weight, differentiable in the input (QLoRA).

Paths:

* inference with the weight in the interleaved layout (a layer placed for CPU inference, see
  ``functional.interleave_4bit``), any number of rows: ``matmul_4bit_interleaved``, the fused
  product on that layout (16-bit fixed point or bf16 products by default, float32 ones as
  ``gemv_4bit`` with :func:`set_cpu_precision` ``("float32")``);
* inference on a few rows (up to :func:`gemv_max_rows` rows of ``A``, no gradient needed: decoding,
  small batches): ``gemv_4bit``, the fused dequantize-dot op that backends implement without
  materializing the weight (float32 products and sums, one rounding to ``A``'s dtype; bitsandbytes
  up to 0.45 did the same for one row; 0.50 dequantizes here too);
* other inference: dequantize the weight straight to ``A``'s dtype, then ``F.linear``. This is
  what bitsandbytes 0.50 computes on CPU, so outputs are bit-identical to it, and with many rows
  the dequantization is paid once for all of them;
* training: the same product inside :class:`MatMul4Bit`, which keeps only the packed weight for
  the backward pass and dequantizes it again there (the dense weight is never stored).
"""

from __future__ import annotations

import warnings
import weakref
from typing import Optional

import torch
import torch.nn.functional as F

from ..core import checks, formats, registry
from ..core.quant_state import QuantState
from ..functional import block_absmax_of, deinterleave_4bit, product_4bit

#: Rows of ``A`` up to which inference on the CPU uses the fused ``gemv_4bit`` (the CPU kernel reads
#: the weight once per 8 rows; beyond that dequantizing once and running a GEMM is faster).
GEMV_MAX_ROWS = 8
#: The same crossover on a GPU. The fused kernel reads 0.5 byte per weight per 8 rows; dequantize +
#: cuBLAS moves ~4.5 (write and read a 16-bit weight) but multiplies on tensor cores. With the fused
#: kernel's scalar float32 FMAs the two meet around 16 rows on an A100 and 32 on an H100 (bandwidth
#: and FMA-rate estimates; ``python benchmarks/gpu.py`` measures both paths per row count).
GPU_GEMV_MAX_ROWS = 16


def gemv_max_rows(device: torch.device) -> int:
    """Rows up to which inference on ``device`` takes the fused ``gemv_4bit`` path."""
    return GPU_GEMV_MAX_ROWS if device.type == "cuda" else GEMV_MAX_ROWS

#: How exact the products on the interleaved layout (CPU inference) are (docs/design.md §10):
#:   "fast" (default): the product may run in 16-bit fixed point -- each code value to 2^-13 of
#:           the largest, each activation to 2^-14 of the largest magnitude among its 64 weights'
#:           worth of A, exact integer sums scaled in float32 (AVX512-VNNI, AVX2) -- or, from 8
#:           rows on CPUs with AMX, with each weight (code * absmax) and activation rounded once
#:           to bf16 and float32 sums: errors ~100x below the 4-bit quantization's own;
#:   "float32": float32 products and sums whatever A's dtype (reference parity, as gemv_4bit).
CPU_PRECISIONS = ("fast", "float32")
ENV_CPU_PRECISION = "LOWBIT_CPU_PRECISION"
_cpu_precision = ["fast"]


def set_cpu_precision(precision: str) -> str:
    """Choose :data:`CPU_PRECISIONS` for the CPU inference products from now on; returns the
    previous choice (``LOWBIT_CPU_PRECISION`` sets the initial one)."""
    if precision not in CPU_PRECISIONS:
        raise ValueError(f"precision must be one of {CPU_PRECISIONS}, got {precision!r}")
    previous, _cpu_precision[0] = _cpu_precision[0], precision
    return previous


def cpu_precision() -> str:
    """The current :data:`CPU_PRECISIONS` choice."""
    return _cpu_precision[0]


def _exact() -> bool:
    return _cpu_precision[0] == "float32"


def dense_weight(B: torch.Tensor, quant_state: QuantState, dtype: torch.dtype) -> torch.Tensor:
    """The [N, K] weight of packed ``B`` in ``dtype``, rounded once from float32 (as bitsandbytes)."""
    if quant_state.interleaved:
        B, quant_state = deinterleave_4bit(B, quant_state)
    return torch.ops.lowbit.dequantize_4bit(
        B,
        block_absmax_of(quant_state),
        quant_state.blocksize,
        quant_state.quant_type,
        list(quant_state.shape),
        dtype,
    )


def to_out(result: torch.Tensor, out: Optional[torch.Tensor]) -> torch.Tensor:
    """``result``, or ``out`` filled with it (the ``out=`` argument of both products): exactly its
    shape and dtype. The result is complete before ``out`` is written, so ``out`` may alias A."""
    if out is None:
        return result
    return checks.out(out, "out", result.shape, result.dtype, result.device, {}, contiguous=False).copy_(result)


class MatMul4Bit(torch.autograd.Function):
    """``A @ W.T + bias`` with ``W`` the dequantized 4-bit ``B``; gradients for ``A`` and ``bias``.

    ``B`` itself gets no gradient: a packed 4-bit weight is frozen (QLoRA trains adapters beside it).
    """

    @staticmethod
    def forward(ctx, A, B, out=None, bias=None, quant_state: Optional[QuantState] = None):
        output = F.linear(A, dense_weight(B, quant_state, A.dtype), bias)
        ctx.quant_state = quant_state
        ctx.save_for_backward(B)
        return to_out(output, out)

    @staticmethod
    def backward(ctx, grad_output):
        (B,) = ctx.saved_tensors
        grad_A = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_A = torch.matmul(grad_output, dense_weight(B, ctx.quant_state, grad_output.dtype))
        if ctx.needs_input_grad[3]:
            grad_bias = grad_output.reshape(-1, grad_output.shape[-1]).sum(0)
        return grad_A, None, None, grad_bias, None


class InterleavedProduct:
    """``matmul_4bit_interleaved`` for a layer's weight in the interleaved layout, its weight-side
    arguments read once (``Linear4bit`` keeps one per placed weight for the calls that follow).

    Decoding a token runs one such product per layer, a few microseconds of kernel each on small
    models, so in eager mode the backend's kernel is called directly, bound to the weight
    (``registry.bind_weight``): the op's own checks would cost more than the product. What they
    check holds by construction -- B and the state (its code checked when it was built) came out
    of ``interleave_4bit`` together, A and bias passed ``_check_arguments`` -- but the bias's size,
    checked here, and its layout, made contiguous as the op's dispatcher would. Traced code and
    fake tensors go through the op.
    """

    __slots__ = ("B", "shapeB", "absmax", "code", "blocksize", "device_type", "binding", "source", "state_fields")

    @staticmethod
    def of(B: torch.Tensor, quant_state: QuantState) -> InterleavedProduct:
        """The product of ``B`` with its state, kept on the state (``QuantState.decode_product``):
        decoding calls ``matmul_4bit`` with the same weight and state every token. A kept one is
        used while it was made from this very B and the state still holds the same tensors.
        Traced code makes its own (a trace must not write to the state)."""
        if torch.compiler.is_compiling():
            return InterleavedProduct(B, quant_state)
        product = quant_state.decode_product
        if product is None or not product.made_from(B, quant_state):
            product = quant_state.decode_product = InterleavedProduct(B, quant_state)
        return product

    def made_from(self, B: torch.Tensor, quant_state: QuantState) -> bool:
        absmax, code, shape, blocksize = self.state_fields
        return (
            self.source() is B
            and absmax is quant_state.absmax  # identity: == would compare the tensors' values
            and code is quant_state.code
            and shape == quant_state.shape
            and blocksize == quant_state.blocksize
        )

    def __init__(self, B: torch.Tensor, quant_state: QuantState):
        # Eager calls get B's bytes as a plain tensor: every attribute read of the parameter
        # subclass (data_ptr, nbytes) passes through __torch_function__, ~1 us each.
        self.B = B if type(B) is torch.Tensor or torch.compiler.is_compiling() else B.data
        self.shapeB = list(quant_state.shape)
        self.absmax = quant_state.absmax
        code = quant_state.code
        self.code = formats.code_tensor(quant_state.quant_type, B.device) if code is None else code
        self.blocksize = quant_state.blocksize
        # A's (_check_arguments); building a device object costs 0.2 us
        self.device_type = "cpu" if self.B.is_cpu else self.B.device.type
        # (kernel, the kernel bound to this weight), made on the first call: one attribute, so that a
        # thread never pairs one backend's kernel with another's binding
        self.binding: tuple = (None, None)
        # what ``of`` compares; B weakly: a Params4bit holds its state, and a product kept there
        # must not hold the parameter back (self.B, its bytes as a plain tensor, keeps the bytes)
        self.source = weakref.ref(B)
        self.state_fields = (quant_state.absmax, quant_state.code, quant_state.shape, quant_state.blocksize)

    def __call__(self, A: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        if not checks.has_data(A):  # traced, or fake tensors: the op (its fake kernel), no pointers
            args = (A, self.B, self.shapeB, self.absmax, self.code, self.blocksize, bias, _exact())
            return torch.ops.lowbit.matmul_4bit_interleaved(*args)
        return self.on_values(A, bias)

    def on_values(self, A: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        """The product for an ``A`` that holds values (``Linear4bit``'s plan checked that itself)."""
        if bias is not None:
            if bias.numel() != self.shapeB[0]:
                raise ValueError(f"matmul_4bit: bias must have {self.shapeB[0]} values, got {bias.numel()}")
            bias = bias.contiguous()
        kernel = registry.kernel_for("matmul_4bit_interleaved", self.device_type)
        binding = self.binding
        if binding[0] is not kernel:  # the first call, or another backend runs the device now
            binding = (kernel, registry.bind_weight(kernel, self.B, self.shapeB, self.absmax, self.code, self.blocksize))
            self.binding = binding
        return binding[1](A, bias, _cpu_precision[0] == "float32")


def _check_arguments(A, B, quant_state, bias) -> None:
    if quant_state is None:
        raise ValueError("matmul_4bit: quant_state is required (the QuantState of the packed weight B)")
    if not isinstance(quant_state, QuantState):
        raise TypeError(
            f"matmul_4bit: quant_state must be a lowbit QuantState, got {type(quant_state).__name__}"
        )
    if quant_state.shape is None or len(quant_state.shape) != 2:
        raise ValueError(f"matmul_4bit: quant_state.shape must be 2-D [N, K], got {quant_state.shape}")
    for name, value in (("A", A), ("B", B)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"matmul_4bit: {name} must be a torch.Tensor, got {type(value).__name__}")
    if A.dtype not in formats.FLOAT_DTYPES:
        raise ValueError(f"matmul_4bit: A must be float32, float16 or bfloat16, got {A.dtype}")
    if A.dim() == 0 or A.shape[-1] not in tuple(quant_state.shape):
        raise ValueError(
            f"matmul_4bit: A has shape {tuple(A.shape)}, but the weight is {list(quant_state.shape)} "
            f"(A's last dimension must be {quant_state.shape[1]})"
        )
    check_bias_and_devices("matmul_4bit", A, B, bias)


def check_bias_and_devices(op: str, A: torch.Tensor, B: torch.Tensor, bias) -> None:
    """Both products: B and bias live on A's device; bias is a real floating-point tensor."""
    # both on the CPU (decoding) settles it without building device objects (0.2 us each)
    if not (A.is_cpu and B.is_cpu) and B.device != A.device:
        raise ValueError(f"{op}: B is on {B.device}, expected {A.device} (the device of A)")
    if bias is None:
        return
    if not isinstance(bias, torch.Tensor):
        raise TypeError(f"{op}: bias must be a torch.Tensor or None, got {type(bias).__name__}")
    if not bias.is_floating_point():
        raise ValueError(f"{op}: bias must be a real floating-point tensor, got {bias.dtype}")
    if not (A.is_cpu and bias.is_cpu) and bias.device != A.device:
        raise ValueError(f"{op}: bias is on {bias.device}, expected {A.device} (the device of A)")


def matmul_4bit(
    A: torch.Tensor,
    B: torch.Tensor,
    quant_state: QuantState,
    out: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``A @ dequantize_4bit(B, quant_state).T + bias``.

    ``B`` is the packed weight as stored by ``Params4bit`` (any view of its bytes: ``weight`` or
    ``weight.t()``); ``quant_state.shape`` is the weight's [N, K] = [out_features, in_features].
    """
    _check_arguments(A, B, quant_state, bias)
    n_out, k_in = quant_state.shape
    if bias is not None and bias.dtype != A.dtype:
        bias = bias.to(A.dtype)  # outside the autograd.Function, so the cast is differentiable

    if A.shape[-1] != k_in:
        # A weight quantized in [K, N] orientation: bitsandbytes still accepts it (deprecated). The
        # message keeps bitsandbytes' wording, which warning filters written for it match.
        if not torch.compiler.is_compiling():
            warnings.warn(
                f"matmul_4bit: the weight was quantized from a [K, N] tensor (quant_state.shape="
                f"{list(quant_state.shape)}). Re-quantize from the weight in [N, K] (out_features, in_features) "
                "orientation.",
                DeprecationWarning,
                stacklevel=2,
            )
        return to_out(F.linear(A, dense_weight(B, quant_state, A.dtype).t(), bias), out)

    needs_grad = torch.is_grad_enabled() and (A.requires_grad or (bias is not None and bias.requires_grad))
    if needs_grad:
        # `out` is filled by a differentiable copy; handed to the Function it would come back
        # as a new tensor object
        return to_out(MatMul4Bit.apply(A, B, None, bias, quant_state), out)
    if quant_state.interleaved and A.numel() > 0:
        return to_out(InterleavedProduct.of(B, quant_state)(A.contiguous(), bias), out)
    if 0 < A.numel() <= gemv_max_rows(A.device) * k_in:  # a few tokens: fused dequantize-dot, no dense weight
        # bias joins the float32 sums before the one rounding to A's dtype
        return to_out(product_4bit(A.contiguous(), B, quant_state, bias), out)
    return to_out(F.linear(A, dense_weight(B, quant_state, A.dtype), bias), out)
