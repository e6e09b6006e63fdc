"""The torch.library ops: schemas and fake kernels agree with the real ones (torch.library.opcheck),
torch.compile(fullgraph=True) traces through them, and their checks read no tensor values."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import ShapeEnv
from torch.utils._pytree import tree_leaves, tree_map

import lowbit
from lowbit import functional as F
from lowbit.core import formats, ops
from support import CPU_BACKENDS

g = torch.Generator().manual_seed(0)
W = torch.randn(32, 64, generator=g)
X = torch.randn(3, 64, generator=g)
PACKED, STATE = F.quantize_4bit(W, quant_type="nf4")
PACKED_NESTED, STATE_NESTED = F.quantize_4bit(W, quant_type="fp4", compress_statistics=True)
QA, SA, _ = F.int8_vectorwise_quant(X)
QW, SW, _ = F.int8_vectorwise_quant(W)
CODE8 = formats.dynamic_map()
Q8, ABSMAX8 = torch.ops.lowbit.quantize_blockwise(W, CODE8, 256)
PACKED_I, ABSMAX_I = torch.ops.lowbit.interleave_4bit(PACKED, STATE.absmax, [32, 64], 64)

SAMPLES = {
    "quantize_4bit": (W, 64, "nf4", torch.uint8),
    "dequantize_4bit": (PACKED, STATE.absmax, 64, "nf4", [32, 64], torch.bfloat16),
    "dequantize_4bit.out": (PACKED, STATE.absmax, 64, "nf4", [32, 64], torch.float32, torch.empty(32, 64)),
    "gemv_4bit": (X, PACKED, [32, 64], STATE.absmax, STATE.code, 64),
    "gemv_4bit.out": (X, PACKED, [32, 64], STATE.absmax, STATE.code, 64, torch.empty(3, 32)),
    "matmul_4bit": (X, PACKED, [32, 64], STATE.absmax, STATE.code, 64, torch.randn(32)),
    "matmul_4bit_nested": (
        X, PACKED_NESTED, [32, 64], STATE_NESTED.absmax, STATE_NESTED.state2.code, STATE_NESTED.state2.absmax,
        STATE_NESTED.state2.blocksize, STATE_NESTED.offset, STATE_NESTED.code, 64, torch.randn(32),
    ),
    "interleave_4bit": (PACKED, STATE.absmax, [32, 64], 64),
    "deinterleave_4bit": (PACKED_I, ABSMAX_I, [32, 64], 64),
    "matmul_4bit_interleaved": (X, PACKED_I, [32, 64], ABSMAX_I, STATE.code, 64, torch.randn(32), False),
    "gemm_4bit": (
        X, PACKED_NESTED, [32, 64], STATE_NESTED.state2.absmax, 64, "fp4", torch.randn(32), STATE_NESTED.absmax,
        STATE_NESTED.state2.code, STATE_NESTED.offset,
    ),
    "quantize_blockwise": (W, CODE8, 256),
    "dequantize_blockwise": (Q8, ABSMAX8, CODE8, 256, torch.float16),
    "dequantize_blockwise.out": (Q8, ABSMAX8, CODE8, 256, torch.float32, torch.empty(32, 64)),
    "int8_vectorwise_quant": (X, 0.0),
    "int8_vectorwise_dequant": (QA, SA),
    "int8_double_quant": (X, 1.0),
    "int8_linear_matmul": (QA, QW),
    "int8_linear_matmul.out": (QA, QW, torch.empty(3, 32, dtype=torch.int32)),
    "int8_mm_dequant": (torch.ops.lowbit.int8_linear_matmul(QA, QW), SA, SW, torch.float32, None),
    "int8_scaled_mm": (QA, QW, SA, SW, None, torch.float32),
    "int8_mixed_scaled_mm": (X, QA, QW, SA, SW, None, None),
    "optimizer_update_32bit": (
        "adam", torch.randn(64), torch.randn(64), torch.zeros(64), torch.zeros(64), None,
        0.0, 1.0, 0.9, 0.999, 0.0, 0.0, 1e-8, 0.01, 1, 1e-3, 1.0, False,
    ),
    "optimizer_update_8bit_blockwise": (
        "adam", torch.randn(300), torch.randn(300), torch.zeros(300, dtype=torch.uint8),
        torch.zeros(300, dtype=torch.uint8), 0.9, 0.999, 0.0, 0.0, 1e-8, 1, 1e-3, formats.dynamic_map(),
        formats.dynamic_map(signed=False), torch.zeros(2), torch.zeros(2), 0.0, 1.0, False,
    ),
}  # fmt: skip


def test_every_op_has_a_sample():
    assert set(SAMPLES) == set(ops.OP_NAMES)


def _op(name: str):
    base, _, overload = name.partition(".")
    packet = getattr(torch.ops.lowbit, base)
    return getattr(packet, overload or "default")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_opcheck(name, backend):
    # data-dependent output sizes (outlier columns) cannot be checked by the dynamic-shape test
    skip = ("test_aot_dispatch_dynamic",) if name in ("int8_double_quant", "int8_mixed_scaled_mm") else ()
    utils = [u for u in ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic") if u not in skip]
    with lowbit.backends.use(backend):
        torch.library.opcheck(_op(name), SAMPLES[name], test_utils=utils)


def test_compile_fullgraph_through_4bit_ops():
    def forward(x, packed, absmax):
        w = torch.ops.lowbit.dequantize_4bit(packed, absmax, 64, "nf4", [32, 64], torch.float32)
        return torch.nn.functional.linear(x, w) + torch.ops.lowbit.gemv_4bit(x, packed, [32, 64], absmax, STATE.code, 64)

    compiled = torch.compile(forward, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(X, PACKED, STATE.absmax), forward(X, PACKED, STATE.absmax))


#: Ops whose output size depends on values (outlier columns): torch runs them on fake tensors with a
#: shape environment only, never on bare meta tensors.
DATA_DEPENDENT_SIZE = ("int8_double_quant", "int8_mixed_scaled_mm")


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_checks_and_fake_kernel_read_no_values(name):
    """An op's whole Python path (its checks, then the fake kernel) on tensors without values: any
    read of one (.item(), bool(t), .tolist(): a GPU sync on a real device) would raise here."""
    with FakeTensorMode(shape_env=ShapeEnv()) as mode:
        fake_args = tree_map(lambda a: mode.from_tensor(a) if isinstance(a, torch.Tensor) else a, SAMPLES[name])
        _op(name)(*fake_args)
    if name not in DATA_DEPENDENT_SIZE:
        meta_args = tree_map(lambda a: a.to("meta") if isinstance(a, torch.Tensor) else a, SAMPLES[name])
        outputs = _op(name)(*meta_args)
        assert all(t.device.type == "meta" for t in tree_leaves(outputs) if isinstance(t, torch.Tensor))


def _tensor_positions(name: str) -> list[int]:
    return [i for i, value in enumerate(SAMPLES[name]) if isinstance(value, torch.Tensor)]


@pytest.mark.parametrize("name", sorted(n for n in SAMPLES if len(_tensor_positions(n)) > 1))
def test_a_meta_argument_among_real_ones_is_rejected(name):
    """One meta tensor among CPU tensors selects the fake kernel; it must refuse the call, naming the
    argument, instead of returning uninitialized memory."""
    schema = _op(name)._schema
    for index in _tensor_positions(name):
        value = SAMPLES[name][index]
        args = list(SAMPLES[name])
        args[index] = value.to("meta")
        with pytest.raises(ValueError, match="is on (meta|cpu), expected (cpu|meta)") as raised:
            _op(name)(*args)
        assert any(other.name in str(raised.value) for other in schema.arguments), raised.value
