"""4-bit quantization of any ``nn.Parameter`` through ``torch.nn.utils.parametrize``
(``bitsandbytes.nn.parametrize``).

Quantized layers replace ``nn.Linear``; some weights are not in one. transformers v5 stores the
experts of a mixture-of-experts block as fused 3-D parameters (``experts.gate_up_proj`` of shape
``[num_experts, 2 * intermediate, hidden]``), which a ``BitsAndBytesConfig`` leaves in 16 bit.
:func:`replace_parameter_4bit` quantizes such a parameter in place: the module keeps its class and
its forward, the parameter's storage becomes the packed NF4/FP4 bytes, and reading
``module.<name>`` returns the dequantized tensor (shape and dtype of the original). PEFT's
``target_parameters`` can stack a LoRA parametrization on top.

* While the module runs its forward, each parametrized tensor is dequantized once however often the
  forward reads it (``parametrize.cached``, entered and left by a forward pre-hook / forward hook;
  the hook that leaves runs even when the forward is cut short, as activation checkpointing does).
* ``state_dict()`` writes bitsandbytes' entries: ``<name>`` (the packed bytes) and
  ``<name>.absmax``, ``<name>.quant_map``, ``<name>.nested_*``, ``<name>.quant_state.bitsandbytes__<type>``
  instead of ``parametrizations.<name>.original``; ``load_state_dict()`` reads them back (lowbit only:
  bitsandbytes does not load them).
"""

from __future__ import annotations

import contextlib
from typing import Any, Literal, Optional

import torch
import torch.nn.utils.parametrize as P
from torch import nn

from .. import functional as F
from ..core.quant_state import QuantState
from .params4bit import check_packed_size

__all__ = ["Bnb4bitParametrization", "replace_parameter_4bit", "replace_parameter_4bit_prequantized"]


class Bnb4bitParametrization(nn.Module):
    """Dequantizes the packed 4-bit tensor it is given (the parameter's storage) with
    ``quant_state``. Its output needs no gradient: a quantized parameter is frozen."""

    def __init__(self, quant_state: QuantState):
        super().__init__()
        if not isinstance(quant_state, QuantState) or quant_state.quant_type is None:
            raise TypeError(f"quant_state must be the QuantState of a 4-bit tensor, got {quant_state!r}")
        self.quant_state = quant_state

    @torch.no_grad()
    def forward(self, quantized_param: torch.Tensor) -> torch.Tensor:
        return F.dequantize_4bit(quantized_param, self.quant_state)


def _parameter(module: nn.Module, param_name: str) -> nn.Parameter:
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    if not hasattr(module, param_name):
        raise AttributeError(f"Module does not have parameter '{param_name}'")
    if P.is_parametrized(module, param_name):
        raise ValueError(
            f"'{param_name}' is already parametrized ({module.parametrizations[param_name]}); quantize it "
            "before adding other parametrizations"
        )
    param = getattr(module, param_name)
    if not isinstance(param, nn.Parameter):
        raise TypeError(f"Parameter '{param_name}' is not an instance of nn.Parameter")
    return param


def replace_parameter_4bit(
    module: nn.Module,
    param_name: str,
    compress_statistics: bool = False,
    quant_type: Literal["nf4", "fp4"] = "nf4",
    blocksize: Optional[int] = None,
) -> None:
    """Quantize ``module.<param_name>`` (any shape, float) to 4 bits in place; see the module docstring.

    Raises ``AttributeError`` if the module has no such attribute, ``TypeError`` if it is not an
    ``nn.Parameter``, ``ValueError`` if it is already parametrized or for bad quantization settings.
    """
    param = _parameter(module, param_name)
    packed, state = F.quantize_4bit(
        param.data, blocksize=blocksize, compress_statistics=compress_statistics, quant_type=quant_type
    )
    setattr(module, param_name, nn.Parameter(packed, requires_grad=False))
    _register(module, param_name, state)


def replace_parameter_4bit_prequantized(
    module: nn.Module, param_name: str, qs_dict: dict[str, Any], device: torch.device | str
) -> None:
    """Parametrize ``module.<param_name>``, which already holds packed 4-bit bytes, with the quant
    state serialized in ``qs_dict`` (``QuantState.as_dict(packed=True)``, keys with or without prefix)."""
    param = _parameter(module, param_name)
    state = QuantState.from_dict(qs_dict, device=device)
    check_packed_size(param.data, state, param_name)
    _register(module, param_name, state)


def _register(module: nn.Module, param_name: str, state: QuantState) -> None:
    P.register_parametrization(module, param_name, Bnb4bitParametrization(state), unsafe=True)
    _cache_during_forward(module)
    module.register_state_dict_post_hook(_save_hook(param_name))
    module.register_load_state_dict_pre_hook(_load_hook(param_name))


def _cache_during_forward(module: nn.Module) -> None:
    """Enter ``parametrize.cached()`` for the duration of each forward of ``module`` (once per module)."""
    if getattr(module, "_lowbit_parametrize_cache", False):
        return
    module._lowbit_parametrize_cache = True
    open_contexts: list[contextlib.AbstractContextManager] = []

    def enter(_module, _inputs):
        context = P.cached()
        context.__enter__()
        open_contexts.append(context)

    def leave(_module, _inputs, _output):
        if open_contexts:  # empty when an earlier pre-hook raised before `enter` ran
            open_contexts.pop().__exit__(None, None, None)

    module.register_forward_pre_hook(enter)
    module.register_forward_hook(leave, always_call=True)


def _parametrization(module: nn.Module, param_name: str) -> Bnb4bitParametrization:
    return next(p for p in module.parametrizations[param_name] if isinstance(p, Bnb4bitParametrization))


def _save_hook(param_name: str):
    def hook(module, state_dict, prefix, local_metadata):
        original = f"{prefix}parametrizations.{param_name}.original"
        if original not in state_dict:
            return
        state_dict[prefix + param_name] = state_dict.pop(original)
        for key, value in _parametrization(module, param_name).quant_state.as_dict(packed=True).items():
            state_dict[f"{prefix}{param_name}.{key}"] = value

    return hook


def _load_hook(param_name: str):
    def hook(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        packed_key = prefix + param_name
        if packed_key not in state_dict or not P.is_parametrized(module, param_name):
            return
        entries = {k: state_dict[k] for k in list(state_dict) if k.startswith(packed_key + ".")}
        parametrization = _parametrization(module, param_name)
        current = module.parametrizations[param_name].original
        try:
            state = QuantState.from_dict(
                {k[len(packed_key) + 1 :]: v for k, v in entries.items()}, device=current.device
            )
            if tuple(state.shape) != tuple(parametrization.quant_state.shape):
                raise ValueError(
                    f"shape {list(state.shape)} in the checkpoint, {list(parametrization.quant_state.shape)} in the model"
                )
            packed = state_dict[packed_key]
            if packed.shape != current.shape or packed.dtype != current.dtype:
                raise ValueError(
                    f"packed {packed.dtype}{list(packed.shape)} in the checkpoint, {current.dtype}{list(current.shape)} "
                    "in the model"
                )
        except ValueError as err:
            error_msgs.append(f"{packed_key}: cannot load the 4-bit parametrized tensor: {err}")
            return
        for key in entries:
            del state_dict[key]
        state_dict[f"{prefix}parametrizations.{param_name}.original"] = state_dict.pop(packed_key)
        parametrization.quant_state = state

    return hook
