"""``Int8Params``: an LLM.int8 weight, float until moved to a device, then int8 rows + ``SCB``."""

from __future__ import annotations

from typing import Any, Optional

import torch

from .parameter import QuantizedParameter


class Int8Params(QuantizedParameter):
    """An int8 weight with one float32 scale per row (``SCB``); ``CB`` is the int8 data itself.

    With ``has_fp16_weights=True`` the weight stays in floating point (it is trained) and is
    quantized by every product instead.
    """

    _pickled_attrs = ("has_fp16_weights", "SCB")

    def __new__(
        cls,
        data: Optional[torch.Tensor] = None,
        requires_grad: bool = True,
        has_fp16_weights: bool = False,
        CB: Optional[torch.Tensor] = None,
        SCB: Optional[torch.Tensor] = None,
        **kwargs: Any,
    ) -> Int8Params:
        self = cls._make(torch.empty(0) if data is None else data, requires_grad)
        self.CB = CB
        self.SCB = SCB
        self.has_fp16_weights = has_fp16_weights
        return self

    def _is_quantized(self) -> bool:
        return self.data.dtype == torch.int8

    def _quantizes_on_move(self) -> bool:
        return not self.has_fp16_weights

    def _quantize(self, device: torch.device) -> Int8Params:
        # float16 first, as bitsandbytes does, so the int8 rows and scales match its bytes
        weight = self.data.contiguous().to(device=device, dtype=torch.float16)
        CB, SCB, _ = torch.ops.lowbit.int8_vectorwise_quant(weight, 0.0)
        self._set_quantized_data(CB)
        self.CB = CB
        self.SCB = SCB
        return self

    def _casts_to_plain(self, dtype: torch.dtype) -> bool:
        # Module casts (.half(), .to(float16)) never pass a dtype to integer data, so an explicit
        # B.to(torch.int32) or CB.to(float16) is arithmetic on the int8 values (as in bitsandbytes).
        return True

    def _move_state(self, device: torch.device, non_blocking: bool) -> None:
        self.CB = self.data
        if self.SCB is not None:
            self.SCB = self.SCB.to(device, non_blocking=non_blocking)

    def _pickle_state(self) -> dict[str, Any]:
        return {**super()._pickle_state(), "CB_is_data": self.CB is not None}

    def _unpickle_state(self, state: dict[str, Any]) -> None:
        state = dict(state)
        self.CB = self.data if state.pop("CB_is_data") else None
        super()._unpickle_state(state)
