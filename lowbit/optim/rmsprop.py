"""RMSprop: ``v = alpha * v + (1 - alpha) * g**2``; ``p -= lr * g / (sqrt(v) + eps)``; L2 weight
decay. As in bitsandbytes: no centered variant, and ``momentum`` is accepted but ignored."""

from __future__ import annotations

from .optimizer import Optimizer1State, warn_ignored


class RMSprop(Optimizer1State):
    """RMSprop with 32-bit (``optim_bits=32``) or 8-bit blockwise (``optim_bits=8``) state."""

    def __init__(
        self,
        params,
        lr=1e-2,
        alpha=0.99,
        eps=1e-8,
        weight_decay=0,
        momentum=0,
        centered=False,
        optim_bits=32,
        args=None,
        min_8bit_size=4096,
        percentile_clipping=100,
        block_wise=True,
    ):
        if alpha == 0:
            raise NotImplementedError("RMSprop with alpha == 0 is not supported (as in bitsandbytes)")
        if centered:
            raise NotImplementedError("centered RMSprop is not supported (as in bitsandbytes)")
        warn_ignored(self, momentum=momentum)
        super().__init__(
            "rmsprop", params, lr, (alpha, momentum), eps, weight_decay, optim_bits, args, min_8bit_size,
            percentile_clipping=percentile_clipping, block_wise=block_wise, beta_names=("alpha", "momentum"),
        )  # fmt: skip


class RMSprop8bit(RMSprop):
    _fixed = {"optim_bits": 8}


class RMSprop32bit(RMSprop):
    _fixed = {"optim_bits": 32}
