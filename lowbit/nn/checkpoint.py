"""State dicts of layers with a quantized ``weight``: bitsandbytes' keys, checked loading.

Saving writes exactly bitsandbytes' entries (docs/design.md §4) so checkpoints go both ways.
Loading does more than bitsandbytes does:

* a quantized checkpoint loads into a freshly constructed (still float) layer: the packed
  weight and its state replace the float weight (bitsandbytes needs a device move first);
* a float checkpoint loads into an already quantized layer: it is quantized with the layer's
  settings on the layer's device;
* everything is validated before anything is assigned. A corrupted or mismatched entry is
  reported through ``load_state_dict``'s error list (a ``RuntimeError`` naming the key, as for
  any size mismatch in torch) and leaves that layer exactly as it was.

``model.load_state_dict`` keeps torch's semantics for the model as a whole: layers are loaded one
after the other, so a bad entry in a later layer leaves the earlier ones loaded (torch does the
same). :func:`load_checkpoint` is the all-or-nothing variant: it validates every entry of every
layer first and writes nothing unless all of them pass.
"""

from __future__ import annotations

import contextvars
from collections.abc import Mapping
from typing import Any, Optional

import torch

from ..core import checks
from ..core.quant_state import QuantState
from .int8params import Int8Params
from .params4bit import Params4bit, check_packed_size

#: Weights that :func:`load_checkpoint` validated up front, by (layer id, prefix), so that the
#: load that follows installs them instead of validating (and quantizing) a second time.
_PREPARED: contextvars.ContextVar[Optional[dict[tuple[int, str], tuple[Any, dict[str, Any]]]]] = (
    contextvars.ContextVar("lowbit_prepared_weights", default=None)
)


class CheckpointError(ValueError):
    """A state-dict entry that cannot be loaded into the layer; the message names the key."""


def _size_mismatch(key: str, got, expected) -> CheckpointError:
    return CheckpointError(
        f"size mismatch for {key}: copying a param with shape {tuple(got)} from checkpoint, "
        f"the shape in current model is {tuple(expected)}."
    )


def _target_device(current: torch.Tensor, loaded: torch.Tensor) -> torch.device:
    # a layer built on the meta device (empty-weight init) takes the checkpoint's device
    return loaded.device if current.device.type == "meta" else current.device


# ------------------------------------------------------------------------------------------
# per weight format: which entries belong to the weight, and how to rebuild it from them
# ------------------------------------------------------------------------------------------
class _Format4bit:
    """``weight`` (packed) + ``weight.absmax``, ``weight.quant_map``, ``weight.nested_*`` and
    ``weight.quant_state.bitsandbytes__<type>``."""

    @staticmethod
    def entries(weight: Params4bit) -> dict[str, torch.Tensor]:
        if not weight._is_quantized() or weight.quant_state is None:
            return {}
        data, state = weight.standard_form()
        found = {f"weight.{k}": v for k, v in state.as_dict(packed=True).items()}
        if data is not weight.data:
            found["weight"] = data  # the standard bytes in place of the interleaved ones (CPU inference)
        return found

    @staticmethod
    def owns(name: str) -> bool:
        return name.startswith("weight.")

    @staticmethod
    def load(
        current: Params4bit, data: torch.Tensor, extra: dict[str, torch.Tensor], shape: tuple, prefix: str
    ) -> Optional[Params4bit]:
        device = _target_device(current, data)
        if extra:
            try:
                state = QuantState.from_dict(
                    {k[len("weight.") :]: v for k, v in extra.items()}, device=device
                )
            except ValueError as err:
                keys = ", ".join(prefix + k for k in sorted(extra))
                raise CheckpointError(
                    f"{prefix}weight: invalid 4-bit quantization state in {keys}: {err}"
                ) from None
            if tuple(state.shape) != tuple(shape):
                raise _size_mismatch(prefix + "weight", state.shape, shape)
            try:
                check_packed_size(data, state, f"{prefix}weight")
            except ValueError as err:
                raise CheckpointError(str(err)) from None
            loaded = Params4bit(
                data.to(device),
                requires_grad=False,
                blocksize=state.blocksize,
                compress_statistics=state.nested,
                quant_type=state.quant_type,
                quant_storage=data.dtype,
            )
            loaded._set_state(state)
            return loaded
        if not data.is_floating_point() or data.dim() != 2:
            raise CheckpointError(
                f"{prefix}weight is a {data.dtype} tensor of shape {tuple(data.shape)}, i.e. packed 4-bit data, "
                f"but the checkpoint has no {prefix}weight.quant_state.bitsandbytes__* entry describing it"
            )
        if tuple(data.shape) != tuple(shape):
            raise _size_mismatch(prefix + "weight", data.shape, shape)
        if not current._is_quantized():
            return None  # an ordinary float copy into the float weight
        requantized = Params4bit(
            data.detach().to(device, copy=True),
            blocksize=current.blocksize,
            compress_statistics=current.compress_statistics,
            quant_type=current.quant_type,
            quant_storage=current.quant_storage,
        )
        return requantized._quantize(device)

    @staticmethod
    def attach(module: torch.nn.Module, weight: Params4bit) -> None:
        weight.module = module
        module.quant_state = weight.quant_state
        module.quant_storage = weight.quant_storage


class _Format8bit:
    """``weight`` (int8) + ``SCB`` (float32 row scales) + ``weight_format`` (uint8 0 = row-major)."""

    @staticmethod
    def entries(weight: Int8Params) -> dict[str, torch.Tensor]:
        if weight.has_fp16_weights or not weight._is_quantized() or weight.SCB is None:
            return {}
        return {"SCB": weight.SCB, "weight_format": torch.tensor(0, dtype=torch.uint8)}

    @staticmethod
    def owns(name: str) -> bool:
        return name in ("SCB", "weight_format")

    @staticmethod
    def load(
        current: Int8Params, data: torch.Tensor, extra: dict[str, torch.Tensor], shape: tuple, prefix: str
    ) -> Optional[Int8Params]:
        device = _target_device(current, data)
        if "weight_format" in extra:
            layout = extra["weight_format"]
            layout = layout.item() if isinstance(layout, torch.Tensor) and layout.numel() == 1 else layout
            if layout not in (0, "row"):
                raise CheckpointError(
                    f"{prefix}weight_format is {layout!r}; only 0 (row-major) int8 weights load"
                )
        if "SCB" not in extra:
            if data.dtype == torch.int8:
                raise CheckpointError(
                    f"{prefix}weight is int8 but the checkpoint has no {prefix}SCB (its row scales)"
                )
            if not data.is_floating_point():
                raise CheckpointError(
                    f"{prefix}weight must be a floating-point or int8 tensor, got {data.dtype}"
                )
            if tuple(data.shape) != tuple(shape):
                raise _size_mismatch(prefix + "weight", data.shape, shape)
            if not current._is_quantized():
                return None
            return Int8Params(data.detach().to(device, copy=True), has_fp16_weights=False)._quantize(device)

        scales = extra["SCB"]
        if current.has_fp16_weights:
            raise CheckpointError(
                f"{prefix}SCB: the checkpoint holds an int8 weight, but the layer was built with "
                "has_fp16_weights=True; construct it with has_fp16_weights=False to load it"
            )
        if data.dtype != torch.int8:
            raise CheckpointError(
                f"{prefix}weight must be int8 when {prefix}SCB is present, got {data.dtype}"
            )
        if tuple(data.shape) != tuple(shape):
            raise _size_mismatch(prefix + "weight", data.shape, shape)
        if (
            not isinstance(scales, torch.Tensor)
            or not scales.is_floating_point()
            or scales.numel() != shape[0]
        ):
            raise CheckpointError(
                f"{prefix}SCB must be a floating-point tensor of {shape[0]} row scales, got "
                f"{getattr(scales, 'dtype', type(scales).__name__)} of shape {tuple(getattr(scales, 'shape', ()))}"
            )
        if not bool(torch.isfinite(scales).all()):
            raise CheckpointError(f"{prefix}SCB contains NaN or Inf")
        weight = data.to(device)
        scales = scales.to(device, torch.float32).reshape(-1)
        return Int8Params(weight, requires_grad=False, has_fp16_weights=False, CB=weight, SCB=scales)

    @staticmethod
    def attach(module: torch.nn.Module, weight: Int8Params) -> None:
        state = getattr(module, "state", None)
        if state is not None:
            state.reset_grads()  # forget the int8 weight of the previous checkpoint


_FORMATS = {Params4bit: _Format4bit, Int8Params: _Format8bit}


# ------------------------------------------------------------------------------------------
# the module side
# ------------------------------------------------------------------------------------------
def _quantize_in_place(weight) -> None:
    weight._quantize(weight.device)


# First-forward quantization rewrites a parameter, which torch.compile cannot trace: it runs
# eagerly (a graph break, which fullgraph=True reports with this reason). torch.compiler.disable
# would import torch._dynamo (a second or more) with lowbit; torch._disable_dynamo defers that to
# the first call, and the two attributes it lacks make torch.compile skip it with the reason.
_WHY_NOT_COMPILED = (
    "lowbit quantizes a layer's weight on its first forward pass; quantize the model before "
    "torch.compile (model.to(device), or one eager call)"
)
_quantize_in_place = torch._disable_dynamo(_quantize_in_place)
_quantize_in_place._torchdynamo_disable = True
_quantize_in_place._torchdynamo_disable_msg = _WHY_NOT_COMPILED


class QuantizedWeightMixin:
    """For ``nn.Linear``/``nn.Embedding`` subclasses whose ``weight`` is a ``Params4bit`` or
    ``Int8Params`` (named by ``weight_class``). Put it first among the bases."""

    weight_class: type = Params4bit

    def weight_shape(self) -> tuple[int, int]:
        """The logical (unpacked) shape of the weight."""
        raise NotImplementedError

    # -- input checks: before the first forward quantizes the weight, so a refused call changes nothing
    def _check_input(self, input: object, integer: bool = False) -> torch.Tensor:
        dtypes = (torch.int64, torch.int32) if integer else None
        value = checks.tensor(input, "input", dtypes, nonempty=False, contiguous=False, device=self.weight.device)
        if not integer and not value.is_floating_point():
            raise ValueError(f"input must be a floating-point tensor, got {value.dtype}")
        return value

    # -- lazy quantization ---------------------------------------------------------------------
    def quantized_weight(self):
        """The weight, quantized in place on its current device if no device move did it yet."""
        weight = self.weight
        if not isinstance(weight, self.weight_class):
            return weight  # a plain (tied) Parameter: used as a float weight
        if not weight._is_quantized() and weight._quantizes_on_move() and weight.device.type != "meta":
            _quantize_in_place(weight)
        return weight

    # -- saving --------------------------------------------------------------------------------
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        weight = self.weight
        if isinstance(weight, self.weight_class):
            for key, value in _FORMATS[self.weight_class].entries(weight).items():
                destination[prefix + key] = value if keep_vars else value.detach()

    # -- loading -------------------------------------------------------------------------------
    def _prepare_load(self, state_dict: dict[str, Any], prefix: str) -> tuple[Any, dict[str, Any]]:
        """Validate this layer's entries of ``state_dict`` without changing the layer.

        Returns the weight to install (None: nothing of the weight to load, or a float weight
        that torch copies itself) and the entries left for torch's own loading. Raises
        :class:`CheckpointError` naming the bad key."""
        fmt = _FORMATS[self.weight_class]
        weight_key = prefix + "weight"
        extra = {
            k[len(prefix) :]: v
            for k, v in state_dict.items()
            if k.startswith(prefix) and fmt.owns(k[len(prefix) :])
        }
        rest = {
            k: v for k, v in state_dict.items() if not (k.startswith(prefix) and fmt.owns(k[len(prefix) :]))
        }
        # A weight replaced by a plain Parameter (tied to another module's weight) loads as a float
        # weight only, as in bitsandbytes; a checkpoint without the weight (e.g. adapters only) has
        # nothing of it to load. Either is an ordinary load, unless quantization entries are present.
        plain = not isinstance(self.weight, self.weight_class)
        if plain or weight_key not in state_dict:
            if extra:
                entries = ", ".join(prefix + k for k in sorted(extra))
                raise CheckpointError(
                    f"Loading a quantized checkpoint into non-quantized {type(self).__name__} is not supported: "
                    f"{weight_key} is a plain {type(self.weight).__name__} (tied to another module's weight?), "
                    f"not a {self.weight_class.__name__}; the checkpoint holds {entries}"
                    if plain
                    else f"{weight_key} is missing but the checkpoint holds its quantization entries {entries}"
                )
            return None, rest  # torch's own loading (of the float weight, or of the other entries)
        new_weight = fmt.load(self.weight, state_dict[weight_key], extra, self.weight_shape(), prefix)
        self._check_other_tensors(rest, prefix)
        return new_weight, rest

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        prepared = _PREPARED.get()
        try:
            if prepared is not None and (id(self), prefix) in prepared:
                new_weight, rest = prepared[(id(self), prefix)]
            else:
                new_weight, rest = self._prepare_load(state_dict, prefix)
        except CheckpointError as err:
            error_msgs.append(str(err))
            return
        if new_weight is None:  # float into float (torch's own copy), or no weight at all
            super()._load_from_state_dict(
                rest, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
            )
            return
        weight_key = prefix + "weight"
        rest = {k: v for k, v in rest.items() if k != weight_key}
        super()._load_from_state_dict(
            rest, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if weight_key in missing_keys:
            missing_keys.remove(weight_key)
        self.weight = new_weight
        _FORMATS[self.weight_class].attach(self, new_weight)

    def _check_other_tensors(self, state_dict: dict[str, Any], prefix: str) -> None:
        """Shape checks torch would do for the remaining parameters, done up front so that an
        error cannot leave the weight replaced and the rest not."""
        own = {**self._parameters, **self._buffers}
        for name, tensor in own.items():
            key = prefix + name
            if name == "weight" or tensor is None or key not in state_dict:
                continue
            value = state_dict[key]
            if not isinstance(value, torch.Tensor):
                raise CheckpointError(f"{key} must be a tensor, got {type(value).__name__}")
            if value.shape != tensor.shape:
                raise _size_mismatch(key, value.shape, tensor.shape)

    # -- pickling / deepcopy: the weight's back-reference is not pickled, restore it -------------
    def __setstate__(self, state):
        super().__setstate__(state)
        weight = self.__dict__.get("_parameters", {}).get("weight")
        if isinstance(weight, Params4bit):
            weight.module = self


# ------------------------------------------------------------------------------------------
# the whole model: all or nothing
# ------------------------------------------------------------------------------------------
def load_checkpoint(
    model: torch.nn.Module, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False
):
    """``model.load_state_dict(state_dict, strict, assign)``, all or nothing.

    Before anything is written, every lowbit layer validates its entries (packed data, quant
    state, scales, shapes: a float weight for a quantized layer is quantized here) and every other
    parameter and buffer is checked as torch would check it (present when ``strict``, a tensor of
    the right shape); with ``strict`` unexpected keys are found too. Any failure raises torch's
    ``RuntimeError("Error(s) in loading state_dict ...")`` listing every bad entry, and the model
    is unchanged. Modules with their own loading code (``_load_from_state_dict`` overrides or
    load hooks outside lowbit) are validated by that code as it runs. Returns what
    ``load_state_dict`` returns (missing and unexpected keys).
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping of names to tensors, got {type(state_dict).__name__}")
    errors: list[str] = []
    missing: list[str] = []
    unexpected: list[str] = []
    prepared: dict[tuple[int, str], tuple[Any, dict[str, Any]]] = {}

    def visit(module: torch.nn.Module, local: dict[str, Any], prefix: str) -> None:
        # the same walk as torch's load_state_dict: every path to a module, each with its own keys
        own = {**module._parameters, **{k: v for k, v in module._buffers.items()
                                        if k not in module._non_persistent_buffers_set}}  # fmt: skip
        if type(module).get_extra_state is not torch.nn.Module.get_extra_state:
            own["_extra_state"] = None
        names = set(own)
        if isinstance(module, QuantizedWeightMixin):
            try:
                prepared[(id(module), prefix)] = module._prepare_load(local, prefix)
            except CheckpointError as err:
                errors.append(str(err))
            fmt = _FORMATS[module.weight_class]
            names |= {k[len(prefix) :].split(".", 1)[0] for k in local if fmt.owns(k[len(prefix) :])}
            own = {k: v for k, v in own.items() if k != "weight"}  # validated by _prepare_load
        for name, current in own.items():
            key = prefix + name
            if key not in local:
                if current is not None or name == "_extra_state":
                    missing.append(key)
                continue
            if current is None or name == "_extra_state":
                continue
            _check_plain_entry(key, local[key], current, assign, errors)
        for key in local:
            first = key[len(prefix) :].split(".", 1)[0]
            if first not in names and first not in module._modules:
                unexpected.append(key)
        for name, child in module._modules.items():
            if child is not None:
                child_prefix = f"{prefix}{name}."
                visit(child, {k: v for k, v in local.items() if k.startswith(child_prefix)}, child_prefix)

    visit(model, dict(state_dict), "")
    if strict:
        if unexpected:
            errors.insert(0, "Unexpected key(s) in state_dict: {}. ".format(", ".join(f'"{k}"' for k in unexpected)))
        if missing:
            errors.insert(0, "Missing key(s) in state_dict: {}. ".format(", ".join(f'"{k}"' for k in missing)))
    if errors:
        raise RuntimeError(
            "Error(s) in loading state_dict for {} (nothing was loaded):\n\t{}".format(
                type(model).__name__, "\n\t".join(errors)
            )
        )
    token = _PREPARED.set(prepared)
    try:
        return model.load_state_dict(state_dict, strict=strict, assign=assign)
    finally:
        _PREPARED.reset(token)


def _check_plain_entry(key: str, value: Any, current: torch.Tensor, assign: bool, errors: list[str]) -> None:
    """What torch's ``_load_from_state_dict`` checks for one parameter or buffer."""
    if not isinstance(value, torch.Tensor):
        errors.append(f'While copying the parameter named "{key}", expected torch.Tensor, got {type(value).__name__}.')
    elif isinstance(current, torch.nn.parameter.UninitializedParameter):
        return  # a lazy module takes the checkpoint's shape
    elif value.shape != current.shape:
        errors.append(str(_size_mismatch(key, value.shape, current.shape)))
    elif value.device.type == "meta" and not assign and current.device.type != "meta":
        errors.append(f"{key} is a meta tensor (no data to copy); load it with assign=True")
    elif value.is_complex() and not current.is_complex():
        errors.append(f"{key} is complex ({value.dtype}) but the model's tensor is {current.dtype}")
