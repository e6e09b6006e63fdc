"""Fused optimizer steps through the native library (csrc/cpu/optimizers.cpp): 32-bit state, and
8-bit blockwise state (dequantize -> update -> requantize in one pass over each 256-element block).

The per-element arithmetic is csrc/common/lowbit_optim.h, shared with the GPU kernels: the
formulas and operation order of lowbit/backends/reference/optimizers.py, with torch's fused
multiply-adds where torch's CPU kernels fuse. The one difference is the square root (correctly
rounded here; torch's MKL ``sqrt`` is not always), so parameters of adam, ademamix, rmsprop and
adagrad may differ from the reference by about one ulp of the update; states and 8-bit codes are
identical (tests/test_parity.py).

Arguments arrive validated by the op layer (lowbit/core/ops.py): contiguous, same device, the
right dtypes and sizes.
"""

from __future__ import annotations

import ctypes

import torch

from ...core import formats, ops
from . import kernels, native

OPTIMIZERS = formats.NATIVE_OPTIMIZER_IDS
_TWO_STATES = tuple(sorted({OPTIMIZERS[name] for name in ops.OPTIMIZERS_TWO_STATES}))


class OptimArgs(ctypes.Structure):
    """lowbit_optim_args."""

    _fields_ = [
        ("beta1", ctypes.c_double),
        ("beta2", ctypes.c_double),
        ("beta3", ctypes.c_double),
        ("alpha", ctypes.c_double),
        ("eps", ctypes.c_double),
        ("weight_decay", ctypes.c_double),
        ("lr", ctypes.c_double),
        ("gnorm_scale", ctypes.c_double),
        ("step", ctypes.c_int64),
        ("max_unorm", ctypes.c_double),
        ("param_norm", ctypes.c_double),
    ]


def _args(beta1, beta2, beta3, alpha, eps, weight_decay, lr, gnorm_scale, step, max_unorm=0.0, param_norm=0.0):
    return OptimArgs(
        float(beta1), float(beta2), float(beta3), float(alpha), float(eps), float(weight_decay), float(lr),
        float(gnorm_scale), int(step), float(max_unorm), float(param_norm),
    )  # fmt: skip


@kernels.register("optimizer_update_32bit")
@torch.no_grad()
def optimizer_update_32bit(
    optimizer_name, g, p, state1, state2, unorm_vec, max_unorm, param_norm, beta1, beta2, beta3, alpha, eps,
    weight_decay, step, lr, gnorm_scale, skip_zeros=False,
):  # fmt: skip
    if skip_zeros:
        raise NotImplementedError("skip_zeros is not supported")
    optimizer = OPTIMIZERS[optimizer_name]
    trust = max_unorm > 0.0 and optimizer in formats.NATIVE_TRUST_RATIO_IDS
    args = _args(beta1, beta2, beta3, alpha, eps, weight_decay, lr, gnorm_scale, step, max_unorm, param_norm)
    native.check(
        native.lib().lowbit_optimizer_update_32bit(
            optimizer, native.DTYPES[p.dtype], native.ptr(g), native.ptr(p), p.numel(), *native.buf(state1),
            *native.buf(state2 if optimizer in _TWO_STATES else None), ctypes.byref(args),
            native.ptr(unorm_vec if trust else None), native.num_threads(),
        ),
        "lowbit_optimizer_update_32bit",
    )  # fmt: skip


@kernels.register("optimizer_update_8bit_blockwise")
@torch.no_grad()
def optimizer_update_8bit_blockwise(
    optimizer_name, g, p, state1, state2, beta1, beta2, beta3, alpha, eps, step, lr, qmap1, qmap2, absmax1,
    absmax2, weight_decay, gnorm_scale, skip_zeros=False,
):  # fmt: skip
    if skip_zeros:
        raise NotImplementedError("skip_zeros is not supported")
    optimizer = OPTIMIZERS[optimizer_name]
    two = optimizer in _TWO_STATES
    args = _args(beta1, beta2, beta3, alpha, eps, weight_decay, lr, gnorm_scale, step)
    native.check(
        native.lib().lowbit_optimizer_update_8bit_blockwise(
            optimizer, native.DTYPES[p.dtype], native.ptr(g), native.ptr(p), p.numel(), *native.buf(state1),
            *native.buf(state2 if two else None), ctypes.byref(args), *native.buf(qmap1),
            *native.buf(qmap2 if two else None), *native.buf(absmax1), *native.buf(absmax2 if two else None),
            native.num_threads(),
        ),
        "lowbit_optimizer_update_8bit_blockwise",
    )  # fmt: skip
