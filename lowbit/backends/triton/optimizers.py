"""Fused optimizer steps as Triton kernels: 32-bit state, and 8-bit blockwise state (dequantize ->
update -> requantize in one kernel).

The arithmetic is csrc/common/lowbit_optim.h's, operation for operation (it is the reference's
chain of torch ops as torch evaluates them on the CPU: ``add_(b, alpha=s)`` is ``fma(b, s, a)``,
``addcmul_(b, c, value=s)`` is ``fma(s * b, c, a)``, ``addcdiv_`` is ``a + (s * b) / c``): the step
scalars are derived in double as the reference derives them in Python and rounded to float32 where
torch rounds them (:func:`_scalars`), the kernels run without FMA contraction and with correctly
rounded division and square root. What differs from the reference (tests/test_parity.py states the
tolerances): torch.sqrt on the CPU is MKL's (not correctly rounded), so the parameter update of
adam, ademamix, rmsprop and adagrad can differ by about one ulp of the update; the LAMB/LARS update
norm is a float32 sum in another order. States and 8-bit codes are identical.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ...core import formats
from ...core.ops import OPTIMIZER_8BIT_BLOCKSIZE, OPTIMIZERS_TWO_STATES
from ...core.registry import KernelTable
from .blockwise_8bit import block_absmax, encode_blocks
from .runtime import EXACT, cast_to, on_device, per_program, to_float32

# Optimizer numbers after alias resolution (adamw, lamb -> adam; lars -> momentum): the native ones.
ADAM: tl.constexpr = tl.constexpr(formats.NATIVE_OPTIMIZER_IDS["adam"])
MOMENTUM: tl.constexpr = tl.constexpr(formats.NATIVE_OPTIMIZER_IDS["momentum"])
RMSPROP: tl.constexpr = tl.constexpr(formats.NATIVE_OPTIMIZER_IDS["rmsprop"])
ADAGRAD: tl.constexpr = tl.constexpr(formats.NATIVE_OPTIMIZER_IDS["adagrad"])
LION: tl.constexpr = tl.constexpr(formats.NATIVE_OPTIMIZER_IDS["lion"])
ADEMAMIX: tl.constexpr = tl.constexpr(formats.NATIVE_OPTIMIZER_IDS["ademamix"])


@triton.jit
def _sign(x):
    """torch.sign as the native kernels compute it: +1, -1, and 0 for +-0 and NaN."""
    return (x > 0.0).to(tl.float32) - (x < 0.0).to(tl.float32)


@triton.jit
def _finite(x):
    """Neither NaN nor +-Inf."""
    return tl.abs(x) <= 3.4028234663852886e38


@triton.jit
def _update32(g, p, s1, s1b, s2, step_alpha, beta1, beta2, beta3, alpha, eps, weight_decay, gnorm_scale,
              one_minus_beta1, one_minus_beta2, one_minus_beta3, correction1, correction2, decay, neg_lr,
              eps_correction2, neg_lr_over_correction1, has_weight_decay, first_step, OPT: tl.constexpr):  # fmt: skip
    """One 32-bit step (lowbit_optim.h update32). Returns p, s1, s1b, s2 and the value whose norm
    the trust ratio needs (adam, rmsprop: the update; momentum: the new state)."""
    g = g * gnorm_scale
    if OPT == ADAM:
        s1 = tl.fma(g, one_minus_beta1, s1 * beta1)
        s2 = tl.fma(one_minus_beta2 * g, g, s2 * beta2)
        p = tl.where(has_weight_decay != 0, p * decay, p)
        value = tl.div_rn(s1, tl.sqrt_rn(s2) + eps_correction2)
        p = tl.fma(value, step_alpha, p)
    elif OPT == ADEMAMIX:
        s1 = tl.fma(g, one_minus_beta1, s1 * beta1)
        s1b = tl.fma(g, one_minus_beta3, s1b * beta3)
        s2 = tl.fma(one_minus_beta2 * g, g, s2 * beta2)
        p = tl.where(has_weight_decay != 0, p * decay, p)
        value = tl.div_rn(tl.div_rn(s1, correction1) + alpha * s1b, tl.div_rn(tl.sqrt_rn(s2), correction2) + eps)
        p = tl.fma(value, neg_lr, p)
    elif OPT == MOMENTUM:
        g = tl.where(has_weight_decay != 0, tl.fma(p, weight_decay, g), g)
        s1 = tl.where(first_step != 0, g, s1 * beta1 + g)
        value = s1
        p = tl.fma(s1, step_alpha, p)
    elif OPT == LION:
        p = tl.where(has_weight_decay != 0, p * decay, p)
        p = tl.fma(_sign(tl.fma(g, one_minus_beta1, s1 * beta1)), neg_lr, p)
        s1 = tl.fma(g, one_minus_beta2, s1 * beta2)
        value = s1
    elif OPT == RMSPROP:
        g = tl.where(has_weight_decay != 0, tl.fma(p, weight_decay, g), g)
        s1 = tl.fma(one_minus_beta1 * g, g, s1 * beta1)
        value = tl.div_rn(g, tl.sqrt_rn(s1) + eps)
        p = tl.fma(value, step_alpha, p)
    else:  # ADAGRAD
        g = tl.where(has_weight_decay != 0, tl.fma(p, weight_decay, g), g)
        s1 = tl.fma(g, g, s1)
        value = tl.div_rn(g, tl.sqrt_rn(s1) + eps)
        p = tl.fma(value, neg_lr, p)
    return p, s1, s1b, s2, value


@triton.jit
def _update8(g, p, s1, s1b, s2, beta1, beta2, beta3, alpha, eps, weight_decay, gnorm_scale, one_minus_beta1,
             one_minus_beta2, one_minus_beta3, correction1, correction2, decay, neg_lr, eps_correction2,
             neg_lr_over_correction1, has_weight_decay, first_step, OPT: tl.constexpr):  # fmt: skip
    """One step on dequantized 8-bit state (lowbit_optim.h update8: eps, weight decay and the
    fused multiply-adds enter where the reference's 8-bit formulas put them; momentum, rmsprop and
    adagrad add weight decay even when it is 0). An element whose new p or state is not finite
    keeps its old values (the non-finite policy of lowbit_optim.h)."""
    p0, s10, s1b0, s20 = p, s1, s1b, s2
    g = g * gnorm_scale
    if OPT == ADAM:
        s1 = tl.fma(g, one_minus_beta1, s1 * beta1)
        s2 = tl.fma(one_minus_beta2 * g, g, s2 * beta2)
        denom = tl.div_rn(tl.sqrt_rn(s2), correction2) + eps
        p = tl.where(has_weight_decay != 0, p * decay, p)
        p = p + tl.div_rn(neg_lr_over_correction1 * s1, denom)
    elif OPT == ADEMAMIX:
        s1 = tl.fma(g, one_minus_beta1, s1 * beta1)
        s1b = tl.fma(g, one_minus_beta3, s1b * beta3)
        s2 = tl.fma(one_minus_beta2 * g, g, s2 * beta2)
        update = tl.div_rn(tl.div_rn(s1, correction1) + alpha * s1b, tl.div_rn(tl.sqrt_rn(s2), correction2) + eps)
        p = tl.where(has_weight_decay != 0, p * decay, p)
        p = tl.fma(update, neg_lr, p)
    elif OPT == MOMENTUM:
        g = tl.fma(p, weight_decay, g)
        s1 = tl.where(first_step != 0, g, s1 * beta1 + g)
        p = tl.fma(s1, neg_lr, p)
    elif OPT == LION:
        p = tl.where(has_weight_decay != 0, p * decay, p)
        p = tl.fma(_sign(s1 * beta1 + g * one_minus_beta1), neg_lr, p)
        s1 = tl.fma(g, one_minus_beta2, s1 * beta2)
    elif OPT == RMSPROP:
        g = tl.fma(p, weight_decay, g)
        s1 = tl.fma(one_minus_beta1 * g, g, s1 * beta1)
        p = p + tl.div_rn(neg_lr * g, tl.sqrt_rn(s1) + eps)
    else:  # ADAGRAD
        g = tl.fma(p, weight_decay, g)
        s1 = tl.fma(g, g, s1)
        p = p + tl.div_rn(neg_lr * g, tl.sqrt_rn(s1) + eps)
    keep = _finite(p) & _finite(s1)
    if OPT == ADEMAMIX:
        keep = keep & _finite(s1b)
    if OPT == ADAM or OPT == ADEMAMIX:
        keep = keep & _finite(s2)
    return tl.where(keep, p, p0), tl.where(keep, s1, s10), tl.where(keep, s1b, s1b0), tl.where(keep, s2, s20)


@triton.jit
def _optimizer_32bit(G, P, S1, S2, n, step_size, norm_sq, unorm_limit, unorm, partial_sums, beta1, beta2, beta3,
                     alpha, eps, weight_decay, gnorm_scale, one_minus_beta1, one_minus_beta2, one_minus_beta3,
                     correction1, correction2, decay, neg_lr, eps_correction2, neg_lr_over_correction1,
                     has_weight_decay, first_step, OPT: tl.constexpr, TRUST_RATIO: tl.constexpr,
                     NORM_PASS: tl.constexpr, TILE_SIZE: tl.constexpr):  # fmt: skip
    # Layout: elementwise, program p owns elements p*TILE_SIZE .. +TILE_SIZE of every array
    # (ademamix's second momentum is state1[n:]). With a trust ratio (LAMB/LARS) the step is two
    # launches: NORM_PASS stores each program's sum of squared update values (nothing else), the
    # caller sums them into norm_sq, and the second launch scales the step by
    # limit / ||update|| when ||update|| > limit and writes everything.
    offs = tl.program_id(0).to(tl.int64) * TILE_SIZE + tl.arange(0, TILE_SIZE)
    inside = offs < n
    g = to_float32(tl.load(G + offs, mask=inside, other=0.0))
    p = to_float32(tl.load(P + offs, mask=inside, other=0.0))
    s1 = tl.load(S1 + offs, mask=inside, other=0.0)
    s1b = s1
    s2 = s1
    if OPT == ADEMAMIX:
        s1b = tl.load(S1 + n + offs, mask=inside, other=0.0)
    if OPT == ADAM or OPT == ADEMAMIX:
        s2 = tl.load(S2 + offs, mask=inside, other=0.0)
    step_alpha = step_size
    if TRUST_RATIO and not NORM_PASS:
        norm = tl.sqrt_rn(tl.load(norm_sq))
        step_alpha = tl.where(norm > unorm_limit, step_size * tl.div_rn(unorm_limit, norm), step_size)
        if tl.program_id(0) == 0:
            tl.store(unorm, norm)
    p, s1, s1b, s2, value = _update32(
        g, p, s1, s1b, s2, step_alpha, beta1, beta2, beta3, alpha, eps, weight_decay, gnorm_scale,
        one_minus_beta1, one_minus_beta2, one_minus_beta3, correction1, correction2, decay, neg_lr,
        eps_correction2, neg_lr_over_correction1, has_weight_decay, first_step, OPT,
    )  # fmt: skip
    if NORM_PASS:
        tl.store(partial_sums + tl.program_id(0), tl.sum(tl.where(inside, value * value, 0.0)))
    else:
        tl.store(P + offs, cast_to(p, P.dtype.element_ty), mask=inside)
        tl.store(S1 + offs, s1, mask=inside)
        if OPT == ADEMAMIX:
            tl.store(S1 + n + offs, s1b, mask=inside)
        if OPT == ADAM or OPT == ADEMAMIX:
            tl.store(S2 + offs, s2, mask=inside)


@triton.jit
def _requantize(state, inside, code, Q, absmax, offs, block, n_blocks):
    """Store ``state`` ([blocks, 256], zero outside the tensor) as 8-bit codes and absmax."""
    state = tl.where(inside, state, 0.0)
    m = block_absmax(state)
    tl.store(Q + offs, encode_blocks(state, m, code), mask=inside)
    tl.store(absmax + block, m, mask=block < n_blocks)


@triton.jit
def _optimizer_8bit(G, P, Q1, Q2, code1, code2, absmax1, absmax2, n, beta1, beta2, beta3, alpha, eps,
                    weight_decay, gnorm_scale, one_minus_beta1, one_minus_beta2, one_minus_beta3, correction1,
                    correction2, decay, neg_lr, eps_correction2, neg_lr_over_correction1, has_weight_decay,
                    first_step, OPT: tl.constexpr, BS: tl.constexpr, GROUP: tl.constexpr):  # fmt: skip
    # Layout: program p owns state blocks p*GROUP .. +GROUP as a [GROUP, BS] tile (one block per
    # row): dequantize (code[q] * absmax), update, then each block's new absmax and codes exactly
    # as quantize_blockwise computes them. Ademamix's second momentum is the second half of
    # state1 / absmax1.
    block = tl.program_id(0) * GROUP + tl.arange(0, GROUP)
    n_blocks = tl.cdiv(n, BS)
    offs = block.to(tl.int64)[:, None] * BS + tl.arange(0, BS)[None, :]
    inside = offs < n
    g = to_float32(tl.load(G + offs, mask=inside, other=0.0))
    p = to_float32(tl.load(P + offs, mask=inside, other=0.0))
    am1 = tl.load(absmax1 + block, mask=block < n_blocks, other=0.0)[:, None]
    s1 = tl.load(code1 + tl.load(Q1 + offs, mask=inside, other=0)) * am1
    s1b = s1
    s2 = s1
    if OPT == ADEMAMIX:
        am1b = tl.load(absmax1 + n_blocks + block, mask=block < n_blocks, other=0.0)[:, None]
        s1b = tl.load(code1 + tl.load(Q1 + n + offs, mask=inside, other=0)) * am1b
    if OPT == ADAM or OPT == ADEMAMIX:
        am2 = tl.load(absmax2 + block, mask=block < n_blocks, other=0.0)[:, None]
        s2 = tl.load(code2 + tl.load(Q2 + offs, mask=inside, other=0)) * am2
    p, s1, s1b, s2 = _update8(
        g, p, s1, s1b, s2, beta1, beta2, beta3, alpha, eps, weight_decay, gnorm_scale, one_minus_beta1,
        one_minus_beta2, one_minus_beta3, correction1, correction2, decay, neg_lr, eps_correction2,
        neg_lr_over_correction1, has_weight_decay, first_step, OPT,
    )  # fmt: skip
    tl.store(P + offs, cast_to(p, P.dtype.element_ty), mask=inside)
    _requantize(s1, inside, code1, Q1, absmax1, offs, block, n_blocks)
    if OPT == ADEMAMIX:
        _requantize(s1b, inside, code1, Q1 + n, absmax1 + n_blocks, offs, block, n_blocks)
    if OPT == ADAM or OPT == ADEMAMIX:
        _requantize(s2, inside, code2, Q2, absmax2, offs, block, n_blocks)


def _scalars(beta1, beta2, beta3, alpha, eps, weight_decay, lr, gnorm_scale, step) -> tuple:
    """The step scalars in kernel order (lowbit_optim.h make_params): the reference's Python
    arithmetic in double, each rounded to float32 by the launch where torch rounds it."""
    correction1 = 1.0 - beta1**step
    correction2 = math.sqrt(1.0 - beta2**step)
    return (
        beta1, beta2, beta3, alpha, eps, weight_decay, gnorm_scale, 1.0 - beta1, 1.0 - beta2, 1.0 - beta3,
        correction1, correction2, 1.0 - lr * weight_decay, -lr, eps * correction2, -lr / correction1,
        int(weight_decay > 0.0), int(step == 1),
    )  # fmt: skip


def install(kernels: KernelTable) -> None:
    @kernels.register("optimizer_update_32bit")
    @torch.no_grad()
    def optimizer_update_32bit(
        optimizer_name, g, p, state1, state2, unorm_vec, max_unorm, param_norm, beta1, beta2, beta3, alpha, eps,
        weight_decay, step, lr, gnorm_scale, skip_zeros=False,
    ):  # fmt: skip
        if skip_zeros:
            raise NotImplementedError("skip_zeros is not supported")
        optimizer = formats.NATIVE_OPTIMIZER_IDS[optimizer_name]
        scalars = _scalars(beta1, beta2, beta3, alpha, eps, weight_decay, lr, gnorm_scale, step)
        correction1, correction2 = scalars[10], scalars[11]
        step_size = (-lr * correction2) / correction1 if optimizer == formats.NATIVE_OPTIMIZER_IDS["adam"] else -lr
        trust = max_unorm > 0.0 and optimizer in formats.NATIVE_TRUST_RATIO_IDS
        n = p.numel()
        tile = per_program(n)
        grid = (triton.cdiv(n, tile),)
        common = dict(OPT=optimizer, TRUST_RATIO=trust, TILE_SIZE=tile, **EXACT)
        limit = max_unorm * param_norm
        with on_device(p):
            norm_sq = None
            if trust:
                partial_sums = torch.empty(grid[0], dtype=torch.float32, device=p.device)
                _optimizer_32bit[grid](
                    g, p, state1, state2, n, step_size, None, limit, None, partial_sums, *scalars,
                    NORM_PASS=True, **common,
                )  # fmt: skip
                norm_sq = partial_sums.sum()
            _optimizer_32bit[grid](
                g, p, state1, state2, n, step_size, norm_sq, limit, unorm_vec if trust else None, None, *scalars,
                NORM_PASS=False, **common,
            )  # fmt: skip

    @kernels.register("optimizer_update_8bit_blockwise")
    @torch.no_grad()
    def optimizer_update_8bit_blockwise(
        optimizer_name, g, p, state1, state2, beta1, beta2, beta3, alpha, eps, step, lr, qmap1, qmap2, absmax1,
        absmax2, weight_decay, gnorm_scale, skip_zeros=False,
    ):  # fmt: skip
        if skip_zeros:
            raise NotImplementedError("skip_zeros is not supported")
        two_states = optimizer_name in OPTIMIZERS_TWO_STATES
        scalars = _scalars(beta1, beta2, beta3, alpha, eps, weight_decay, lr, gnorm_scale, step)
        bs = OPTIMIZER_8BIT_BLOCKSIZE
        n = p.numel()
        blocks = formats.num_blocks(n, bs)
        group = per_program(blocks, bs)
        with on_device(p):
            _optimizer_8bit[(triton.cdiv(blocks, group),)](
                g, p, state1, state2 if two_states else None, qmap1, qmap2 if two_states else None, absmax1,
                absmax2 if two_states else None, n, *scalars,
                OPT=formats.NATIVE_OPTIMIZER_IDS[optimizer_name], BS=bs, GROUP=group, **EXACT,
            )  # fmt: skip
