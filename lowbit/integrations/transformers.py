"""lowbit as a Hugging Face transformers quantization backend.

Importing this module registers ``quant_method="lowbit"`` through transformers' public registry
(``register_quantization_config`` / ``register_quantizer``)::

    from transformers import AutoModelForCausalLM
    from lowbit.integrations.transformers import LowbitConfig

    model = AutoModelForCausalLM.from_pretrained(
        path, quantization_config=LowbitConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
    )
    model.save_pretrained(out)                        # bitsandbytes' tensors and keys
    model = AutoModelForCausalLM.from_pretrained(out)  # reloads through lowbit

:class:`LowbitConfig` takes ``BitsAndBytesConfig``'s arguments. The layers it puts in the model
are :mod:`lowbit.nn`'s ``Linear4bit`` / ``Linear8bitLt``, whose state dicts hold exactly
bitsandbytes' entries, so the saved ``model.safetensors`` is what transformers + bitsandbytes
would write. ``config.json`` records ``"quant_method": "lowbit"`` (transformers routes any
quantization config holding ``load_in_4bit``/``load_in_8bit`` to bitsandbytes, so those two
flags are saved as ``"bits": 4|8``).

Checkpoints saved by transformers + bitsandbytes (``"quant_method": "bitsandbytes"``) load
without bitsandbytes installed through :func:`from_pretrained`, which rewrites their
quantization config to a :class:`LowbitConfig` before calling the model class::

    model = lowbit.integrations.transformers.from_pretrained(AutoModelForCausalLM, bnb_dir)

or, for code written for bitsandbytes, :func:`replace_bitsandbytes` makes transformers serve
``BitsAndBytesConfig`` and bitsandbytes checkpoints with lowbit in this process (opt-in: it
replaces two entries of transformers' quantizer mapping, which its registry cannot re-register).

Device maps: lowbit's layers run on the CPU too, so a map may put quantized layers on ``"cpu"``
(with or without an accelerator elsewhere). Modules mapped to ``"disk"`` are kept in float (a
quantized weight's state cannot be disk-offloaded by accelerate); with
``llm_int8_enable_fp32_cpu_offload=True`` modules mapped to ``"cpu"`` are kept in float32 as in
bitsandbytes, unless the whole map is on the CPU (then the CPU is the compute device).
"""

from __future__ import annotations

import json
import os
import types
from typing import Any, Optional, Union

import torch
from torch import nn

try:
    from transformers.core_model_loading import ConversionOps
    from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
    from transformers.quantizers.quantizers_utils import get_module_from_name, should_convert_module
    from transformers.utils.quantization_config import QuantizationConfigMixin
except ImportError as err:  # pragma: no cover - exercised only without transformers
    from . import HF_INSTALL_HINT

    raise ImportError(
        f"lowbit.integrations.transformers needs transformers>=5 ({err}). Install it with: {HF_INSTALL_HINT}"
    ) from err

from .. import functional as F
from ..nn import Int8Params, Linear4bit, Linear8bitLt, Params4bit

__all__ = [
    "QUANT_METHOD",
    "BitsAndBytesViaLowbitQuantizer",
    "LowbitConfig",
    "LowbitHfQuantizer",
    "bitsandbytes_config_json",
    "dequantize_model",
    "from_pretrained",
    "lowbit_config_from_bitsandbytes",
    "replace_bitsandbytes",
    "replace_with_lowbit_linear",
    "restore_bitsandbytes",
]

QUANT_METHOD = "lowbit"
_STORAGE_NAMES = ("float16", "float32", "int8", "uint8", "float64", "bfloat16")


def _dtype(
    value: Any, name: str, default: torch.dtype, allowed: Optional[tuple[str, ...]] = None
) -> torch.dtype:
    if value is None:
        return default
    if isinstance(value, str):
        value = value.removeprefix("torch.")
        if allowed is not None and value not in allowed:
            raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        dtype = getattr(torch, value, None)
        if isinstance(dtype, torch.dtype):
            return dtype
    if isinstance(value, torch.dtype):
        return value
    raise ValueError(f"{name} must be a torch.dtype or its name, got {value!r}")


class LowbitConfig(QuantizationConfigMixin):
    """``BitsAndBytesConfig``'s fields, served by lowbit (``quant_method="lowbit"``).

    Args:
        load_in_8bit: LLM.int8 (``lowbit.nn.Linear8bitLt``).
        load_in_4bit: NF4/FP4 (``lowbit.nn.Linear4bit``).
        llm_int8_threshold: outlier threshold of LLM.int8 (default 6.0).
        llm_int8_skip_modules: module names (or patterns) kept in float; default: the output
            embedding / tied weights, as transformers picks them for bitsandbytes.
        llm_int8_enable_fp32_cpu_offload: keep modules that a device map puts on "cpu"/"disk" in
            float32 (see the module docstring for the CPU-only case).
        llm_int8_has_fp16_weight: LLM.int8 with a trainable float weight.
        bnb_4bit_compute_dtype: dtype of the 4-bit matmul (default float32).
        bnb_4bit_quant_type: "fp4" (default, as bitsandbytes) or "nf4".
        bnb_4bit_use_double_quant: double quantization of the absmax.
        bnb_4bit_quant_storage: dtype the packed bytes are viewed as (uint8; bfloat16 etc. for FSDP).
    """

    def __init__(
        self,
        load_in_8bit: bool = False,
        load_in_4bit: bool = False,
        llm_int8_threshold: float = 6.0,
        llm_int8_skip_modules: Optional[list[str]] = None,
        llm_int8_enable_fp32_cpu_offload: bool = False,
        llm_int8_has_fp16_weight: bool = False,
        bnb_4bit_compute_dtype: Union[torch.dtype, str, None] = None,
        bnb_4bit_quant_type: str = "fp4",
        bnb_4bit_use_double_quant: bool = False,
        bnb_4bit_quant_storage: Union[torch.dtype, str, None] = None,
        **kwargs: Any,
    ):
        self.quant_method = QUANT_METHOD
        bits = kwargs.pop("bits", None)  # the serialized form of load_in_4bit / load_in_8bit
        kwargs.pop("quant_method", None)
        kwargs.pop("_load_in_4bit", None)
        kwargs.pop("_load_in_8bit", None)
        if bits is not None:
            if bits not in (4, 8):
                raise ValueError(f"bits must be 4 or 8, got {bits!r}")
            load_in_4bit, load_in_8bit = bits == 4, bits == 8
        for name, value in (
            ("load_in_8bit", load_in_8bit),
            ("load_in_4bit", load_in_4bit),
            ("llm_int8_enable_fp32_cpu_offload", llm_int8_enable_fp32_cpu_offload),
            ("llm_int8_has_fp16_weight", llm_int8_has_fp16_weight),
            ("bnb_4bit_use_double_quant", bnb_4bit_use_double_quant),
        ):
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be a bool, got {value!r}")
        if load_in_4bit and load_in_8bit:
            raise ValueError(
                "load_in_4bit and load_in_8bit are both True, but only one can be used at the same time"
            )
        if not load_in_4bit and not load_in_8bit:
            raise ValueError("LowbitConfig needs load_in_4bit=True or load_in_8bit=True")
        if isinstance(llm_int8_threshold, bool) or not isinstance(llm_int8_threshold, (int, float)):
            raise TypeError(f"llm_int8_threshold must be a float, got {llm_int8_threshold!r}")
        if llm_int8_skip_modules is not None and (
            not isinstance(llm_int8_skip_modules, list)
            or not all(isinstance(m, str) for m in llm_int8_skip_modules)
        ):
            raise TypeError(f"llm_int8_skip_modules must be a list of strings, got {llm_int8_skip_modules!r}")
        if bnb_4bit_quant_type not in ("fp4", "nf4"):
            raise ValueError(f"bnb_4bit_quant_type must be 'fp4' or 'nf4', got {bnb_4bit_quant_type!r}")
        self._load_in_8bit = load_in_8bit
        self._load_in_4bit = load_in_4bit
        self.llm_int8_threshold = float(llm_int8_threshold)
        self.llm_int8_skip_modules = llm_int8_skip_modules
        self.llm_int8_enable_fp32_cpu_offload = llm_int8_enable_fp32_cpu_offload
        self.llm_int8_has_fp16_weight = llm_int8_has_fp16_weight
        self.bnb_4bit_quant_type = bnb_4bit_quant_type
        self.bnb_4bit_use_double_quant = bnb_4bit_use_double_quant
        self.bnb_4bit_compute_dtype = _dtype(bnb_4bit_compute_dtype, "bnb_4bit_compute_dtype", torch.float32)
        self.bnb_4bit_quant_storage = _dtype(
            bnb_4bit_quant_storage, "bnb_4bit_quant_storage", torch.uint8, _STORAGE_NAMES
        )
        if self.bnb_4bit_quant_storage not in (
            torch.uint8,
            torch.int8,
            torch.float16,
            torch.bfloat16,
            torch.float32,
        ):
            raise ValueError(
                f"bnb_4bit_quant_storage {self.bnb_4bit_quant_storage} is not supported by lowbit"
            )
        # BitsAndBytesConfig ignores unknown keyword arguments too (it logs them)
        self.unused_kwargs = sorted(kwargs)

    @property
    def load_in_4bit(self) -> bool:
        return self._load_in_4bit

    @property
    def load_in_8bit(self) -> bool:
        return self._load_in_8bit

    def is_quantizable(self) -> bool:
        return self.load_in_8bit or self.load_in_4bit

    def quantization_method(self) -> Optional[str]:
        """'llm_int8', 'fp4' or 'nf4' (``BitsAndBytesConfig.quantization_method``)."""
        if self.load_in_8bit:
            return "llm_int8"
        return self.bnb_4bit_quant_type if self.load_in_4bit else None

    def _fields(self) -> dict[str, Any]:
        return {
            "llm_int8_threshold": self.llm_int8_threshold,
            "llm_int8_skip_modules": self.llm_int8_skip_modules,
            "llm_int8_enable_fp32_cpu_offload": self.llm_int8_enable_fp32_cpu_offload,
            "llm_int8_has_fp16_weight": self.llm_int8_has_fp16_weight,
            "bnb_4bit_compute_dtype": str(self.bnb_4bit_compute_dtype).removeprefix("torch."),
            "bnb_4bit_quant_type": self.bnb_4bit_quant_type,
            "bnb_4bit_use_double_quant": self.bnb_4bit_use_double_quant,
            "bnb_4bit_quant_storage": str(self.bnb_4bit_quant_storage).removeprefix("torch."),
        }

    def to_dict(self) -> dict[str, Any]:
        """What ``config.json`` records: ``quant_method="lowbit"``, ``bits`` and the other fields."""
        return {"quant_method": QUANT_METHOD, "bits": 4 if self.load_in_4bit else 8, **self._fields()}

    def to_diff_dict(self) -> dict[str, Any]:
        return self.to_dict()

    def __iter__(self):
        yield from self.to_dict().items()

    def to_bitsandbytes_dict(self) -> dict[str, Any]:
        """The same settings as ``BitsAndBytesConfig.to_dict()`` writes them (``quant_method="bitsandbytes"``):
        put this under ``quantization_config`` in a lowbit-saved ``config.json`` to load it with bitsandbytes."""
        return {
            "quant_method": "bitsandbytes",
            "load_in_4bit": self.load_in_4bit,
            "load_in_8bit": self.load_in_8bit,
            **self._fields(),
        }

    @classmethod
    def from_bitsandbytes(cls, config: Any) -> LowbitConfig:
        """A ``LowbitConfig`` with the settings of a ``BitsAndBytesConfig`` or of its dict."""
        if isinstance(config, QuantizationConfigMixin):
            config = config.to_dict()
        if not isinstance(config, dict):
            raise TypeError(f"expected a BitsAndBytesConfig or its dict, got {type(config).__name__}")
        fields = {
            k: v for k, v in config.items() if k not in ("quant_method", "_load_in_4bit", "_load_in_8bit")
        }
        fields.setdefault("load_in_4bit", bool(config.get("_load_in_4bit", False)))
        fields.setdefault("load_in_8bit", bool(config.get("_load_in_8bit", False)))
        return cls(**fields)


def lowbit_config_from_bitsandbytes(config: Any) -> LowbitConfig:
    """Alias of :meth:`LowbitConfig.from_bitsandbytes`."""
    return LowbitConfig.from_bitsandbytes(config)


# ------------------------------------------------------------------------------------------
# module replacement
# ------------------------------------------------------------------------------------------
def _conv1d_class():
    from transformers.pytorch_utils import Conv1D

    return Conv1D


def replace_with_lowbit_linear(
    model: nn.Module,
    quantization_config: LowbitConfig,
    modules_to_not_convert: Optional[list[str]] = None,
    pre_quantized: bool = False,
) -> int:
    """Replace every ``nn.Linear`` (and transformers ``Conv1D``) not matched by
    ``modules_to_not_convert`` with a lowbit layer on the meta device. Returns how many."""
    conv1d = _conv1d_class()
    replaced = 0
    for name, module in list(model.named_modules()):
        if not name or not should_convert_module(name, modules_to_not_convert):
            continue
        if not (type(module) is nn.Linear or isinstance(module, conv1d)):
            continue
        if isinstance(module, conv1d):
            in_features, out_features = module.weight.shape
        else:
            in_features, out_features = module.in_features, module.out_features
        with torch.device("meta"):
            if quantization_config.load_in_8bit:
                new = Linear8bitLt(
                    in_features,
                    out_features,
                    module.bias is not None,
                    has_fp16_weights=quantization_config.llm_int8_has_fp16_weight,
                    threshold=quantization_config.llm_int8_threshold,
                )
                if pre_quantized:
                    new.weight.data = new.weight.data.to(torch.int8)
            else:
                new = Linear4bit(
                    in_features,
                    out_features,
                    module.bias is not None,
                    quantization_config.bnb_4bit_compute_dtype,
                    compress_statistics=quantization_config.bnb_4bit_use_double_quant,
                    quant_type=quantization_config.bnb_4bit_quant_type,
                    quant_storage=quantization_config.bnb_4bit_quant_storage,
                )
                if pre_quantized:
                    new.weight.data = new.weight.data.to(quantization_config.bnb_4bit_quant_storage)
        new.source_cls = type(module)
        new.requires_grad_(False)
        model.set_submodule(name, new)
        replaced += 1
    return replaced


def _restore_float_linear(model: nn.Module, prefixes: list[str]) -> None:
    """Put the original float layer (on the meta device, before loading) back in place of every
    lowbit layer under one of ``prefixes`` (module paths)."""
    if not prefixes:
        return
    for name, module in list(model.named_modules()):
        if not isinstance(module, (Linear4bit, Linear8bitLt)):
            continue
        if not any(name == p or name.startswith(p + ".") for p in prefixes):
            continue
        source = getattr(module, "source_cls", nn.Linear)
        with torch.device("meta"):
            if issubclass(source, _conv1d_class()):
                dense = source(module.out_features, module.in_features)
            else:
                dense = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
        model.set_submodule(name, dense)


def _dense_weight(module: nn.Module) -> torch.Tensor:
    weight = module.quantized_weight()
    if isinstance(module, Linear4bit):
        return F.dequantize_4bit(weight.data, weight.quant_state)
    if weight.has_fp16_weights or not weight._is_quantized():
        return weight.data
    scales = weight.SCB if weight.SCB is not None else module.state.SCB
    return F.int8_vectorwise_dequant(weight.data, scales)


def _forget_quantization(model: nn.Module) -> None:
    """Drop transformers' quantization markers from every ``PreTrainedModel`` inside ``model``."""
    for module in model.modules():
        quantizer = module.__dict__.get("hf_quantizer")
        if quantizer is None:
            continue
        quantizer.remove_quantization_config(module)
        for name in ("is_loaded_in_4bit", "is_loaded_in_8bit", "num_parameters"):
            module.__dict__.pop(name, None)


def dequantize_model(
    model: nn.Module, dtype: Optional[torch.dtype] = None, forget_quantization: bool = True
) -> nn.Module:
    """Replace every lowbit ``Linear4bit`` / ``Linear8bitLt`` in ``model`` by an ``nn.Linear`` holding
    its dequantized weight (in ``dtype``, default the weight's own float dtype). In place; returns ``model``.

    Works inside PEFT wrappers too (the LoRA layers then sit on dense layers, and
    ``merge_and_unload`` merges exactly). With ``forget_quantization`` the transformers model loses its
    quantization config, so ``save_pretrained`` writes an ordinary float checkpoint."""
    for name, module in list(model.named_modules()):
        if not isinstance(module, (Linear4bit, Linear8bitLt)):
            continue
        weight = _dense_weight(module)
        if dtype is not None:
            weight = weight.to(dtype)
        with torch.device("meta"):
            dense = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
        dense.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
        if module.bias is not None:
            dense.bias = nn.Parameter(
                module.bias.detach().to(weight.dtype), requires_grad=module.bias.requires_grad
            )
        hook = getattr(module, "_hf_hook", None)
        if hook is not None:  # accelerate's dispatch hooks follow the module
            from accelerate.hooks import add_hook_to_module

            add_hook_to_module(dense, hook)
        model.set_submodule(name, dense)
    if forget_quantization:
        _forget_quantization(model)
    return model


# ------------------------------------------------------------------------------------------
# weight conversion ops (transformers' loader calls these per parameter)
# ------------------------------------------------------------------------------------------
def _first(value):
    return value[0] if isinstance(value, list) else value


class _QuantizeWeights(ConversionOps):
    """Float checkpoint weights -> quantized parameters built on the weight's own device
    (``_quantized`` per layer, from the placeholder parameter the quantizer put there)."""

    def __init__(self, hf_quantizer):
        self.hf_quantizer = hf_quantizer

    def convert(self, input_dict, full_layer_name=None, model=None, **kwargs):
        result = {}
        for param_name, value in input_dict.items():
            value = _first(value)
            module, _ = get_module_from_name(model, param_name)
            if issubclass(getattr(module, "source_cls", nn.Linear), _conv1d_class()):
                value = value.T
            placeholder = model.get_parameter_or_buffer(param_name)
            result[param_name] = self._quantized(value.contiguous(), placeholder, module)
            module._is_hf_initialized = True
        return result

    def _quantized(self, value: torch.Tensor, placeholder, module: nn.Module) -> torch.Tensor:
        raise NotImplementedError


class _Quantize4bit(_QuantizeWeights):
    """-> ``Params4bit`` (NF4/FP4 with the layer's blocksize, double quant and storage dtype)."""

    def _quantized(self, value, placeholder, module):
        weight = Params4bit(
            value,
            requires_grad=False,
            blocksize=placeholder.blocksize,
            compress_statistics=placeholder.compress_statistics,
            quant_type=placeholder.quant_type,
            quant_storage=placeholder.quant_storage,
            module=module,
        )
        return weight._quantize(value.device)


class _Deserialize4bit(ConversionOps):
    """``weight`` + ``weight.absmax``/``quant_map``/``nested_*``/``quant_state.bitsandbytes__*`` -> ``Params4bit``."""

    def __init__(self, hf_quantizer):
        self.hf_quantizer = hf_quantizer

    def convert(self, input_dict, model=None, full_layer_name=None, **kwargs):
        if len(input_dict) == 1:
            return input_dict  # only the weight: not a quantized checkpoint entry
        stats = {key: _first(value) for key, value in input_dict.items()}
        data = stats.pop("weight")
        for key, value in stats.items():
            # bitsandbytes 0.50.2 on CPU quantizes a bfloat16/float16 weight into an absmax of that
            # dtype and shape (1, blocks), and saves it so; its values are exact in float32.
            if key.endswith("absmax") and value.is_floating_point() and value.dtype != torch.float32:
                stats[key] = value.to(torch.float32).reshape(-1)
        module, _ = get_module_from_name(model, full_layer_name)
        weight = Params4bit.from_prequantized(
            data, stats, requires_grad=False, device=data.device, module=module
        )
        module.quant_storage = weight.quant_storage
        module._is_hf_initialized = True
        return {"weight": weight}


class _Quantize8bit(_QuantizeWeights):
    """-> int8 ``Int8Params`` with row scales ``SCB`` (kept float when ``has_fp16_weights``)."""

    def _quantized(self, value, placeholder, module):
        weight = Int8Params(value, requires_grad=False, has_fp16_weights=placeholder.has_fp16_weights)
        if not weight.has_fp16_weights:
            weight._quantize(value.device)
        return weight


class _Deserialize8bit(ConversionOps):
    """``weight`` (int8) + ``SCB`` (+ ``weight_format``) -> ``Int8Params``."""

    def __init__(self, hf_quantizer):
        self.hf_quantizer = hf_quantizer

    def convert(self, input_dict, model=None, full_layer_name=None, **kwargs):
        if len(input_dict) == 1:
            return input_dict
        values = {key: _first(value) for key, value in input_dict.items()}
        data, scales = values["weight"], values.get("SCB")
        module, _ = get_module_from_name(model, full_layer_name)
        if scales is None or data.dtype != torch.int8:
            raise ValueError(
                f"{full_layer_name}: an 8-bit checkpoint needs an int8 weight and its SCB row scales"
            )
        if "weight_format" in values:
            layout = values["weight_format"]
            layout = layout.item() if isinstance(layout, torch.Tensor) else layout
            if layout not in (0, "row"):
                raise ValueError(
                    f"{full_layer_name}: weight_format {layout!r} is not supported (only row-major, 0)"
                )
        scales = scales.to(data.device, torch.float32).reshape(-1)
        weight = Int8Params(data, requires_grad=False, has_fp16_weights=False, CB=data, SCB=scales)
        module._is_hf_initialized = True
        return {"weight": weight}


# ------------------------------------------------------------------------------------------
# the quantizer
# ------------------------------------------------------------------------------------------
def _num_parameters(self, only_trainable: bool = False, exclude_embeddings: bool = False) -> int:
    """``PreTrainedModel.num_parameters`` counting a packed 4-bit weight as its logical size
    (transformers' own version imports bitsandbytes for 4-bit models)."""
    skip = set()
    if exclude_embeddings:
        skip = {f"{n}.weight" for n, m in self.named_modules() if isinstance(m, nn.Embedding)}
    total = 0
    for name, param in self.named_parameters():
        if name in skip or (only_trainable and not param.requires_grad):
            continue
        if isinstance(param, Params4bit) and param._is_quantized():
            total += param.numel() * 2 * param.element_size()
        else:
            total += param.numel()
    return total


class LowbitHfQuantizer(HfQuantizer):
    """transformers' quantizer for :class:`LowbitConfig` (4-bit and 8-bit)."""

    requires_calibration = False
    quantization_config: LowbitConfig

    def __init__(self, quantization_config: LowbitConfig, **kwargs):
        super().__init__(quantization_config, **kwargs)
        self.modules_to_not_convert: list[str] = []

    @property
    def _is_4bit(self) -> bool:
        return self.quantization_config.load_in_4bit

    @property
    def quantized_element_size(self) -> float:
        return 0.5 if self._is_4bit else 1

    @property
    def serialized_names(self) -> dict[str, list[str]]:  # type: ignore[override]
        if self._is_4bit:
            return {
                "weight": [
                    "weight",
                    "weight.nested_absmax",
                    "weight.nested_quant_map",
                    "weight.quant_map",
                    "weight.absmax",
                    "weight.quant_state.bitsandbytes__nf4",
                    "weight.quant_state.bitsandbytes__fp4",
                ]
            }
        return {"weight": ["weight", "SCB", "weight_format"]}

    def validate_environment(self, *args, **kwargs):
        device_map = kwargs.get("device_map")
        if isinstance(device_map, dict) and "disk" in device_map.values():
            from transformers.utils import is_accelerate_available

            if not is_accelerate_available():
                raise ImportError("offloading to disk needs accelerate: pip install accelerate")
        model = self.__dict__.get("_model")
        if model is not None and isinstance(device_map, dict):
            # transformers resolves device_map="auto" (and max_memory) only after the layers were
            # replaced, and shows the result here: put float layers back where it offloads.
            _restore_float_linear(model, self._float_prefixes(device_map))

    def _float_prefixes(self, device_map: dict) -> list[str]:
        """Modules of ``device_map`` that stay in float: those on "disk" (accelerate cannot
        offload a quantized weight's state), and with ``llm_int8_enable_fp32_cpu_offload`` those on
        "cpu" when an accelerator computes the rest."""
        placements = {str(v) for v in device_map.values()}
        keep_float = {"disk"}
        if self.quantization_config.llm_int8_enable_fp32_cpu_offload and placements - {"cpu", "disk"}:
            keep_float.add("cpu")
        return [k for k, v in device_map.items() if str(v) in keep_float and k]

    def update_device_map(self, device_map):
        if device_map is None:
            device_map = {"": torch.cuda.current_device()} if torch.cuda.is_available() else {"": "cpu"}
        return device_map

    def adjust_max_memory(self, max_memory):
        return {key: val * 0.90 for key, val in max_memory.items()}

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        module, name = get_module_from_name(model, param_name)
        layer = Linear4bit if self._is_4bit else Linear8bitLt
        if not isinstance(module, layer) or name != "weight":
            return False
        return not (isinstance(module, Linear8bitLt) and self.quantization_config.llm_int8_has_fp16_weight)

    def _process_model_before_weight_loading(self, model, device_map=None, **kwargs):
        config = self.quantization_config
        self.modules_to_not_convert = self.get_modules_to_not_convert(
            model, config.llm_int8_skip_modules, getattr(model, "_keep_in_fp32_modules", None)
        )
        if isinstance(device_map, dict):
            self.modules_to_not_convert.extend(self._float_prefixes(device_map))
        replace_with_lowbit_linear(
            model, config, self.modules_to_not_convert, pre_quantized=self.pre_quantized
        )
        self._model = model  # until loading ends: see validate_environment

    def _process_model_after_weight_loading(self, model, **kwargs):
        self.__dict__.pop("_model", None)
        if self._is_4bit:
            model.is_loaded_in_4bit = True
        else:
            model.is_loaded_in_8bit = True
        model.num_parameters = types.MethodType(_num_parameters, model)
        return model

    def is_serializable(self, safe_serialization=None):
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    @property
    def is_compileable(self) -> bool:
        return True

    def _dequantize(self, model, dtype=None):
        dequantize_model(model, dtype=dtype, forget_quantization=False)  # transformers drops the config
        for name in ("is_loaded_in_4bit", "is_loaded_in_8bit", "num_parameters"):
            model.__dict__.pop(name, None)
        return model

    def get_quantize_ops(self):
        return _Quantize4bit(self) if self._is_4bit else _Quantize8bit(self)

    def get_load_operations(self):
        return {"deserialize": _Deserialize4bit if self._is_4bit else _Deserialize8bit}


def _register() -> None:
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(LowbitConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(LowbitHfQuantizer)


_register()


# ------------------------------------------------------------------------------------------
# checkpoints saved by transformers + bitsandbytes
# ------------------------------------------------------------------------------------------
def _is_bitsandbytes_config(config: Any) -> bool:
    if isinstance(config, QuantizationConfigMixin):
        config = config.to_dict()
    if not isinstance(config, dict):
        return False
    method = str(config.get("quant_method", ""))
    return (
        method.endswith("bitsandbytes")
        or method.startswith("bitsandbytes")
        or bool(config.get("load_in_4bit") or config.get("load_in_8bit"))
    )


def from_pretrained(model_class, pretrained_model_name_or_path: Union[str, os.PathLike], **kwargs):
    """``model_class.from_pretrained(path, **kwargs)``, loading a checkpoint saved by transformers +
    bitsandbytes through lowbit (bitsandbytes need not be installed).

    The checkpoint's ``quantization_config`` (``quant_method="bitsandbytes"``) is replaced by the
    equivalent :class:`LowbitConfig` in the config passed to ``from_pretrained``; the tensors load
    unchanged. Checkpoints saved with ``quant_method="lowbit"`` or without quantization load as usual.
    """
    if kwargs.get("quantization_config") is not None and not isinstance(
        kwargs["quantization_config"], LowbitConfig
    ):
        raise TypeError("from_pretrained: quantization_config must be a LowbitConfig (or left out)")
    config = kwargs.pop("config", None)
    if config is None:
        from transformers import AutoConfig

        config_kwargs = {
            k: kwargs[k]
            for k in ("revision", "trust_remote_code", "cache_dir", "local_files_only", "token")
            if k in kwargs
        }
        config = AutoConfig.from_pretrained(pretrained_model_name_or_path, **config_kwargs)
    for sub in {id(config): config, id(config.get_text_config()): config.get_text_config()}.values():
        quant = getattr(sub, "quantization_config", None)
        if quant is not None and _is_bitsandbytes_config(quant):
            sub.quantization_config = LowbitConfig.from_bitsandbytes(quant).to_dict()
    if (
        kwargs.get("quantization_config") is not None
        and getattr(config, "quantization_config", None) is not None
    ):
        kwargs.pop("quantization_config")  # the checkpoint's settings win, as in transformers
    return model_class.from_pretrained(pretrained_model_name_or_path, config=config, **kwargs)


class BitsAndBytesViaLowbitQuantizer(LowbitHfQuantizer):
    """Serves a ``BitsAndBytesConfig`` (and checkpoints saved with one) with lowbit's layers; the
    model keeps its ``BitsAndBytesConfig``, so ``save_pretrained`` writes a bitsandbytes checkpoint."""


_BNB_METHODS = ("bitsandbytes_4bit", "bitsandbytes_8bit")
_replaced: dict[str, type] = {}


def replace_bitsandbytes() -> None:
    """Make transformers serve ``BitsAndBytesConfig`` and checkpoints saved by bitsandbytes with
    lowbit, in this process: existing code such as
    ``from_pretrained(path, quantization_config=BitsAndBytesConfig(load_in_4bit=True))`` or
    ``from_pretrained(bitsandbytes_checkpoint)`` then runs without bitsandbytes.

    transformers' registry refuses to re-register a method, so this replaces the two entries of
    ``transformers.quantizers.auto.AUTO_QUANTIZER_MAPPING`` directly; :func:`restore_bitsandbytes` undoes it.
    """
    for method in _BNB_METHODS:
        if AUTO_QUANTIZER_MAPPING.get(method) is not BitsAndBytesViaLowbitQuantizer:
            _replaced.setdefault(method, AUTO_QUANTIZER_MAPPING.get(method))
            AUTO_QUANTIZER_MAPPING[method] = BitsAndBytesViaLowbitQuantizer


def restore_bitsandbytes() -> None:
    """Undo :func:`replace_bitsandbytes`."""
    for method, quantizer in list(_replaced.items()):
        AUTO_QUANTIZER_MAPPING[method] = quantizer
        del _replaced[method]


def bitsandbytes_config_json(path: Union[str, os.PathLike]) -> None:
    """Rewrite ``path/config.json`` of a lowbit-saved checkpoint so that transformers + bitsandbytes
    load it (``quant_method="bitsandbytes"``); the tensors are already bitsandbytes'."""
    file = os.path.join(path, "config.json")
    with open(file) as f:
        config = json.load(f)
    quant = config.get("quantization_config")
    if not quant or quant.get("quant_method") != QUANT_METHOD:
        raise ValueError(f"{file} holds no lowbit quantization_config")
    config["quantization_config"] = LowbitConfig.from_dict(quant).to_bitsandbytes_dict()
    with open(file, "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")
