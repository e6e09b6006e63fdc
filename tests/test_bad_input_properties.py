"""Bad input, generated: every public op, layer, optimizer and loader against hypothesis-made inputs.

Each generated case starts from a valid call and corrupts one thing: an argument's dtype (incl.
bool, complex, float8 views of packed data), device (meta next to CPU tensors), shape (0-d, empty,
one element more or less, a 2-D layout of a 1-D tensor), strides, aliasing (out= over an input),
values (NaN, Inf, subnormal, huge, out-of-range indices), a scalar (blocksize, quant type, dtype,
shape, threshold, optimizer hyper-parameters), a QuantState field, a state-dict entry or the
packed QuantState JSON (truncated, bytes replaced, fields of the wrong type). Every case runs on
every CPU backend: the reference backend and the native library at each instruction set this
machine runs. Asserted for each:

* a refusal is a ValueError or TypeError (torch's RuntimeError from ``load_state_dict``, or from
  ``torch.ops`` argument parsing for a value of the wrong Python type) whose message names the
  argument or key;
* a refused call leaves every input unchanged: tensors, modules, optimizer states;
* all backends agree: the same refusal, or results equal (bit for bit where docs/design.md promises
  it, within accumulation-order tolerance for float matmuls and optimizer parameters);
* what issue 14 requires to be refused is refused (mixed devices, overlapping or mistyped out=,
  2-D absmax, packed data as bool/complex/float8, NaN in a code or in quantized input on the host,
  out-of-range outlier columns, corrupted states), and corruptions that must not change a result
  (strides, a stats tensor's layout, out= beside an input in one buffer) do not when accepted.

Examples per test scale with the hypothesis profile: the default runs in about two minutes on two
cores; ``pytest tests/test_bad_input_properties.py --hypothesis-profile=long`` runs 20 times more
(random, not derandomized).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
from collections.abc import Callable, Iterator
from typing import Any, Optional

import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import lowbit
import lowbit.nn as lnn
import lowbit.optim as O
from lowbit import functional as F
from lowbit.backends.cpu import native
from lowbit.core import formats
from lowbit.core.quant_state import QuantState, pack_dict_to_tensor

# ------------------------------------------------------------------------------------------------
# running one case everywhere
# ------------------------------------------------------------------------------------------------
_DEFAULT = settings.default  # the active profile (pytest --hypothesis-profile=...)


def examples(n: int) -> settings:
    """``n`` examples in the default profile, proportionally more in a longer one."""
    scaled = max(1, n * _DEFAULT.max_examples // 100)
    return settings(
        max_examples=scaled,
        deadline=None,
        derandomize=_DEFAULT.max_examples <= 100,  # CI runs the same cases every time
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
        database=None,
    )


def _backends() -> list[tuple[str, Callable[[], contextlib.AbstractContextManager]]]:
    found = [("reference", lambda: lowbit.backends.use("reference"))]
    if native.load_error() is None:
        for isa in native.supported_isas():
            found.append((f"cpu/{isa}", lambda isa=isa: _native_at(isa)))
    return found


@contextlib.contextmanager
def _native_at(isa: str) -> Iterator[None]:
    with lowbit.backends.use("cpu"), native.use_cpu_isa(isa):
        yield


BACKENDS = _backends()


def _bits(value: Any) -> Any:
    """Everything observable about ``value``, comparable with ==: tensors by metadata and bytes,
    modules and optimizers by their state dicts."""
    if isinstance(value, torch.Tensor):
        meta = (tuple(value.shape), value.dtype, value.stride(), value.storage_offset(), value.device.type)
        if value.device.type == "meta":
            return meta
        flat = value.detach().cpu().reshape(-1)
        data = torch.empty(flat.shape, dtype=flat.dtype).copy_(flat)
        return meta, bytes(data.view(torch.uint8).numpy()) if data.numel() else b""
    if isinstance(value, torch.nn.Module):
        return _bits(value.state_dict())
    if isinstance(value, torch.optim.Optimizer):
        return _bits(value.state_dict())
    if isinstance(value, QuantState):
        return _bits(value.as_dict())
    if isinstance(value, dict):
        return {k: _bits(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_bits(v) for v in value)
    return value


def _changed(before: Any, after: Any, path: str = "inputs") -> list[str]:
    """Where two ``_bits`` structures differ."""
    if isinstance(before, dict) and isinstance(after, dict):
        keys = sorted(set(before) | set(after), key=str)
        return [p for k in keys for p in _changed(before.get(k), after.get(k), f"{path}[{k!r}]")]
    if isinstance(before, list) and isinstance(after, list) and len(before) == len(after):
        return [p for i, (b, a) in enumerate(zip(before, after)) for p in _changed(b, a, f"{path}[{i}]")]
    return [] if before == after else [path]


def _leaves(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _leaves(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _leaves(v)]
    return []


@dataclasses.dataclass
class Case:
    """One generated call: ``make()`` builds fresh inputs (a list), ``call(inputs)`` runs it."""

    what: str  # for messages: which corruption of which call
    make: Callable[[], list]
    call: Callable[[list], Any]
    names: tuple[str, ...]  # a refusal's message must name one of these
    must_reject: bool = False
    must_accept: bool = False
    #: when accepted, the result must equal the uncorrupted call's on the same backend
    base: Optional[Callable[[], list]] = None
    close: bool = False  # float accumulations: compare within tolerance, not bit for bit
    written: tuple[int, ...] = ()  # inputs the call writes (out=, optimizer state): results too
    #: extra property of an accepted call: check(inputs, result)
    check: Optional[Callable[[list, Any], None]] = None
    errors: tuple[type, ...] = (ValueError, TypeError)
    #: what a refused call must leave unchanged (default: all inputs)
    unchanged: Callable[[list], Any] = lambda inputs: inputs


def _is_clean(error: BaseException, case: Case) -> bool:
    if isinstance(error, case.errors) or type(error).__module__.startswith("lowbit"):
        return True
    # torch.ops' own argument parsing (a value of the wrong Python type) names the argument too
    return isinstance(error, RuntimeError) and "for argument" in str(error)


def run(case: Case) -> None:
    outcomes = []
    for label, backend in BACKENDS:
        inputs = case.make()
        before = _bits(case.unchanged(inputs))
        error = result = None
        with backend():
            try:
                result = case.call(inputs)
            except Exception as err:  # judged below: the class and message are the point
                error = err
        if error is not None:
            assert _is_clean(error, case), f"{case.what} on {label}: unclear {type(error).__name__}: {error}"
            message = str(error)
            assert any(name in message for name in case.names), (
                f"{case.what} on {label}: the message does not name {case.names}: {message}"
            )
            after = _bits(case.unchanged(inputs))
            assert after == before, f"{case.what} on {label}: a refused call modified {_changed(before, after)}"
            outcomes.append((label, error, None))
            continue
        values = [t.detach().cpu().clone() for t in _leaves(result) + _leaves(inputs) if t.device.type != "meta"]
        if case.base is not None:
            expected_inputs = case.base()
            with backend():
                expected = case.call(expected_inputs)
            got = [t.detach().cpu() for t in _leaves(result) + [inputs[i] for i in case.written]]
            want = [t.detach().cpu() for t in _leaves(expected) + [expected_inputs[i] for i in case.written]]
            # packed bytes returned in the caller's storage dtype (interleave_4bit) compare as bytes
            got, want = zip(*(_same_bytes_view(g, w) for g, w in zip(got, want))) if got else (got, want)
            _assert_same(
                list(got), list(want), case.close,
                f"{case.what} on {label} (vs the uncorrupted call)",
            )  # fmt: skip
        if case.check is not None:
            case.check(inputs, result)
        outcomes.append((label, None, values))

    label0, error0, values0 = outcomes[0]
    for label, error, values in outcomes[1:]:
        where = f"{case.what}: {label} vs {label0}"
        assert (error is None) == (error0 is None), f"{where}: {error0!r} vs {error!r} (accept/reject differ)"
        if error is not None:
            assert (type(error), str(error)) == (type(error0), str(error0)), f"{where}: {error0!r} vs {error!r}"
        else:
            _assert_same(values, values0, case.close, where)
    if case.must_reject:
        assert error0 is not None, f"{case.what}: accepted, but it must be refused"
    if case.must_accept:
        assert error0 is None, f"{case.what}: refused ({error0!r}), but it is valid"


def _same_bytes_view(g: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two results of other dtypes but the same bytes' size, as their bytes; others unchanged."""
    if g.dtype != w.dtype and g.numel() * g.element_size() == w.numel() * w.element_size():
        return g.contiguous().view(-1).view(torch.uint8), w.contiguous().view(-1).view(torch.uint8)
    return g, w


def _assert_same(got: list[torch.Tensor], want: list[torch.Tensor], close: bool, where: str) -> None:
    assert len(got) == len(want), f"{where}: {len(got)} result tensors vs {len(want)}"
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.numel() == w.numel(), f"{where}: {g.dtype}{tuple(g.shape)} vs {w.dtype}{tuple(w.shape)}"
        g, w = g.reshape(-1), w.reshape(-1)
        if not (g.is_floating_point() or g.is_complex()):
            assert torch.equal(g, w), f"{where}: integer results differ"
            continue
        if not close:
            assert torch.equal(g.isnan(), w.isnan()), f"{where}: NaN in different places"
            g, w = g[~g.isnan()], w[~w.isnan()]
            assert torch.equal(g, w), f"{where}: results differ (max |diff| {(g.double() - w.double()).abs().max()})"
            continue
        # Float accumulations in another order: a non-finite input may end as NaN in one sum and
        # as Inf in another, and sums near the top of the range may overflow in one order only;
        # but no backend may give an ordinary value where another overflows.
        limit = torch.finfo(g.dtype).max / 1024
        g_big, w_big = ~(g.abs() <= limit), ~(w.abs() <= limit)  # NaN counts as big
        assert torch.equal(g_big, w_big), f"{where}: overflow (or NaN) in different places"
        g, w = g[~g_big], w[~w_big]
        finite = w.isfinite()
        eps = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}.get(g.dtype, 1e-5)
        scale = float(w[finite].double().abs().max()) if finite.any() else 0.0
        torch.testing.assert_close(g[finite], w[finite], rtol=eps, atol=eps * scale + 1e-30, msg=where)


# ------------------------------------------------------------------------------------------------
# valid calls of every op, with the role of each argument
# ------------------------------------------------------------------------------------------------
FLOATS = formats.FLOAT_DTYPES
REAL_FLOATS = (*FLOATS, torch.float64)
ALL_DTYPES = (
    torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float16, torch.bfloat16,
    torch.float32, torch.float64, torch.complex64, torch.float8_e4m3fn, torch.float8_e5m2,
)  # fmt: skip


@dataclasses.dataclass
class Arg:
    """One tensor argument: which dtypes are valid, and what kind of thing it is."""

    dtypes: tuple[torch.dtype, ...]
    #: input: free data; sized: its size follows from other arguments; absmax; stat (row/col
    #: scales); code; packed (4-bit bytes, viewed as any quant_storage dtype); out; bias; index
    role: str
    quantized_input: bool = False  # NaN/Inf here is refused on the host (quantize policy)


@dataclasses.dataclass
class OpCall:
    op: str
    args: list  # python values; tensors are rebuilt from `seed` for every backend
    roles: dict[int, Arg]
    close: bool = False

    @property
    def written(self) -> tuple[int, ...]:
        """Positions of the arguments the op writes: out=, or an optimizer's parameter and state."""
        if self.op.startswith("optimizer"):
            return tuple(i for i in (2, 3, 4, 14, 15) if isinstance(self.args[i], torch.Tensor))
        return tuple(i for i, r in self.roles.items() if r.role == "out")


def _op(name: str):
    base, _, overload = name.partition(".")
    return getattr(getattr(torch.ops.lowbit, base), overload or "default")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(shape, dtype, g, scale=2.0):
    return (torch.randn(shape, generator=g) * scale).to(dtype)


def _quantized_4bit(n: int, blocksize: int, quant_type: str, g):
    return torch.ops.lowbit.quantize_4bit(_randn((n,), torch.float32, g), blocksize, quant_type, torch.uint8)


def _int8(shape, g):
    return torch.randint(-127, 128, shape, dtype=torch.int8, generator=g)


@st.composite
def op_calls(draw) -> Callable[[], OpCall]:
    """A valid call of one op: a builder returning fresh tensors (same values every time)."""
    name = draw(st.sampled_from(sorted(_BUILDERS)))
    params = draw(_BUILDERS[name][0])
    seed = draw(st.integers(0, 2**16))
    return lambda: _BUILDERS[name][1](name, params, _gen(seed))


_small = st.integers(1, 5)
_features = st.sampled_from([1, 7, 32, 64, 65, 130])
_blocksize = st.sampled_from([32, 64, 128, 256, 4096])
_quant_type = st.sampled_from(formats.QUANT_TYPES)
_float = st.sampled_from(FLOATS)


def _build_quantize_4bit(name, p, g):
    n, bs, qt, dtype = p
    return OpCall(name, [_randn((n,), dtype, g), bs, qt, torch.uint8], {0: Arg(FLOATS, "input", True)})


def _build_dequantize_4bit(name, p, g):
    n, bs, qt, dtype = p
    packed, absmax = _quantized_4bit(n, bs, qt, g)
    args = [packed, absmax, bs, qt, [n], dtype]
    roles = {0: Arg(formats.QUANT_STORAGE_DTYPES, "packed"), 1: Arg((torch.float32,), "absmax")}
    if name.endswith(".out"):
        args.append(torch.zeros(n, dtype=dtype))
        roles[6] = Arg((dtype,), "out")
    return OpCall(name, args, roles)


def _build_4bit_matmul(name, p, g):
    (m, N, K), bs, qt, dtype, with_bias = p
    packed, absmax = _quantized_4bit(N * K, bs, qt, g)
    args = [_randn((m, K), dtype, g), packed, [N, K], absmax, formats.code_tensor(qt), bs]
    roles = {
        0: Arg((dtype,) if name.endswith(".out") else FLOATS, "input"),
        1: Arg(formats.QUANT_STORAGE_DTYPES, "packed"),
        3: Arg((torch.float32,), "absmax"),
        4: Arg((torch.float32,), "code"),
    }
    if name.endswith(".out"):
        args.append(torch.zeros(m, N, dtype=dtype))
        roles[6] = Arg((dtype,), "out")
    elif name == "matmul_4bit" and with_bias:
        args.append(_randn((N,), dtype, g))
        roles[6] = Arg(REAL_FLOATS, "bias")
    return OpCall(name, args, roles, close=True)


def _build_interleave_4bit(name, p, g):
    """A weight whose K is whole blocks (the layout's condition); deinterleave_4bit gets its
    interleaved bytes."""
    (N, k_blocks), bs, qt = p
    packed, absmax = _quantized_4bit(N * k_blocks * bs, bs, qt, g)
    if name == "deinterleave_4bit":
        packed, absmax = torch.ops.lowbit.interleave_4bit(packed, absmax, [N, k_blocks * bs], bs)
    roles = {0: Arg(formats.QUANT_STORAGE_DTYPES, "packed"), 1: Arg((torch.float32,), "absmax")}
    return OpCall(name, [packed, absmax, [N, k_blocks * bs], bs], roles)


def _build_4bit_matmul_interleaved(name, p, g):
    # exact=True: exact=False allows the fast precision's roundings, which backends take where
    # they pay off (tests/test_parity.py bounds their error)
    (m, N, k_blocks), bs, qt, dtype, with_bias = p
    K = k_blocks * bs
    packed, absmax = torch.ops.lowbit.interleave_4bit(*_quantized_4bit(N * K, bs, qt, g), [N, K], bs)
    bias = _randn((N,), dtype, g) if with_bias else None
    args = [_randn((m, K), dtype, g), packed, [N, K], absmax, formats.code_tensor(qt), bs, bias, True]
    roles = {
        0: Arg(FLOATS, "input"),
        1: Arg(formats.QUANT_STORAGE_DTYPES, "packed"),
        3: Arg((torch.float32,), "absmax"),
        4: Arg((torch.float32,), "code"),
    }
    if with_bias:
        roles[6] = Arg(REAL_FLOATS, "bias")
    return OpCall(name, args, roles, close=True)


def _build_4bit_matmul_nested(name, p, g):
    (m, N, K), bs, bs2, qt, dtype, with_bias = p
    packed, absmax = _quantized_4bit(N * K, bs, qt, g)
    offset, code2 = absmax.mean(), formats.dynamic_map()
    q, absmax2 = torch.ops.lowbit.quantize_blockwise(absmax - offset, code2, bs2)
    bias = _randn((N,), dtype, g) if with_bias else None
    args = [_randn((m, K), dtype, g), packed, [N, K], q, code2, absmax2, bs2, offset, formats.code_tensor(qt), bs, bias]
    roles = {
        0: Arg(FLOATS, "input"),
        1: Arg(formats.QUANT_STORAGE_DTYPES, "packed"),
        3: Arg((torch.uint8,), "absmax"),
        4: Arg((torch.float32,), "code"),
        5: Arg((torch.float32,), "absmax"),
        7: Arg((torch.float32,), "sized"),
        8: Arg((torch.float32,), "code"),
    }
    if with_bias:
        roles[10] = Arg(REAL_FLOATS, "bias")
    return OpCall(name, args, roles, close=True)


def _build_gemm_4bit(name, p, g):
    """bitsandbytes' op: the quant type instead of a code, and a double-quantized absmax as
    (absmax of the nested blocks, absmax_8bit, absmax_code, absmax_offset) when ``nested``."""
    (m, N, K), bs, qt, dtype, nested = p
    packed, absmax = _quantized_4bit(N * K, bs, qt, g)
    args = [_randn((m, K), dtype, g), packed, [N, K], absmax, bs, qt, _randn((N,), dtype, g)]
    roles = {
        0: Arg(FLOATS, "input"), 1: Arg(formats.QUANT_STORAGE_DTYPES, "packed"), 3: Arg((torch.float32,), "absmax"),
        6: Arg(REAL_FLOATS, "bias"),
    }  # fmt: skip
    if nested:
        offset = absmax.mean()
        absmax_8bit, args[3] = torch.ops.lowbit.quantize_blockwise(
            absmax - offset, formats.dynamic_map(), formats.NESTED_BLOCKSIZE
        )
        args += [absmax_8bit, formats.dynamic_map(), offset]
        roles.update({7: Arg((torch.uint8,), "sized"), 8: Arg((torch.float32,), "code"), 9: Arg(FLOATS, "stat")})
    return OpCall(name, args, roles, close=True)


def _build_quantize_blockwise(name, p, g):
    n, bs, dtype = p
    return OpCall(
        name,
        [_randn((n,), dtype, g), formats.dynamic_map(), bs],
        {0: Arg(FLOATS, "input", True), 1: Arg((torch.float32,), "code")},
    )


def _build_dequantize_blockwise(name, p, g):
    n, bs, dtype = p
    q = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g)
    absmax = torch.rand(formats.num_blocks(n, bs), generator=g) * 4
    args = [q, absmax, formats.dynamic_map(), bs, dtype]
    roles = {0: Arg((torch.uint8,), "input"), 1: Arg((torch.float32,), "absmax"), 2: Arg((torch.float32,), "code")}
    if name.endswith(".out"):
        args.append(torch.zeros(n, dtype=dtype))
        roles[5] = Arg((dtype,), "out")
    return OpCall(name, args, roles)


def _build_int8_quant(name, p, g):
    (rows, cols), threshold, dtype = p
    return OpCall(name, [_randn((rows, cols), dtype, g, scale=4.0), threshold], {0: Arg(FLOATS, "input", True)})


def _build_int8_vectorwise_dequant(name, p, g):
    (rows, cols), _, _ = p
    return OpCall(
        name,
        [_int8((rows, cols), g), torch.rand(rows, generator=g) * 10],
        {0: Arg((torch.int8,), "input"), 1: Arg((torch.float32,), "stat")},
    )


def _build_int8_linear_matmul(name, p, g):
    m, N, K = p
    args = [_int8((m, K), g), _int8((N, K), g)]
    roles = {0: Arg((torch.int8,), "input"), 1: Arg((torch.int8,), "sized")}
    if name.endswith(".out"):
        args.append(torch.zeros(m, N, dtype=torch.int32))
        roles[2] = Arg((torch.int32,), "out")
    return OpCall(name, args, roles)


def _build_int8_mm_dequant(name, p, g):
    (m, N), dtype, with_bias = p
    acc = torch.randint(-(2**20), 2**20, (m, N), dtype=torch.int32, generator=g)
    args = [acc, torch.rand(m, generator=g) * 10, torch.rand(N, generator=g) * 10, dtype, None]
    roles = {0: Arg((torch.int32,), "input"), 1: Arg((torch.float32,), "stat"), 2: Arg((torch.float32,), "stat")}
    if with_bias:
        args[4] = _randn((N,), torch.float16, g)
        roles[4] = Arg(REAL_FLOATS, "bias")
    return OpCall(name, args, roles)


def _build_int8_scaled_mm(name, p, g):
    (m, N, K), dtype, with_bias = p
    args = [_int8((m, K), g), _int8((N, K), g), torch.rand(m, generator=g) * 10, torch.rand(N, generator=g) * 10]
    args += [_randn((N,), torch.float32, g) if with_bias else None, dtype]
    roles = {
        0: Arg((torch.int8,), "input"), 1: Arg((torch.int8,), "sized"),
        2: Arg((torch.float32,), "stat"), 3: Arg((torch.float32,), "stat"),
    }  # fmt: skip
    if with_bias:
        roles[4] = Arg(REAL_FLOATS, "bias")
    return OpCall(name, args, roles)


def _build_int8_mixed_scaled_mm(name, p, g):
    (m, N, K), _, with_bias = p
    A = _randn((m, K), torch.float16, g, scale=4.0)
    CA, SCA, cols = torch.ops.lowbit.int8_vectorwise_quant(A, 6.0)
    args = [A, CA, _int8((N, K), g), SCA, torch.rand(N, generator=g) * 10, cols, None]
    roles = {
        0: Arg(FLOATS, "input"), 1: Arg((torch.int8,), "sized"), 2: Arg((torch.int8,), "sized"),
        3: Arg((torch.float32,), "stat"), 4: Arg((torch.float32,), "stat"), 5: Arg((torch.int64, torch.int32), "index"),
    }  # fmt: skip
    if with_bias:
        args[6] = _randn((N,), torch.float16, g)
        roles[6] = Arg(REAL_FLOATS, "bias")
    return OpCall(name, args, roles)


_HYPER = (0.9, 0.99, 0.999, 0.5, 1e-8, 0.01)  # beta1, beta2, beta3, alpha, eps, weight_decay


def _build_optimizer_32bit(name, p, g):
    optimizer, n, dtype = p
    copies = 2 if optimizer == "ademamix" else 1
    two = optimizer in ("adam", "adamw", "lamb", "ademamix")
    args = [
        optimizer, _randn((n,), dtype, g), _randn((n,), dtype, g), torch.rand(copies * n, generator=g),
        torch.rand(n, generator=g) if two else None, None, 0.0, 1.0, *_HYPER[:4], _HYPER[4], _HYPER[5], 3, 1e-3,
        1.0, False,
    ]  # fmt: skip
    roles = {1: Arg((dtype,), "sized"), 2: Arg(FLOATS, "input"), 3: Arg((torch.float32,), "sized")}
    if two:
        roles[4] = Arg((torch.float32,), "sized")
    return OpCall(name, args, roles, close=True)


def _build_optimizer_8bit(name, p, g):
    optimizer, n, dtype = p
    copies = 2 if optimizer == "ademamix" else 1
    two = optimizer in ("adam", "adamw", "lamb", "ademamix")
    blocks = formats.num_blocks(n, formats.NESTED_BLOCKSIZE)
    args = [
        optimizer, _randn((n,), dtype, g), _randn((n,), dtype, g),
        torch.randint(0, 256, (copies * n,), dtype=torch.uint8, generator=g),
        torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g) if two else None,
        *_HYPER[:4], _HYPER[4], 3, 1e-3, formats.dynamic_map(), formats.dynamic_map(signed=False) if two else None,
        torch.rand(copies * blocks, generator=g), torch.rand(blocks, generator=g) if two else None, _HYPER[5], 1.0,
        False,
    ]  # fmt: skip
    roles = {
        1: Arg((dtype,), "sized"), 2: Arg(FLOATS, "input"), 3: Arg((torch.uint8,), "sized"),
        12: Arg((torch.float32,), "code"), 14: Arg((torch.float32,), "sized"),
    }  # fmt: skip
    if two:
        roles.update({4: Arg((torch.uint8,), "sized"), 13: Arg((torch.float32,), "code"), 15: Arg((torch.float32,), "sized")})
    return OpCall(name, args, roles, close=True)


_mnk = st.tuples(_small, st.integers(1, 40), _features)
_optimizer = st.tuples(st.sampled_from(["adam", "adamw", "momentum", "lion", "rmsprop", "ademamix"]), st.integers(1, 600), _float)
_BUILDERS: dict[str, tuple[st.SearchStrategy, Callable]] = {
    "quantize_4bit": (st.tuples(st.integers(1, 600), _blocksize, _quant_type, _float), _build_quantize_4bit),
    "dequantize_4bit": (st.tuples(st.integers(1, 600), _blocksize, _quant_type, _float), _build_dequantize_4bit),
    "dequantize_4bit.out": (st.tuples(st.integers(1, 600), _blocksize, _quant_type, _float), _build_dequantize_4bit),
    "gemv_4bit": (st.tuples(_mnk, _blocksize, _quant_type, _float, st.just(False)), _build_4bit_matmul),
    "gemv_4bit.out": (st.tuples(_mnk, _blocksize, _quant_type, _float, st.just(False)), _build_4bit_matmul),
    "matmul_4bit": (st.tuples(_mnk, _blocksize, _quant_type, _float, st.booleans()), _build_4bit_matmul),
    "matmul_4bit_nested": (
        st.tuples(_mnk, _blocksize, _blocksize, _quant_type, _float, st.booleans()), _build_4bit_matmul_nested
    ),
    "gemm_4bit": (st.tuples(_mnk, _blocksize, _quant_type, _float, st.booleans()), _build_gemm_4bit),
    "interleave_4bit": (st.tuples(st.tuples(st.integers(1, 40), _small), _blocksize, _quant_type), _build_interleave_4bit),
    "deinterleave_4bit": (st.tuples(st.tuples(st.integers(1, 40), _small), _blocksize, _quant_type), _build_interleave_4bit),
    "matmul_4bit_interleaved": (
        st.tuples(st.tuples(_small, st.integers(1, 40), _small), _blocksize, _quant_type, _float, st.booleans()),
        _build_4bit_matmul_interleaved,
    ),  # fmt: skip
    "quantize_blockwise": (st.tuples(st.integers(1, 600), _blocksize, _float), _build_quantize_blockwise),
    "dequantize_blockwise": (st.tuples(st.integers(1, 600), _blocksize, _float), _build_dequantize_blockwise),
    "dequantize_blockwise.out": (st.tuples(st.integers(1, 600), _blocksize, _float), _build_dequantize_blockwise),
    "int8_vectorwise_quant": (
        st.tuples(st.tuples(_small, _features), st.sampled_from([0.0, 6.0]), st.sampled_from([torch.float16, torch.float32])),
        _build_int8_quant,
    ),
    "int8_double_quant": (
        st.tuples(st.tuples(_small, _features), st.sampled_from([0.0, 6.0]), st.sampled_from([torch.float16, torch.float32])),
        _build_int8_quant,
    ),
    "int8_vectorwise_dequant": (st.tuples(st.tuples(_small, _features), st.none(), st.none()), _build_int8_vectorwise_dequant),
    "int8_linear_matmul": (_mnk, _build_int8_linear_matmul),
    "int8_linear_matmul.out": (_mnk, _build_int8_linear_matmul),
    "int8_mm_dequant": (st.tuples(st.tuples(_small, st.integers(1, 40)), _float, st.booleans()), _build_int8_mm_dequant),
    "int8_scaled_mm": (st.tuples(_mnk, _float, st.booleans()), _build_int8_scaled_mm),
    "int8_mixed_scaled_mm": (st.tuples(_mnk, st.none(), st.booleans()), _build_int8_mixed_scaled_mm),
    "optimizer_update_32bit": (_optimizer, _build_optimizer_32bit),
    "optimizer_update_8bit_blockwise": (_optimizer, _build_optimizer_8bit),
}


def test_every_op_is_generated():
    from lowbit.core import ops

    assert set(_BUILDERS) == set(ops.OP_NAMES)


# ------------------------------------------------------------------------------------------------
# corruptions of one op call
# ------------------------------------------------------------------------------------------------
_SCALARS: dict[str, list[tuple[int, str, list]]] = {}  # op -> (position, name, bad values)
_BAD_BLOCKSIZES = [0, -64, 48, 8192, 1]
_BAD_BLOCKSIZES_8BIT = [0, -64, 48, 2 * formats.BLOCKSIZES_8BIT[-1], 1]  # 8192..65536 are 8-bit blocksizes
_BAD_QUANT_TYPES = ["nf5", "", "NF4", "int4"]
_BAD_DTYPES = [torch.int8, torch.float64, torch.bool, torch.complex64]
_BAD_FLOATS = [math.nan, math.inf, -math.inf, -1.0]
for _name in ("quantize_4bit",):
    _SCALARS[_name] = [(1, "blocksize", _BAD_BLOCKSIZES), (2, "quant_type", _BAD_QUANT_TYPES),
                       (3, "quant_storage", [torch.bool, torch.complex64, torch.float8_e4m3fn])]  # fmt: skip
for _name in ("dequantize_4bit", "dequantize_4bit.out"):
    _SCALARS[_name] = [(2, "blocksize", _BAD_BLOCKSIZES), (3, "quant_type", _BAD_QUANT_TYPES),
                       (4, "shape", ["+2", "-2", "negative", [0], [], "extra0"]), (5, "dtype", _BAD_DTYPES)]  # fmt: skip
for _name in ("gemv_4bit", "gemv_4bit.out", "matmul_4bit"):
    _SCALARS[_name] = [(5, "blocksize", _BAD_BLOCKSIZES), (2, "shapeB", ["N+1", "K+1", "flat", "3-D"])]
_SCALARS["matmul_4bit_nested"] = [
    (9, "blocksize", _BAD_BLOCKSIZES), (6, "blocksize2", _BAD_BLOCKSIZES), (2, "shapeB", ["N+1", "K+1", "flat", "3-D"])
]  # fmt: skip
_SCALARS["gemm_4bit"] = [(4, "blocksize", _BAD_BLOCKSIZES), (5, "quant_type", _BAD_QUANT_TYPES),
                         (2, "shapeB", ["N+1", "K+1", "flat", "3-D"])]  # fmt: skip
_SCALARS["quantize_blockwise"] = [(2, "blocksize", _BAD_BLOCKSIZES_8BIT)]
for _name in ("dequantize_blockwise", "dequantize_blockwise.out"):
    _SCALARS[_name] = [(3, "blocksize", _BAD_BLOCKSIZES_8BIT), (4, "dtype", _BAD_DTYPES)]
for _name in ("int8_vectorwise_quant", "int8_double_quant"):
    _SCALARS[_name] = [(1, "threshold", [-1.0, math.nan, math.inf, -math.inf])]
_SCALARS["int8_mm_dequant"] = [(3, "dtype", _BAD_DTYPES)]
_SCALARS["int8_scaled_mm"] = [(5, "dtype", _BAD_DTYPES)]
_SCALARS["optimizer_update_32bit"] = [
    (0, "optimizer_name", ["adamm", "", "ADAM"]), (6, "max_unorm", _BAD_FLOATS), (7, "param_norm", _BAD_FLOATS),
    (8, "beta1", [*_BAD_FLOATS, 1.5]), (9, "beta2", [*_BAD_FLOATS, 2.0]), (10, "beta3", [math.nan, 1.5]),
    (11, "alpha", _BAD_FLOATS), (12, "eps", _BAD_FLOATS), (13, "weight_decay", _BAD_FLOATS), (14, "step", [0, -3]),
    (15, "lr", _BAD_FLOATS), (16, "gnorm_scale", _BAD_FLOATS),
]  # fmt: skip
_SCALARS["optimizer_update_8bit_blockwise"] = [
    (0, "optimizer_name", ["adamm", "", "ADAM"]), (5, "beta1", [*_BAD_FLOATS, 1.5]), (6, "beta2", [*_BAD_FLOATS, 2.0]),
    (7, "beta3", [math.nan, 1.5]), (8, "alpha", _BAD_FLOATS), (9, "eps", _BAD_FLOATS), (10, "step", [0, -3]),
    (11, "lr", _BAD_FLOATS), (16, "weight_decay", _BAD_FLOATS), (17, "gnorm_scale", _BAD_FLOATS),
]  # fmt: skip


def _shape_value(bad, call: OpCall):
    """A corrupted shape argument (dequantize's `shape`, the products' `shapeB`)."""
    if call.op.startswith("dequantize_4bit"):
        (n,) = call.args[4]
        if not isinstance(bad, str):
            return [n + 2] if bad == [] and n == 1 else bad  # [] (a 0-d tensor) is the valid shape of one value
        # +-2 values: one packed byte more or less (+-1 may only add or drop the padding nibble)
        return {"+2": [n + 2], "-2": [n - 2] if n > 2 else [n + 2], "negative": [-n], "extra0": [n, 0]}[bad]
    N, K = call.args[2]
    # K = 1: one row more may only fill the padding nibble of an odd N, so add two
    # "N+1" adds two rows when K == 1: one more row of one value may fit the padding nibble of B
    return {"N+1": [N + (2 if K == 1 else 1), K], "K+1": [N, K + 1], "flat": [N * K], "3-D": [N, K, 1]}[bad]


def _strided(t: torch.Tensor) -> torch.Tensor:
    """The same values in a non-contiguous tensor (every other element of a buffer)."""
    wide = torch.zeros((*t.shape, 2), dtype=t.dtype)
    wide[..., 0] = t
    return wide[..., 0]


def _with_value(t: torch.Tensor, index: int, kind: str, n_cols: int) -> torch.Tensor:
    t = t.clone()
    flat = t.view(-1)
    i = index % flat.numel()
    if t.is_floating_point():
        finfo = torch.finfo(t.dtype)
        value = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf, "subnormal": finfo.tiny / 4,
                 "huge": finfo.max, "-huge": -finfo.max}[kind]  # fmt: skip
    else:
        info = torch.iinfo(t.dtype)
        value = {"nan": -1, "inf": n_cols, "-inf": info.min, "subnormal": 2**31 - 1 if info.bits > 32 else info.max,
                 "huge": info.max, "-huge": info.min}[kind]  # fmt: skip
        value = min(max(value, info.min), info.max)  # n_cols or -1 may not fit (int8, uint8)
        value = min(max(value, info.min), info.max)  # n_cols of an int8 tensor may exceed 127
    flat[i] = value
    return t


def _in_one_buffer(a: torch.Tensor, out: torch.Tensor, overlap: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """A copy of input ``a`` and an output like ``out`` viewing one storage: overlapping (out starts
    on a's bytes), or side by side. Only ``a``'s values matter (out is written)."""
    a_bytes, out_bytes = a.numel() * a.element_size(), out.numel() * out.element_size()
    out_start = 0 if overlap else -(-a_bytes // 16) * 16
    buffer = torch.zeros(max(a_bytes, out_start + out_bytes) + 16, dtype=torch.uint8)
    out_view = buffer[out_start : out_start + out_bytes].view(out.dtype).view(out.shape)
    a_view = buffer[:a_bytes].view(a.dtype).view(a.shape)
    a_view.copy_(a)
    return a_view, out_view


@st.composite
def corrupted_op_calls(draw) -> Case:
    builder = draw(op_calls())
    call = builder()
    name, args, roles = call.op, call.args, call.roles
    schema = [a.name for a in _op(name)._schema.arguments]
    tensor_positions = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
    kinds = ["dtype", "meta", "zero_d", "empty", "numel", "layout", "strided", "values", "not_tensor"]
    if any(r.role == "out" for r in roles.values()) or name.startswith("optimizer"):
        kinds += ["alias", "beside"]
    if name in _SCALARS:
        kinds += ["scalar"] * 3
    kind = draw(st.sampled_from(kinds))
    position = draw(st.sampled_from(sorted(roles)))
    arg, arg_name = roles[position], schema[position]
    if args[position].numel() == 0:  # an empty outlier_cols: there is no element to corrupt
        assume(kind not in ("zero_d", "values"))
    names: tuple[str, ...] = (arg_name,)
    must_reject, must_accept, base, check = False, False, None, None

    def mutate(transform: Callable[[list], None]) -> Callable[[], list]:
        def make() -> list:
            fresh = list(builder().args)
            transform(fresh)
            return fresh

        return make

    if kind == "dtype":
        dtype = draw(st.sampled_from([d for d in ALL_DTYPES if d != args[position].dtype]))
        size = args[position].numel() * args[position].element_size()
        as_view = arg.role == "packed" and size % torch.empty((), dtype=dtype).element_size() == 0

        def transform(a):
            a[position] = a[position].reshape(-1).view(dtype) if as_view else a[position].to(dtype)

        must_reject = dtype not in arg.dtypes
        if as_view and not must_reject:
            base = builder_args(builder)  # reinterpreting packed bytes changes nothing
    elif kind == "meta":
        assume(len(tensor_positions) > 1)

        def transform(a):
            a[position] = a[position].to("meta")

        must_reject, names = True, tuple(schema[i] for i in tensor_positions)
    elif kind == "zero_d":

        def transform(a):
            a[position] = a[position].reshape(-1)[0].clone()

    elif kind == "empty":

        def transform(a):
            a[position] = a[position].reshape(-1)[:0].clone()

        must_reject = arg.role != "index"
    elif kind == "numel":
        grow = draw(st.booleans())

        def transform(a):
            flat = a[position].reshape(-1)
            a[position] = torch.cat([flat, flat[:1]]) if grow else flat[:-1].clone()

        must_reject = arg.role in ("absmax", "stat", "code", "out", "packed", "sized")
    elif kind == "layout":
        assume(arg.role != "input")
        column = draw(st.booleans())

        n = args[position].numel()
        assume(tuple(args[position].shape) != ((n, 1) if column else (1, n)))

        def transform(a):
            a[position] = a[position].reshape((n, 1) if column else (1, n))

        must_reject = arg.role in ("absmax", "code", "bias", "index", "out")
        base = builder_args(builder)
    elif kind == "strided":

        def transform(a):
            a[position] = _strided(a[position])

        base = builder_args(builder)
    elif kind == "values":
        value = draw(st.sampled_from(["nan", "inf", "-inf", "subnormal", "huge", "-huge"]))
        index = draw(st.integers(0, 10_000))
        assume(args[position].dtype != torch.bool)
        first = args[tensor_positions[0]]
        n_cols = first.shape[-1] if first.dim() else 1

        def transform(a):
            a[position] = _with_value(a[position], index, value, n_cols)

        floating = args[position].is_floating_point()
        non_finite = value in ("nan", "inf", "-inf")
        if floating and non_finite and (arg.quantized_input or arg.role == "code"):
            must_reject = True
        if arg.role == "index" and value in ("nan", "inf", "-inf", "huge", "subnormal"):
            must_reject = True  # -1, n_cols, int min, int max: no column index
        if arg.role == "absmax" and non_finite and name.startswith("dequantize"):
            check = _block_is_non_finite(index, name)
    elif kind == "not_tensor":

        def transform(a):
            a[position] = a[position].tolist()

        must_reject = True
    elif kind in ("alias", "beside"):
        if name.startswith("optimizer"):
            position, names = 1, ("g", "p")

            def transform(a):
                a[1] = a[2] if kind == "alias" else a[1]

            must_reject = kind == "alias"
        else:
            out_position = next(i for i, r in roles.items() if r.role == "out")
            other = draw(st.sampled_from([i for i in tensor_positions if i != out_position]))
            names, arg_name = ("out",), f"out and {schema[other]}"

            def transform(a):
                a[other], a[out_position] = _in_one_buffer(a[other], a[out_position], overlap=kind == "alias")

            must_reject = kind == "alias"
            if kind == "beside":
                base = builder_args(builder)
        must_accept = kind == "beside"
    else:  # scalar
        position, arg_name, values = draw(st.sampled_from(_SCALARS[name]))
        bad = draw(st.sampled_from(values))
        names = (arg_name,) if arg_name not in ("shape", "shapeB") else (arg_name, "A", "B")

        def transform(a):
            a[position] = _shape_value(bad, call) if arg_name in ("shape", "shapeB") else bad

        must_reject = True
    if kind == "dtype" and arg.role == "packed":
        names = (arg_name, "A", "B")  # a smaller view may fail the size check first
    op = _op(name)
    return Case(
        what=f"{name}: {kind} of {arg_name}",
        make=mutate(transform),
        call=lambda a: op(*a),
        names=names,
        must_reject=must_reject,
        must_accept=must_accept,
        base=base,
        close=call.close,
        check=check,
        written=call.written,
    )


def builder_args(builder) -> Callable[[], list]:
    return lambda: list(builder().args)


def _block_is_non_finite(index: int, name: str) -> Callable[[list, Any], None]:
    """A block whose absmax is NaN/Inf dequantizes to non-finite values only: a broken scale is
    never turned into finite garbage."""

    def check(inputs, result):
        out = (inputs[-1] if name.endswith(".out") else result).reshape(-1)
        absmax, blocksize = inputs[1], inputs[2] if name.startswith("dequantize_4bit") else inputs[3]
        block = index % absmax.numel()
        values = out[block * blocksize : (block + 1) * blocksize]
        assert not values.isfinite().any(), f"{name}: a block with absmax {absmax[block]} has finite values"

    return check


@examples(5000)
@given(corrupted_op_calls())
def test_corrupted_op_calls(case):
    run(case)


# ------------------------------------------------------------------------------------------------
# the functional API: out=/absmax= buffers, codes, QuantState fields
# ------------------------------------------------------------------------------------------------
def _buffer_variants(shape: tuple[int, ...], dtype: torch.dtype) -> st.SearchStrategy:
    """(description, builder(A) -> buffer, valid?) for an out=/absmax= argument."""
    n = math.prod(shape)
    return st.sampled_from([
        ("exact", lambda A: torch.zeros(shape, dtype=dtype), True),
        ("float32" if dtype != torch.float32 else "float16", lambda A: torch.zeros(shape, dtype=torch.float32 if dtype != torch.float32 else torch.float16), False),
        ("int8", lambda A: torch.zeros(shape, dtype=torch.int8), dtype == torch.int8),
        ("wider, broadcastable", lambda A: torch.zeros((2, *shape), dtype=dtype), False),
        ("one more element", lambda A: torch.zeros(n + 1, dtype=dtype), False),
        ("2-D", lambda A: torch.zeros((1, n), dtype=dtype), len(shape) == 2 and shape[0] == 1),
        ("meta", lambda A: torch.zeros(shape, dtype=dtype, device="meta"), False),
        ("a list", lambda A: torch.zeros(shape, dtype=dtype).tolist(), False),
        ("over A's memory", lambda A: A.view(torch.uint8)[: n * torch.empty((), dtype=dtype).element_size()].view(dtype).view(shape), False),
    ])  # fmt: skip


@st.composite
def quantizer_buffer_cases(draw) -> Case:
    """F.quantize_4bit / F.quantize_blockwise with an out= or absmax= buffer."""
    four_bit = draw(st.booleans())
    n = draw(st.integers(2, 300)) * 2
    blocksize = draw(st.sampled_from([64, 256]))
    nested = draw(st.booleans())
    seed = draw(st.integers(0, 2**16))
    which = draw(st.sampled_from(["out", "absmax"]))
    if which == "out":
        shape, dtype = ((n // 2, 1), torch.uint8) if four_bit else ((n,), torch.uint8)
    else:
        shape, dtype = (formats.num_blocks(n, blocksize),), torch.uint8 if nested else torch.float32
    what, make_buffer, valid = draw(_buffer_variants(shape, dtype))

    def make() -> list:
        A = _randn((n,), torch.float32, _gen(seed))
        return [A, make_buffer(A)]

    def call(inputs):
        A, buffer = inputs
        kwargs = {which: buffer, "blocksize": blocksize}
        if four_bit:
            return F.quantize_4bit(A, compress_statistics=nested, quant_type="nf4", **kwargs)
        return F.quantize_blockwise(A, nested=nested, **kwargs)

    def check(inputs, result):
        packed, state = result
        if which == "out":
            assert packed is inputs[1]
        else:
            assert state.absmax is inputs[1]

    return Case(
        what=f"{'quantize_4bit' if four_bit else 'quantize_blockwise'}({which}=<{what}>, nested={nested})",
        make=make, call=call, names=(which,), must_reject=not valid, must_accept=valid, check=check,
    )  # fmt: skip


def _state_fields(rows: int, quant_type: str, nested: bool, seed: int) -> tuple[torch.Tensor, dict[str, Any]]:
    """A [rows, 64] weight quantized, and the fields of its QuantState."""
    W = _randn((rows, 64), torch.float32, _gen(seed))
    packed, state = F.quantize_4bit(W, quant_type=quant_type, compress_statistics=nested)
    fields = dict(absmax=state.absmax, shape=state.shape, code=state.code, blocksize=state.blocksize,
                  quant_type=state.quant_type, dtype=state.dtype, offset=state.offset, state2=state.state2)  # fmt: skip
    return packed, fields


_FIELD_CORRUPTIONS = {
    "code": [("the other codebook", "swap"), ("5 entries", torch.linspace(-1, 1, 5)), ("2-D", "2d"), ("a list", "list")],
    "quant_type": [("bogus", "bogus"), ("an int", 4), ("None", None)],
    "shape": [("None", None), ("one value more", "+2"), ("a bool", [True, 64]), ("negative", [-1, 64]), ("a float", [2.0])],
    "blocksize": [("48", 48), ("None", None), ("True", True), ("64.0", 64.0)],
    "dtype": [("int8", torch.int8), ("float64", torch.float64), ("None", None), ("a string", "float32")],
    "absmax": [("float16", torch.float16), ("2-D", "2d"), ("one short", "-1"), ("meta", "meta"), ("a list", "list")],
    "offset": [("a float", 0.5), ("without state2", "alone")],
    "state2": [("a dict", {}), ("without offset", "alone")],
}  # fmt: skip


def _corrupt_field(fields: dict[str, Any], key: str, value: Any) -> None:
    current = fields[key]
    if isinstance(value, str) and value in ("swap", "2d", "list", "+2", "-1", "meta", "alone"):
        if value == "swap":
            other = "fp4" if fields["quant_type"] == "nf4" else "nf4"
            fields[key] = formats.code_tensor(other).clone()
        elif value == "2d":
            fields[key] = current.reshape(1, -1)
        elif value == "list":
            fields[key] = current.tolist()
        elif value == "+2":
            fields[key] = torch.Size([current[0] + 2, current[1]])
        elif value == "-1":
            fields[key] = current[:-1]
        elif value == "meta":
            fields[key] = current.to("meta")
        elif value == "alone":
            other = "state2" if key == "offset" else "offset"
            fields[other] = None
            if fields[key] is None:
                fields[key] = torch.tensor(0.5) if key == "offset" else QuantState(torch.zeros(1))
    elif isinstance(value, torch.dtype) and key == "absmax":
        fields[key] = current.to(value)
    else:
        fields[key] = value


@st.composite
def quant_state_field_cases(draw) -> Case:
    """A QuantState built with one corrupted field, then used by dequantize_4bit or gemv_4bit (gemv
    uses the code, dequantize the quant type: they must never silently disagree)."""
    rows = draw(st.integers(1, 40))
    quant_type = draw(st.sampled_from(formats.QUANT_TYPES))
    nested = draw(st.booleans())
    key = draw(st.sampled_from(sorted(_FIELD_CORRUPTIONS)))
    what, value = draw(st.sampled_from(_FIELD_CORRUPTIONS[key]))
    use = draw(st.sampled_from(["dequantize_4bit", "gemv_4bit", "gemv_4bit after quant_type is reassigned"]))
    seed = draw(st.integers(0, 2**16))
    corrupt = draw(st.booleans()) or use == "dequantize_4bit"

    def make() -> list:
        packed, fields = _state_fields(rows, quant_type, nested, seed)
        if corrupt:
            _corrupt_field(fields, key, value)
        return [packed, fields, _randn((1, 64), torch.float32, _gen(seed))]

    def call(inputs):
        packed, fields, x = inputs
        state = QuantState(**fields)
        if use == "dequantize_4bit":
            return F.dequantize_4bit(packed, state)
        if use.endswith("reassigned"):  # to the quant type whose codebook the state does not hold
            state.quant_type = "fp4" if quant_type == "nf4" else "nf4"
        return F.gemv_4bit(x, packed.t(), state=state)

    return Case(
        what=f"QuantState({key}=<{what if corrupt else 'valid'}>, nested={nested}) in {use}",
        make=make, call=call, names=(key, "quant_state", "state", "code", "A", "B"),
        must_reject=corrupt or use.endswith("reassigned"), close=True,
    )  # fmt: skip


@st.composite
def code_cases(draw) -> Case:
    """An 8-bit code handed to quantize_blockwise / dequantize_blockwise (±inf ends, NaN, unsorted,
    too short, 2-D, on meta, a list)."""
    what = draw(st.sampled_from(["+inf end", "-inf end", "NaN", "unsorted", "255 entries", "2-D", "meta", "a list", "valid"]))
    quantize = draw(st.booleans())
    n = draw(st.integers(1, 600))
    seed = draw(st.integers(0, 2**16))

    def make() -> list:
        code = formats.dynamic_map()
        if what == "+inf end":
            code[-1] = math.inf
        elif what == "-inf end":
            code[0] = -math.inf
        elif what == "NaN":
            code[100] = math.nan
        elif what == "unsorted":
            code = code.flip(0)
        elif what == "255 entries":
            code = code[:255]
        elif what == "2-D":
            code = code.reshape(16, 16)
        elif what == "meta":
            code = code.to("meta")
        elif what == "a list":
            code = code.tolist()
        g = _gen(seed)
        if quantize:
            return [_randn((n,), torch.float32, g), code]
        return [torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g), torch.rand(1, generator=g), code]

    def call(inputs):
        if quantize:
            return F.quantize_blockwise(inputs[0], code=inputs[1], blocksize=4096)
        return F.dequantize_blockwise(inputs[0], absmax=inputs[1], code=inputs[2], blocksize=4096)

    valid = what == "valid"  # a 256-entry code is sorted and finite, for decoding too
    return Case(
        what=f"{'quantize' if quantize else 'dequantize'}_blockwise(code=<{what}>)",
        make=make, call=call, names=("code",), must_reject=not valid, must_accept=valid,
    )  # fmt: skip


@st.composite
def int8_functional_cases(draw) -> Case:
    """int8_mm_dequant(out=), int8_linear_matmul(out=, dtype=), lowbit.matmul with an Int8Params
    weight (valid: issue 14's 'valid input rejected'), a complex bias, create_dynamic_map."""
    kind = draw(st.sampled_from(["mm_dequant out", "linear_matmul", "matmul Int8Params", "matmul bias", "dynamic map"]))
    m, N, K = draw(st.integers(1, 5)), draw(st.integers(1, 9)), draw(st.sampled_from([8, 33, 64]))
    seed = draw(st.integers(0, 2**16))
    if kind == "mm_dequant out":
        what, make_out, valid = draw(_buffer_variants((m, N), torch.float16))
        assume(what != "over A's memory")
        def make():
            g = _gen(seed)
            acc = torch.randint(-999, 999, (m, N), dtype=torch.int32, generator=g)
            return [acc, torch.rand(m, generator=g), torch.rand(N, generator=g), make_out(None)]


        call = lambda a: F.int8_mm_dequant(a[0], a[1], a[2], out=a[3])  # noqa: E731
        return Case(f"int8_mm_dequant(out=<{what}>)", make, call, ("out",), must_reject=not valid, must_accept=valid)
    if kind == "linear_matmul":
        what, make_out, valid = draw(_buffer_variants((m, N), torch.int32))
        assume(what != "over A's memory")
        dtype = draw(st.sampled_from([torch.int32, torch.int8, torch.float32]))
        make = lambda: [_int8((m, K), _gen(seed)), _int8((N, K), _gen(seed + 1)), make_out(None)]  # noqa: E731
        call = lambda a: F.int8_linear_matmul(a[0], a[1], out=a[2], dtype=dtype)  # noqa: E731
        ok = valid and dtype == torch.int32
        return Case(f"int8_linear_matmul(out=<{what}>, dtype={dtype})", make, call, ("out", "dtype"), must_reject=not ok, must_accept=ok)
    if kind in ("matmul Int8Params", "matmul bias"):
        threshold = draw(st.sampled_from([0.0, 6.0]))
        training = draw(st.booleans())
        bias_dtype = draw(st.sampled_from([None, torch.float16, torch.float32, torch.complex64, torch.int32]))
        if kind == "matmul Int8Params":
            bias_dtype = None

        def make():
            g = _gen(seed)
            weight = lnn.Int8Params(_randn((N, K), torch.float16, g), has_fp16_weights=False).to("cpu")
            bias = None if bias_dtype is None else _randn((N,), torch.float32, g).to(bias_dtype)
            return [_randn((m, K), torch.float16, g, scale=4.0), weight, bias]

        def call(a):
            state = lowbit.autograd.MatmulLtState(threshold=threshold, has_fp16_weights=False, is_training=training)
            return lowbit.matmul(a[0], a[1], bias=a[2], state=state)

        valid = bias_dtype is None or bias_dtype.is_floating_point
        return Case(f"matmul(A, Int8Params, bias={bias_dtype}, threshold={threshold}, training={training})",
                    make, call, ("bias",), must_reject=not valid, must_accept=valid)  # fmt: skip
    signed = draw(st.booleans())
    exponent_bits, total_bits = draw(st.sampled_from([(0, 8), (-1, 8), (9, 8), (8, 8), (7, 9), (3, 1), (True, 8), (2.0, 8), (7, 8), (2, 4)]))
    # (2, 4) and (8, 8) fill 2**total_bits codes only when signed (unsigned: 15 and 257; bitsandbytes
    # asserts on them too)
    valid = not isinstance(exponent_bits, bool) and (
        (exponent_bits, total_bits) == (7, 8) or (signed and (exponent_bits, total_bits) in ((2, 4), (8, 8)))
    )
    call = lambda a: F.create_dynamic_map(signed, exponent_bits, total_bits)  # noqa: E731
    return Case(f"create_dynamic_map({signed}, {exponent_bits}, {total_bits})", list, call,
                ("max_exponent_bits", "total_bits"), must_reject=not valid, must_accept=valid)  # fmt: skip


@examples(2000)
@given(st.one_of(quantizer_buffer_cases(), quant_state_field_cases(), code_cases(), int8_functional_cases()))
def test_corrupted_functional_calls(case):
    run(case)


# ------------------------------------------------------------------------------------------------
# layers
# ------------------------------------------------------------------------------------------------
def _layer(kind: str, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    if kind == "Linear4bit nf4+dq":
        return lnn.Linear4bit(64, 24, quant_type="nf4", compute_dtype=torch.float32).to("cpu")
    if kind == "Linear4bit fp4 bf16":
        return lnn.Linear4bit(64, 24, quant_type="fp4", compress_statistics=False, compute_dtype=torch.bfloat16).to("cpu")
    if kind == "Linear8bitLt":
        return lnn.Linear8bitLt(64, 24, has_fp16_weights=False).to("cpu").eval()
    if kind == "Linear8bitLt threshold":
        return lnn.Linear8bitLt(64, 24, has_fp16_weights=False, threshold=6.0).to("cpu").eval()
    if kind == "Embedding4bit":
        return lnn.EmbeddingNF4(50, 64).to("cpu")
    return lnn.Embedding8bit(50, 64).to("cpu")


_LAYERS = ["Linear4bit nf4+dq", "Linear4bit fp4 bf16", "Linear8bitLt", "Linear8bitLt threshold", "Embedding4bit", "Embedding8bit"]


@st.composite
def layer_cases(draw) -> Case:
    kind = draw(st.sampled_from(_LAYERS))
    seed = draw(st.integers(0, 2**16))
    batch = draw(st.sampled_from([(1,), (3,), (2, 5), (0,)]))
    corruption = draw(st.sampled_from(
        ["none", "dtype", "meta", "0-d", "features", "strided", "nan", "inf", "huge", "out of range", "a list"]
    ))  # fmt: skip
    assume(corruption != "0-d" or batch != (0,))
    embedding = kind.startswith("Embedding")
    dtype = draw(st.sampled_from([torch.int32, torch.float32, torch.int16] if embedding else [*FLOATS, torch.float64, torch.int64]))
    must_reject = must_accept = False
    base = None

    def valid_input(g):
        if embedding:
            return torch.randint(0, 50, batch, generator=g)
        return _randn((*batch, 64), torch.float16 if kind.startswith("Linear8") else torch.float32, g)

    def make():
        g = _gen(seed)
        layer, x = _layer(kind, seed), valid_input(g)
        if corruption == "dtype":
            x = x.to(dtype)
        elif corruption == "meta":
            x = x.to("meta")
        elif corruption == "0-d":
            x = x.reshape(-1)[:1].reshape(())
        elif corruption == "features":
            x = x[..., :-1] if not embedding else x.float()
        elif corruption == "strided":
            x = _strided(x)
        elif corruption in ("nan", "inf", "huge", "out of range") and x.numel():
            x = _with_value(x, seed, {"out of range": "inf"}.get(corruption, corruption), 50)
        elif corruption == "a list":
            x = x.tolist()
        return [layer, x]

    if corruption == "none":
        must_accept = True
    elif corruption == "strided":
        base = lambda: [_layer(kind, seed), valid_input(_gen(seed))]  # noqa: E731
    elif corruption in ("meta", "features", "a list") or (corruption == "0-d" and not embedding):
        must_reject = True
    elif corruption == "dtype":
        # Linear4bit computes in its compute_dtype: any floating input is cast to it
        valid = (torch.int32, torch.int64) if embedding else FLOATS if kind.startswith("Linear8") else REAL_FLOATS
        must_reject = dtype not in valid
    elif corruption in ("out of range", "nan", "inf", "huge") and embedding and batch != (0,):
        must_reject = True  # every corrupted index (-1, 50, the dtype's min or max) lies outside [0, 50)
    return Case(
        what=f"{kind}(input with {corruption}, batch {batch}, dtype {dtype})",
        make=make, call=lambda a: a[0](a[1]), names=("input", "A", "x", "indices"),
        must_reject=must_reject, must_accept=must_accept, base=base, close=True,
    )  # fmt: skip


@examples(600)
@given(layer_cases())
def test_corrupted_layer_inputs(case):
    run(case)


# ------------------------------------------------------------------------------------------------
# optimizers: construction, steps, load_state_dict
# ------------------------------------------------------------------------------------------------
_FAMILIES = {
    "AdamW8bit": (O.AdamW8bit, {}), "AdamW": (O.AdamW, {}), "Lion8bit": (O.Lion8bit, {}),
    "SGD8bit": (O.SGD8bit, {"lr": 0.01, "momentum": 0.9}), "RMSprop": (O.RMSprop, {}),
    "AdEMAMix8bit": (O.AdEMAMix8bit, {}), "LAMB": (O.LAMB, {}), "Adagrad8bit": (O.Adagrad8bit, {}),
}  # fmt: skip
_BAD_HYPERPARAMETERS = {
    "lr": [math.nan, math.inf, -1.0, "abc", None, True, torch.tensor(math.nan)],
    "eps": [math.nan, -1e-8, "1e-8"],
    "weight_decay": [math.nan, -0.1, math.inf],
    "betas": [(0.9,), (0.9, 0.99, 0.999, 0.9), (2.0, 0.999), (0.9, -0.1), (0.9, math.nan), 0.9, "x,y", ("a", "b")],
    "min_8bit_size": [-1, 1.5, "big"],
    "percentile_clipping": [101, -1, 5.0],
    "optim_bits": [4, 16, True],
}  # fmt: skip


@st.composite
def optimizer_construction_cases(draw) -> Case:
    family = draw(st.sampled_from(sorted(_FAMILIES)))
    key = draw(st.sampled_from(sorted(_BAD_HYPERPARAMETERS)))
    value = draw(st.sampled_from(_BAD_HYPERPARAMETERS[key]))
    cls, kwargs = _FAMILIES[family]
    if key == "betas":
        if family.startswith("AdEMAMix") and isinstance(value, tuple) and len(value) == 3:
            value = (0.9, 0.99)  # three betas are AdEMAMix's valid count: give it two
        if family in ("SGD8bit", "RMSprop", "Adagrad8bit"):  # no betas argument: their own
            key, value = {"SGD8bit": ("momentum", 1.5), "RMSprop": ("alpha", 1.5), "Adagrad8bit": ("lr", -1.0)}[family]
    if key == "optim_bits" and family.endswith("8bit"):
        value = 4  # the 8-bit variants accept 8 and 32 (bitsandbytes' compatibility default)
    names = (key, "beta", "momentum", "alpha") if key in ("betas", "momentum", "alpha") else (key,)
    return Case(
        what=f"{family}({key}={value!r})",
        make=lambda: [torch.nn.Parameter(torch.arange(10.0))],
        call=lambda a: cls(a, **{**kwargs, key: value}),
        names=names, must_reject=True,
    )


def _trained(family: str, seed: int, n: int = 600, steps: int = 2):
    cls, kwargs = _FAMILIES[family]
    torch.manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(n)), torch.nn.Parameter(torch.randn(3, 7))]
    opt = cls(params, min_8bit_size=100, **kwargs)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    return params, opt


@st.composite
def optimizer_step_cases(draw) -> Case:
    """Steps with gradients holding NaN/Inf/huge values, and with zero-element parameters (valid:
    torch's optimizers accept both; all backends must agree on what follows)."""
    family = draw(st.sampled_from(sorted(_FAMILIES)))
    seed = draw(st.integers(0, 2**16))
    value = draw(st.sampled_from(["none", "nan", "inf", "-inf", "huge", "subnormal", "empty parameter"]))
    index = draw(st.integers(0, 10_000))

    def make():
        params, opt = _trained(family, seed, steps=1)
        if value == "empty parameter":
            opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(0, 4))]})
        for p in opt.param_groups[0]["params"] + opt.param_groups[-1]["params"]:
            p.grad = torch.randn_like(p)
        if value not in ("none", "empty parameter"):
            params[0].grad = _with_value(params[0].grad, index, value, 0)
        return [opt]

    def check(inputs, result):
        opt = inputs[0]
        steps = [opt.state[p]["step"] for group in opt.param_groups for p in group["params"]]
        assert steps == [2, 2] + [1] * (len(steps) - 2), f"every parameter's step counts: {steps}"

    return Case(
        what=f"{family}.step() with {value} gradients",
        make=make, call=lambda a: a[0].step(), names=("g",), must_accept=True, close=True, check=check,
    )  # fmt: skip


def _state_corruptions(opt) -> list[tuple[str, Callable[[dict], None], tuple[str, ...]]]:
    """(description, corrupt(state_dict), names) for a saved optimizer state."""
    state0 = opt.state_dict()["state"][0]
    quant = "__bnb_optimizer_quant_state__"
    keys = sorted(state0.get(quant, {}))

    def entry(sd, key):
        return sd["state"][0][quant] if key in sd["state"][0].get(quant, {}) else sd["state"][0]

    def set_key(key, make):
        return lambda sd: entry(sd, key).__setitem__(key, make(entry(sd, key)[key]))

    def drop(key):
        return lambda sd: entry(sd, key).pop(key)

    found: list[tuple[str, Callable[[dict], None], tuple[str, ...]]] = []
    for step in (-1, 1.5, True, "3", None):
        found.append((f"step={step!r}", lambda sd, s=step: sd["state"][0].__setitem__("step", s), ("step",)))
    for key in keys:
        found += [
            (f"{key} float16", set_key(key, lambda t: t.half()), (key,)),
            (f"{key} one element short", set_key(key, lambda t: t.reshape(-1)[:-1].clone()), (key,)),
            (f"{key} on meta", set_key(key, lambda t: t.to("meta")), (key,)),
            (f"{key} missing", drop(key), (key,)),
            (f"{key} a list", set_key(key, lambda t: t.tolist()), (key,)),
        ]
        if key.startswith("qmap"):
            found += [
                (f"{key} NaN", set_key(key, lambda t: t.clone().index_fill_(0, torch.tensor([7]), math.nan)), (key,)),
                (f"{key} +inf end", set_key(key, lambda t: t.clone().index_fill_(0, torch.tensor([255]), math.inf)), (key,)),
                (f"{key} unsorted", set_key(key, lambda t: t.flip(0)), (key,)),
            ]
        if key.startswith("absmax"):
            found.append((f"{key} NaN", set_key(key, lambda t: t.clone().fill_(math.nan)), (key,)))
    found += [
        ("an unknown entry", lambda sd: sd["state"][0].__setitem__("bogus", torch.zeros(1)), ("bogus",)),
        ("lr='abc'", lambda sd: sd["param_groups"][0].__setitem__("lr", "abc"), ("lr",)),
        ("lr=nan", lambda sd: sd["param_groups"][0].__setitem__("lr", math.nan), ("lr",)),
        ("betas=(0.9,)", lambda sd: sd["param_groups"][0].__setitem__("betas", (0.9,)), ("betas",)),
        ("no lr", lambda sd: sd["param_groups"][0].pop("lr"), ("lr",)),
        ("eps=None", lambda sd: sd["param_groups"][0].__setitem__("eps", None), ("eps",)),
        ("a parameter too few", lambda sd: sd["param_groups"][0]["params"].pop(), ("group",)),
        ("an extra group", lambda sd: sd["param_groups"].append(copy.deepcopy(sd["param_groups"][0])), ("groups",)),
        ("state not a dict", lambda sd: sd.__setitem__("state", []), ("state",)),
        ("a parameter's state not a dict", lambda sd: sd["state"].__setitem__(0, [1, 2]), ("state",)),
        ("no param_groups", lambda sd: sd.pop("param_groups"), ("param_groups",)),
    ]  # fmt: skip
    return found


@st.composite
def optimizer_load_cases(draw) -> Case:
    family = draw(st.sampled_from(sorted(_FAMILIES)))
    seed = draw(st.integers(0, 2**16))
    other = draw(st.sampled_from([None, None, *sorted(_FAMILIES)]))
    _, reference_opt = _trained(family, seed)
    must_reject = True
    if other is not None and other != family:
        what, corrupt, names = f"the state of {other}", None, ("state", "lacks", "holds", "group")
        # A checkpoint names no optimizer (bitsandbytes' format), and 8-bit and 32-bit states are
        # interchangeable: what must be refused is another number of states, AdEMAMix's double
        # first moment, or LAMB's trust-ratio buffer missing for its 32-bit state.
        must_reject = _kind(family) != _kind(other) or (family == "LAMB" and other != "LAMB")
    else:
        what, corrupt, names = draw(st.sampled_from(_state_corruptions(reference_opt)))

    def make():
        _, target = _trained(family, seed + 1, steps=1)
        if corrupt is None:
            state_dict = _trained(other, seed)[1].state_dict()
        else:
            state_dict = copy.deepcopy(_trained(family, seed)[1].state_dict())
            corrupt(state_dict)
        return [target, state_dict]

    return Case(
        what=f"{family}.load_state_dict(<{what}>)",
        make=make, call=lambda a: a[0].load_state_dict(a[1]), names=names, must_reject=must_reject,
    )


def _kind(family: str) -> tuple[int, bool]:
    """(number of states, AdEMAMix) of an optimizer family."""
    two = family in ("AdamW8bit", "AdamW", "AdEMAMix8bit", "LAMB")
    return (2 if two else 1), family.startswith("AdEMAMix")


@examples(800)
@given(st.one_of(optimizer_construction_cases(), optimizer_step_cases(), optimizer_load_cases()))
def test_corrupted_optimizer_calls(case):
    run(case)


# ------------------------------------------------------------------------------------------------
# loaders: QuantState.from_dict, a layer's load_state_dict, lowbit.nn.load_checkpoint
# ------------------------------------------------------------------------------------------------
_PACKED_KEY = "quant_state.bitsandbytes__"
#: JSON fields of a packed 4-bit state and values that are never valid for them
_BAD_JSON = {
    "quant_type": [None, True, "nf5", 4, ["nf4"]],
    "blocksize": [None, True, 48, 64.0, "64", -64],
    "dtype": [None, "float64", "int8", "bool", "floaty", 32],
    "shape": [None, [True, 64], [-1, 64], [], "64,64", [64.0, 64], [[64], 64], 1e300],
    "nested_blocksize": [None, 0, 255.5, True],
    "nested_dtype": ["int64", "float16", None, 8],
    "nested_offset": [True, None, "0.1", math.nan, math.inf, [0.1]],
}  # fmt: skip
_TENSOR_CORRUPTIONS = ["float16", "float64", "int8", "2-D", "one more", "one short", "NaN", "Inf", "meta", "a list", "missing"]


def _corrupt_tensor(entries: dict, key: str, how: str) -> None:
    t = entries[key]
    if how == "missing":
        del entries[key]
        return
    entries[key] = {
        "float16": lambda: t.half(), "float64": lambda: t.double(), "int8": lambda: t.to(torch.int8),
        "2-D": lambda: t.reshape(1, -1), "one more": lambda: torch.cat([t, t[:1]]), "one short": lambda: t[:-1].clone(),
        # (a uint8 nested absmax becomes float32: NaN has no integer form)
        "NaN": lambda: t.float().index_fill(0, torch.tensor([0]), math.nan).to(t.dtype if t.is_floating_point() else torch.float32),
        "Inf": lambda: t.float().index_fill(0, torch.tensor([0]), math.inf).to(t.dtype if t.is_floating_point() else torch.float32),
        "meta": lambda: t.to("meta"), "a list": lambda: t.tolist(),
    }[how]()  # fmt: skip


@st.composite
def quant_state_entry_corruptions(draw) -> tuple[str, Callable[[dict, str], None], tuple[str, ...], bool]:
    """(description, corrupt(entries, prefix), names, must_reject) for the saved entries of one
    4-bit weight (``prefix`` + ``absmax``, ``quant_map``, ``nested_*``, the packed JSON)."""
    kind = draw(st.sampled_from(["json field", "tensor", "truncated JSON", "byte replaced", "deep JSON", "key renamed"]))
    if kind == "json field":
        key = draw(st.sampled_from(sorted(_BAD_JSON)))
        value = draw(st.sampled_from(_BAD_JSON[key]))

        def corrupt(entries, prefix):
            packed_key = next(k for k in entries if k.startswith(prefix + _PACKED_KEY))
            fields = json.loads(bytes(entries[packed_key].tolist()))
            fields[key] = value
            entries[packed_key] = pack_dict_to_tensor(fields)

        # a nested field in a state without double quantization makes it look nested: refused too
        return f"JSON {key}={value!r}", corrupt, (key, "nested"), True
    if kind == "tensor":
        key = draw(st.sampled_from(["absmax", "quant_map", "nested_absmax", "nested_quant_map"]))
        how = draw(st.sampled_from(_TENSOR_CORRUPTIONS))

        def corrupt(entries, prefix):
            if prefix + key in entries:
                _corrupt_tensor(entries, prefix + key, how)
            else:  # not a nested state: a nested entry appears from nowhere
                entries[prefix + key] = torch.zeros(256)

        return f"{key} {how}", corrupt, (key, "nested"), True
    if kind == "truncated JSON":
        fraction = draw(st.floats(0.0, 0.99))

        def corrupt(entries, prefix):
            packed_key = next(k for k in entries if k.startswith(prefix + _PACKED_KEY))
            data = entries[packed_key]
            entries[packed_key] = data[: int(len(data) * fraction)].clone()

        return f"JSON truncated to {fraction:.0%}", corrupt, (_PACKED_KEY,), True
    if kind == "byte replaced":
        position, byte = draw(st.integers(0, 10_000)), draw(st.integers(0, 255))

        def corrupt(entries, prefix):
            packed_key = next(k for k in entries if k.startswith(prefix + _PACKED_KEY))
            data = entries[packed_key].clone()
            data[position % len(data)] = byte
            entries[packed_key] = data

        # may still be a valid state (a digit of nested_offset): then it loads
        return f"JSON byte {position} = {byte}", corrupt, ("quant state", _PACKED_KEY), False
    if kind == "deep JSON":

        def corrupt(entries, prefix):
            packed_key = next(k for k in entries if k.startswith(prefix + _PACKED_KEY))
            entries[packed_key] = torch.tensor(list(b"[" * 100_000 + b"]" * 100_000), dtype=torch.uint8)

        return "deeply nested JSON", corrupt, (_PACKED_KEY,), True

    def corrupt(entries, prefix):  # key renamed: nf4 JSON under the fp4 key, or the reverse
        packed_key = next(k for k in entries if k.startswith(prefix + _PACKED_KEY))
        other = "fp4" if packed_key.endswith("nf4") else "nf4"
        entries[packed_key[: -3] + other] = entries.pop(packed_key)

    return "packed key names the other quant type", corrupt, (_PACKED_KEY,), True


def _quantized_entries(seed: int, nested: bool, quant_type: str) -> dict[str, torch.Tensor]:
    _, state = F.quantize_4bit(_randn((24, 64), torch.float32, _gen(seed)), quant_type=quant_type, compress_statistics=nested)
    return state.as_dict(packed=True)


@st.composite
def quant_state_load_cases(draw) -> Case:
    seed = draw(st.integers(0, 2**16))
    nested, quant_type = draw(st.booleans()), draw(st.sampled_from(formats.QUANT_TYPES))
    what, corrupt, names, must_reject = draw(quant_state_entry_corruptions())

    def make():
        entries = _quantized_entries(seed, nested, quant_type)
        corrupt(entries, "")
        return [entries]

    return Case(
        what=f"QuantState.from_dict(<{what}>, nested={nested})",
        make=make, call=lambda a: QuantState.from_dict(a[0]), names=(*names, "quant state"), must_reject=must_reject,
    )  # fmt: skip


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        lnn.Linear4bit(64, 64, quant_type="nf4"),  # double quantization
        torch.nn.LayerNorm(64),
        lnn.Linear4bit(64, 32, quant_type="fp4", compress_statistics=False),
        lnn.Linear8bitLt(32, 16, has_fp16_weights=False),
    ).to("cpu")


@st.composite
def model_load_cases(draw) -> Case:
    """A checkpoint of a three-layer quantized model with one corrupted entry, loaded with
    lowbit.nn.load_checkpoint (all or nothing: the model must be unchanged) or torch's
    load_state_dict (the corrupted layer must be unchanged)."""
    seed = draw(st.integers(0, 2**16))
    loader = draw(st.sampled_from(["load_checkpoint", "load_state_dict"]))
    layer = draw(st.sampled_from(["0.", "2.", "3."]))
    if layer == "3.":
        what = draw(st.sampled_from(["SCB NaN", "SCB one short", "SCB missing", "weight float", "weight 2 rows short", "weight_format 1"]))

        def corrupt(entries, prefix):
            key = {"SCB NaN": "SCB", "SCB one short": "SCB", "SCB missing": "SCB", "weight_format 1": "weight_format"}.get(what, "weight")
            if what == "SCB NaN":
                entries[prefix + key] = entries[prefix + key].clone().fill_(math.nan)
            elif what == "SCB one short":
                entries[prefix + key] = entries[prefix + key][:-1].clone()
            elif what == "SCB missing":
                del entries[prefix + key]
            elif what == "weight float":
                entries[prefix + key] = entries[prefix + key].float()
            elif what == "weight 2 rows short":
                entries[prefix + key] = entries[prefix + key][:-2].clone()
            else:
                entries[prefix + key] = torch.tensor(1, dtype=torch.uint8)

        names = (layer, "SCB", "weight")
        # a float weight with SCB present is refused; torch's loader then reports per layer
    else:
        what, corrupt, names, _ = draw(quant_state_entry_corruptions())
        names = (layer, *names)
    must_reject = not what.startswith("JSON byte")

    def make():
        target = _model(seed + 1)
        source = _model(seed).state_dict()
        corrupt(source, layer if layer == "3." else layer + "weight.")
        return [target, source]

    def call(inputs):
        model, state_dict = inputs
        return (lnn.load_checkpoint if loader == "load_checkpoint" else type(model).load_state_dict)(model, state_dict)

    def unchanged(inputs):
        if loader == "load_checkpoint":
            return inputs
        # torch loads layer by layer: the other layers may load, the corrupted one must not change
        return [{k: v for k, v in inputs[0].state_dict().items() if k.startswith(layer)}, inputs[1]]

    # both raise torch's RuntimeError("Error(s) in loading state_dict ...") naming the entry
    return Case(
        what=f"{loader}(model, <layer {layer}: {what}>)",
        make=make, call=call, names=names, must_reject=must_reject, errors=(ValueError, TypeError, RuntimeError),
        unchanged=unchanged,
    )  # fmt: skip


@examples(700)
@given(st.one_of(quant_state_load_cases(), model_load_cases()))
def test_corrupted_loads(case):
    run(case)
