"""What ``Params4bit`` and ``Int8Params`` share: a Parameter that quantizes itself on a device move.

A quantized parameter's ``data`` is only half of the weight; the other half (the 4-bit
``quant_state``, the int8 row scales ``SCB``) lives in attributes. Everything here keeps the two
together:

* ``.to(device)`` / ``.cpu()`` / ``.cuda()`` on a float weight quantize it on the target device
  (bitsandbytes' "quantization happens on the move"); on a quantized weight they move the data
  and its state together. Both happen in place and return ``self``, so a module's ``_apply``
  (which keeps the parameter object and copies only ``.data``) never separates the data from its
  state. A dtype change never touches packed data.
* pickling, ``torch.save``/``torch.load`` (also with ``weights_only=True``) and ``deepcopy``
  rebuild the subclass with its attributes (``nn.Parameter`` alone would drop both).
"""

from __future__ import annotations

import copy
from typing import Any, Optional

import torch


def _can_require_grad(data: torch.Tensor) -> bool:
    return data.is_floating_point() or data.is_complex()


class QuantizedParameter(torch.nn.Parameter):
    """Base class; subclasses implement the four hooks below."""

    #: attributes saved by pickling / deepcopy (others, like a back-reference to the module, are not)
    _pickled_attrs: tuple[str, ...] = ()

    @classmethod
    def _make(cls, data: torch.Tensor, requires_grad: bool):
        """The subclass instance viewing ``data`` (integer data cannot require gradients)."""
        return torch.Tensor._make_subclass(cls, data, requires_grad and _can_require_grad(data))

    def _set_quantized_data(self, data: torch.Tensor) -> None:
        if not _can_require_grad(data):
            self.requires_grad_(False)  # torch refuses integer data in a parameter that requires grad
        self.data = data

    # -- hooks ------------------------------------------------------------------------------
    def _is_quantized(self) -> bool:
        raise NotImplementedError

    def _quantizes_on_move(self) -> bool:
        """Whether a move to a device quantizes this (still float) weight."""
        return True

    def _quantize(self, device: torch.device) -> QuantizedParameter:
        """Quantize ``self.data`` on ``device`` in place; return self."""
        raise NotImplementedError

    def _move_state(self, device: torch.device, non_blocking: bool) -> None:
        """Move the quantization state (not ``data``) to ``device``."""
        raise NotImplementedError

    # -- device moves -----------------------------------------------------------------------
    def to(self, *args, **kwargs):
        copy_requested = bool(kwargs.pop("copy", False))  # torch's parser has no copy argument
        device, dtype, non_blocking, _ = torch._C._nn._parse_to(*args, **kwargs)
        if copy_requested:
            # a copy is a deep copy moved in place: the original keeps its data and state
            return copy.deepcopy(self).to(device=device, dtype=dtype, non_blocking=non_blocking)
        if self._is_quantized():
            if dtype is not None and dtype != self.dtype and self._casts_to_plain(dtype):
                return torch.Tensor.to(self.data, device=device or self.device, dtype=dtype, non_blocking=non_blocking)
            if device is not None:
                self.data = self.data.to(device, non_blocking=non_blocking)
                self._move_state(device, non_blocking)
            return self  # packed bytes keep their dtype: casting them would destroy the weight
        if device is not None and device.type != "meta" and self._quantizes_on_move():
            return self._quantize(device)
        moved = super().to(device=device, dtype=dtype, non_blocking=non_blocking)
        if torch._has_compatible_shallow_copy_type(self.data, moved):
            self.data = moved  # in place too (see the module docstring)
            return self
        return self._with_data(moved)  # e.g. to "meta": a tensor of another kind, a new object

    def _casts_to_plain(self, dtype: torch.dtype) -> bool:
        """Whether ``.to(dtype)`` of the quantized data is a computation that wants the values
        converted (a plain tensor, the weight untouched) rather than a module-wide cast that must
        leave the packed bytes alone."""
        return False

    def cpu(self):
        return self.to(device="cpu")

    def cuda(self, device: Optional[int | torch.device | str] = None, non_blocking: bool = False):
        return self.to(device="cuda" if device is None else device, non_blocking=non_blocking)

    def xpu(self, device: Optional[int | torch.device | str] = None, non_blocking: bool = False):
        return self.to(device="xpu" if device is None else device, non_blocking=non_blocking)

    def _with_data(self, data: torch.Tensor) -> QuantizedParameter:
        """A parameter of the same class and settings holding ``data``."""
        new = self._make(data, self.requires_grad)
        new.__dict__.update(self.__dict__)
        return new

    # -- pickling, torch.save, deepcopy --------------------------------------------------------
    def _pickle_state(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self._pickled_attrs}

    def _unpickle_state(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def __reduce_ex__(self, protocol):
        return (
            _rebuild_quantized_parameter,
            (type(self), self.data, self.requires_grad, self._pickle_state()),
        )

    def __deepcopy__(self, memo):
        if id(self) in memo:
            return memo[id(self)]
        cls, data, requires_grad, state = self.__reduce_ex__(2)[1]
        new = _rebuild_quantized_parameter(
            cls, copy.deepcopy(data, memo), requires_grad, copy.deepcopy(state, memo)
        )
        memo[id(self)] = new
        return new


def _rebuild_quantized_parameter(cls, data: torch.Tensor, requires_grad: bool, state: dict[str, Any]):
    param = cls._make(data, requires_grad)
    param._unpickle_state(state)
    return param
