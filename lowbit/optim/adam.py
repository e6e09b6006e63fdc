"""Adam. bitsandbytes' "adam" kernel decouples weight decay (``p *= 1 - lr * weight_decay``), so
with ``weight_decay > 0`` this is AdamW, not ``torch.optim.Adam`` (which adds L2 to the gradient)."""

from __future__ import annotations

from .optimizer import Optimizer2State, reject_amsgrad


class Adam(Optimizer2State):
    """Adam with 32-bit (``optim_bits=32``) or 8-bit blockwise (``optim_bits=8``) state."""

    _variants_keep = frozenset({"optim_bits", "is_paged"})

    def __init__(
        self,
        params,
        lr=1e-3,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=0,
        amsgrad=False,
        optim_bits=32,
        args=None,
        min_8bit_size=4096,
        is_paged=False,
        percentile_clipping=100,
        block_wise=True,
    ):
        reject_amsgrad(amsgrad, self)
        super().__init__(
            "adam", params, lr, betas, eps, weight_decay, optim_bits, args, min_8bit_size, is_paged=is_paged,
            percentile_clipping=percentile_clipping, block_wise=block_wise,
        )  # fmt: skip


class Adam8bit(Adam):
    _fixed = {"optim_bits": 8}


class Adam32bit(Adam):
    _fixed = {"optim_bits": 32}


class PagedAdam(Adam):
    _fixed = {"is_paged": True}


class PagedAdam8bit(Adam):
    _fixed = {"optim_bits": 8, "is_paged": True}


class PagedAdam32bit(Adam):
    _fixed = {"optim_bits": 32, "is_paged": True}
