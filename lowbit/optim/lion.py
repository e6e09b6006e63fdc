"""Lion (Chen et al. 2023): ``p -= lr * sign(beta1 * m + (1 - beta1) * g)``, then
``m = beta2 * m + (1 - beta2) * g``; weight decay decoupled."""

from __future__ import annotations

from .optimizer import Optimizer1State


class Lion(Optimizer1State):
    """Lion with 32-bit (``optim_bits=32``) or 8-bit blockwise (``optim_bits=8``) state."""

    def __init__(
        self,
        params,
        lr=1e-4,
        betas=(0.9, 0.99),
        weight_decay=0,
        optim_bits=32,
        args=None,
        min_8bit_size=4096,
        is_paged=False,
        percentile_clipping=100,
        block_wise=True,
    ):
        super().__init__(
            "lion", params, lr, betas, 0.0, weight_decay, optim_bits, args, min_8bit_size, is_paged=is_paged,
            percentile_clipping=percentile_clipping, block_wise=block_wise,
        )  # fmt: skip


class Lion8bit(Lion):
    _fixed = {"optim_bits": 8}


class Lion32bit(Lion):
    _fixed = {"optim_bits": 32}


class PagedLion(Lion):
    _fixed = {"is_paged": True}


class PagedLion8bit(Lion):
    _fixed = {"optim_bits": 8, "is_paged": True}


class PagedLion32bit(Lion):
    _fixed = {"optim_bits": 32, "is_paged": True}
