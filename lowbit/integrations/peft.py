"""QLoRA with PEFT on lowbit's quantized layers.

PEFT wraps bitsandbytes' layers with its own LoRA classes only when bitsandbytes is installed and
the layer *is* a ``bitsandbytes.nn.Linear4bit``; lowbit's ``Linear4bit`` is an ``nn.Linear``
subclass, so without help PEFT would wrap it as a plain linear layer: training works, but merging
would add the LoRA delta to the packed bytes. This module gives PEFT LoRA layers that know lowbit
(:class:`LoraLinear4bit`, :class:`LoraLinear8bitLt`, modelled on PEFT's bitsandbytes ones) and
hands them to PEFT through its custom-module mapping (``LoraConfig._register_custom_module``,
PEFT's documented hook for layer types it does not know; PEFT dispatches custom modules first)::

    from peft import LoraConfig, prepare_model_for_kbit_training
    from lowbit.integrations import peft as lowbit_peft

    model = prepare_model_for_kbit_training(model)            # lowbit 4-bit model from LowbitConfig
    config = LoraConfig(r=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    model = lowbit_peft.get_peft_model(model, config)          # = peft.get_peft_model + registration
    ...train...
    model.save_pretrained("adapters")                          # adapters only (PEFT's format)
    model = lowbit_peft.from_pretrained(base_model, "adapters")  # = PeftModel.from_pretrained + registration
    dense = lowbit_peft.merge_and_unload(model)                 # exact, into float nn.Linear layers
    # model.merge_and_unload() also works: it merges into the 4-bit weights and quantizes them again

``PeftModel.merge_and_unload()`` dequantizes each weight, adds the LoRA product and quantizes
again with the layer's settings (as PEFT does for bitsandbytes), so a merged 4-bit layer carries a
new rounding error; :func:`merge_and_unload` dequantizes first and merges exactly into a float model.
DoRA and the weight-rewriting initialisations (PiSSA, OLoRA, CorDA, LoftQ) read bitsandbytes
weights through bitsandbytes and are refused with a clear error.
"""

from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
from torch import nn

try:
    import peft
    from peft import LoraConfig, PeftModel
    from peft.tuners.lora.layer import LoraLayer
    from peft.tuners.tuners_utils import check_adapters_to_merge
    from peft.utils.other import transpose
except ImportError as err:  # pragma: no cover - exercised only without peft
    from . import HF_INSTALL_HINT

    raise ImportError(
        f"lowbit.integrations.peft needs peft ({err}). Install it with: {HF_INSTALL_HINT}"
    ) from err

from ..nn import Int8Params, Linear4bit, Linear8bitLt, Params4bit
from .transformers import _dense_weight, dequantize_model

__all__ = [
    "LoraLinear4bit",
    "LoraLinear8bitLt",
    "LOWBIT_LORA_MODULES",
    "from_pretrained",
    "get_peft_model",
    "merge_and_unload",
    "register_lowbit_modules",
]

_VARIANT_KWARG_KEYS = ("alora_offsets",)
_REWRITING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga", "eva")


def _requantize(base: nn.Module, weight: torch.Tensor) -> None:
    """Put the float ``weight`` back into ``base`` (a lowbit layer), quantized with its settings."""
    device = base.weight.device
    if not isinstance(base, (Linear4bit, Linear8bitLt)):  # dequantized by dequantize_model: exact
        base.weight.data = weight.to(base.weight.dtype)
    elif isinstance(base, Linear4bit):
        old = base.weight
        dtype = old.quant_state.dtype if old.quant_state is not None else weight.dtype
        new = Params4bit(
            weight.to(dtype).contiguous(),
            requires_grad=False,
            blocksize=old.blocksize,
            compress_statistics=old.compress_statistics,
            quant_type=old.quant_type,
            quant_storage=old.quant_storage,
            module=base,
        )
        base.weight = new._quantize(device)
    else:
        new = Int8Params(weight.contiguous(), requires_grad=False, has_fp16_weights=False)
        base.weight = new._quantize(device)
        base.state.reset_grads()
        base.init_8bit_state()


class _LoraLowbitLinear(nn.Module, LoraLayer):
    """LoRA around a lowbit quantized linear layer (PEFT's bitsandbytes LoRA layers, for lowbit)."""

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        config: LoraConfig,
        r: int = 0,
        lora_alpha: int = 1,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        LoraLayer.__init__(self, base_layer)
        self.fan_in_fan_out = False
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config)

    def resolve_lora_variant(self, *, config: LoraConfig, **kwargs):
        init = config.init_lora_weights
        if config.use_dora:
            raise ValueError(f"lowbit: {type(self).__name__} does not support DoRA (use_dora=True)")
        if isinstance(init, str) and init.lower().startswith(_REWRITING_INITS):
            raise ValueError(
                f"lowbit: init_lora_weights={init!r} rewrites the base weight, which {type(self).__name__} "
                "does not support; use the default initialisation"
            )
        if getattr(config, "alora_invocation_tokens", None) is not None:
            from peft.tuners.lora.variants import ALoraLinearVariant

            return ALoraLinearVariant()
        return None

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        return (
            transpose(self.lora_B[adapter].weight @ self.lora_A[adapter].weight, False)
            * self.scaling[adapter]
        )

    def _merged_weight(self, adapter: str, sign: int) -> torch.Tensor:
        base = self.get_base_layer()
        dense = _dense_weight(base) if isinstance(base, (Linear4bit, Linear8bitLt)) else base.weight.data
        dense = dense.to(torch.float32)
        return dense + sign * self.get_delta_weight(adapter).to(device=dense.device, dtype=torch.float32)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Merge the active adapters into the base weight (dequantize, add, quantize again)."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        for adapter in adapter_names or []:
            if adapter not in self.lora_A.keys():
                continue
            if adapter in self.lora_variant:
                raise ValueError(
                    f"lowbit: merging a {type(self.lora_variant[adapter]).__name__} adapter is not supported"
                )
            warnings.warn(
                "Merging LoRA into a quantized weight rounds it again; generations may change slightly.",
                stacklevel=2,
            )
            weight = self._merged_weight(adapter, +1)
            if safe_merge and not torch.isfinite(weight).all():
                raise ValueError(
                    f"NaNs detected in the merged weights. The adapter {adapter} seems to be broken"
                )
            _requantize(self.get_base_layer(), weight)
            if self.lora_bias[adapter]:
                bias = self.get_base_layer().bias
                bias.data = bias.data + self.lora_B[adapter].bias.to(bias.dtype)
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            if adapter not in self.lora_A.keys():
                continue
            _requantize(self.get_base_layer(), self._merged_weight(adapter, -1))
            if self.lora_bias[adapter]:
                bias = self.get_base_layer().bias
                bias.data = bias.data - self.lora_B[adapter].bias.to(bias.dtype)

    def _lora_output(
        self, x: torch.Tensor, result: torch.Tensor, adapter: str, **variant_kwargs
    ) -> torch.Tensor:
        lora_A, lora_B = self.lora_A[adapter], self.lora_B[adapter]
        requires_conversion = not torch.is_autocast_enabled()
        expected_dtype = result.dtype
        if requires_conversion:
            x = self._cast_input_dtype(x, lora_A.weight.dtype)
        if adapter in self.lora_variant:
            result = self.lora_variant[adapter].forward(
                self, active_adapter=adapter, x=x, result=result, **variant_kwargs
            )
            return result.to(expected_dtype) if requires_conversion else result
        output = lora_B(lora_A(self.lora_dropout[adapter](x))) * self.scaling[adapter]
        if requires_conversion:
            output = output.to(expected_dtype)
        return result + output

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self._check_forward_args(x, *args, **kwargs)
        adapter_names = kwargs.pop("adapter_names", None)
        variant_kwargs = {k: kwargs.pop(k, None) for k in _VARIANT_KWARG_KEYS}
        variant_kwargs = {k: v for k, v in variant_kwargs.items() if v is not None}
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if adapter_names is not None:
            return self._mixed_batch_forward(x, *args, adapter_names=adapter_names, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        # As PEFT does for bitsandbytes 4-bit: the product may be a view autograd must not rewrite.
        result = result.clone()
        for adapter in self.active_adapters:
            if adapter in self.lora_A.keys():
                result = self._lora_output(x, result, adapter, **variant_kwargs)
        return result

    def _mixed_batch_forward(
        self, x: torch.Tensor, *args: Any, adapter_names: list[str], **kwargs: Any
    ) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs).clone()
        for adapter in set(adapter_names):
            if adapter == "__base__" or adapter not in self.lora_A.keys():
                continue
            rows = [i for i, name in enumerate(adapter_names) if name == adapter]
            result[rows] = self._lora_output(x[rows], result[rows], adapter)
        return result

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


class LoraLinear4bit(_LoraLowbitLinear):
    """LoRA around ``lowbit.nn.Linear4bit`` (QLoRA)."""


class LoraLinear8bitLt(_LoraLowbitLinear):
    """LoRA around ``lowbit.nn.Linear8bitLt``."""


#: PEFT custom-module mapping: lowbit layer class -> its LoRA class.
LOWBIT_LORA_MODULES: dict[type[nn.Module], type[nn.Module]] = {
    Linear4bit: LoraLinear4bit,
    Linear8bitLt: LoraLinear8bitLt,
}


def register_lowbit_modules(config: LoraConfig) -> LoraConfig:
    """Register lowbit's LoRA layers on ``config`` (``LoraConfig._register_custom_module``); returns it."""
    if not isinstance(config, LoraConfig):
        raise TypeError(f"register_lowbit_modules needs a peft.LoraConfig, got {type(config).__name__}")
    config._register_custom_module(LOWBIT_LORA_MODULES)
    return config


def get_peft_model(model: nn.Module, peft_config: LoraConfig, *args: Any, **kwargs: Any):
    """``peft.get_peft_model`` with lowbit's LoRA layers registered on ``peft_config``."""
    return peft.get_peft_model(model, register_lowbit_modules(peft_config), *args, **kwargs)


def from_pretrained(
    model: nn.Module, model_id: str, adapter_name: str = "default", **kwargs: Any
) -> PeftModel:
    """``PeftModel.from_pretrained`` for a lowbit model: the saved ``LoraConfig`` is read and
    lowbit's LoRA layers are registered on it (a saved config does not record custom modules)."""
    config = kwargs.pop("config", None)
    if config is None:
        config_kwargs = {k: kwargs[k] for k in ("revision", "subfolder", "cache_dir", "token") if k in kwargs}
        config = LoraConfig.from_pretrained(model_id, **config_kwargs)
    config.inference_mode = not kwargs.get("is_trainable", False)
    return PeftModel.from_pretrained(
        model, model_id, adapter_name=adapter_name, config=register_lowbit_modules(config), **kwargs
    )


def merge_and_unload(
    model: PeftModel, dequantize: bool = True, dtype: Optional[torch.dtype] = None, **kwargs: Any
) -> nn.Module:
    """The base model with the LoRA adapters merged in and the PEFT wrappers removed.

    ``dequantize=True`` (default) first replaces the lowbit layers by dense ``nn.Linear`` layers
    (``dtype``, default float32 for 4-bit and the float dtype of 8-bit weights) and merges the adapters exactly:
    the result is an ordinary float model (``save_pretrained`` writes a float checkpoint).
    ``dequantize=False`` is ``PeftModel.merge_and_unload()``: each merged weight is quantized again.
    """
    if dequantize:
        dequantize_model(model, dtype=dtype if dtype is not None else torch.float32)
    return model.merge_and_unload(**kwargs)
