"""``python -m lowbit``: what lowbit can run here and why.

``python -m lowbit demo``: quantize a weight tensor every way lowbit can; then SmolLM2-135M-Instruct
through transformers in int8/NF4/FP4 (memory, perplexity on Hamlet, decode speed, a 4-bit
completion; with ``lowbit[hf]`` and the offline model/text installed, else what to install); then
the report."""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import torch

import lowbit
from lowbit import functional as F
from lowbit.backends import triton as triton_backend
from lowbit.backends.xpu import ipex
from lowbit.core import registry

_ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "amx_bf16")


def cpu_features() -> list[str]:
    """The SIMD features of this CPU that lowbit's kernels care about."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return [flag for flag in _ISA_FLAGS if flag in flags]
    except OSError:
        pass
    return [f"torch capability: {torch.backends.cpu.get_cpu_capability()}"]


def _self_test_device(status: registry.BackendStatus) -> str:
    """The first device type the backend serves that torch can use here (cpu for the reference)."""
    usable = [d for d in status.device_types if d == "cpu" or getattr(torch, d).is_available()]
    return usable[0] if usable else "cpu"


def self_test(backend: str) -> str:
    """Run quantize 4-bit and 8-bit blockwise on ``backend``'s device and compare with the reference."""
    torch.manual_seed(0)
    A = torch.randn(4099, dtype=torch.float32)
    device_type = _self_test_device(registry.get(backend).status())
    on_device = A.to(device_type)
    reference = registry.get("reference").kernels
    kernels = registry.get(backend).kernels
    if kernels.get("quantize_4bit") is None and backend != "reference":
        return "no kernels of its own (ops run on the reference backend)"

    def same(ours, theirs) -> bool:
        return all(torch.equal(a.cpu(), b) for a, b in zip(ours, theirs))

    q4 = kernels.get("quantize_4bit") or reference.get("quantize_4bit")
    results = [same(q4(on_device, 64, "nf4", torch.uint8), reference.get("quantize_4bit")(A, 64, "nf4", torch.uint8))]
    qb = kernels.get("quantize_blockwise") or reference.get("quantize_blockwise")
    code = lowbit.core.formats.dynamic_map()
    results.append(same(qb(on_device, code.to(on_device.device), 256), reference.get("quantize_blockwise")(A, code, 256)))
    where = f" on {on_device.device}" if backend != "reference" else ""
    return f"pass (quantize_4bit, quantize_blockwise bit-exact vs reference{where})" if all(results) else "FAIL: differs from reference"


def report() -> int:
    print(f"lowbit {lowbit.__version__}  torch {torch.__version__}  python {platform.python_version()}  {platform.machine()}")
    print(f"CPU: {platform.processor() or 'unknown'}; features: {' '.join(cpu_features())}; torch threads: {torch.get_num_threads()}")
    forced = registry.forced()
    print(f"LOWBIT_BACKEND: {os.environ.get(registry.ENV_BACKEND) or '(unset)'}" + (f" -> {forced} forced" if forced else ""))
    print(f"Triton: {triton_backend.describe()}")
    print(f"IPEX: {ipex.describe()}")
    print()
    print(f"{'backend':<10} {'device':<12} {'status':<12} {'active for':<10} detail")
    status_ok = True
    for status in registry.available():
        active_for = [d for d in ("cpu", "cuda", "xpu") if registry.active(d) == status.name]
        state = "available" if status.available else "unavailable"
        if status.name == forced:
            state = "forced"
        detail = status.reason if not status.available else ", ".join(f"{k}: {v}" for k, v in status.details.items())
        print(f"{status.name:<10} {status.device_type:<12} {state:<12} {','.join(active_for) or '-':<10} {detail}")
        if not status.available and "variant" in status.details:  # GPU backends: which library file and why
            print(f"{'':<10} library: {status.details['library']} ({status.details['variant']})")
    print()
    print("self-test:")
    for status in registry.available():
        if status.available:
            result = self_test(status.name)
            status_ok &= not result.startswith("FAIL")
            print(f"  {status.name:<10} {result}")
    return 0 if status_ok else 1


def demo(windows: int | None = None, decode_tokens: int | None = None, model: bool = True) -> int:
    """The tensor demo, the model demo (SmolLM2 in int8/NF4/FP4 on Hamlet, or what to install for
    it), then the report."""
    tensor_demo()
    if model:
        from lowbit.integrations import demo as model_demo

        model_demo.main(windows=windows, decode_tokens=decode_tokens)
    return report()


def tensor_demo() -> None:
    """Quantize one 4096x4096 weight every way lowbit can and show size and error."""
    torch.manual_seed(0)
    weight = torch.randn(4096, 4096) * 0.02
    dense_bytes = weight.numel() * 2  # what a bf16 copy would take
    print(f"weight 4096x4096, bf16 size {dense_bytes / 2**20:.1f} MiB, backend for cpu: {registry.active('cpu')}")
    print(f"{'format':<16} {'MiB':>7} {'saved':>7} {'mean |err|':>11} {'time ms':>8}")
    for name, run in (
        ("nf4", lambda: _roundtrip_4bit(weight, "nf4", False)),
        ("nf4 + dq", lambda: _roundtrip_4bit(weight, "nf4", True)),
        ("fp4", lambda: _roundtrip_4bit(weight, "fp4", False)),
        ("int8 blockwise", lambda: _roundtrip_8bit(weight)),
    ):
        start = time.perf_counter()
        nbytes, restored = run()
        elapsed = (time.perf_counter() - start) * 1e3
        error = (restored - weight).abs().mean().item()
        print(f"{name:<16} {nbytes / 2**20:7.2f} {1 - nbytes / dense_bytes:7.1%} {error:11.2e} {elapsed:8.1f}")
    print()


def _state_bytes(state) -> int:
    total = state.absmax.numel() * state.absmax.element_size()
    if state.nested:
        total += state.state2.absmax.numel() * 4 + 4
    return total


def _roundtrip_4bit(weight, quant_type, double_quant):
    packed, state = F.quantize_4bit(weight, quant_type=quant_type, compress_statistics=double_quant)
    return packed.numel() * packed.element_size() + _state_bytes(state), F.dequantize_4bit(packed, state)


def _roundtrip_8bit(weight):
    q, state = F.quantize_blockwise(weight)
    return q.numel() + _state_bytes(state), F.dequantize_blockwise(q, state)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lowbit", description=__doc__)
    parser.add_argument("command", nargs="?", choices=("report", "demo"), default="report")
    demo_options = parser.add_argument_group("demo options")
    demo_options.add_argument(
        "--windows", type=int, default=None, metavar="N",
        help="1024-token windows of Hamlet scored per format (default 2; 20 = the full DESIGN.md measurement)",
    )  # fmt: skip
    demo_options.add_argument(
        "--decode-tokens", type=int, default=None, metavar="N", help="tokens timed for decode speed (default 8)"
    )
    demo_options.add_argument("--no-model", action="store_true", help="the tensor demo only (no SmolLM2)")
    args = parser.parse_args(argv)
    if args.command == "demo":
        for name in ("windows", "decode_tokens"):
            value = getattr(args, name)
            if value is not None and value < 1:
                parser.error(f"--{name.replace('_', '-')} must be at least 1")
        return demo(args.windows, args.decode_tokens, model=not args.no_model)
    return report()


if __name__ == "__main__":
    sys.exit(main())
