"""Optimizer updates: 32-bit state, and 8-bit blockwise state (dequantize, update, requantize).

The update formulas follow bitsandbytes on CPU. Weight decay is decoupled (AdamW-style) for
adam/adamw/lamb/lion/ademamix and added to the gradient (L2) for momentum/rmsprop/adagrad.

Non-finite values (README, "Overflow and non-finite values"; the native kernels do the same,
csrc/common/lowbit_optim.h): in an 8-bit step, an element whose new parameter or new state is
not finite (a NaN/Inf gradient, or a finite one whose square overflows) keeps its previous
parameter and state, so one bad element cannot make its whole 256-value state block non-finite.
32-bit steps let a non-finite value reach its own element only, as torch.optim does.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from ...core import formats
from . import kernels
from .blockwise_8bit import decode_blockwise, quantize_blockwise

_ALIASES = {"adamw": "adam", "lamb": "adam", "lars": "momentum"}


def _trust_ratio(update: torch.Tensor, unorm_vec: Optional[torch.Tensor], max_unorm: float, param_norm: float) -> float:
    """LAMB/LARS: shrink the update when its norm exceeds max_unorm * ||p||."""
    if max_unorm <= 0.0:
        return 1.0
    unorm = torch.norm(update).item()
    unorm_vec.fill_(unorm)
    return (max_unorm * param_norm) / unorm if unorm > max_unorm * param_norm else 1.0


@kernels.register("optimizer_update_32bit")
@torch.no_grad()
def optimizer_update_32bit(
    optimizer_name, g, p, state1, state2, unorm_vec, max_unorm, param_norm, beta1, beta2, beta3, alpha, eps,
    weight_decay, step, lr, gnorm_scale, skip_zeros=False,
):  # fmt: skip
    if skip_zeros:
        raise NotImplementedError("skip_zeros is not supported")
    name = _ALIASES.get(optimizer_name, optimizer_name)
    grad = g.float() * gnorm_scale
    p32 = p.float()
    state1 = state1.view(-1) if name != "ademamix" else state1.view(2, -1)
    grad, p32 = grad.view(-1), p32.view(-1)

    if name == "adam":
        state1.mul_(beta1).add_(grad, alpha=1.0 - beta1)
        state2.view(-1).mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        correction1 = 1.0 - beta1**step
        correction2 = math.sqrt(1.0 - beta2**step)
        if weight_decay > 0.0:
            p32.mul_(1.0 - lr * weight_decay)
        update = state1 / (state2.view(-1).sqrt() + eps * correction2)
        scale = _trust_ratio(update, unorm_vec, max_unorm, param_norm)
        p32.add_(update, alpha=-lr * correction2 / correction1 * scale)
    elif name == "ademamix":
        m1, m2, nu = state1[0], state1[1], state2.view(-1)
        m1.mul_(beta1).add_(grad, alpha=1.0 - beta1)
        m2.mul_(beta3).add_(grad, alpha=1.0 - beta3)
        nu.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        correction1 = 1.0 - beta1**step
        correction2 = math.sqrt(1.0 - beta2**step)
        if weight_decay > 0.0:
            p32.mul_(1.0 - lr * weight_decay)
        p32.add_((m1 / correction1 + alpha * m2) / (nu.sqrt() / correction2 + eps), alpha=-lr)
    elif name == "momentum":
        grad = grad.add(p32, alpha=weight_decay) if weight_decay > 0.0 else grad
        if step == 1:
            state1.copy_(grad)
        else:
            state1.mul_(beta1).add_(grad)
        p32.add_(state1, alpha=-lr * _trust_ratio(state1, unorm_vec, max_unorm, param_norm))
    elif name == "lion":
        if weight_decay > 0.0:
            p32.mul_(1.0 - lr * weight_decay)
        p32.add_(state1.mul(beta1).add(grad, alpha=1.0 - beta1).sign(), alpha=-lr)
        state1.mul_(beta2).add_(grad, alpha=1.0 - beta2)
    elif name == "rmsprop":
        grad = grad.add(p32, alpha=weight_decay) if weight_decay > 0.0 else grad
        state1.mul_(beta1).addcmul_(grad, grad, value=1.0 - beta1)
        update = grad / (state1.sqrt() + eps)
        p32.add_(update, alpha=-lr * _trust_ratio(update, unorm_vec, max_unorm, param_norm))
    elif name == "adagrad":
        grad = grad.add(p32, alpha=weight_decay) if weight_decay > 0.0 else grad
        state1.addcmul_(grad, grad, value=1.0)
        p32.add_(grad / (state1.sqrt() + eps), alpha=-lr)
    else:
        raise ValueError(f"unknown optimizer {optimizer_name!r}")
    p.copy_(p32.view(p.shape))


@kernels.register("optimizer_update_8bit_blockwise")
@torch.no_grad()
def optimizer_update_8bit_blockwise(
    optimizer_name, g, p, state1, state2, beta1, beta2, beta3, alpha, eps, step, lr, qmap1, qmap2, absmax1,
    absmax2, weight_decay, gnorm_scale, skip_zeros=False,
):  # fmt: skip
    if skip_zeros:
        raise NotImplementedError("skip_zeros is not supported")
    name = _ALIASES.get(optimizer_name, optimizer_name)
    blocksize = formats.NESTED_BLOCKSIZE
    n = p.numel()
    copies = 2 if name == "ademamix" else 1
    q1, a1 = state1.view(copies, n), absmax1.view(copies, -1)
    s1 = torch.stack([decode_blockwise(q1[i], a1[i], qmap1, blocksize) for i in range(copies)])
    s2 = decode_blockwise(state2.view(-1), absmax2, qmap2, blocksize) if state2 is not None else None
    grad = g.float().view(-1) * gnorm_scale
    p32 = p.float().view(-1).clone()
    before = (p32.clone(), s1.clone(), s2.clone() if s2 is not None else None)

    if name == "adam":
        s1[0].mul_(beta1).add_(grad, alpha=1.0 - beta1)
        s2.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        correction1 = 1.0 - beta1**step
        correction2 = math.sqrt(1.0 - beta2**step)
        denom = (s2.sqrt() / correction2).add_(eps)
        if weight_decay > 0.0:
            p32.mul_(1.0 - lr * weight_decay)
        p32.addcdiv_(s1[0], denom, value=-lr / correction1)
    elif name == "ademamix":
        s1[0].mul_(beta1).add_(grad, alpha=1.0 - beta1)
        s1[1].mul_(beta3).add_(grad, alpha=1.0 - beta3)
        s2.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        correction1 = 1.0 - beta1**step
        correction2 = math.sqrt(1.0 - beta2**step)
        update = (s1[0] / correction1 + alpha * s1[1]) / (s2.sqrt() / correction2 + eps)
        if weight_decay > 0.0:
            p32.mul_(1.0 - lr * weight_decay)
        p32.add_(update, alpha=-lr)
    elif name == "momentum":
        grad.add_(p32, alpha=weight_decay)
        if step == 1:
            s1[0].copy_(grad)
        else:
            s1[0].mul_(beta1).add_(grad)
        p32.add_(s1[0], alpha=-lr)
    elif name == "lion":
        if weight_decay > 0.0:
            p32.mul_(1.0 - lr * weight_decay)
        p32.add_(torch.sign(s1[0].mul(beta1) + grad.mul(1.0 - beta1)), alpha=-lr)
        s1[0].mul_(beta2).add_(grad, alpha=1.0 - beta2)
    elif name == "rmsprop":
        grad.add_(p32, alpha=weight_decay)
        s1[0].mul_(beta1).addcmul_(grad, grad, value=1.0 - beta1)
        p32.addcdiv_(grad, s1[0].sqrt().add_(eps), value=-lr)
    elif name == "adagrad":
        grad.add_(p32, alpha=weight_decay)
        s1[0].addcmul_(grad, grad, value=1.0)
        p32.addcdiv_(grad, s1[0].sqrt().add_(eps), value=-lr)
    else:
        raise ValueError(f"unknown optimizer {optimizer_name!r}")

    keep = torch.isfinite(p32) & torch.isfinite(s1).all(dim=0)
    if s2 is not None:
        keep &= torch.isfinite(s2)
    p32 = torch.where(keep, p32, before[0])
    s1 = torch.where(keep, s1, before[1])
    if s2 is not None:
        s2 = torch.where(keep, s2, before[2])
    p.copy_(p32.view(p.shape))
    for i in range(copies):
        q, am = quantize_blockwise(s1[i], qmap1, blocksize)
        q1[i].copy_(q)
        a1[i].copy_(am)
    if s2 is not None:
        q, am = quantize_blockwise(s2, qmap2, blocksize)
        state2.view(-1).copy_(q)
        absmax2.copy_(am)
