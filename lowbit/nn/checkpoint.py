"""State dicts of layers with a quantized ``weight``: bitsandbytes' keys, checked loading.

Saving writes exactly bitsandbytes' entries (DESIGN.md §4) so checkpoints go both ways.
Loading does more than bitsandbytes does:

* a quantized checkpoint loads into a freshly constructed (still float) layer: the packed
  weight and its state replace the float weight (bitsandbytes needs a device move first);
* a float checkpoint loads into an already quantized layer: it is quantized with the layer's
  settings on the layer's device;
* everything is validated before anything is assigned. A corrupted or mismatched entry is
  reported through ``load_state_dict``'s error list (a ``RuntimeError`` naming the key, as for
  any size mismatch in torch) and leaves that layer exactly as it was.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from ..core.quant_state import QuantState
from .int8params import Int8Params
from .params4bit import Params4bit, check_packed_size


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
# eagerly (a graph break, which fullgraph=True reports with this reason).
_WHY_NOT_COMPILED = (
    "lowbit quantizes a layer's weight on its first forward pass; quantize the model before "
    "torch.compile (model.to(device), or one eager call)"
)
try:
    _quantize_in_place = torch.compiler.disable(_quantize_in_place, reason=_WHY_NOT_COMPILED)
except TypeError:  # torch < 2.7: no reason argument
    _quantize_in_place = torch.compiler.disable(_quantize_in_place)


class QuantizedWeightMixin:
    """For ``nn.Linear``/``nn.Embedding`` subclasses whose ``weight`` is a ``Params4bit`` or
    ``Int8Params`` (named by ``weight_class``). Put it first among the bases."""

    weight_class: type = Params4bit

    def weight_shape(self) -> tuple[int, int]:
        """The logical (unpacked) shape of the weight."""
        raise NotImplementedError

    # -- lazy quantization ---------------------------------------------------------------------
    def quantized_weight(self):
        """The weight, quantized in place on its current device if no device move did it yet."""
        weight = self.weight
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
    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
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
        if weight_key not in state_dict:
            if extra:
                error_msgs.append(
                    f"{weight_key} is missing but the checkpoint holds its quantization entries "
                    f"{', '.join(prefix + k for k in sorted(extra))}"
                )
                return
            # e.g. a checkpoint of adapters only: nothing of the weight to load
            super()._load_from_state_dict(
                rest, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
            )
            return

        try:
            new_weight = fmt.load(self.weight, state_dict[weight_key], extra, self.weight_shape(), prefix)
            self._check_other_tensors(rest, prefix)
        except CheckpointError as err:
            error_msgs.append(str(err))
            return
        if new_weight is None:  # float into float: torch's own copy
            super()._load_from_state_dict(
                rest, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
            )
            return
        del rest[weight_key]
        super()._load_from_state_dict(
            rest, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if weight_key in missing_keys:
            missing_keys.remove(weight_key)
        self.weight = new_weight
        fmt.attach(self, new_weight)

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
