"""The benchmark cases. Each builder makes its tensors once and returns one :class:`Impl` per
implementation (lowbit first, then bitsandbytes, then torch; the first of each library is the one
the table's ratios use, later ones are shown as extra rows). Every library runs on the same
tensors; 4-bit weights are quantized once by lowbit, and bitsandbytes gets the same bytes (the
quantize cases check that both libraries produce identical bytes).
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import math
from typing import Any, Callable, Optional

import bench_machine
import torch
import torch.nn.functional as TF
from bench_core import Case, Check, Impl, Verdict, all_of, close_to, equals, rel_err, same_as, unavailable

K = N = 4096  # in_features, out_features of every weight
ELEMENTS = K * N  # 16.8M
BLOCKSIZE_4BIT = 64
INT4PACK_GROUP = 64
LLM_INT8_THRESHOLD = 6.0
OUTLIER_COLUMNS = (11, 1000, 2047, 3333)  # activation features above the threshold (LLM.int8)

Factory = Callable[[], Callable[[], Any]]  # builds an implementation's zero-argument callable


# ------------------------------------------------------------------------------------------
# Libraries
# ------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Libs:
    lowbit: Any
    F: Any  # lowbit.functional
    bnb: Any  # bitsandbytes, or None
    BF: Any  # bitsandbytes.functional, or None
    bnb_missing: str  # why bitsandbytes is None

    @classmethod
    def load(cls) -> Libs:
        import lowbit
        import lowbit.functional

        try:
            import bitsandbytes
            import bitsandbytes.functional

            return cls(lowbit, lowbit.functional, bitsandbytes, bitsandbytes.functional, "")
        except Exception as err:  # noqa: BLE001 (a broken install raises all sorts of things)
            return cls(lowbit, lowbit.functional, None, None, f"bitsandbytes not importable: {err}")

    def impl(self, lib: str, label: str, factory: Factory, **kwargs: Any) -> Impl:
        """An implementation whose callable ``factory`` builds; n/a (with the reason) if the
        library is missing or the factory fails, e.g. because the library lacks the API."""
        if lib == "bitsandbytes" and self.bnb is None:
            return unavailable(lib, label, self.bnb_missing)
        try:
            return Impl(lib, label, factory(), **kwargs)
        except Exception as err:  # noqa: BLE001
            return unavailable(lib, label, f"{type(err).__name__}: {err}"[:200])


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def weight(dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """An [N, K] weight scaled by 1/sqrt(K), so activations keep their size layer after layer."""
    return (torch.randn(N, K, generator=_generator(seed)) / math.sqrt(K)).to(dtype)


def activations(rows: int, dtype: torch.dtype, seed: int = 1) -> torch.Tensor:
    return torch.randn(rows, K, generator=_generator(seed)).to(dtype)


def calling(get: Callable[[], Callable[..., Any]], *args: Any, **kwargs: Any) -> Factory:
    """A factory for :meth:`Libs.impl`: looks the function up when the case is built (so a
    library lacking it gives an n/a with the AttributeError) and binds the arguments."""

    def factory() -> Callable[[], Any]:
        fn = get()
        return lambda: fn(*args, **kwargs)

    return factory


def module_call(make: Callable[[], Any], x: torch.Tensor) -> Factory:
    """A factory for an inference call ``layer(x)`` of the module ``make()`` builds."""

    def factory() -> Callable[[], Any]:
        layer = make()

        def call() -> Any:
            with torch.no_grad():
                return layer(x)

        return call

    return factory


def agrees_with(lib: str, tol: float) -> Check:
    """Within ``tol`` (relative to max |output|) of ``lib``'s output; says if bit-identical."""

    def check(out: Any, primary: dict[str, Any]) -> Optional[Verdict]:
        if lib not in primary:
            return None
        if torch.equal(out, primary[lib]):
            return Verdict(True, f"bit-identical to {lib}")
        err = rel_err(out, primary[lib])
        return Verdict(err <= tol, f"rel diff {err:.1e} vs {lib} (tol {tol:.0e})")

    return check


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


# ------------------------------------------------------------------------------------------
# 4-bit weights shared by the gemv, matmul and decode cases
# ------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Weight4bit:
    packed: torch.Tensor  # bitsandbytes layout: [N*K/2, 1] uint8
    state: Any  # lowbit QuantState (absmax float32, not double-quantized)

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes + self.state.absmax.nbytes

    def dense(self, dtype: torch.dtype) -> torch.Tensor:
        """The dequantized [N, K] weight (what every implementation multiplies by)."""
        return torch.ops.lowbit.dequantize_4bit(
            self.packed, self.state.absmax, self.state.blocksize, self.state.quant_type, [N, K], dtype
        )


def quantize_nf4(libs: Libs, dtype: torch.dtype, seed: int = 0) -> Weight4bit:
    packed, state = libs.F.quantize_4bit(weight(dtype, seed), blocksize=BLOCKSIZE_4BIT, quant_type="nf4")
    return Weight4bit(packed, state)


def bnb_state_4bit(libs: Libs, w: Weight4bit, dtype: torch.dtype) -> Any:
    """A bitsandbytes QuantState for the same packed bytes."""
    return libs.BF.QuantState(
        absmax=w.state.absmax.clone(),
        shape=torch.Size([N, K]),
        code=libs.BF.get_4bit_type("nf4", device="cpu"),
        blocksize=w.state.blocksize,
        quant_type="nf4",
        dtype=dtype,
    )


def bnb_cpu_layout(libs: Libs, w: Weight4bit, dtype: torch.dtype) -> tuple[torch.Tensor, Any]:
    """The weight as ``bitsandbytes.nn.Linear4bit`` holds it for CPU inference on AVX512-BF16
    machines (repacked for its fused kernel, absmax in bf16); its gemv_4bit CPU kernel expects
    this layout and returns wrong values for the standard one."""
    if not libs.BF.has_avx512bf16():
        raise RuntimeError("no AVX512-BF16: bitsandbytes keeps the standard layout here")
    return libs.BF._convert_weight_packed_for_cpu(w.packed.clone(), bnb_state_4bit(libs, w, dtype))


BNB_CPU_LAYOUT = "Linear4bit CPU layout"
BNB_STD_LAYOUT = "standard layout"


def bnb_4bit_impls(
    libs: Libs, w: Weight4bit, dtype: torch.dtype, call: Callable[[torch.Tensor, Any], Any], label: str, **kwargs: Any
) -> list[Impl]:
    """bitsandbytes on the layout its Linear4bit uses for CPU inference (primary, when this CPU
    has it), then on the standard layout."""
    impls = []
    if libs.bnb is not None and libs.BF.has_avx512bf16():

        def on_cpu_layout() -> Callable[[], Any]:
            packed, state = bnb_cpu_layout(libs, w, dtype)
            return lambda: call(packed, state)

        impls.append(libs.impl("bitsandbytes", f"{label}, {BNB_CPU_LAYOUT}", on_cpu_layout, **kwargs))

    def on_standard_layout() -> Callable[[], Any]:
        state = bnb_state_4bit(libs, w, dtype)
        return lambda: call(w.packed, state)

    impls.append(libs.impl("bitsandbytes", f"{label}, {BNB_STD_LAYOUT}", on_standard_layout, **kwargs))
    return impls


@dataclasses.dataclass
class Int4Pack:
    """torch's own int4 weight-only format for CPU (group-wise scale and zero point)."""

    packed: torch.Tensor
    scales_zeros: torch.Tensor

    @classmethod
    def random(cls, dtype: torch.dtype, seed: int = 7) -> Int4Pack:
        q = torch.randint(0, 16, (N, K), dtype=torch.int32, generator=_generator(seed))
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        # (q - 8) * scale + zero with std(q - 8) ~ 4.6: weights of std ~1/sqrt(K), like weight()
        scales_zeros = torch.zeros(K // INT4PACK_GROUP, N, 2, dtype=dtype)
        scales_zeros[..., 0] = 1 / (4.6 * math.sqrt(K))
        return cls(packed, scales_zeros)

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes + self.scales_zeros.nbytes

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.packed, INT4PACK_GROUP, self.scales_zeros)


INT4PACK_LABEL = f"aten._weight_int4pack_mm_for_cpu (int4 g{INT4PACK_GROUP}, timing only)"
#: The read stream timed beside each decode (bench_report's '% of read' divides by its rate).
SIDE_READ_LABEL = "src.sum() over lowbit's bytes in huge pages: the read bandwidth, side by side"


def int4pack_impl(libs: Libs, x: torch.Tensor) -> Impl:
    def factory() -> Callable[[], Any]:
        w = Int4Pack.random(x.dtype)
        return lambda: w(x)

    return libs.impl("torch", INT4PACK_LABEL, factory)


# ------------------------------------------------------------------------------------------
# Cases
# ------------------------------------------------------------------------------------------
def gemv_4bit(libs: Libs, dtype: torch.dtype) -> list[Impl]:
    w = quantize_nf4(libs, dtype)
    x = activations(1, dtype)
    dense = w.dense(dtype)
    check = close_to(x.double() @ w.dense(torch.float32).double().T, 1e-2, "fp64 product")
    impls = [
        libs.impl("lowbit", "F.gemv_4bit", calling(lambda: libs.F.gemv_4bit, x, w.packed, state=w.state), check=check),
        *bnb_4bit_impls(
            libs, w, dtype, lambda B, state: libs.BF.gemv_4bit(x, B, state=state), "F.gemv_4bit", check=check
        ),
        Impl("torch", f"F.linear {dtype_name(dtype)}, dense dequantized weight", lambda: TF.linear(x, dense), check=check),
    ]
    if dtype == torch.bfloat16:
        impls.append(int4pack_impl(libs, x))
    return impls


def _lowbit_matmul_4bit(libs: Libs, x: torch.Tensor, w: Weight4bit, check: Check) -> Impl:
    """The first matmul_4bit lowbit offers: bitsandbytes' top-level name, then the autograd
    module's, then the raw op."""
    candidates = [
        ("lowbit.matmul_4bit", calling(lambda: libs.lowbit.matmul_4bit, x, w.packed.t(), w.state)),
        (
            "lowbit.autograd.matmul_4bit",
            calling(lambda: importlib.import_module("lowbit.autograd").matmul_4bit, x, w.packed.t(), w.state),
        ),
        (
            "torch.ops.lowbit.matmul_4bit",
            calling(lambda: torch.ops.lowbit.matmul_4bit, x, w.packed, [N, K], w.state.absmax, w.state.code, w.state.blocksize),
        ),
    ]
    reasons = []
    for label, factory in candidates:
        found = libs.impl("lowbit", label, factory, check=check)
        if found.fn is not None:
            return found
        reasons.append(f"{label}: {found.reason}")
    return unavailable("lowbit", "matmul_4bit", "; ".join(reasons))


def matmul_4bit(libs: Libs, rows: int, dtype: torch.dtype) -> list[Impl]:
    w = quantize_nf4(libs, dtype)
    x = activations(rows, dtype)
    dense = w.dense(dtype)
    check = close_to(x.double() @ w.dense(torch.float32).double().T, 1e-2, "fp64 product")
    return [
        _lowbit_matmul_4bit(libs, x, w, check),
        *bnb_4bit_impls(
            libs, w, dtype, lambda B, state: libs.bnb.matmul_4bit(x, B.t(), state), "bnb.matmul_4bit", check=check
        ),
        Impl("torch", f"F.linear {dtype_name(dtype)}, dense dequantized weight", lambda: TF.linear(x, dense), check=check),
        int4pack_impl(libs, x),
    ]


NO_TORCH_FORMAT = "torch has no NF4 / blockwise-dynamic 8-bit format"


def quantize_4bit(libs: Libs, dtype: torch.dtype) -> list[Impl]:
    W = weight(dtype)
    check = same_as("bitsandbytes", "packed bytes and absmax")
    return [
        libs.impl("lowbit", "F.quantize_4bit nf4",
                  calling(lambda: libs.F.quantize_4bit, W, blocksize=BLOCKSIZE_4BIT, quant_type="nf4"), check=check),
        libs.impl("bitsandbytes", "F.quantize_4bit nf4",
                  calling(lambda: libs.BF.quantize_4bit, W, blocksize=BLOCKSIZE_4BIT, quant_type="nf4")),
        unavailable("torch", "", NO_TORCH_FORMAT),
    ]  # fmt: skip


def dequantize_4bit(libs: Libs, dtype: torch.dtype) -> list[Impl]:
    w = quantize_nf4(libs, dtype)
    check = same_as("bitsandbytes")
    return [
        libs.impl("lowbit", "F.dequantize_4bit nf4", calling(lambda: libs.F.dequantize_4bit, w.packed, w.state), check=check),
        libs.impl("bitsandbytes", "F.dequantize_4bit nf4",
                  calling(lambda: libs.BF.dequantize_4bit, w.packed, bnb_state_4bit(libs, w, dtype))),
        unavailable("torch", "", NO_TORCH_FORMAT),
    ]


def dequantize_4bit_out(libs: Libs, dtype: torch.dtype) -> list[Impl]:
    """dequantize_4bit into a preallocated ``out=``: the kernel alone. A fresh output (the plain
    dequantize_4bit rows) pays for first-touching its pages (64 MiB for fp32), several times the
    kernel's time for both libraries; here each library writes its own buffer, touched by a first
    call when the case is built (which also shows n/a for a library that cannot write into out=)."""
    w = quantize_nf4(libs, dtype)
    check = same_as("bitsandbytes")

    def into_out(fn: Callable[[], Callable[..., Any]], state: Callable[[], Any]) -> Factory:
        def factory() -> Callable[[], Any]:
            dequantize, st = fn(), state()
            out = torch.empty(N, K, dtype=dtype)
            dequantize(w.packed, st, out=out)
            return lambda: dequantize(w.packed, st, out=out)

        return factory

    return [
        libs.impl("lowbit", "F.dequantize_4bit nf4, out=", into_out(lambda: libs.F.dequantize_4bit, lambda: w.state),
                  check=check),
        libs.impl("bitsandbytes", "F.dequantize_4bit nf4, out=",
                  into_out(lambda: libs.BF.dequantize_4bit, lambda: bnb_state_4bit(libs, w, dtype))),
        unavailable("torch", "", NO_TORCH_FORMAT),
    ]  # fmt: skip


def quantize_blockwise(libs: Libs, dtype: torch.dtype) -> list[Impl]:
    W = weight(dtype)
    return [
        libs.impl("lowbit", "F.quantize_blockwise", calling(lambda: libs.F.quantize_blockwise, W),
                  check=same_as("bitsandbytes", "codes and absmax")),
        libs.impl("bitsandbytes", "F.quantize_blockwise", calling(lambda: libs.BF.quantize_blockwise, W)),
        unavailable("torch", "", NO_TORCH_FORMAT),
    ]  # fmt: skip


def dequantize_blockwise(libs: Libs, dtype: torch.dtype) -> list[Impl]:
    q, state = libs.F.quantize_blockwise(weight(dtype))

    def bnb_factory() -> Callable[[], Any]:
        bnb_state = libs.BF.QuantState(
            absmax=state.absmax.clone(), code=libs.BF.create_dynamic_map(), blocksize=state.blocksize, dtype=dtype
        )
        return lambda: libs.BF.dequantize_blockwise(q, bnb_state)

    return [
        libs.impl("lowbit", "F.dequantize_blockwise", calling(lambda: libs.F.dequantize_blockwise, q, state),
                  check=same_as("bitsandbytes")),
        libs.impl("bitsandbytes", "F.dequantize_blockwise", bnb_factory),
        unavailable("torch", "", NO_TORCH_FORMAT),
    ]  # fmt: skip


def int8_gemm(libs: Libs, rows: int) -> list[Impl]:
    g = _generator(5)
    A = torch.randint(-127, 128, (rows, K), dtype=torch.int8, generator=g)
    B = torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=g)
    # float64 holds every partial sum exactly (|sum| <= 127 * 127 * K < 2**53); torch._int_mm is
    # checked too: oneDNN's AVX2 s8s8 kernel saturates 16-bit intermediate sums (wrong results on
    # CPUs without AVX-512)
    exact = equals((A.double() @ B.double().t()).to(torch.int32), "exact int32 product")
    return [
        libs.impl("lowbit", "F.int8_linear_matmul", calling(lambda: libs.F.int8_linear_matmul, A, B), check=exact),
        libs.impl("bitsandbytes", "F.int8_linear_matmul", calling(lambda: libs.BF.int8_linear_matmul, A, B), check=exact),
        libs.impl("torch", "torch._int_mm(A, B.t())", calling(lambda: torch._int_mm, A, B.t()), check=exact),
    ]


def _linear8bitlt(nn: Any, W: torch.Tensor) -> Any:
    layer = nn.Linear8bitLt(K, N, bias=False, has_fp16_weights=False, threshold=LLM_INT8_THRESHOLD)
    layer.weight = nn.Int8Params(W.clone(), requires_grad=False, has_fp16_weights=False)
    return layer.to("cpu").eval()


def _lowbit_llm_int8(libs: Libs, W: torch.Tensor, x: torch.Tensor, check: Check) -> Impl:
    """``lowbit.nn.Linear8bitLt`` if lowbit has it, else the same computation from functional ops."""
    make = lambda: _linear8bitlt(importlib.import_module("lowbit.nn"), W)  # noqa: E731
    found = libs.impl("lowbit", "lowbit.nn.Linear8bitLt", module_call(make, x), check=check)
    if found.fn is not None:
        return found
    F = libs.F
    CB, SCB, _ = F.int8_vectorwise_quant(W)

    def functional() -> torch.Tensor:
        q, row_stats, outliers = F.int8_vectorwise_quant(x, LLM_INT8_THRESHOLD)
        out = F.int8_mm_dequant(F.int8_linear_matmul(q, CB), row_stats, SCB)
        if outliers is not None and outliers.numel():  # outlier features in fp16, as bitsandbytes
            w_outliers = (CB[:, outliers].float() * SCB[:, None] / 127).to(x.dtype)
            out += x[:, outliers] @ w_outliers.T
        return out

    return Impl("lowbit", "int8_vectorwise_quant + int8_linear_matmul + int8_mm_dequant", functional, check=check)


def llm_int8_linear(libs: Libs, rows: int) -> list[Impl]:
    W = weight(torch.float16)
    x = activations(rows, torch.float16)
    x[:, list(OUTLIER_COLUMNS)] = 8.0  # a few outlier features, as LLM.int8 is designed for
    check = all_of(close_to(x.double() @ W.double().T, 2e-2, "fp64 product"), agrees_with("bitsandbytes", 1e-2))
    return [  # fmt: skip
        _lowbit_llm_int8(libs, W, x, check),
        libs.impl("bitsandbytes", "bnb.nn.Linear8bitLt", module_call(lambda: _linear8bitlt(libs.bnb.nn, W), x),
                  check=close_to(x.double() @ W.double().T, 2e-2, "fp64 product")),
        Impl("torch", "F.linear fp16, dense weight", lambda: TF.linear(x, W)),
    ]


def _optimizer_step(make: Callable[[list[torch.Tensor]], Any], p0: torch.Tensor, grad: torch.Tensor) -> Callable:
    def factory() -> Callable[[], Any]:
        p = torch.nn.Parameter(p0.clone())
        p.grad = grad.clone()
        return make([p]).step

    return factory


def adam8bit_agreement(libs: Libs, numel: int = 1 << 20, steps: int = 3) -> Check:
    """lowbit's and bitsandbytes' AdamW8bit from the same start with the same gradients:
    identical 8-bit state codes in >= 99.9% of entries (docs/design.md §5) and matching parameters.
    Run on 1M parameters (the kernels are the same at any size) to keep the check cheap."""

    def run(optim: Any) -> tuple[torch.Tensor, Any]:
        g = _generator(11)
        p = torch.nn.Parameter(torch.randn(numel, generator=g) * 0.1)
        opt = optim.AdamW8bit([p])
        for _ in range(steps):
            p.grad = torch.randn(numel, generator=g) * 0.01
            opt.step()
        return p.detach(), opt.state[p]

    def check(_: Any, __: dict[str, Any]) -> Optional[Verdict]:
        if libs.bnb is None:
            return None
        (p, state), (bp, bstate) = run(libs.lowbit.optim), run(libs.bnb.optim)
        codes = min((state[k] == bstate[k]).float().mean().item() for k in ("state1", "state2"))
        err = rel_err(p, bp)
        return Verdict(
            codes >= 0.999 and err <= 1e-5,
            f"{codes:.3%} of state codes and params (rel diff {err:.0e}) = bitsandbytes ({numel >> 20}M params, {steps} steps)",
        )

    return check


def adamw_step(libs: Libs, numel: int) -> list[Impl]:
    g = _generator(9)
    p0 = torch.randn(numel, generator=g) * 0.1
    grad = torch.randn(numel, generator=g) * 0.01
    torch_adamw = torch.optim.AdamW
    return [
        libs.impl("lowbit", "lowbit.optim.AdamW8bit", _optimizer_step(lambda ps: libs.lowbit.optim.AdamW8bit(ps), p0, grad),
                  check=adam8bit_agreement(libs)),
        libs.impl("bitsandbytes", "bnb.optim.AdamW8bit", _optimizer_step(lambda ps: libs.bnb.optim.AdamW8bit(ps), p0, grad)),
        libs.impl("torch", "optim.AdamW fp32 (default: for-loop)", _optimizer_step(torch_adamw, p0, grad)),
        libs.impl("torch", "optim.AdamW fp32 foreach=True", _optimizer_step(lambda ps: torch_adamw(ps, foreach=True), p0, grad)),
        libs.impl("torch", "optim.AdamW fp32 fused=True", _optimizer_step(lambda ps: torch_adamw(ps, fused=True), p0, grad)),
    ]  # fmt: skip


def decode_layers(llc_bytes: int) -> int:
    """Layers of 4096x4096 4-bit weights in a decode stack: at least 20 and packed weights of at
    least 2.5x the last-level cache, so every token streams the weights from memory."""
    per_layer = N * K // 2
    return max(20, math.ceil(2.5 * llc_bytes / per_layer))


#: Layer variant v is the stack's weight with its rows rolled by v * ROLL_ROWS: distinct weights
#: (activations keep their size through the stack) without quantizing again.
ROLL_ROWS = 17


@dataclasses.dataclass
class DecodeStack:
    """``rows`` tokens through ``layers`` 4096x4096 4-bit layers; layer j multiplies by variant
    j % variants of one quantized weight. The 4-bit implementations keep a separate copy of their
    tensors for every layer; dense float weights (4x the bytes) keep one copy per variant, and
    there are enough variants for those copies to hold 2.5x the LLC: no layer's bytes are in cache
    when a token reaches it, for any implementation."""

    libs: Libs
    quant_type: str
    nested: bool
    dtype: torch.dtype
    rows: int
    layers: int
    variants: int
    base: tuple[torch.Tensor, Any]  # lowbit's standard (packed, QuantState)

    @classmethod
    def build(cls, libs: Libs, llc: int, layers: int, quant_type: str, nested: bool, dtype, rows: int) -> DecodeStack:
        base = libs.F.quantize_4bit(
            weight(torch.float32), blocksize=BLOCKSIZE_4BIT, quant_type=quant_type, compress_statistics=nested
        )
        variants = min(layers, math.ceil(2.5 * llc / (N * K * torch.finfo(dtype).bits // 8)))
        return cls(libs, quant_type, nested, dtype, rows, layers, variants, base)

    def variant(self, v: int) -> tuple[torch.Tensor, Any]:
        """Variant v as new tensors: lowbit's standard (packed, QuantState)."""
        packed, state = self.base
        shift = v * ROLL_ROWS
        state = copy.copy(state)
        state.absmax = state.absmax.view(N, -1).roll(shift, 0).reshape(-1)
        return packed.view(N, K // 2).roll(shift, 0).reshape(-1, 1), state

    def per_layer(self, make: Callable[[torch.Tensor, Any], Any]) -> list[Any]:
        """make(packed, state) for every layer: separate copies, layer j holding variant j % variants."""
        return [make(*self.variant(j % self.variants)) for j in range(self.layers)]

    def dense(self) -> list[Any]:
        """The dequantized weights in the activations' dtype, one copy per variant, cycled."""
        weights = []
        for v in range(self.variants):
            packed, state = self.variant(v)
            weights.append(self.libs.F.dequantize_4bit(packed, state).to(self.dtype))
        return [weights[j % self.variants] for j in range(self.layers)]


def bnb_state(libs: Libs, state: Any, dtype: torch.dtype) -> Any:
    """bitsandbytes' QuantState for lowbit's (possibly double-quantized) state of the same bytes."""
    nested = None
    if state.nested:
        s2 = state.state2
        nested = libs.BF.QuantState(absmax=s2.absmax.clone(), code=s2.code.clone(), blocksize=s2.blocksize,
                                    dtype=torch.float32)  # fmt: skip
    return libs.BF.QuantState(
        absmax=state.absmax.clone(), shape=torch.Size([N, K]), code=libs.BF.get_4bit_type(state.quant_type, device="cpu"),
        blocksize=state.blocksize, quant_type=state.quant_type, dtype=dtype,
        offset=None if nested is None else state.offset.clone(), state2=nested,
    )  # fmt: skip


def _run_stack(x: torch.Tensor, step: Callable[[Any, torch.Tensor], torch.Tensor], layers: list[Any]) -> Callable:
    """One pass through the stack; returns (first layer's output, last layer's output)."""

    def run() -> tuple[torch.Tensor, torch.Tensor]:
        first = h = step(layers[0], x)
        for layer in layers[1:]:
            h = step(layer, h)
        return first, h

    return run


def stack_check(first_reference: torch.Tensor, layers: int) -> Check:
    """The first layer within 1e-2 of the float64 product, and the stack's output within 0.1 of
    torch's (the same weights, dequantized: bf16/fp16 activations drift apart a little per layer)."""

    def check(out: Any, primary: dict[str, Any]) -> Verdict:
        first = rel_err(out[0], first_reference)
        notes = [f"layer 1: rel err {first:.1e} vs fp64 product (tol 1e-02)"]
        ok = first <= 1e-2
        if "torch" in primary:
            last = rel_err(out[1], primary["torch"][1])
            notes.append(f"layer {layers}: rel diff {last:.1e} vs torch (tol 1e-01)")
            ok = ok and last <= 0.1
        return Verdict(ok, "; ".join(notes))

    return check


def lowbit_layer(libs: Libs, packed: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]:
    """What a Linear4bit placed for CPU inference holds (the interleaved layout) when this lowbit
    has one; else the standard bytes."""
    interleave = getattr(libs.F, "interleave_4bit", None)
    return interleave(packed, state) if interleave is not None else (packed, state)


def lowbit_bytes(packed: torch.Tensor, state: Any) -> int:
    """Bytes a product reads per layer: the packed weight and the absmax it uses (decoded float32
    in the interleaved layout; the nested codes and their tables in the standard one)."""
    total = packed.nbytes + state.absmax.nbytes
    if state.nested and not getattr(state, "interleaved", False):
        total += state.state2.absmax.nbytes
    return total


def bnb_cpu_bytes(layer: tuple[torch.Tensor, Any]) -> int:
    packed, state = layer
    return packed.nbytes + state.absmax.nbytes  # absmax in bf16, decoded from double quantization


def decode_stack(libs: Libs, stack: DecodeStack, with_standard_bnb: bool = False) -> list[Impl]:
    """The stack on every implementation: lowbit's interleaved layout, bitsandbytes' CPU layout
    (and its standard one), torch's dense F.linear and int4pack."""
    x = activations(stack.rows, stack.dtype)
    first_weight = libs.F.dequantize_4bit(*stack.variant(0))
    check = stack_check(x.double() @ first_weight.double().T, stack.layers)
    lowbit_per_layer = lowbit_bytes(*lowbit_layer(libs, *stack.variant(0)))

    def lowbit_stack() -> Callable[[], Any]:
        layers = stack.per_layer(lambda packed, state: lowbit_layer(libs, packed, state))
        return _run_stack(x, lambda layer, h: libs.lowbit.matmul_4bit(h, layer[0], layer[1]), layers)

    def bnb_stack(cpu_layout: bool) -> Callable[[], Callable[[], Any]]:
        def factory() -> Callable[[], Any]:
            if cpu_layout and not libs.BF.has_avx512bf16():
                raise RuntimeError("no AVX512-BF16: bitsandbytes keeps the standard layout here")

            def make(packed: torch.Tensor, state: Any) -> Any:
                layer = (packed, bnb_state(libs, state, stack.dtype))
                return libs.BF._convert_weight_packed_for_cpu(*layer) if cpu_layout else layer

            layers = stack.per_layer(make)
            impls_bytes[cpu_layout] = stack.layers * (bnb_cpu_bytes(layers[0]) if cpu_layout else lowbit_bytes(*stack.base))
            return _run_stack(x, lambda layer, h: libs.bnb.matmul_4bit(h, layer[0].t(), layer[1]), layers)

        return factory

    impls_bytes: dict[bool, int] = {}
    int4 = Int4Pack.random(stack.dtype)  # timing only: random int4 weights, one copy per layer
    impls = [
        libs.impl("lowbit", "lowbit.matmul_4bit per layer, interleaved layout (Linear4bit in eval mode)",
                  lowbit_stack, check=check, bytes_read=stack.layers * lowbit_per_layer),
        libs.impl("bitsandbytes", f"bnb.matmul_4bit per layer, {BNB_CPU_LAYOUT}", bnb_stack(True), check=check),
    ]  # fmt: skip
    if with_standard_bnb:
        impls.append(libs.impl("bitsandbytes", f"bnb.matmul_4bit per layer, {BNB_STD_LAYOUT}", bnb_stack(False),
                               check=check))  # fmt: skip
    for impl in impls[1:]:
        impl.bytes_read = impls_bytes.get(BNB_CPU_LAYOUT in impl.label)
    dense = stack.dense()
    impls += [
        Impl("torch", f"F.linear {dtype_name(stack.dtype)} per layer, dense dequantized weights "
             f"({stack.variants} copies, cycled)", _run_stack(x, lambda w, h: TF.linear(h, w), dense), check=check,
             bytes_read=stack.layers * dense[0].nbytes),
        libs.impl("torch", INT4PACK_LABEL,
                  lambda: _run_stack(x, lambda w, h: w(h), [Int4Pack(int4.packed.clone(), int4.scales_zeros.clone())
                                                            for _ in range(stack.layers)]),
                  bytes_read=stack.layers * int4.nbytes),
    ]  # fmt: skip
    # the machine's read rate in the same rotation as the decodes: a shared host's bandwidth moves
    # between cases (2x within minutes on a 2-vCPU EPYC), so a rate taken once would not do
    src = bench_machine.huge_page_ones(stack.layers * lowbit_per_layer // 4)
    impls.append(Impl("torch", SIDE_READ_LABEL, lambda: src.sum(), bytes_read=src.nbytes))
    if stack.rows == 1:  # the bandwidth-bound decode
        impls.append(libs.impl("lowbit", NATIVE_STACK_LABEL, lambda: lowbit_native_stack(libs, stack, x), check=check,
                               bytes_read=stack.layers * lowbit_per_layer))  # fmt: skip
    return impls


#: The decode row that takes Python out: what lowbit's per-call Python costs is its difference.
NATIVE_STACK_LABEL = "the same products through the C ABI, arguments prepared: no Python between layers"


def stack_arguments(x: torch.Tensor, layers: list[Any], outs: list[torch.Tensor], precision: str) -> list[tuple]:
    """The arguments of ``lowbit_matmul_4bit_interleaved`` for each layer (packed weight, state) of a
    stack in the interleaved layout: ``x`` into the first, each output into the next. The tensors
    must outlive the calls (the tuples hold their addresses)."""
    import lowbit.backends.cpu.native as native

    dtype = native.DTYPES[x.dtype]
    return [
        (dtype, a.data_ptr(), x.shape[0], K, B.data_ptr(), B.nbytes, s.absmax.data_ptr(), s.absmax.numel(),
         s.code.data_ptr(), s.code.numel(), N, s.blocksize, None, 0, 0, native.PRECISIONS[precision], dtype,
         o.data_ptr(), torch.get_num_threads())
        for a, (B, s), o in zip([x, *outs[:-1]], layers, outs)
    ]  # fmt: skip


def lowbit_native_stack(libs: Libs, stack: DecodeStack, x: torch.Tensor) -> Callable[[], Any]:
    """lowbit's layers called as its decode path calls the library (the same function, the same
    arguments, the CPU precision in force), but with every argument computed beforehand and the
    outputs preallocated."""
    import lowbit.backends.cpu.native as native
    from lowbit.autograd.matmul_4bit import cpu_precision

    layers = stack.per_layer(lambda packed, state: lowbit_layer(libs, packed, state))
    outs = [torch.empty(x.shape[0], N, dtype=x.dtype) for _ in layers]
    call, calls = native.matmul_4bit_interleaved_function(), stack_arguments(x, layers, outs, cpu_precision())

    def run(keep_alive: Any = layers) -> tuple[torch.Tensor, torch.Tensor]:  # the pointers are theirs
        for arguments in calls:
            native.check(call(*arguments), "lowbit_matmul_4bit_interleaved")
        return outs[0], outs[-1]

    return run


def placement(libs: Libs, nested: bool) -> list[Impl]:
    """Placing one 4096x4096 weight for CPU inference: lowbit's layout change (decoding a nested
    absmax once), bitsandbytes' repacking for its CPU kernel, torch's int4pack conversion."""
    packed, state = libs.F.quantize_4bit(weight(torch.float32), quant_type="nf4", compress_statistics=nested)

    def round_trip(out: Any, _: dict[str, Any]) -> Verdict:
        back, back_state = libs.F.deinterleave_4bit(*out)
        same = torch.equal(back, packed) and back_state == state
        return Verdict(same, f"back to the standard bytes and state: {'bit-identical' if same else 'DIFFERENT'}")

    q = torch.randint(0, 16, (N, K), dtype=torch.int32, generator=_generator(7))
    return [
        libs.impl("lowbit", "F.interleave_4bit", calling(lambda: libs.F.interleave_4bit, packed, state), check=round_trip),
        libs.impl("bitsandbytes", "functional._convert_weight_packed_for_cpu (Linear4bit's first CPU inference call)",
                  lambda: lambda: libs.BF._convert_weight_packed_for_cpu(packed.clone(), bnb_state(libs, state, torch.bfloat16))),
        libs.impl("torch", "aten._convert_weight_to_int4pack_for_cpu (from int32 codes)",
                  calling(lambda: torch.ops.aten._convert_weight_to_int4pack_for_cpu, q, 1)),
    ]  # fmt: skip


def resident_bytes(libs: Libs) -> list[tuple[str, int]]:
    """Bytes one 4096x4096 layer keeps in memory for CPU inference, per implementation (the
    weight and its scales; NF4 blocksize 64)."""
    found = []
    for nested in (False, True):
        name = "nf4" + ("-dq" if nested else "")
        packed, state = libs.F.quantize_4bit(weight(torch.float32), quant_type="nf4", compress_statistics=nested)
        found.append((f"{name}, standard layout (checkpoint bytes; lowbit and bitsandbytes)", _state_bytes(packed, state)))
        if hasattr(libs.F, "interleave_4bit"):
            found.append((f"{name}, lowbit interleaved layout (Linear4bit in eval mode)",
                          _state_bytes(*libs.F.interleave_4bit(packed, state))))  # fmt: skip
        if libs.bnb is not None and libs.BF.has_avx512bf16():
            layer = libs.BF._convert_weight_packed_for_cpu(packed.clone(), bnb_state(libs, state, torch.bfloat16))
            found.append((f"{name}, bitsandbytes CPU layout", bnb_cpu_bytes(layer)))
    found.append(("torch int4pack (int4, group 64, bf16 scales and zeros)", Int4Pack.random(torch.bfloat16).nbytes))
    found.append(("torch dense bf16", N * K * 2))
    return found


def precision_errors(libs: Libs) -> list[tuple[str, float, float]]:
    """Error of each product against the float64 product of the same (dequantized) NF4 weight,
    4096x4096, 1 and 16 rows of N(0, 1) activations: (what, max |error| / max |product|, mean
    |error| / mean |product|). lowbit in each CPU precision (1 row: the fixed point on AVX2 /
    AVX512-VNNI; 16 rows: bf16 on AMX where the CPU has it), torch's F.linear on the weight in
    the activations' dtype, and for scale the NF4 quantization itself (the float32 weight's
    product against its NF4 dequantization's)."""
    float_weight = weight(torch.float32)
    packed, state = libs.F.quantize_4bit(float_weight, quant_type="nf4")
    dense = libs.F.dequantize_4bit(packed, state)
    set_precision = getattr(libs.lowbit, "set_cpu_precision", None)
    precisions = getattr(libs.lowbit, "CPU_PRECISIONS", ())
    placed = lowbit_layer(libs, packed, state)
    found = []
    for rows in (1, 16):
        for dtype in (torch.bfloat16, torch.float32):
            x = activations(rows, dtype)
            exact = x.double() @ dense.double().T
            tokens = f"{rows} row{'s' if rows > 1 else ''} of {dtype_name(dtype)} activations"
            for precision in precisions if set_precision is not None else ():
                previous = set_precision(precision)
                try:
                    out = libs.lowbit.matmul_4bit(x, *placed)
                finally:
                    set_precision(previous)
                found.append((f"lowbit, {tokens}, precision {precision!r}", *_errors(out, exact)))
            torch_out = TF.linear(x, dense.to(dtype))
            found.append((f"torch F.linear, {tokens} (weight in {dtype_name(dtype)})", *_errors(torch_out, exact)))
    x = activations(1, torch.float32).double()
    found.append(("NF4 itself: float32 weight vs its NF4 dequantization, 1 row",
                  *_errors(x @ float_weight.double().T, x @ dense.double().T)))  # fmt: skip
    return found


def _errors(out: torch.Tensor, exact: torch.Tensor) -> tuple[float, float]:
    diff = (out.double() - exact).abs()
    return (diff.max() / exact.abs().max()).item(), (diff.mean() / exact.abs().mean()).item()


def _state_bytes(packed: torch.Tensor, state: Any) -> int:
    tensors = [packed, state.absmax, state.code, getattr(state, "absmax_codes", None), state.offset]
    if state.state2 is not None:
        tensors += [state.state2.absmax, state.state2.code]
    return sum(t.nbytes for t in tensors if t is not None)


#: The end-to-end model: SmolLM2-135M-Instruct (docs/design.md §7), decoded greedily with a KV cache.
SMOLLM2_PROMPT_TOKENS = 64


def smollm2_decode(libs: Libs) -> list[Impl]:
    """One greedy decode step of SmolLM2-135M-Instruct through transformers after a 64-token prompt
    (the KV cache is cropped back to the prompt after each step, so every step sees the same
    context): lowbit NF4 and bitsandbytes NF4 (the same quantization through their transformers
    integrations, float32 compute like the fp32 model), and the float32 and bfloat16 models."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, DynamicCache
    from transformers.utils import logging as hf_logging

    from lowbit.integrations import assets
    from lowbit.integrations.transformers import LowbitConfig

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    path = assets.smollm2_dir(log=None)
    prompt = assets.hamlet_ids(AutoTokenizer.from_pretrained(path))[:SMOLLM2_PROMPT_TOKENS][None]

    def decode_step(**load: Any) -> Callable[[], Callable[[], Any]]:
        def factory() -> Callable[[], Any]:
            model = AutoModelForCausalLM.from_pretrained(path, device_map="cpu", **load).eval()
            cache = DynamicCache()
            with torch.no_grad():
                token = model(prompt, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)

            def step() -> torch.Tensor:
                with torch.no_grad():
                    logits = model(token, past_key_values=cache, use_cache=True).logits
                cache.crop(-1)  # back to the prompt: every step sees the same context
                return logits.float()

            return step

        return factory

    nf4 = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": torch.float32}
    check = agrees_with("bitsandbytes", 5e-2)  # the same NF4 bytes on both sides
    return [
        libs.impl("lowbit", "NF4 (LowbitConfig), float32 compute", decode_step(quantization_config=LowbitConfig(**nf4)),
                  check=check),
        libs.impl("bitsandbytes", "NF4 (BitsAndBytesConfig), float32 compute",
                  decode_step(quantization_config=BitsAndBytesConfig(**nf4))),
        libs.impl("torch", "float32 model", decode_step(dtype=torch.float32)),
        libs.impl("lowbit", "NF4 (LowbitConfig), bfloat16 model and compute",
                  decode_step(dtype=torch.bfloat16, quantization_config=LowbitConfig(**{**nf4, "bnb_4bit_compute_dtype": torch.bfloat16}))),
        libs.impl("torch", "bfloat16 model", decode_step(dtype=torch.bfloat16)),
    ]  # fmt: skip


def cases(llc_bytes: int, libs: Libs) -> list[Case]:
    layers = decode_layers(llc_bytes)
    packed_mib = layers * N * K // 2 / 2**20
    found = []
    for dtype in (torch.float32, torch.bfloat16):
        found.append(Case(f"gemv_4bit 1×{N}×{K} nf4 {dtype_name(dtype)}", "4-bit", lambda d=dtype: gemv_4bit(libs, d)))
    found.append(Case(f"matmul_4bit 8×{N}×{K} nf4 bf16", "4-bit", lambda: matmul_4bit(libs, 8, torch.bfloat16)))
    for name, build in (("quantize_4bit", quantize_4bit), ("dequantize_4bit", dequantize_4bit)):
        for dtype in (torch.bfloat16, torch.float32):
            found.append(Case(f"{name} {N}×{K} nf4 {dtype_name(dtype)}", "4-bit", lambda b=build, d=dtype: b(libs, d)))
    for dtype in (torch.bfloat16, torch.float32):
        found.append(Case(f"dequantize_4bit {N}×{K} nf4 {dtype_name(dtype)} into out=", "4-bit",
                          lambda d=dtype: dequantize_4bit_out(libs, d)))  # fmt: skip
    for name, build in (("quantize_blockwise", quantize_blockwise), ("dequantize_blockwise", dequantize_blockwise)):
        for dtype in (torch.float32, torch.bfloat16):
            found.append(Case(f"{name} {N}×{K} {dtype_name(dtype)}", "8-bit", lambda b=build, d=dtype: b(libs, d)))
    found += [
        Case(f"int8 GEMM 32×{N}×{K}", "int8", lambda: int8_gemm(libs, 32)),
        Case(f"LLM.int8 linear 32×{K}→{N} fp16, threshold {LLM_INT8_THRESHOLD:g}, {len(OUTLIER_COLUMNS)} outlier columns",
             "int8", lambda: llm_int8_linear(libs, 32)),
        Case(f"AdamW 8-bit step, {ELEMENTS / 1e6:.1f}M params", "optimizer", lambda: adamw_step(libs, ELEMENTS)),
    ]
    for nested in (False, True):
        found.append(Case(f"placement for CPU inference: {N}×{K} nf4{'-dq' if nested else ''}", "placement",
                          lambda n=nested: placement(libs, n)))  # fmt: skip
    stack_name = f"{layers} layers ({packed_mib:.0f} MiB packed)"
    for quant_type, nested, dtype in DECODE_VARIANTS:
        fmt = quant_type + ("-dq" if nested else "")
        found.append(Case(f"decode: 1 token through {stack_name} {fmt} {dtype_name(dtype)}", "bandwidth",
                          lambda q=quant_type, n=nested, d=dtype: decode_stack(
                              libs, DecodeStack.build(libs, llc_bytes, layers, q, n, d, 1), with_standard_bnb=(q, n, d) == DECODE_VARIANTS[0])))  # fmt: skip
    found.append(Case("SmolLM2-135M-Instruct: one decode step through transformers (64-token context)", "model",
                      lambda: smollm2_decode(libs)))  # fmt: skip
    for rows in DECODE_ROWS:
        found.append(Case(f"decode: {rows} tokens through {stack_name} nf4 bf16", "bandwidth",
                          lambda r=rows: decode_stack(libs, DecodeStack.build(libs, llc_bytes, layers, "nf4", False,
                                                                             torch.bfloat16, r))))  # fmt: skip
    return found


#: (quant_type, double quantization, activation dtype) of the one-token decode cases; the first
#: also shows bitsandbytes on the standard layout.
DECODE_VARIANTS = (
    ("nf4", False, torch.bfloat16), ("nf4", False, torch.float16), ("nf4", False, torch.float32),
    ("nf4", True, torch.bfloat16), ("fp4", False, torch.bfloat16),
)  # fmt: skip
#: Tokens per step of the multi-token decode cases (speculative decoding, small batches).
DECODE_ROWS = (2, 4, 8, 16, 32, 64)
