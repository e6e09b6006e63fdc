"""Native libraries side by side on the decode stack: which build of liblowbit_cpu streams the
weights faster (benchmarks/README.md, "Comparing native builds").

    python benchmarks/native_ab.py LIB.so LIB.so [...] [--rows 1] [--isa avx2] [--rounds 10]

One token (``--rows``) through 20 NF4 4096x4096 layers in the interleaved layout, called through
each library's C ABI with the arguments prepared beforehand (no Python between layers), and
``src.sum()`` over as many bytes in huge pages. Each round times every library (the median of 9
passes, after one untimed pass) and then the sum; the order of the libraries turns by one each
round. On a shared 2-vCPU host a fixed order biased the comparison by up to 10 %: whichever
library ran right after the sum ran slower, while torch's threads still spun on the cores.
Prints microseconds per layer, one line a round, and the medians over the rounds.
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_machine  # noqa: E402
from bench_cases import K, N, stack_arguments  # noqa: E402

from lowbit import functional as F  # noqa: E402
from lowbit.backends.cpu import native  # noqa: E402

LAYERS = 20
PASSES = 9


def load(path: str, isa: str | None) -> ctypes._CFuncPtr:
    """The product of the library at ``path`` (its own copy: its own thread pool and ISA)."""
    library = ctypes.CDLL(str(Path(path).resolve()))
    fn = library.lowbit_matmul_4bit_interleaved
    fn.argtypes = native.lib().lowbit_matmul_4bit_interleaved.argtypes
    fn.restype = ctypes.c_int32
    if isa is not None:
        native.check(library.lowbit_set_cpu_isa(native.ISAS[isa]), "lowbit_set_cpu_isa")
    return fn


def per_layer_us(fn, passes: int = PASSES) -> float:
    times = []
    for _ in range(passes):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) / LAYERS * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("libraries", nargs="+", help="liblowbit_cpu.so builds to compare")
    parser.add_argument("--rows", type=int, default=1, help="rows of A (tokens)")
    parser.add_argument("--isa", choices=sorted(native.ISAS), help="the ISA every library runs")
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()

    torch.manual_seed(0)
    packed, state = F.quantize_4bit(torch.randn(N, K), quant_type="nf4")
    layers = [F.interleave_4bit(packed.clone(), state) for _ in range(LAYERS)]
    x = torch.randn(args.rows, K, dtype=torch.bfloat16)
    outs = [torch.empty(args.rows, N, dtype=torch.bfloat16) for _ in layers]
    calls = stack_arguments(x, layers, outs, "fast")
    src = bench_machine.huge_page_ones(sum(B.nbytes + s.absmax.nbytes for B, s in layers) // 4)
    names = args.libraries  # as given: builds of one library share its file name
    stacks = {}
    for name in names:
        fn = load(name, args.isa)

        def stack(fn=fn) -> None:
            for call in calls:
                native.check(fn(*call), "lowbit_matmul_4bit_interleaved")

        stacks[name] = stack
    times: dict[str, list[float]] = {name: [] for name in [*names, "src.sum()"]}
    widths = [max(12, len(name)) for name in times]
    print("  ".join(f"{name:>{w}}" for name, w in zip(times, widths)), "   (us per layer)")
    for r in range(args.rounds):
        turn = r % len(names)
        for name in names[turn:] + names[:turn]:
            stacks[name]()  # untimed: this library's workers awake, the previous threads settled
            times[name].append(per_layer_us(stacks[name]))
        times["src.sum()"].append(per_layer_us(src.sum))
        print("  ".join(f"{t[-1]:{w}.1f}" for t, w in zip(times.values(), widths)), flush=True)
    print("  ".join(f"{statistics.median(t):{w}.1f}" for t, w in zip(times.values(), widths)), "   medians")


if __name__ == "__main__":
    main()
