#!/usr/bin/env python3
"""The one command for a lent NVIDIA GPU (offline): build, parity on the device, QLoRA step, timings.

    python benchmarks/gpu.py                 # or: python -m nox -s gpu
    python benchmarks/gpu.py --dry-run       # what it would do here, and why it cannot (no GPU)
    python benchmarks/gpu.py --quick         # fewer repetitions, smaller optimizer

It runs in the current environment (a virtualenv with a CUDA build of torch, pytest, and
optionally bitsandbytes) and needs no network. Steps, each timed:

1. build: the library variant torch needs (``liblowbit_cuda<major>.so``, lowbit/backends/cuda/
   runtime.py) for this GPU's architecture only, with the toolchain that matches torch's CUDA
   major (nvcc of that major; for CUDA 12 also clang-19 with the CUDA 12.8 wheel tree of
   ci/cuda12_path.py); installed into lowbit/_native/. Without such a toolchain a library already
   there (carried in) is used if it has code for the GPU. ``--skip-build`` uses it as it is.
2. parity: tests/test_gpu_backends.py on the device (every op against the reference backend,
   odd shapes, unaligned views, large shapes; LOWBIT_TEST_TARGETS=gpu: no emulation).
3. QLoRA step: a Linear4bit layer (NF4, double quant) with a LoRA adapter, forward + backward +
   AdamW8bit step on the cuda backend against the reference backend on the same device.
4. timings (CUDA events, median): gemv_4bit (bf16, fp16) on weights larger than L2,
   dequantize_4bit, AdamW8bit -- against torch (dense bf16 GEMV, bf16 copy, fused AdamW) and
   bitsandbytes when installed -- in GB/s and % of a measured device copy bandwidth; the 4-bit
   product at 1..32 rows fused and as dequantize + cuBLAS (the crossover of
   lowbit.autograd.matmul_4bit.GPU_GEMV_MAX_ROWS).

The last line is one summary: ``GPU SUMMARY: ...``. Exit status 0 when the build, parity and
QLoRA steps pass (and for ``--dry-run``), 1 when one fails, 2 when there is no GPU to run on.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # an uninstalled checkout works

import torch  # noqa: E402

SUMMARY_PREFIX = "GPU SUMMARY:"


# ---- planning (pure: unit-tested without a GPU) --------------------------------------------------
@dataclass(frozen=True)
class BuildPlan:
    toolchain: Optional[str]  # None: no build (use the library that is there, or fail)
    archs: str
    library: str
    reason: str
    extra: tuple[str, ...] = ()


def tool_major(version_text: str) -> Optional[int]:
    """``nvcc --version`` output -> its CUDA major (``release 12.8`` -> 12)."""
    match = re.search(r"release (\d+)\.", version_text)
    return int(match.group(1)) if match else None


def plan_build(torch_cuda: Optional[str], capability: tuple[int, int], nvcc_major: Optional[int],
               clang: bool, cuda12_tree: Optional[Path]) -> BuildPlan:  # fmt: skip
    """Which toolchain builds the library torch needs, for this GPU only."""
    from lowbit.backends.cuda import runtime

    variant = runtime.cuda_variant(torch_cuda)
    arch = f"{capability[0]}{capability[1]}"
    if variant.library is None:
        return BuildPlan(None, arch, "", f"nothing to build: {variant.reason}")
    major = int(str(torch_cuda).split(".")[0])
    if nvcc_major == major and not (major >= 13 and capability < (7, 5)):
        return BuildPlan("nvcc", arch, variant.library, f"nvcc {major} matches torch's CUDA {torch_cuda}")
    if major == 12 and clang and cuda12_tree is not None:
        return BuildPlan(
            "clang-cuda", arch, variant.library, f"clang-19 with the CUDA 12.8 tree at {cuda12_tree} (torch {torch_cuda})",
            ("--cuda-path", str(cuda12_tree)),
        )  # fmt: skip
    have = f"nvcc {nvcc_major}" if nvcc_major else "no nvcc"
    return BuildPlan(None, arch, variant.library, f"no toolchain for CUDA {major} here ({have}); using the library as it is")


def gbps(nbytes: float, seconds: float) -> float:
    return nbytes / seconds / 1e9


def summary_line(results: dict) -> str:
    """One line: the verdict of each step and the headline bandwidths."""
    parts = [f"build {results.get('build', 'not run')}", f"parity {results.get('parity', 'not run')}",
             f"qlora {results.get('qlora', 'not run')}"]  # fmt: skip
    for name in ("gemv_4bit bf16", "gemv_4bit fp16", "dequantize_4bit bf16", "AdamW8bit"):
        timing = results.get("timings", {}).get(name)
        if timing:
            parts.append(f"{name} {timing['lowbit_gbps']:.0f} GB/s ({timing['lowbit_pct_copy']:.0f}% of copy)")
    copy = results.get("copy_gbps")
    if copy:
        parts.append(f"copy {copy:.0f} GB/s")
    return f"{SUMMARY_PREFIX} " + "; ".join(parts)


def parse_pytest_counts(output: str) -> str:
    """The counts of pytest's closing line ("12 passed, 1 skipped in 3.2s" -> "12 passed, 1 skipped")."""
    for line in reversed(output.strip().splitlines()):
        if re.search(r"\d+ (passed|failed|error)", line):
            return re.sub(r"\s+in [\d.]+s.*$", "", line.strip("= ").strip())
    return "no pytest summary"


# ---- steps -------------------------------------------------------------------------------------------
def log(message: str) -> None:
    print(f"[gpu] {message}", flush=True)


def gpu_problem() -> Optional[str]:
    if torch.version.hip:
        return f"this torch is a ROCm build ({torch.version.hip}): this script is for NVIDIA GPUs"
    if torch.version.cuda is None:
        return f"this torch ({torch.__version__}) has no CUDA: install a CUDA build of torch in this environment"
    if not torch.cuda.is_available():
        return "no GPU visible: torch.cuda.is_available() is False"
    return None


def detect_plan() -> BuildPlan:
    nvcc = shutil.which("nvcc")
    nvcc_major = None
    if nvcc:
        nvcc_major = tool_major(subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout)
    tree = ROOT / "build" / "gpu" / "cuda12"
    capability = torch.cuda.get_device_capability() if torch.cuda.is_available() else (0, 0)
    return plan_build(torch.version.cuda, capability, nvcc_major, bool(shutil.which("clang++-19")),
                      tree if (tree / "bin" / "ptxas").exists() else None)  # fmt: skip


def step_build(plan: BuildPlan, skip: bool) -> str:
    from lowbit.backends.cuda import native

    if plan.toolchain is not None and not skip:
        started = time.perf_counter()
        cmd = [sys.executable, str(ROOT / "ci" / "gpu_build.py"), plan.toolchain, "--archs", plan.archs, "--no-ptx",
               "--install", "--build-root", str(ROOT / "build" / "gpu-local"), *plan.extra]  # fmt: skip
        log("$ " + " ".join(cmd))
        if subprocess.run(cmd).returncode != 0:
            return "FAILED"
        return f"ok ({plan.toolchain} sm_{plan.archs}, {time.perf_counter() - started:.0f} s)"
    problem = native.CUDA.load_error() or native.CUDA.device_problem(torch.cuda.current_device())
    if problem is not None:
        return f"FAILED ({plan.reason}; {problem})"
    return f"ok (prebuilt {native.CUDA.library_path().name}: {plan.reason})"


def step_parity() -> str:
    env = {**os.environ, "LOWBIT_TEST_TARGETS": "gpu", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_gpu_backends.py"]
    log("$ LOWBIT_TEST_TARGETS=gpu " + " ".join(cmd))
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    print(result.stdout[-6000:], result.stderr[-2000:], sep="\n", flush=True)
    counts = parse_pytest_counts(result.stdout)
    return counts if result.returncode == 0 else f"FAILED ({counts})"


def step_qlora(device: str = "cuda", backend: str = "cuda") -> str:
    """One QLoRA layer step on ``backend`` and on the reference backend, same device, same data:
    Linear4bit (NF4, double quant) + LoRA adapter, forward, backward, AdamW8bit step."""
    import lowbit
    from lowbit.core import registry

    def run(name: str):
        torch.manual_seed(0)
        with registry.use(name):
            layer = lowbit.nn.Linear4bit(1024, 4096, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4").to(device)
            adapter_a = torch.nn.Linear(1024, 16, bias=False).to(device, torch.bfloat16)
            adapter_b = torch.nn.Linear(16, 4096, bias=False).to(device, torch.bfloat16)
            optimizer = lowbit.optim.AdamW8bit([*adapter_a.parameters(), *adapter_b.parameters()], lr=1e-3)
            x = torch.randn(4, 64, 1024, dtype=torch.bfloat16).to(device).requires_grad_(True)
            y = layer(x) + adapter_b(adapter_a(x))
            y.float().square().mean().backward()
            optimizer.step()
        return y.detach().float().cpu(), x.grad.float().cpu(), adapter_a.weight.detach().float().cpu()

    got, want = run(backend), run("reference")
    problems = []
    for name, a, b in zip(("output", "input grad", "adapter after the step"), got, want):
        err = float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))
        if not err <= 2e-2:  # bf16 activations, float32 sums in another order
            problems.append(f"{name} off by {err:.2e} (relative to its max)")
    return "ok" if not problems else "FAILED (" + "; ".join(problems) + ")"


def cuda_seconds(fn: Callable[[], object], repetitions: int) -> float:
    """Median seconds of ``fn`` on the device (CUDA events), after two warm-up calls."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repetitions):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


@dataclass
class Case:
    name: str
    nbytes: float  # bytes lowbit's kernel must move
    lowbit: Callable[[], object]
    others: dict[str, tuple[float, Callable[[], object]]] = field(default_factory=dict)  # name -> (bytes, fn)


def _bnb():
    try:
        import bitsandbytes

        return bitsandbytes
    except ImportError:
        return None


def timing_cases(quick: bool) -> list[Case]:
    from lowbit import functional as F
    from lowbit.optim import AdamW8bit

    bnb = _bnb()
    device = torch.device("cuda")
    cases = []
    for dtype, label in ((torch.bfloat16, "bf16"), (torch.float16, "fp16")):
        N, K = 16384, 16384  # 128 MiB of 4-bit weight: larger than any current L2
        W = torch.randn(N, K, device=device, dtype=dtype) * 0.02
        packed, state = F.quantize_4bit(W, quant_type="nf4")
        absmax = F.block_absmax_of(state)
        code = state.code.to(device)
        A = torch.randn(1, K, device=device, dtype=dtype)
        weight_bytes = N * K / 2 + absmax.numel() * 4

        def ours(A=A, packed=packed, absmax=absmax, code=code, N=N, K=K):
            return torch.ops.lowbit.gemv_4bit(A, packed, [N, K], absmax, code, 64)

        others = {"torch dense": (N * K * 2, lambda A=A, W=W: torch.nn.functional.linear(A, W))}
        if bnb is not None:
            bstate = bnb.functional.quantize_4bit(W, quant_type="nf4", compress_statistics=False)
            others["bitsandbytes"] = (weight_bytes, lambda A=A, b=bstate: bnb.matmul_4bit(A, b[0].t(), quant_state=b[1]))
        cases.append(Case(f"gemv_4bit {label}", weight_bytes, ours, others))
        del W

    n = 1 << 28
    x = torch.randn(n, device=device, dtype=torch.bfloat16)
    packed, state = F.quantize_4bit(x, quant_type="nf4")
    absmax = F.block_absmax_of(state)
    dq_bytes = n / 2 + absmax.numel() * 4 + n * 2
    others = {"torch copy (bf16)": (n * 4, lambda x=x: x.clone())}
    if bnb is not None:
        bq = bnb.functional.quantize_4bit(x, quant_type="nf4", compress_statistics=False)
        others["bitsandbytes"] = (dq_bytes, lambda b=bq: bnb.functional.dequantize_4bit(b[0], b[1]))
    cases.append(Case("dequantize_4bit bf16", dq_bytes,
                      lambda p=packed, a=absmax, n=n: torch.ops.lowbit.dequantize_4bit(p, a, 64, "nf4", [n], torch.bfloat16),
                      others))  # fmt: skip
    del x

    params = (1 << 24) if quick else (1 << 26)

    def optimizer_case(make):
        p = torch.nn.Parameter(torch.randn(params, device=device))
        p.grad = torch.randn_like(p) * 1e-3
        opt = make([p])
        opt.step()  # state allocated outside the timing
        return opt.step

    eight_bit_bytes = params * (4 + 4 + 4 + 2 + 2)  # p read+write, g read, two 1-byte states read+write
    others = {"torch fused AdamW": (params * (4 * 2 + 4 + 8 * 2), optimizer_case(lambda ps: torch.optim.AdamW(ps, fused=True)))}
    if bnb is not None:
        others["bitsandbytes"] = (eight_bit_bytes, optimizer_case(lambda ps: bnb.optim.AdamW8bit(ps)))
    cases.append(Case("AdamW8bit", eight_bit_bytes, optimizer_case(lambda ps: AdamW8bit(ps)), others))
    return cases


def copy_bandwidth(repetitions: int) -> float:
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return gbps(2 * src.numel(), cuda_seconds(lambda: dst.copy_(src), repetitions))


def crossover(repetitions: int) -> dict[int, dict[str, float]]:
    """Milliseconds of the 4-bit product per row count: fused gemv_4bit vs dequantize + F.linear."""
    from lowbit import functional as F

    N, K = 8192, 8192
    W = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02
    packed, state = F.quantize_4bit(W, quant_type="nf4")
    absmax, code = F.block_absmax_of(state), state.code.to("cuda")
    rows = {}
    for m in (1, 4, 8, 16, 32):
        A = torch.randn(m, K, device="cuda", dtype=torch.bfloat16)
        fused = cuda_seconds(lambda A=A: torch.ops.lowbit.gemv_4bit(A, packed, [N, K], absmax, code, 64), repetitions)
        dense = cuda_seconds(
            lambda A=A: torch.nn.functional.linear(A, torch.ops.lowbit.dequantize_4bit(packed, absmax, 64, "nf4", [N, K], A.dtype)),
            repetitions,
        )  # fmt: skip
        rows[m] = {"fused_ms": fused * 1e3, "dequantize_linear_ms": dense * 1e3}
    return rows


def step_timings(quick: bool, results: dict) -> None:
    repetitions = 10 if quick else 30
    copy = copy_bandwidth(repetitions)
    results["copy_gbps"] = copy
    log(f"device copy bandwidth: {copy:.0f} GB/s")
    timings = results.setdefault("timings", {})
    for case in timing_cases(quick):
        seconds = cuda_seconds(case.lowbit, repetitions)
        row = {"lowbit_ms": seconds * 1e3, "lowbit_gbps": gbps(case.nbytes, seconds)}
        row["lowbit_pct_copy"] = 100 * row["lowbit_gbps"] / copy
        text = f"{case.name:<22} lowbit {row['lowbit_ms']:8.3f} ms {row['lowbit_gbps']:7.0f} GB/s ({row['lowbit_pct_copy']:3.0f}% of copy)"
        for other, (nbytes, fn) in case.others.items():
            s = cuda_seconds(fn, repetitions)
            row[other] = {"ms": s * 1e3, "gbps": gbps(nbytes, s)}
            text += f" | {other} {s * 1e3:8.3f} ms {gbps(nbytes, s):7.0f} GB/s"
        timings[case.name] = row
        log(text)
        torch.cuda.empty_cache()
    results["crossover"] = crossover(repetitions)
    for m, row in results["crossover"].items():
        log(f"4-bit product {m:>2} rows: fused {row['fused_ms']:.3f} ms, dequantize + linear {row['dequantize_linear_ms']:.3f} ms")


# ---- main ---------------------------------------------------------------------------------------------
def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="say what would run here (and why not), run nothing")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions, a smaller optimizer")
    parser.add_argument("--skip-build", action="store_true", help="use the library in lowbit/_native as it is")
    parser.add_argument("--skip-parity", action="store_true", help="no test run (timings only)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    problem = gpu_problem()
    plan = detect_plan() if problem is None else plan_build(torch.version.cuda, (0, 0), None, False, None)
    if args.dry_run or problem is not None:
        state = "dry run" if problem is None else f"skipped: {problem}"
        log(f"plan ({state}): build {plan.toolchain or 'none'} for sm_{plan.archs} -> {plan.library or '-'} ({plan.reason}); "
            "parity: tests/test_gpu_backends.py on the device; QLoRA step; timings")  # fmt: skip
        print(f"{SUMMARY_PREFIX} {state}", flush=True)
        return 0 if args.dry_run else 2  # a real run without a GPU did not check anything
    log(f"{torch.cuda.get_device_name()} (sm_{plan.archs}), torch {torch.__version__} CUDA {torch.version.cuda}")
    results: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    results["build"] = step_build(plan, args.skip_build)
    log(f"build: {results['build']}")
    ok = not results["build"].startswith("FAILED")
    if ok:
        if not args.skip_parity:
            results["parity"] = step_parity()
            ok &= not results["parity"].startswith("FAILED")
        results["qlora"] = step_qlora()
        ok &= results["qlora"] == "ok"
        step_timings(args.quick, results)
    results["seconds"] = round(time.perf_counter() - started, 1)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))
    print(summary_line(results) + f"; {results['seconds']:.0f} s", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
