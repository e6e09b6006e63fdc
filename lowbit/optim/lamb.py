"""LAMB: Adam whose 32-bit update is scaled by a trust ratio (``max_unorm * ||p|| / ||update||``
when the update norm exceeds ``max_unorm * ||p||``). As in bitsandbytes, 8-bit LAMB has no trust
ratio (the blockwise kernels have none) and ``bias_correction``/``adam_w_mode`` are not options."""

from __future__ import annotations

from .optimizer import Optimizer2State, reject_amsgrad


class LAMB(Optimizer2State):
    """LAMB with 32-bit (``optim_bits=32``) or 8-bit blockwise (``optim_bits=8``) state."""

    def __init__(
        self,
        params,
        lr=1e-3,
        bias_correction=True,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=0,
        amsgrad=False,
        adam_w_mode=True,
        optim_bits=32,
        args=None,
        min_8bit_size=4096,
        max_unorm=1.0,
        percentile_clipping=100,
        block_wise=True,
    ):
        reject_amsgrad(amsgrad, self)
        if optim_bits == 8 and max_unorm != 1.0:  # bitsandbytes refuses it too, not to ignore it silently
            raise ValueError(f"8-bit LAMB has no trust ratio, so max_unorm must stay 1.0; got {max_unorm!r}")
        super().__init__(
            "lamb", params, lr, betas, eps, weight_decay, optim_bits, args, min_8bit_size, max_unorm=max_unorm,
            percentile_clipping=percentile_clipping, block_wise=block_wise,
        )  # fmt: skip


class LAMB8bit(LAMB):
    _fixed = {"optim_bits": 8}


class LAMB32bit(LAMB):
    _fixed = {"optim_bits": 32}
