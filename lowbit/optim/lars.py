"""LARS: SGD with momentum whose 32-bit update is scaled by a trust ratio (``max_unorm``), and
:class:`PytorchLARS`, the plain-torch version bitsandbytes ships for comparison."""

from __future__ import annotations

import torch

from ..core import checks
from .optimizer import Optimizer1State, require_momentum, warn_ignored


class LARS(Optimizer1State):
    """LARS with 32-bit (``optim_bits=32``) or 8-bit blockwise state (8-bit: no trust ratio,
    as in bitsandbytes). Dampening and nesterov are accepted but ignored, as in bitsandbytes."""

    def __init__(
        self,
        params,
        lr,
        momentum=0,
        dampening=0,
        weight_decay=0,
        nesterov=False,
        optim_bits=32,
        args=None,
        min_8bit_size=4096,
        max_unorm=0.02,
        percentile_clipping=100,
        block_wise=True,
    ):
        require_momentum(momentum, self)
        warn_ignored(self, dampening=dampening, nesterov=nesterov)
        super().__init__(
            "lars", params, lr, (momentum, dampening), 0.0, weight_decay, optim_bits, args, min_8bit_size,
            max_unorm=max_unorm, percentile_clipping=percentile_clipping, block_wise=block_wise,
            beta_names=("momentum", "dampening"),
        )  # fmt: skip


class LARS8bit(LARS):
    _fixed = {"optim_bits": 8}


class LARS32bit(LARS):
    _fixed = {"optim_bits": 32}


class PytorchLARS(torch.optim.Optimizer):
    """LARS in plain torch (float32 parameters): SGD with momentum (torch's dampening/nesterov
    semantics) whose update is shrunk to ``max_unorm * ||p||`` when it is longer."""

    def __init__(
        self, params, lr=0.01, momentum=0, dampening=0, weight_decay=0, nesterov=False, max_unorm=0.02
    ):
        for name, value in (("lr", lr), ("momentum", momentum), ("weight_decay", weight_decay)):
            checks.number(value, name, 0.0)
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("nesterov momentum requires momentum > 0 and dampening == 0")
        defaults = dict(
            lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
            max_unorm=max_unorm,
        )  # fmt: skip
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad
                if group["weight_decay"] != 0:
                    update = update.add(p, alpha=group["weight_decay"])
                if group["momentum"] != 0:
                    buf = self.state[p].get("momentum_buffer")
                    if buf is None:
                        buf = self.state[p]["momentum_buffer"] = update.clone()
                    else:
                        buf.mul_(group["momentum"]).add_(update, alpha=1 - group["dampening"])
                    update = update.add(buf, alpha=group["momentum"]) if group["nesterov"] else buf
                scale = 1.0
                if group["max_unorm"] > 0.0:
                    p_norm, u_norm = torch.norm(p), torch.norm(update)
                    if u_norm > group["max_unorm"] * p_norm:
                        scale = float(group["max_unorm"] * p_norm / u_norm)
                p.add_(update, alpha=-group["lr"] * scale)
        return loss
