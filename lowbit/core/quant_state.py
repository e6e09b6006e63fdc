"""``QuantState``: everything needed to undo a 4-bit or 8-bit blockwise quantization.

Serialization uses bitsandbytes' exact keys (docs/design.md §4) so that a state dict written by
either library loads in the other: tensors under their own keys, the non-tensor fields packed
as UTF-8 JSON into one uint8 tensor under ``quant_state.bitsandbytes__<quant_type>``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any, Optional

import torch

from . import checks, formats

_PACKED_PREFIX = "quant_state.bitsandbytes__"
_VALID_KEYS = frozenset(
    {
        "absmax",
        "quant_map",
        "nested_absmax",
        "nested_quant_map",
        "quant_state",
        "quant_type",
        "blocksize",
        "dtype",
        "shape",
        "nested_blocksize",
        "nested_dtype",
        "nested_offset",
    }
)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype_from_name(name: Any, key: str, allowed: tuple[torch.dtype, ...]) -> torch.dtype:
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    if dtype not in allowed:
        names = ", ".join(repr(_dtype_name(d)) for d in allowed)
        raise ValueError(f"quant state: {key!r} must be one of {names}, got {name!r}")
    return dtype


def pack_dict_to_tensor(source: dict[str, Any]) -> torch.Tensor:
    """JSON-encode ``source`` into a uint8 tensor (the bitsandbytes packing, byte for byte)."""
    return torch.tensor(list(json.dumps(source).encode("utf-8")), dtype=torch.uint8)


def unpack_tensor_to_dict(packed: torch.Tensor, key: str = _PACKED_PREFIX + "*") -> dict[str, Any]:
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8 or packed.dim() != 1:
        raise ValueError(f"quant state: the packed {key!r} entry must be a 1-D uint8 tensor")
    try:
        unpacked = json.loads(bytes(packed.cpu().tolist()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"quant state: the packed {key!r} entry is not valid JSON ({err})") from None
    except RecursionError:
        raise ValueError(f"quant state: the packed {key!r} entry nests JSON too deeply") from None
    if not isinstance(unpacked, dict):
        raise ValueError(f"quant state: the packed {key!r} entry must hold a JSON object")
    return unpacked


class QuantState:
    """Quantization state of a tensor: absmax per block, codebook, and the original shape/dtype.

    When ``state2`` is set the absmax itself is 8-bit quantized (double quantization):
    ``absmax = dequantize_blockwise(self.absmax, state2) + offset``.

    ``layout`` says how the packed bytes and ``absmax`` are arranged (``formats.LAYOUTS``). In the
    standard layout (bitsandbytes', what checkpoints hold) ``absmax`` is float32, or the uint8 codes
    of double quantization. In the interleaved layout (CPU inference, see
    ``functional.interleave_4bit``) ``absmax`` is always float32, in the layout's order, decoded
    once if the weight was double-quantized. The standard uint8 codes of double quantization are
    then read back from those values (with ``state2`` and ``offset``) so that the standard state
    comes back bit for bit; ``absmax_codes`` keeps them only where two codes of a nested block
    decode to the same float32 and the values cannot tell them apart.
    """

    #: The product of an interleaved weight with this state, kept by ``autograd.matmul_4bit`` for
    #: the calls after the first (it checks it was made from the same objects); never saved or
    #: copied (``__getstate__``). It holds the weight's bytes while the state lives.
    decode_product: Any = None

    valid_quant_types = formats.QUANT_TYPES
    valid_qs_type_keys = [f"bitsandbytes__{t}" for t in formats.QUANT_TYPES]
    valid_qs_keys = sorted(_VALID_KEYS)

    def __init__(
        self,
        absmax: torch.Tensor,
        shape: Optional[torch.Size] = None,
        code: Optional[torch.Tensor] = None,
        blocksize: Optional[int] = None,
        quant_type: Optional[str] = None,
        dtype: Optional[torch.dtype] = None,
        offset: Optional[torch.Tensor] = None,
        state2: Optional[QuantState] = None,
        layout: str = formats.LAYOUT_STANDARD,
        absmax_codes: Optional[torch.Tensor] = None,
    ):
        _check_fields(absmax, shape, code, blocksize, quant_type, dtype, offset, state2)
        if layout not in formats.LAYOUTS:
            raise ValueError(f"quant state: layout must be one of {formats.LAYOUTS}, got {layout!r}")
        self.absmax = absmax
        self.shape = torch.Size(shape) if shape is not None else None
        self.code = code
        self.dtype = dtype
        self.blocksize = blocksize
        self.quant_type = quant_type
        self.offset = offset
        self.state2 = state2
        self.layout = layout
        self.absmax_codes = absmax_codes

    @property
    def nested(self) -> bool:
        return self.state2 is not None

    @property
    def interleaved(self) -> bool:
        return self.layout == formats.LAYOUT_INTERLEAVED

    def __getattr__(self, name: str):
        # FSDP's state-dict traversal resolves the dotted key "quant_state.bitsandbytes__nf4"
        # with getattr on this object.
        if name.startswith("bitsandbytes__"):
            packed = self.as_dict(packed=True)
            key = "quant_state." + name
            if key in packed:
                return packed[key]
        raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'")

    def __getitem__(self, idx):
        """The legacy list layout: [absmax, shape, dtype, blocksize, [offset, state2] | None, quant_type]."""
        nested = [self.offset, self.state2] if self.nested else None
        return [self.absmax, self.shape, self.dtype, self.blocksize, nested, self.quant_type][idx]

    # -- serialization -------------------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        """Pickling and copying: every field, without ``decode_product`` (it holds a binding to
        this process's library and a view of the weight, which is not the state's to save)."""
        fields = dict(self.__dict__)
        fields.pop("decode_product", None)
        return fields

    def as_dict(self, packed: bool = False) -> dict[str, Any]:
        """The state as a flat dict; with ``packed=True`` only tensors (safetensors-ready)."""
        if self.interleaved:
            raise ValueError(
                "quant state: the interleaved (CPU inference) layout is not saved; "
                "lowbit.functional.deinterleave_4bit gives the standard weight and state"
            )
        out: dict[str, Any] = {
            "quant_type": self.quant_type,
            "absmax": self.absmax,
            "blocksize": self.blocksize,
            "quant_map": self.code,
            "dtype": _dtype_name(self.dtype),
            "shape": tuple(self.shape) if self.shape is not None else None,
        }
        if self.nested:
            out.update(
                {
                    "nested_absmax": self.state2.absmax,
                    "nested_blocksize": self.state2.blocksize,
                    # a copy: safetensors refuses tensors that share storage
                    "nested_quant_map": self.state2.code.clone(),
                    "nested_dtype": _dtype_name(self.state2.dtype),
                    "nested_offset": self.offset.item(),
                }
            )
        if not packed or self.quant_type is None:
            return out
        tensors = {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}
        tensors[_PACKED_PREFIX + self.quant_type] = pack_dict_to_tensor(
            {k: v for k, v in out.items() if not isinstance(v, torch.Tensor)}
        )
        return tensors

    @classmethod
    def from_dict(cls, qs_dict: dict[str, Any], device: torch.device | str = "cpu") -> QuantState:
        """Rebuild a state from ``as_dict`` output (packed or not, key prefixes allowed): 4-bit, or
        8-bit blockwise (``quant_type`` None, unpacked, as ``as_dict`` writes it).

        Every field is checked against the format (docs/design.md §4), so a truncated or corrupted
        checkpoint raises ``ValueError`` naming the bad entry instead of producing garbage at the
        first forward pass. This runs at load time: values (finite absmax, the codebooks) are read.
        """
        if not isinstance(qs_dict, Mapping):
            raise TypeError(f"quant state: expected a dict of state entries, got {type(qs_dict).__name__}")
        bad_keys = [k for k in qs_dict if not isinstance(k, str)]
        if bad_keys:
            raise ValueError(f"quant state: keys must be strings, got {bad_keys!r}")
        qs_dict = dict(qs_dict)
        packed_keys = [k for k, v in qs_dict.items() if "quant_state" in k and isinstance(v, torch.Tensor)]
        if "quant_type" not in qs_dict and not any(k.split(".")[-1] == "quant_type" for k in qs_dict):
            if not packed_keys:
                raise ValueError("quant state: expected packed or unpacked quant_state items, found neither")
            if len(packed_keys) != 1 or packed_keys[0].split(".")[-1] not in cls.valid_qs_type_keys:
                raise ValueError(
                    f"quant state: expected exactly one 'quant_state' entry ending in one of "
                    f"{cls.valid_qs_type_keys}, found {packed_keys}"
                )
        if len(packed_keys) == 1:
            key = packed_keys[0]
            unpacked = unpack_tensor_to_dict(qs_dict.pop(key), key)
            named, held = key.split(".")[-1].removeprefix("bitsandbytes__"), unpacked.get("quant_type")
            if named in formats.QUANT_TYPES and held in formats.QUANT_TYPES and held != named:
                raise ValueError(
                    f"quant state: {key!r} holds the JSON of quant_type={held!r}, "
                    f"but its key names {named!r}"
                )
            qs_dict.update(unpacked)

        fields: dict[str, Any] = {}
        for key, value in qs_dict.items():
            name = key.split(".")[-1]
            if name in fields:
                raise ValueError(f"quant state: more than one entry for {name!r} (key {key!r})")
            fields[name] = value
        unknown = set(fields) - _VALID_KEYS
        if unknown:
            raise ValueError(f"quant state: unexpected keys {sorted(unknown)}")
        for key in ("quant_type", "absmax", "blocksize", "quant_map", "dtype", "shape"):
            if key not in fields:
                raise ValueError(f"quant state: missing {key!r}")

        quant_type = fields["quant_type"]  # None: an 8-bit blockwise state (256-entry code, shape optional)
        eight_bit = quant_type is None
        if not eight_bit and (not isinstance(quant_type, str) or quant_type not in formats.QUANT_TYPES):
            raise ValueError(
                f"quant state: 'quant_type' must be one of {formats.QUANT_TYPES} or None (8-bit blockwise), "
                f"got {quant_type!r}"
            )
        blocksizes = formats.BLOCKSIZES_8BIT if eight_bit else formats.BLOCKSIZES
        blocksize = _check_blocksize(fields["blocksize"], "blocksize", blocksizes)
        dtype = _dtype_from_name(fields["dtype"], "dtype", formats.FLOAT_DTYPES)
        shape = fields["shape"]
        if eight_bit and shape is None:
            n_blocks = None  # quantize_blockwise's state records no shape
        else:
            if not isinstance(shape, (list, tuple, torch.Size)) or not all(
                isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape
            ) or not shape:
                raise ValueError(f"quant state: 'shape' must be a non-empty list of positive ints, got {shape!r}")
            shape = torch.Size(shape)
            n_blocks = formats.num_blocks(math.prod(shape), blocksize)
        if eight_bit:
            code = _check_tensor(fields["quant_map"], "quant_map", torch.float32, formats.CODE8_SIZE)
            if not bool((code[1:] >= code[:-1]).all()):
                raise ValueError("quant state: 'quant_map' must be sorted in ascending order (an 8-bit code)")
        else:
            code = _check_tensor(fields["quant_map"], "quant_map", torch.float32, 16)
            if not torch.equal(code.cpu(), formats.code_tensor(quant_type)):
                raise ValueError(
                    f"quant state: 'quant_map' is not the {quant_type} codebook (quant_type={quant_type!r})"
                )

        offset = state2 = None
        nested_keys = ("nested_absmax", "nested_blocksize", "nested_quant_map", "nested_dtype", "nested_offset")
        if any(key in fields for key in nested_keys):
            for key in nested_keys:
                if key not in fields:
                    raise ValueError(f"quant state: nested state is missing {key!r}")
            absmax = _check_tensor(fields["absmax"], "absmax", torch.uint8, n_blocks)
            nested_blocksize = _check_blocksize(fields["nested_blocksize"], "nested_blocksize", blocksizes)
            nested_offset = fields["nested_offset"]
            if (
                isinstance(nested_offset, bool)
                or not isinstance(nested_offset, (int, float))
                or not math.isfinite(nested_offset)
            ):
                raise ValueError(f"quant state: 'nested_offset' must be a finite number, got {nested_offset!r}")
            nested_code = _check_tensor(fields["nested_quant_map"], "nested_quant_map", torch.float32, 256)
            if not bool((nested_code[1:] >= nested_code[:-1]).all()):
                raise ValueError("quant state: 'nested_quant_map' must be sorted in ascending order")
            state2 = cls(
                absmax=_check_tensor(
                    fields["nested_absmax"],
                    "nested_absmax",
                    torch.float32,
                    formats.num_blocks(absmax.numel(), nested_blocksize),
                ).to(device),
                blocksize=nested_blocksize,
                code=nested_code.to(device),
                dtype=_dtype_from_name(fields["nested_dtype"], "nested_dtype", (torch.float32,)),
            )
            offset = torch.tensor(float(nested_offset), device=device)
        else:
            absmax = _check_tensor(fields["absmax"], "absmax", torch.float32, n_blocks)

        return cls(
            absmax=absmax.to(device),
            shape=shape,
            code=code.to(device),
            blocksize=blocksize,
            quant_type=quant_type,
            dtype=dtype,
            offset=offset,
            state2=state2,
        )

    def replace(self, **changes: Any) -> QuantState:
        """A new state with the same fields except ``changes`` (the tensors are shared, not copied)."""
        fields = {
            name: getattr(self, name)
            for name in ("absmax", "shape", "code", "blocksize", "quant_type", "dtype", "offset", "state2", "layout",
                         "absmax_codes")
        }  # fmt: skip
        return QuantState(**{**fields, **changes})

    # -- device movement and comparison ---------------------------------------------------
    def to(self, device: torch.device | str) -> QuantState:
        """Move every tensor to ``device`` in place (and return self, for chaining)."""
        self.code = self.code.to(device)
        self.absmax = self.absmax.to(device)
        if self.absmax_codes is not None:
            self.absmax_codes = self.absmax_codes.to(device)
        if self.nested:
            self.offset = self.offset.to(device)
            self.state2.absmax = self.state2.absmax.to(device)
            self.state2.code = self.state2.code.to(device)
        return self

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, QuantState):
            return False
        return (
            _tensors_equal(self.absmax, other.absmax)
            and self.shape == other.shape
            and _tensors_equal(self.code, other.code)
            and self.dtype == other.dtype
            and self.blocksize == other.blocksize
            and self.quant_type == other.quant_type
            and self.layout == other.layout
            and _tensors_equal(self.absmax_codes, other.absmax_codes)
            and (
                self.offset is other.offset
                if self.offset is None or other.offset is None
                else bool(self.offset.cpu() == other.offset.cpu())
            )
            and (
                self.state2 is other.state2
                if self.state2 is None or other.state2 is None
                else self.state2 == other.state2
            )
        )

    __hash__ = None  # mutable, compared by value

    def __repr__(self) -> str:
        nested = f", nested(blocksize={self.state2.blocksize})" if self.nested else ""
        layout = f", layout={self.layout!r}" if self.interleaved else ""
        return (
            f"QuantState(quant_type={self.quant_type!r}, shape={tuple(self.shape) if self.shape else None}, "
            f"dtype={self.dtype}, blocksize={self.blocksize}{nested}{layout})"
        )


def _tensors_equal(a: Optional[torch.Tensor], b: Optional[torch.Tensor]) -> bool:
    if a is None or b is None:
        return a is b
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.cpu(), b.cpu())


def _check_blocksize(value: Any, key: str, blocksizes: tuple[int, ...] = formats.BLOCKSIZES) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value not in blocksizes:
        raise ValueError(f"quant state: {key!r} must be one of {blocksizes}, got {value!r}")
    return value


def _check_tensor(value: Any, key: str, dtype: torch.dtype, numel: Optional[int]) -> torch.Tensor:
    """A loaded tensor entry: its dtype, 1-D layout and size (``None``: not known), and finite values."""
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"quant state: {key!r} must be a tensor, got {type(value).__name__}")
    if value.dtype != dtype:
        raise ValueError(f"quant state: {key!r} must be {dtype}, got {value.dtype}")
    if numel is not None and value.numel() != numel:
        raise ValueError(f"quant state: {key!r} has {value.numel()} elements, expected {numel}")
    if value.dim() != 1:
        raise ValueError(f"quant state: {key!r} must be 1-D, got shape {tuple(value.shape)}")
    if value.device.type == "meta":
        raise ValueError(f"quant state: {key!r} is a meta tensor (no data to load)")
    if value.is_floating_point() and not bool(torch.isfinite(value).all()):
        raise ValueError(f"quant state: {key!r} contains NaN or Inf")
    return value


def _check_fields(absmax, shape, code, blocksize, quant_type, dtype, offset, state2) -> None:
    """What a QuantState is built from: types and metadata, and for a 4-bit state, that ``code`` is
    the codebook of ``quant_type`` (read once per code tensor; gemv uses the code, dequantize the
    quant type, and the two must agree)."""
    if not isinstance(absmax, torch.Tensor):
        raise TypeError(f"QuantState: absmax must be a torch.Tensor, got {type(absmax).__name__}")
    if shape is not None:
        checks.shape(shape, "QuantState: shape")
    if blocksize is not None:
        allowed = formats.BLOCKSIZES if quant_type is not None else formats.BLOCKSIZES_8BIT
        checks.blocksize(blocksize, "QuantState: blocksize", allowed)
    if dtype is not None:
        checks.float_dtype(dtype, "QuantState: dtype")
    if offset is not None and not isinstance(offset, torch.Tensor):
        raise TypeError(f"QuantState: offset must be a torch.Tensor or None, got {type(offset).__name__}")
    if state2 is not None and not isinstance(state2, QuantState):
        raise TypeError(f"QuantState: state2 must be a QuantState or None, got {type(state2).__name__}")
    if (offset is None) != (state2 is None):
        raise ValueError("QuantState: a nested (double-quantized) state needs both offset and state2")
    if quant_type is not None:
        checks.quant_type(quant_type, "QuantState: quant_type")
        if code is not None:
            checks.code_matches(code, quant_type, "QuantState: code")
    elif code is not None:
        checks.tensor(code, "QuantState: code", (torch.float32,), ndim=1)
