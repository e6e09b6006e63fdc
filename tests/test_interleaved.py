"""The interleaved 4-bit layout for CPU inference, from the user's side: where a layer takes it,
that it replaces the standard bytes instead of sitting beside them, and that everything that
leaves the CPU inference path (saving, training, other devices, the functional API) sees the
standard bytes again, bit for bit. Kernel parity per ISA is in test_parity.py."""

from __future__ import annotations

import copy
import ctypes
import io
import math
import mmap
import pickle
import sys
import time

import pytest
import torch

import lowbit
import lowbit.functional as F
from lowbit.backends.cpu import native
from lowbit.core import formats, registry
from lowbit.nn import Linear4bit
from support import NATIVE_CPU_BACKENDS, fixed_point_bound

pytestmark = pytest.mark.skipif(not NATIVE_CPU_BACKENDS, reason="native CPU library not built")


def _layer(in_features=576, out_features=200, quant_type="nf4", nested=True, bias=True, seed=0) -> Linear4bit:
    torch.manual_seed(seed)
    return Linear4bit(in_features, out_features, bias=bias, compress_statistics=nested, quant_type=quant_type).cpu()


def _state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _assert_same_state_dict(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for key in want:
        assert got[key].dtype == want[key].dtype and torch.equal(got[key], want[key]), key


def _resident_bytes(weight) -> int:
    """Bytes of every tensor the weight keeps: packed data and its quantization state."""
    state = weight.quant_state
    tensors = [weight.data, state.absmax, state.code, state.absmax_codes, state.offset]
    if state.state2 is not None:
        tensors += [state.state2.absmax, state.state2.code]
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


@pytest.mark.parametrize("quant_type", formats.QUANT_TYPES)
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_eval_forward_places_the_layout_and_computes_the_same_product(quant_type, nested, dtype):
    layer = _layer(quant_type=quant_type, nested=nested)
    with torch.no_grad():
        layer(torch.randn(5, 576).to(dtype))  # training mode: stays in the standard layout
        assert not layer.weight.interleaved
        dense = F.dequantize_4bit(layer.weight.data, layer.weight.quant_state).double()
        layer.eval()
        for rows in (1, 5, 33):
            x = torch.randn(rows, 576).to(dtype)
            got = layer(x)
            assert layer.weight.interleaved
            bias = layer.bias.to(dtype).double()  # the layer adds the bias in the compute dtype
            want = x.double() @ dense.t() + bias
            # the fast precision (the default): 16-bit fixed point, or from 8 rows with AMX each
            # weight and activation rounded to bf16 once; float32 sums; one rounding to dtype
            scale = x.double().abs() @ dense.abs().t() + bias.abs()
            state = F.deinterleave_4bit(layer.weight.data, layer.weight.quant_state)[1]
            bound = fixed_point_bound(x, F.block_absmax_of(state), state.code, (200, 576))
            tol = 1e-6 * scale + bound + 2.0**-8 * scale + (0 if dtype == torch.float32 else want.abs() * 2.0**-7)
            assert ((got.double() - want).abs() <= tol).all()


@pytest.mark.parametrize("nested", [False, True])
def test_layout_replaces_the_standard_bytes_and_state_dict_stays_bitsandbytes(nested):
    layer = _layer(nested=nested)
    saved = _state_dict(layer)
    standard_bytes = _resident_bytes(layer.weight)
    layer.eval()
    with torch.no_grad():
        layer(torch.randn(1, 576))
    weight = layer.weight
    assert weight.interleaved and weight.data.shape == saved["weight"].shape
    # one copy of the weight: the same packed size; the float32 absmax replaces the standard one,
    # and with double quantization replaces the uint8 codes, decoded (4 bytes per block, not 1)
    blocks = 576 * 200 // 64
    assert _resident_bytes(weight) == standard_bytes + (3 * blocks if nested else 0)
    assert not torch.equal(weight.data, saved["weight"])  # really rearranged
    _assert_same_state_dict(_state_dict(layer), saved)
    assert weight.interleaved  # saving converted a copy, not the layer
    layer.train()
    assert not layer.weight.interleaved
    _assert_same_state_dict(_state_dict(layer), saved)
    assert _resident_bytes(layer.weight) == standard_bytes


def test_nested_absmax_is_decoded_once_at_placement():
    layer = _layer(nested=True).eval()
    standard = layer.weight.quant_state
    want = formats.interleave_rows(F.block_absmax_of(standard).view(200, 576 // 64))
    with torch.no_grad():
        layer(torch.randn(1, 576))
    state = layer.weight.quant_state
    assert state.absmax.dtype == torch.float32 and torch.equal(state.absmax, want.reshape(-1))
    assert state.absmax_codes is None  # read back from the decoded values on the way back


@pytest.mark.parametrize("blocksize", [32, 64, 256, 4096])
@pytest.mark.parametrize("quant_type", formats.QUANT_TYPES)
def test_nested_codes_are_read_back_bit_exactly_from_their_values(blocksize, quant_type):
    """The uint8 codes of double quantization leave memory at placement and come back from the
    float32 absmax: for weights whose block scales span orders of magnitude, nested blocks
    left partial (N * K / blocksize not a multiple of 256) and every blocksize."""
    torch.manual_seed(blocksize)
    for N, K in ((200, 4096), (37, 4096 * 3)):
        W = torch.randn(N, K) * torch.logspace(-3, 3, N).unsqueeze(1)  # absmax over six decades
        packed, state = F.quantize_4bit(W, blocksize=blocksize, compress_statistics=True, quant_type=quant_type)
        packed_i, state_i = F.interleave_4bit(packed, state)
        assert state_i.absmax_codes is None
        back, state_back = F.deinterleave_4bit(packed_i, state_i)
        assert torch.equal(back, packed) and torch.equal(state_back.absmax, state.absmax) and state_back == state


def test_nested_codes_that_share_a_value_are_kept():
    """Block scales a few float32 steps apart: neighbouring codes of a nested block decode to one
    float32, so the values cannot give the codes back and the layout keeps them."""
    torch.manual_seed(0)
    W = 0.1 * torch.rand(64, 1024)
    W.view(-1, 64)[:, 0] = 1 + 2.0**-23 * torch.randint(0, 9, (1024,))  # absmax 1 + 0..8 steps
    W.view(-1, 64)[::256, 0] = 1 + 2.0**-23 * 1000  # one per nested block: its scale is ~1000 steps
    packed, state = F.quantize_4bit(W, compress_statistics=True)
    values = F.block_absmax_of(state)
    assert not torch.equal(F._recover_absmax_codes(values, state), state.absmax)  # codes really collide
    packed_i, state_i = F.interleave_4bit(packed, state)
    assert torch.equal(state_i.absmax_codes, state.absmax)
    back, state_back = F.deinterleave_4bit(packed_i, state_i)
    assert torch.equal(back, packed) and state_back == state


def test_functional_api_reads_the_interleaved_layout():
    W = torch.randn(48, 256)
    packed, state = F.quantize_4bit(W, quant_type="fp4", compress_statistics=True)
    packed_i, state_i = F.interleave_4bit(packed, state)
    assert state_i.interleaved and not state.interleaved
    assert torch.equal(F.dequantize_4bit(packed_i, state_i), F.dequantize_4bit(packed, state))
    x = torch.randn(2, 256)
    torch.testing.assert_close(F.gemv_4bit(x, packed_i, state=state_i), F.gemv_4bit(x, packed, state=state))
    back, state_back = F.deinterleave_4bit(packed_i, state_i)
    assert torch.equal(back, packed) and state_back == state
    with pytest.raises(ValueError, match="already in the interleaved layout"):
        F.interleave_4bit(packed_i, state_i)
    with pytest.raises(ValueError, match="not in the interleaved layout"):
        F.deinterleave_4bit(packed, state)
    with pytest.raises(ValueError, match="interleaved .* layout is not saved"):
        state_i.as_dict(packed=True)
    with pytest.raises(ValueError, match="shapeB=.* has no interleaved layout"):
        F.interleave_4bit(*F.quantize_4bit(torch.randn(4, 96)))  # K % 64 != 0


def test_functional_calls_reuse_the_product_kept_on_the_state_while_it_holds():
    """matmul_4bit keeps the product of an interleaved weight on its state (decoding calls it with
    the same weight every token) and makes a new one whenever B or the state's tensors change."""
    g = torch.Generator().manual_seed(3)
    packed, state = F.interleave_4bit(*F.quantize_4bit(torch.randn(48, 256, generator=g)))
    x = torch.randn(2, 256, generator=g)

    def product(B=packed):
        return lowbit.matmul_4bit(x, B, quant_state=state)

    want = product()
    kept = state.decode_product
    assert kept is not None and torch.equal(product(), want) and state.decode_product is kept
    # other bytes under the same state: another B object, a new product that reads them
    other = F.interleave_4bit(*F.quantize_4bit(torch.randn(48, 256, generator=g)))[0]
    assert not torch.equal(product(other), want) and state.decode_product is not kept
    assert torch.equal(product(other), lowbit.matmul_4bit(x, other, quant_state=copy.copy(state)))  # a fresh one
    # the state's absmax replaced: the product follows it
    state.absmax = state.absmax * 2
    assert torch.equal(product(), want * 2)
    # pickles and copies of the state carry no product, and work
    for twin in (pickle.loads(pickle.dumps(state)), copy.deepcopy(state), copy.copy(state)):
        assert twin.decode_product is None and twin == state
        assert torch.equal(lowbit.matmul_4bit(x, packed, quant_state=twin), want * 2)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    assert torch.load(io.BytesIO(buffer.getvalue()), weights_only=False).decode_product is None


def test_interleaved_product_takes_a_strided_bias_and_refuses_a_wrong_size():
    """The eager fast path calls the kernel directly: a non-contiguous bias gives the result of
    its contiguous copy, as the op dispatcher would, and a bias of the wrong size is refused."""
    packed, state = F.interleave_4bit(*F.quantize_4bit(torch.randn(48, 256)))
    x, bias = torch.randn(3, 256), torch.randn(48)
    strided = torch.stack([bias, torch.full_like(bias, float("nan"))], dim=-1)[:, 0]
    assert not strided.is_contiguous()
    want = lowbit.matmul_4bit(x, packed, quant_state=state, bias=bias)
    assert torch.equal(lowbit.matmul_4bit(x, packed, quant_state=state, bias=strided), want)
    with pytest.raises(ValueError, match="bias must have 48 values, got 47"):
        lowbit.matmul_4bit(x, packed, quant_state=state, bias=bias[:47])


def test_no_placement_where_it_cannot_serve():
    x = torch.randn(2, 576)
    with torch.no_grad():
        training = _layer()
        training(x)
        assert not training.weight.interleaved  # training mode
        ragged = _layer(in_features=96 + 8).eval()  # K % blocksize != 0
        ragged(torch.randn(2, 104))
        assert not ragged.weight.interleaved
        with registry.use("reference"):
            pure_torch = _layer().eval()
            pure_torch(x)
            assert not pure_torch.weight.interleaved  # no native kernel: the layout would only cost
    needs_grad = _layer().eval()
    needs_grad(x.requires_grad_(True)).sum().backward()
    assert not needs_grad.weight.interleaved


def test_training_after_inference_and_gradients_through_the_interleaved_weight():
    layer = _layer(bias=False).eval()
    x = torch.randn(3, 576)
    with torch.no_grad():
        layer(x)
    assert layer.weight.interleaved
    # a gradient for the input only (eval mode, e.g. saliency): the dense product of the same weight
    x.requires_grad_(True)
    layer(x).sum().backward()
    dense = F.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    torch.testing.assert_close(x.grad, dense.sum(0).expand(3, -1))
    layer.train()
    assert not layer.weight.interleaved


def test_pickle_deepcopy_and_device_moves_keep_the_weight(monkeypatch):
    layer = _layer().eval()
    x = torch.randn(2, 576)
    with torch.no_grad():
        want = layer(x)
        buffer = io.BytesIO()
        torch.save(layer, buffer)
        buffer.seek(0)
        for other in (torch.load(buffer, weights_only=False), copy.deepcopy(layer)):
            assert other.weight.interleaved
            assert torch.equal(other(x), want)
    saved = _state_dict(layer)
    layer.weight.to("cpu")
    assert layer.weight.interleaved
    # to any other device, the standard layout travels (the move itself is QuantizedParameter.to's)
    moves = []
    monkeypatch.setattr(lowbit.nn.parameter.QuantizedParameter, "to", lambda self, *a, **k: moves.append(a) or self)
    layer.weight.to("cuda:1")
    assert moves == [("cuda:1",)] and not layer.weight.interleaved
    _assert_same_state_dict(_state_dict(layer), saved)


def test_layout_change_is_a_transpose_of_words_within_groups_of_16_rows():
    # the definition in words, on a weight small enough to write out: row n, word d -> position
    N, K = 19, 64
    packed, state = F.quantize_4bit(torch.randn(N, K), compress_statistics=False)
    packed_i, state_i = F.interleave_4bit(packed, state)
    words, words_i = packed.view(N, K // 8, 4), packed_i.view(-1, 4)
    for n in range(N):
        n0 = n - n % 16
        rows = min(16, N - n0)
        for d in range(K // 8):
            assert torch.equal(words_i[n0 * (K // 8) + d * rows + n - n0], words[n, d])
    assert math.prod(state_i.absmax.shape) == N
    assert torch.equal(state_i.absmax.view(-1)[16:19], state.absmax.view(N)[16:19])  # tail group, 1 block


def _vm_flags(address: int) -> list[str]:
    """The VmFlags of the mapping of this process that holds ``address`` (/proc/self/smaps)."""
    inside = False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split(None, 1)[0]
            if "-" in head and not head.endswith(":"):  # a mapping's first line: "start-end perms ..."
                start, end = (int(x, 16) for x in head.split("-"))
                inside = start <= address < end
            elif inside and head == "VmFlags:":
                return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


def _transparent_huge_pages() -> str:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return f.read().split("[", 1)[1].split("]", 1)[0]  # "always [madvise] never" -> "madvise"
    except (OSError, IndexError):
        return "unavailable"


@pytest.mark.skipif(_transparent_huge_pages() not in ("always", "madvise"), reason="no transparent huge pages here")
def test_the_interleaved_layout_is_advised_to_be_huge_pages():
    # docs/design.md §4: a decode streams it once per token, 4-5% faster in 2 MiB pages. 8 MiB of
    # packed weight holds at least three whole 2 MiB pages, whichever address it starts at.
    packed, state = F.quantize_4bit(torch.randn(4096, 4096), compress_statistics=False)
    interleaved, _ = F.interleave_4bit(packed, state)
    middle = interleaved.data_ptr() + interleaved.nbytes // 2
    assert "hg" in _vm_flags(middle)  # MADV_HUGEPAGE: the kernel gives these pages huge ones
    assert "hg" not in _vm_flags(packed.data_ptr() + packed.nbytes // 2)  # the standard bytes: untouched


def test_lowbit_reports_its_layout_in_repr():
    layer = _layer().eval()
    with torch.no_grad():
        layer(torch.randn(1, 576))
    assert "layout='interleaved'" in repr(layer.weight.quant_state)
    assert lowbit.functional.deinterleave_4bit is F.deinterleave_4bit


def test_cpu_precision_float32_is_reference_parity_and_fast_is_the_default():
    layer = _layer(in_features=1024, out_features=48, nested=False, bias=False).eval()
    x = torch.randn(3, 1024)
    assert lowbit.set_cpu_precision("fast") == "fast"  # the default (LOWBIT_CPU_PRECISION unset)
    with torch.no_grad():
        layer(x)
        assert layer.weight.interleaved
        dense = F.dequantize_4bit(layer.weight.data, layer.weight.quant_state).double()
        exact = x.double() @ dense.t()
        scale = x.double().abs() @ dense.abs().t()
        previous = lowbit.set_cpu_precision("float32")
        try:
            parity = layer(x).double()
        finally:
            lowbit.set_cpu_precision(previous)
        fast = layer(x).double()
    assert ((parity - exact).abs() <= 1e-6 * scale).all()
    state = F.deinterleave_4bit(layer.weight.data, layer.weight.quant_state)[1]
    bound = fixed_point_bound(x, F.block_absmax_of(state), state.code, (48, 1024))
    assert ((fast - exact).abs() <= 1e-6 * scale + bound).all()
    if native.fixed_point_products():  # the fixed point really ran
        assert ((fast - exact).abs() > 1e-6 * scale).any()
    with pytest.raises(ValueError, match="precision must be one of"):
        lowbit.set_cpu_precision("bf16")


@pytest.mark.skipif(not NATIVE_CPU_BACKENDS or "amx_bf16" not in native.supported_cpu_features(), reason="no AMX")
@pytest.mark.parametrize("rows", [8, 16, 33, 64, 65])
def test_amx_and_fma_paths_agree_within_the_bf16_contract(rows):
    W = torch.randn(40, 512)
    packed, state = F.interleave_4bit(*F.quantize_4bit(W, quant_type="nf4"))
    x = torch.randn(rows, 512).bfloat16()
    bias = torch.randn(40).bfloat16()
    args = (x, packed, [40, 512], state.absmax, state.code, 64, bias, False)
    with native.use_cpu_features(["amx_bf16"]):
        amx = torch.ops.lowbit.matmul_4bit_interleaved(*args).double()
    with native.use_cpu_features([]):
        fma = torch.ops.lowbit.matmul_4bit_interleaved(*args).double()
    dense = F.dequantize_4bit(packed, state).double()
    scale = x.double().abs() @ dense.abs().t() + bias.double().abs()
    assert ((amx - fma).abs() <= 2.0**-7 * scale).all()
    assert not torch.equal(amx, fma)



# ---- the plan an eval-mode call keeps for the next (Linear4bit._planned_forward) ----------------
def _fresh_output(layer: Linear4bit, x: torch.Tensor) -> torch.Tensor:
    """What a newly built layer holding ``layer``'s parameters computes for ``x`` on its first,
    fully checked call (the same kernel, so the same bits)."""
    fresh = Linear4bit(
        layer.in_features, layer.out_features, bias=layer.bias is not None, quant_type=layer.weight.quant_type
    )
    fresh.load_state_dict(layer.state_dict())
    fresh.compute_dtype = layer.compute_dtype
    with torch.no_grad():
        return fresh.eval()(x)


@pytest.fixture
def full_path_calls(monkeypatch) -> list:
    """Records the calls that took the fully checked path (those the plan did not cover)."""
    calls = []
    original = Linear4bit._check_input
    monkeypatch.setattr(Linear4bit, "_check_input", lambda self, x: calls.append(x) or original(self, x))
    return calls


def test_decode_calls_reuse_the_plan_and_compute_the_same_bits(full_path_calls):
    layer = _layer().eval()
    with torch.no_grad():
        layer(torch.randn(1, 1, 576))  # places the weight, keeps the plan
        assert len(full_path_calls) == 1
        for rows in (1, 3):
            x = torch.randn(1, rows, 576)
            got = layer(x)
            want = lowbit.matmul_4bit(x, layer.weight, layer.weight.quant_state, bias=layer.bias)
            assert got.shape == (1, rows, 200) and torch.equal(got, want)
    assert len(full_path_calls) == 1  # the later calls took the plan


def test_the_plan_follows_every_change_of_the_layer(full_path_calls):
    layer, other = _layer(seed=0).eval(), _layer(seed=1).eval()
    x = torch.randn(2, 576)
    with torch.no_grad():
        layer(x)
        # a quantized state dict loaded from another layer
        layer.load_state_dict(other.state_dict())
        assert layer._inference_plan is None  # dropped at once: it keeps no old bytes alive
        assert torch.equal(layer(x), _fresh_output(other, x))
        # the weight replaced by another layer's placed weight
        other(x)
        layer.weight = other.weight
        assert torch.equal(layer(x), other(x))
        # train() and back: the layout goes and comes back, the output stays
        layer.weight = _layer(seed=2).weight
        want = layer(x)
        layer.train()
        assert layer._inference_plan is None and not layer.weight.interleaved
        layer.eval()
        assert torch.equal(layer(x), want)
        # a cast to another precision and back (Module._apply): the same 4-bit bytes, a rounded bias
        layer.to(torch.bfloat16).float()
        want = layer(x)
        assert torch.equal(want, _fresh_output(layer, x))
        # a bias of another dtype: cast in place on first use, as bitsandbytes does
        layer.bias.data = layer.bias.data.bfloat16()
        assert torch.equal(layer(x), want) and layer.bias.dtype == torch.float32
        # the bias changed in place, replaced, removed
        layer.bias.add_(1.0)
        torch.testing.assert_close(layer(x), want + 1.0)
        layer.bias = torch.nn.Parameter(torch.randn(200))
        assert torch.equal(layer(x), _fresh_output(layer, x))
        layer.bias = None
        no_bias = layer(x)
        assert torch.equal(no_bias, _fresh_output(layer, x))
        del layer.bias
        layer.bias = torch.ones(200)  # a plain attribute now, no parameter
        torch.testing.assert_close(layer(x), no_bias + 1.0)
        del layer.bias
        layer.register_parameter("bias", None)
        # another input dtype, another compute dtype: the full path casts; bfloat16 input to a
        # bfloat16 layer needs no cast and takes the plan of the call before it
        calls = len(full_path_calls)
        assert layer(x.bfloat16()).dtype == torch.bfloat16
        layer.compute_dtype = torch.bfloat16
        assert torch.equal(layer(x), layer(x.bfloat16()).float())
        assert len(full_path_calls) == calls + 2
        layer.compute_dtype = torch.float32
        # another backend for a block: its kernel
        want = layer(x)
        with registry.use("reference"):
            reference = layer(x)
        assert not torch.equal(reference, want)
        torch.testing.assert_close(reference, want, rtol=1e-5, atol=1e-5)
        assert torch.equal(layer(x), want)  # and the cpu backend's again after the block
    # a gradient wanted: autograd's product of the same weight
    x.requires_grad_(True)
    layer(x).sum().backward()
    dense = F.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    torch.testing.assert_close(x.grad, dense.sum(0).expand(2, -1))
    # the weight's bytes and state swapped for another's, under the same parameter object
    other = _layer(seed=4).eval()
    with torch.no_grad():
        want = other(x)
        layer.weight.data, layer.weight.quant_state = other.weight.data, other.weight.quant_state
        layer.bias = other.bias
        assert torch.equal(layer(x), want)


def test_the_plan_reads_the_weight_where_its_storage_is_now():
    """FSDP frees a parameter's storage after a forward and re-allocates it for the next, under the
    same parameter object and state: the plan must not keep the old address."""
    layer = _layer().eval()
    x = torch.randn(1, 576)
    with torch.no_grad():
        layer(x)
        want = layer(x)  # through the plan, its product bound to the weight
        saved = layer.weight.data.clone()
        storage = layer.weight.untyped_storage()
        old = storage.data_ptr()
        holds = []  # buffers of 0xFF bytes that take freed memory, until the storage lands elsewhere
        while storage.data_ptr() == old and len(holds) < 16:  # the allocator may hand the bytes back
            storage.resize_(0)
            holds.append(torch.full((saved.nbytes,), 0xFF, dtype=torch.uint8))
            storage.resize_(saved.nbytes)
        assert storage.data_ptr() != old
        layer.weight.data.copy_(saved)
        assert torch.equal(layer(x), want)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="maps and unmaps memory through libc's mmap")
@pytest.mark.parametrize("precision", ["fast", "float32"])
def test_a_product_computes_as_before_once_the_layer_that_followed_it_is_unmapped(precision):
    """A product's idle workers prefetch the layer that followed it the last time
    (csrc/cpu/call_order.h). Once that layer's memory is unmapped the hint points at nothing:
    the prefetch must not fault, and nothing else may change."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype, libc.mmap.argtypes = ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int,
                                                               ctypes.c_int, ctypes.c_int, ctypes.c_long]  # fmt: skip
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    # 1024 x 2048: the product splits across two threads (its grain is 2^20 weights a thread)
    first, second = (F.interleave_4bit(*F.quantize_4bit(torch.randn(1024, 2048), quant_type="nf4")) for _ in range(2))
    size = second[0].nbytes
    address = libc.mmap(None, size, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
    assert address not in (None, ctypes.c_void_p(-1).value), ctypes.get_errno()
    mapped = torch.frombuffer((ctypes.c_uint8 * size).from_address(address), dtype=torch.uint8)
    mapped = mapped.view_as(second[0]).copy_(second[0])
    x = torch.randn(1, 2048)
    threads, previous = torch.get_num_threads(), lowbit.set_cpu_precision(precision)
    torch.set_num_threads(2)
    try:
        want = lowbit.matmul_4bit(x, *first)
        for _ in range(3):  # the first product learns that the mapped one follows it
            lowbit.matmul_4bit(x, *first)
            assert torch.equal(lowbit.matmul_4bit(x, mapped, second[1]), lowbit.matmul_4bit(x, *second))
        del mapped
        assert libc.munmap(address, size) == 0
        assert torch.equal(lowbit.matmul_4bit(x, *first), want)
        time.sleep(0.01)  # the worker prefetches its share of the unmapped layer meanwhile
        assert torch.equal(lowbit.matmul_4bit(x, *first), want)
    finally:
        torch.set_num_threads(threads)
        lowbit.set_cpu_precision(previous)


def test_bad_input_after_the_plan_is_refused_as_before():
    layer = _layer().eval()
    bad_inputs = [
        (torch.randn(1, 575), ValueError, r"A has shape \(1, 575\).*last dimension must be 576"),
        (torch.ones(1, 576, dtype=torch.int64), ValueError, "input must be a floating-point tensor"),
        ([0.0] * 576, TypeError, "input must be a torch.Tensor"),
        (torch.randn(1, 576, device="meta"), ValueError, "input is on meta, expected cpu"),
    ]
    with torch.no_grad():
        for x, error, message in bad_inputs:
            layer(torch.randn(1, 576))  # a good call first: the next one meets the plan
            with pytest.raises(error, match=message):
                layer(x)
        assert layer(torch.randn(0, 576)).shape == (0, 200)  # no rows: no product, an empty output
        layer(torch.randn(1, 576))
        layer.bias.data = torch.randn(199)
        with pytest.raises(ValueError, match="bias must have 200 values, got 199"):
            layer(torch.randn(1, 576))


def test_copies_of_a_layer_do_not_share_its_plan():
    layer = _layer().eval()
    x = torch.randn(1, 576)
    with torch.no_grad():
        want = layer(x)
        for copied in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
            assert copied._inference_plan is None
            copied.load_state_dict(_layer(seed=3).state_dict())
            assert not torch.equal(copied(x), want)
            assert torch.equal(layer(x), want)
