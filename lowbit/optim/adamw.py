"""AdamW: the same kernel as :class:`~lowbit.optim.Adam` (whose decay is decoupled too); only the
default ``weight_decay`` (1e-2) differs, as in bitsandbytes."""

from __future__ import annotations

from .adam import Adam


class AdamW(Adam):
    """AdamW with 32-bit (``optim_bits=32``) or 8-bit blockwise (``optim_bits=8``) state."""

    _variants_keep = frozenset({"optim_bits"})  # bitsandbytes' PagedAdamW* drop is_paged, PagedAdam* keep it

    def __init__(
        self,
        params,
        lr=1e-3,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=1e-2,
        amsgrad=False,
        optim_bits=32,
        args=None,
        min_8bit_size=4096,
        is_paged=False,
        percentile_clipping=100,
        block_wise=True,
    ):
        super().__init__(
            params, lr, betas, eps, weight_decay, amsgrad, optim_bits, args, min_8bit_size, is_paged,
            percentile_clipping, block_wise,
        )  # fmt: skip


class AdamW8bit(AdamW):
    _fixed = {"optim_bits": 8}


class AdamW32bit(AdamW):
    _fixed = {"optim_bits": 32}


class PagedAdamW(AdamW):
    _fixed = {"is_paged": True}


class PagedAdamW8bit(AdamW):
    _fixed = {"optim_bits": 8, "is_paged": True}


class PagedAdamW32bit(AdamW):
    _fixed = {"optim_bits": 32, "is_paged": True}
