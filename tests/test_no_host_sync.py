"""No host read-back in hot paths (docs/design.md: each read-back is a GPU sync), proven without a GPU.

* Under ``FakeTensorMode`` tensors have metadata and no values: any ``.item()``, ``bool(t)`` or
  ``.tolist()`` raises. The functional API, the layers' forward and backward passes and the 8-bit
  optimizer step run there unchanged, so none of their checks branches on data. (Each op's own
  checks and fake kernel: tests/test_op_schemas.py.)
* A code (a constant) is validated once per tensor object and version, not per call.
* ``torch.compile(fullgraph=True)`` traces a whole QLoRA step — Linear4bit NF4 with double
  quantization plus a LoRA adapter, forward, backward and an 8-bit AdamW step — without a graph
  break, and computes what eager mode computes.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import ShapeEnv

import lowbit.nn as lnn
import lowbit.optim as O
from lowbit import functional as F
from lowbit.core import checks


def _qlora_layer(seed: int = 0):
    """A frozen NF4 + double-quant base layer with a trainable LoRA adapter (rank 4)."""
    torch.manual_seed(seed)
    base = lnn.Linear4bit(64, 48, bias=False, compute_dtype=torch.float32, quant_type="nf4").to("cpu")
    lora_a = torch.nn.Parameter(torch.randn(4, 64) * 0.05)
    lora_b = torch.nn.Parameter(torch.randn(48, 4) * 0.05)
    return base, lora_a, lora_b


def _loss(base, lora_a, lora_b, x):
    return (base(x) + (x @ lora_a.t()) @ lora_b.t()).square().mean()


# ---- FakeTensorMode: the Python paths read no values -------------------------------------------
def _fake_mode() -> FakeTensorMode:
    # real tensors met inside (module weights, cached codes) become fake ones; shape_env allows
    # the data-dependent output sizes of the outlier ops
    return FakeTensorMode(allow_non_fake_inputs=True, shape_env=ShapeEnv())


def test_functional_api_reads_no_values():
    W = torch.randn(32, 64)
    packed, state = F.quantize_4bit(W, quant_type="nf4", compress_statistics=True)
    q8, state8 = F.quantize_blockwise(W, nested=True)
    qa, sa, _ = F.int8_vectorwise_quant(torch.randn(3, 64))
    qw, sw, _ = F.int8_vectorwise_quant(W)
    with _fake_mode():
        x = torch.randn(3, 64)
        assert F.dequantize_4bit(packed, state).shape == (32, 64)
        assert F.gemv_4bit(x[:1], packed.t(), state=state).shape == (1, 32)
        assert F.dequantize_blockwise(q8, state8).shape == (32, 64)
        assert F.int8_linear_matmul(qa, qw).shape == (3, 32)
        assert F.int8_mm_dequant(F.int8_linear_matmul(qa, qw), sa, sw).shape == (3, 32)
        assert F.int8_vectorwise_dequant(qa, sa).shape == (3, 64)
        assert F.int8_vectorwise_quant(x, threshold=2.0)[0].shape == (3, 64)


@pytest.mark.parametrize("batch", [1, 16], ids=["gemv", "dequantize+gemm"])
def test_qlora_forward_and_backward_read_no_values(batch):
    base, lora_a, lora_b = _qlora_layer()
    with _fake_mode():
        x = torch.randn(batch, 64, requires_grad=True)
        loss = _loss(base, lora_a, lora_b, x)
        loss.backward()
        assert x.grad.shape == x.shape


def test_int8_layer_and_embeddings_read_no_values():
    int8 = lnn.Linear8bitLt(64, 32, has_fp16_weights=False, threshold=6.0).to("cpu").eval()
    emb4 = lnn.Embedding4bit(100, 64, quant_type="nf4").to("cpu")
    emb8 = lnn.Embedding8bit(100, 64).to("cpu")
    with _fake_mode():
        assert int8(torch.randn(5, 64, dtype=torch.float16)).shape == (5, 32)
        index = torch.zeros(2, 3, dtype=torch.long)
        assert emb4(index).shape == emb8(index).shape == (2, 3, 64)


def test_layer_placed_for_cpu_inference_reads_no_values():
    """Eager calls on the interleaved layout call the kernel directly, with pointers; fake
    tensors go through the op instead (its fake kernel), before and after the layer's plan."""
    base = _qlora_layer()[0].eval()
    with torch.no_grad():
        real = base(torch.randn(3, 64))  # places the weight, keeps the plan
        assert base.weight.interleaved
        with _fake_mode():
            for rows in (1, 3):
                out = base(torch.randn(rows, 64))
                assert out.shape == (rows, 48) and checks.is_fake(out)
        assert torch.equal(base(torch.zeros(3, 64)), torch.zeros_like(real))


@pytest.mark.parametrize("cls", [O.AdamW8bit, O.Lion8bit, O.AdEMAMix8bit, O.AdamW], ids=lambda c: c.__name__)
def test_optimizer_step_reads_no_values(cls):
    with _fake_mode():
        p = torch.nn.Parameter(torch.randn(300))
        opt = cls([p], lr=1e-3, min_8bit_size=0)
        for _ in range(2):
            p.grad = torch.randn(300)
            opt.step()
        assert opt.state[p]["step"] == 2


# ---- a code is validated once -----------------------------------------------------------------
@pytest.fixture
def code_checks(monkeypatch):
    """Counts the value checks of codes (each is one read-back on a GPU)."""
    calls = []
    original = checks._check_code_values

    def counting(value, name, ascending):
        calls.append(name)
        original(value, name, ascending)

    monkeypatch.setattr(checks, "_check_code_values", counting)
    return calls


def test_optimizer_codes_are_validated_once(code_checks):
    p = torch.nn.Parameter(torch.randn(1000))
    opt = O.AdamW8bit([p], min_8bit_size=0)
    for _ in range(5):
        p.grad = torch.randn(1000)
        opt.step()
    assert sorted(code_checks) == ["qmap1", "qmap2"]  # at the first step, not at every step
    opt.state[p]["qmap1"].mul_(1.0)  # modified in place: its version moves, it is checked again
    p.grad = torch.randn(1000)
    opt.step()
    assert sorted(code_checks) == ["qmap1", "qmap1", "qmap2"]


@pytest.mark.parametrize("batch", [1, 16], ids=["gemv", "dequantize+gemm"])
def test_double_quant_forward_validates_its_codes_once(code_checks, batch):
    base, lora_a, lora_b = _qlora_layer()
    base(torch.randn(batch, 64))
    first_call = len(code_checks)
    assert first_call >= 1  # the nested absmax's 8-bit code (and gemv's 4-bit codebook)
    for _ in range(3):
        base(torch.randn(batch, 64))
    assert len(code_checks) == first_call


def test_a_changed_code_is_caught_after_it_was_validated():
    p = torch.nn.Parameter(torch.randn(1000))
    opt = O.AdamW8bit([p], min_8bit_size=0)
    p.grad = torch.randn(1000)
    opt.step()
    opt.state[p]["qmap1"][5] = float("nan")
    with pytest.raises(ValueError, match="qmap1 contains NaN or Inf"):
        opt.step()


# ---- torch.compile: a QLoRA step in full graphs -------------------------------------------------
def test_qlora_step_compiles_without_graph_breaks_and_matches_eager():
    """Forward + loss in one graph whose backward AOTAutograd compiles too, and the 8-bit AdamW step
    in another, both fullgraph=True: any graph break (a host read-back among them) is an error.

    (One graph spanning ``loss.backward()`` needs torch's experimental ``trace_autograd_ops``; in
    torch 2.13 the optimizer inside such a graph does not see the gradients the backward just
    accumulated, so it is not the way to compile a training step.)"""
    base, lora_a, lora_b = _qlora_layer()
    eager = copy.deepcopy((base, lora_a, lora_b))
    opt = O.AdamW8bit([lora_a, lora_b], lr=1e-2, min_8bit_size=0)
    eager_opt = O.AdamW8bit(list(eager[1:]), lr=1e-2, min_8bit_size=0)
    loss_fn = torch.compile(_loss, fullgraph=True, backend="aot_eager")
    optimizer_step = torch.compile(opt.step, fullgraph=True, backend="aot_eager")
    for batch in (1, 16, 16):  # the fused gemv path and the dequantize + GEMM path
        x = torch.randn(batch, 64)
        loss = loss_fn(base, lora_a, lora_b, x)
        loss.backward()
        optimizer_step()
        opt.zero_grad()
        eager_loss = _loss(*eager, x)
        eager_loss.backward()
        eager_opt.step()
        eager_opt.zero_grad()
        torch.testing.assert_close(loss, eager_loss, rtol=1e-6, atol=0)
        torch.testing.assert_close(lora_a, eager[1], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(lora_b, eager[2], rtol=1e-6, atol=1e-7)
    assert opt.state[lora_a]["state1"].dtype == torch.uint8 and opt.state[lora_a]["step"] == 3
