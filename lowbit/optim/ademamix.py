"""AdEMAMix (Pagliardini et al. 2024): Adam plus a slow EMA ``m2`` (``beta3``) mixed in with
weight ``alpha``; optional warm-up schedules for alpha (``t_alpha``) and beta3 (``t_beta3``).
Weight decay is decoupled. State: ``state1`` = (fast, slow) first moments, ``state2`` = nu."""

from __future__ import annotations

import math

from .optimizer import Optimizer2State


class AdEMAMix(Optimizer2State):
    """AdEMAMix with 32-bit (``optim_bits=32``) or 8-bit blockwise (``optim_bits=8``) state."""

    _n_betas = 3

    def __init__(
        self,
        params,
        lr=1e-3,
        betas=(0.9, 0.999, 0.9999),
        alpha=5.0,
        t_alpha=None,
        t_beta3=None,
        eps=1e-8,
        weight_decay=1e-2,
        optim_bits=32,
        min_8bit_size=4096,
        is_paged=False,
        percentile_clipping=100,
        block_wise=True,
    ):
        super().__init__(
            "ademamix", params, lr, betas, eps, weight_decay, optim_bits, None, min_8bit_size, is_paged=is_paged,
            alpha=alpha, t_alpha=t_alpha, t_beta3=t_beta3, percentile_clipping=percentile_clipping,
            block_wise=block_wise,
        )  # fmt: skip

    def _schedule(self, config, step):
        """alpha ramps up linearly over ``t_alpha`` steps; beta3 rises from beta1 to its final value
        over ``t_beta3`` steps (the paper's schedule, computed as bitsandbytes does)."""
        beta1, _, beta3 = (float(b) for b in config["betas"])
        alpha = float(config["alpha"])
        if config["t_alpha"]:
            alpha = min(step * alpha / config["t_alpha"], alpha)
        if config["t_beta3"]:
            ln_beta1, ln_beta3 = math.log(beta1), math.log(beta3)
            fraction = step / config["t_beta3"]
            beta3 = min(
                math.exp(ln_beta1 * ln_beta3 / ((1 - fraction) * ln_beta3 + fraction * ln_beta1)), beta3
            )
        return beta3, alpha


class AdEMAMix8bit(AdEMAMix):
    _fixed = {"optim_bits": 8}


class AdEMAMix32bit(AdEMAMix):
    _fixed = {"optim_bits": 32}


class PagedAdEMAMix(AdEMAMix):
    _fixed = {"is_paged": True}


class PagedAdEMAMix8bit(AdEMAMix):
    _fixed = {"optim_bits": 8, "is_paged": True}


class PagedAdEMAMix32bit(AdEMAMix):
    _fixed = {"optim_bits": 32, "is_paged": True}
