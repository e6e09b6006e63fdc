"""SGD with momentum (bitsandbytes' "momentum" kernel): ``buf = g`` at step 1, then
``buf = momentum * buf + g``; ``p -= lr * buf``. Weight decay is L2 (added to the gradient).
Like bitsandbytes, dampening and nesterov are accepted but not implemented (a warning says so)."""

from __future__ import annotations

from .optimizer import Optimizer1State, require_momentum, warn_ignored


class SGD(Optimizer1State):
    """SGD with momentum and 32-bit (``optim_bits=32``) or 8-bit blockwise state."""

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
        percentile_clipping=100,
        block_wise=True,
    ):
        require_momentum(momentum, self)
        warn_ignored(self, dampening=dampening, nesterov=nesterov)
        super().__init__(
            "momentum", params, lr, (momentum, dampening), 0.0, weight_decay, optim_bits, args, min_8bit_size,
            percentile_clipping=percentile_clipping, block_wise=block_wise, beta_names=("momentum", "dampening"),
        )  # fmt: skip


class SGD8bit(SGD):
    _fixed = {"optim_bits": 8}


class SGD32bit(SGD):
    _fixed = {"optim_bits": 32}
