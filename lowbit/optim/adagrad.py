"""Adagrad: ``s += g**2``; ``p -= lr * g / (sqrt(s) + eps)``; L2 weight decay. As in
bitsandbytes, ``lr_decay`` and ``initial_accumulator_value`` must be 0."""

from __future__ import annotations

from .optimizer import Optimizer1State


class Adagrad(Optimizer1State):
    """Adagrad with 32-bit (``optim_bits=32``) or 8-bit blockwise (``optim_bits=8``) state."""

    _variants_keep = frozenset({"optim_bits"})
    _variants_also_accept_bits = ()  # Adagrad8bit(optim_bits=32) is refused, as in bitsandbytes

    def __init__(
        self,
        params,
        lr=1e-2,
        lr_decay=0,
        weight_decay=0,
        initial_accumulator_value=0,
        eps=1e-10,
        optim_bits=32,
        args=None,
        min_8bit_size=4096,
        percentile_clipping=100,
        block_wise=True,
    ):
        if initial_accumulator_value != 0.0:
            raise ValueError("initial_accumulator_value must be 0 (as in bitsandbytes)")
        if lr_decay != 0.0:
            raise ValueError("lr_decay must be 0 (as in bitsandbytes)")
        super().__init__(
            "adagrad", params, lr, (0.0, 0.0), eps, weight_decay, optim_bits, args, min_8bit_size,
            percentile_clipping=percentile_clipping, block_wise=block_wise,
        )  # fmt: skip


class Adagrad8bit(Adagrad):
    _fixed = {"optim_bits": 8}


class Adagrad32bit(Adagrad):
    _fixed = {"optim_bits": 32}
