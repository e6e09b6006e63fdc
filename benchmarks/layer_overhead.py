"""What ``Linear4bit`` adds per call around its native kernel at decode time: one token, eval mode,
no gradient, the weight in the interleaved layout (benchmarks/README.md, "Per-layer overhead").

    python benchmarks/layer_overhead.py [--calls 20000] [--threads 1] [--against DIR ...]

For each layer (NF4 576x576 and 1536x576 as in SmolLM2-135M, with and without bias and double
quantization) it times ``layer(x)`` for x of shape [1, 1, in_features], and the native call alone
(``lowbit_matmul_4bit_interleaved`` through ctypes with its arguments prepared beforehand); the
difference is the Python overhead per call. ``--against DIR`` runs the same measurement, in
subprocesses alternating with this checkout, on the lowbit package in DIR (another checkout, e.g.
``git worktree add /tmp/base main`` with the native library copied into it), so that both sides see
the same machine load.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
LAYERS = [  # (out_features, in_features, bias, compress_statistics)
    (576, 576, False, False),
    (576, 576, True, False),
    (576, 576, False, True),
    (1536, 576, False, False),
    (1536, 576, True, True),
]


def _best_per_call(fn, calls: int, repeats: int = 5) -> float:
    """Microseconds per call: the fastest of ``repeats`` blocks of ``calls // repeats`` calls."""
    per_block = max(calls // repeats, 1)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(per_block):
            fn()
        best = min(best, (time.perf_counter() - start) / per_block)
    return best * 1e6


def measure(calls: int, threads: int) -> list[dict]:
    """Per layer: microseconds of ``layer(x)`` and of the native call alone."""
    import torch

    from lowbit.backends.cpu import native
    from lowbit.nn import Linear4bit

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    rows = []
    for n_out, k_in, bias, nested in LAYERS:
        layer = Linear4bit(k_in, n_out, bias=bias, compress_statistics=nested, quant_type="nf4").eval()
        x = torch.randn(1, 1, k_in)
        with torch.no_grad():
            layer(x)  # quantizes and places the weight for CPU inference
            state = layer.weight.quant_state
            assert state.interleaved, "the layer did not take the interleaved path"
            packed, absmax = layer.weight.data, state.absmax
            code = state.code
            out = torch.empty(1, 1, n_out)
            bias_t = None if layer.bias is None else layer.bias.data
            fn = native.lib().lowbit_matmul_4bit_interleaved
            args = (
                native.DTYPES[x.dtype], x.data_ptr(), 1, k_in, packed.data_ptr(), packed.nbytes, absmax.data_ptr(),
                absmax.numel(), code.data_ptr(), code.numel(), n_out, state.blocksize,
                None if bias_t is None else bias_t.data_ptr(), 0 if bias_t is None else bias_t.numel(),
                0 if bias_t is None else native.DTYPES[bias_t.dtype], native.PRECISIONS["float32"],
                native.DTYPES[out.dtype], out.data_ptr(), threads,
            )  # fmt: skip
            layer_us = _best_per_call(functools.partial(layer, x), calls)
            native_us = _best_per_call(functools.partial(fn, *args), calls)
        rows.append(
            {
                "layer": f"{n_out}x{k_in}" + (" bias" if bias else "") + (" dq" if nested else ""),
                "layer_us": layer_us,
                "native_us": native_us,
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=20000, help="timed calls per layer and side")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3, help="alternations of the sides (with --against)")
    parser.add_argument("--against", action="append", default=[], help="another checkout to compare with")
    parser.add_argument("--json", action="store_true", help=argparse.SUPPRESS)  # one measurement, for a parent
    args = parser.parse_args(argv)
    if args.json:
        print(json.dumps(measure(args.calls, args.threads)))
        return 0

    sides = [str(HERE.parent)] + [str(Path(d).resolve()) for d in args.against]
    results: dict[str, list[list[dict]]] = {side: [] for side in sides}
    for _ in range(args.rounds if args.against else 1):
        for side in sides:
            env = {**os.environ, "PYTHONPATH": side, "OMP_NUM_THREADS": str(args.threads)}
            command = [sys.executable, __file__, "--json", "--calls", str(args.calls), "--threads", str(args.threads)]
            done = subprocess.run(command, env=env, check=True, capture_output=True, text=True)
            results[side].append(json.loads(done.stdout))
    print(f"Linear4bit NF4, x [1, 1, in], eval, no_grad, {args.threads} thread(s); microseconds per call, "
          f"median of {len(results[sides[0]])} run(s), each the best of 5 blocks of {args.calls // 5} calls")  # fmt: skip
    header = f"{'layer':<20}" + "".join(f"{'layer(x)':>10}{'native':>8}{'Python':>8}" for _ in sides)
    print(" " * 20 + "".join(f"{Path(side).name[-26:]:>26}" for side in sides))
    print(header)
    for i in range(len(LAYERS)):
        line = f"{results[sides[0]][0][i]['layer']:<20}"
        for side in sides:
            layer_us = statistics.median(run[i]["layer_us"] for run in results[side])
            native_us = statistics.median(run[i]["native_us"] for run in results[side])
            line += f"{layer_us:10.1f}{native_us:8.1f}{layer_us - native_us:8.1f}"
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
