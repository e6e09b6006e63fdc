"""``Params4bit``: an NF4/FP4 weight, float until moved to a device, then packed 4-bit + QuantState."""

from __future__ import annotations

import math
from typing import Any, Optional

import torch

from .. import functional
from ..core import checks, formats
from ..core.quant_state import QuantState
from .parameter import QuantizedParameter


def _check_settings(blocksize: int, quant_type: str, quant_storage: torch.dtype) -> None:
    checks.blocksize(blocksize)
    checks.quant_type(quant_type)
    if quant_storage not in formats.QUANT_STORAGE_DTYPES:
        raise ValueError(
            f"quant_storage must be one of {formats.QUANT_STORAGE_DTYPES}, got {quant_storage!r}"
        )


def default_device(data: torch.Tensor, device) -> torch.device:
    """``device``, or where bitsandbytes would put a pre-quantized weight: CUDA when present."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda") if torch.cuda.is_available() else data.device


class Params4bit(QuantizedParameter):
    """A 4-bit weight. Constructed from a float tensor; quantized by ``.to(device)``, ``.cpu()``,
    ``.cuda()`` or the owning layer's first forward pass, after which ``data`` holds the packed
    bytes (shape ``[(n+1)//2 // itemsize, 1]`` in ``quant_storage``) and ``quant_state`` the rest.
    """

    _pickled_attrs = (
        "blocksize",
        "compress_statistics",
        "quant_type",
        "quant_state",
        "quant_storage",
        "bnb_quantized",
    )

    def __new__(
        cls,
        data: Optional[torch.Tensor] = None,
        requires_grad: bool = False,  # a quantized weight is frozen
        quant_state: Optional[QuantState] = None,
        blocksize: Optional[int] = None,
        compress_statistics: bool = True,
        quant_type: str = "fp4",
        quant_storage: torch.dtype = torch.uint8,
        module: Optional[torch.nn.Module] = None,
        bnb_quantized: bool = False,
        **kwargs: Any,
    ) -> Params4bit:
        blocksize = formats.DEFAULT_BLOCKSIZE_4BIT if blocksize is None else blocksize
        _check_settings(blocksize, quant_type, quant_storage)
        if quant_state is not None and not isinstance(quant_state, QuantState):
            raise TypeError(
                f"quant_state must be a lowbit QuantState or None, got {type(quant_state).__name__}"
            )
        self = cls._make(torch.empty(0) if data is None else data, requires_grad)
        self.blocksize = blocksize
        self.compress_statistics = compress_statistics
        self.quant_type = quant_type
        self.quant_state = quant_state
        self.quant_storage = quant_storage
        self.bnb_quantized = bnb_quantized
        self.module = module
        return self

    def _is_quantized(self) -> bool:
        return self.bnb_quantized

    def _unpickle_state(self, state: dict[str, Any]) -> None:
        super()._unpickle_state(state)
        self.module = None  # not pickled (it would drag the whole layer along); the layer re-links it

    def _quantize(self, device: torch.device) -> Params4bit:
        weight = self.data.contiguous().to(device)
        packed, state = functional.quantize_4bit(
            weight,
            blocksize=self.blocksize,
            compress_statistics=bool(self.compress_statistics),
            quant_type=self.quant_type,
            quant_storage=self.quant_storage,
        )
        self._set_quantized_data(packed)
        self._set_state(state)
        return self

    def _set_state(self, state: QuantState) -> None:
        self.quant_state = state
        self.bnb_quantized = True
        if self.module is not None:
            self.module.quant_state = state  # lets the layer recover it if FSDP drops the attribute

    def _move_state(self, device: torch.device, non_blocking: bool) -> None:
        if self.quant_state is not None:
            self.quant_state.to(device)

    # -- the interleaved layout (CPU inference): replaces the standard bytes, never beside them
    @property
    def interleaved(self) -> bool:
        return self.quant_state is not None and self.quant_state.interleaved

    def _interleave(self) -> None:
        packed, state = functional.interleave_4bit(self.data, self.quant_state)
        self.data = packed
        self._set_state(state)

    def _deinterleave(self) -> None:
        packed, state = functional.deinterleave_4bit(self.data, self.quant_state)
        self.data = packed
        self._set_state(state)

    def standard_form(self) -> tuple[torch.Tensor, QuantState]:
        """The packed bytes and state in the standard layout (bitsandbytes', checkpoints'), as
        stored or converted back (without changing this parameter)."""
        if self.interleaved:
            return functional.deinterleave_4bit(self.data, self.quant_state)
        return self.data, self.quant_state

    def to(self, *args, **kwargs):
        device = torch._C._nn._parse_to(*args, **kwargs)[0]
        if self.interleaved and device is not None and device.type != "cpu":
            self._deinterleave()  # only the CPU kernels read the interleaved layout
        return super().to(*args, **kwargs)

    @classmethod
    def from_prequantized(
        cls,
        data: torch.Tensor,
        quantized_stats: dict[str, Any],
        requires_grad: bool = False,
        device=None,
        module: Optional[torch.nn.Module] = None,
        **kwargs: Any,
    ) -> Params4bit:
        """A quantized weight from its packed ``data`` and the ``weight.*`` entries of a state dict
        (``QuantState.as_dict(packed=True)``, keys with or without their prefix).

        ``device=None`` means CUDA when available (bitsandbytes' default), else ``data``'s device.
        Raises ``ValueError`` when the entries are corrupted or do not match ``data``.
        """
        if not isinstance(data, torch.Tensor):
            raise TypeError(f"data must be a torch.Tensor, got {type(data).__name__}")
        device = default_device(data, device)
        state = QuantState.from_dict(quantized_stats, device=device)
        check_packed_size(data, state, "data")
        self = cls(
            data.to(device),
            requires_grad=requires_grad,
            blocksize=state.blocksize,
            compress_statistics=state.nested,
            quant_type=state.quant_type,
            quant_storage=data.dtype,
            module=module,
        )
        self._set_state(state)
        return self

    # -- QuantState fields as attributes: FSDP resolves state-dict keys like "weight.absmax" with
    # getattr on the parameter. Properties (not __getattr__) keep torch.compile from breaking.
    def _state_field(self, name: str, nested: bool = False):
        state = self.__dict__.get("quant_state")
        if state is None or (nested and state.state2 is None):
            raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'")
        return state.state2 if nested else state

    absmax = property(lambda self: self._state_field("absmax").absmax)
    code = property(lambda self: self._state_field("code").code)
    quant_map = property(lambda self: self._state_field("quant_map").code)
    offset = property(lambda self: self._state_field("offset").offset)
    state2 = property(lambda self: self._state_field("state2").state2)
    nested_offset = property(lambda self: self._state_field("nested_offset").offset)
    nested_absmax = property(lambda self: self._state_field("nested_absmax", nested=True).absmax)
    nested_blocksize = property(lambda self: self._state_field("nested_blocksize", nested=True).blocksize)
    nested_quant_map = property(lambda self: self._state_field("nested_quant_map", nested=True).code)
    nested_dtype = property(lambda self: self._state_field("nested_dtype", nested=True).dtype)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        # chunk/split keep the subclass and its state (FSDP shards parameters this way); every
        # other op returns plain tensors, as for any nn.Parameter.
        result = super().__torch_function__(func, types, args, kwargs or {})
        if func not in (torch.chunk, torch.split, torch.Tensor.chunk, torch.Tensor.split):
            return result
        source = args[0]
        rewrap = source._with_data
        return tuple(rewrap(r) for r in result) if isinstance(result, (tuple, list)) else rewrap(result)


def check_packed_size(data: torch.Tensor, state: QuantState, name: str) -> None:
    """``data`` holds exactly the packed bytes of a ``state.shape`` weight."""
    n = math.prod(state.shape)
    have = data.numel() * data.element_size()
    if have != (n + 1) // 2:
        raise ValueError(
            f"{name} holds {have} bytes, but a 4-bit weight of shape {list(state.shape)} packs into {(n + 1) // 2}"
        )
