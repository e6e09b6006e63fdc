"""lowbit vs bitsandbytes 0.50.2 vs torch on the same tensors, in one run (benchmarks/README.md).

    python benchmarks/run.py            # full run, a few minutes
    python benchmarks/run.py --quick    # smoke run: same shapes, few repetitions
    python benchmarks/run.py --only gemv --only decode

Writes results.md, results.json and results.png to benchmarks/results/ (or --out).
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="few repetitions (smoke test), same shapes")
    parser.add_argument("--threads", type=int, default=2, help="torch and OpenMP threads (default 2)")
    parser.add_argument("--out", type=Path, default=HERE / "results", help="output directory")
    parser.add_argument("--only", action="append", default=[], metavar="REGEX", help="run the cases matching REGEX")
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    parser.add_argument("--llc-mib", type=int, help="size the decode stacks for this LLC instead of sysfs' (smoke tests)")
    return parser.parse_args(argv)


def load_average() -> float | None:
    """The 1-minute load average (other processes competing for the CPUs), if the OS has one."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # before torch and bitsandbytes load: their OpenMP pools size themselves from this
    os.environ["OMP_NUM_THREADS"] = str(args.threads)

    import torch

    torch.set_num_threads(args.threads)
    try:
        import lowbit  # noqa: F401
    except ImportError:  # running from a checkout without installing: use the checkout
        sys.path.insert(0, str(HERE.parent))

    import bench_cases
    import bench_machine
    import bench_report
    from bench_core import Budget, run_case

    llc = args.llc_mib << 20 if args.llc_mib else bench_machine.llc_bytes()[0]
    libs = bench_cases.Libs.load()
    cases = bench_cases.cases(llc, libs)
    if args.only:
        cases = [c for c in cases if any(re.search(p, c.name, re.IGNORECASE) for p in args.only)]
    if args.list:
        print("\n".join(c.name for c in cases))
        return 0

    budget = Budget.quick() if args.quick else Budget.full()
    started = time.perf_counter()
    stamp = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    log = lambda text: print(f"[{time.perf_counter() - started:6.1f} s] {text}", file=sys.stderr, flush=True)  # noqa: E731

    log(f"lowbit from {sys.modules['lowbit'].__file__}; {libs.bnb_missing or 'bitsandbytes ' + libs.bnb.__version__}")
    log("python -m lowbit ...")
    info = {
        "load_start": load_average(),
        "mode": "quick" if args.quick else "full",
        "threads": args.threads,
        "started": stamp,
        "budget": vars(budget),
        "machine": bench_machine.machine(args.threads),
        "versions": bench_machine.versions(),
        "lowbit": bench_machine.lowbit_backend_details(),
        "lowbit_report": bench_machine.lowbit_report(),
    }
    info["resident"] = bench_cases.resident_bytes(libs)
    info["precision"] = bench_cases.precision_errors(libs)
    log("read and copy bandwidth ...")
    read = bench_machine.read_bandwidth(llc, budget)
    if read.impls and read.impls[0].gbps:
        log(f"read bandwidth {read.impls[0].gbps:.1f} GB/s")
    copy = bench_machine.copy_bandwidth(llc, budget)
    if copy.impls and copy.impls[0].gbps:
        log(f"copy bandwidth {copy.impls[0].gbps:.1f} GB/s (read + write)")

    results = []
    for number, case in enumerate(cases, 1):
        log(f"[{number}/{len(cases)}] {case.name} ...")
        result = run_case(case, budget)
        results.append(result)
        summary = ", ".join(
            f"{r.lib} {r.median_ms:.3g} ms" + (" WRONG" if r.verdict and not r.verdict.ok else "")
            if r.status == "ok" else f"{r.lib} {r.status}"
            for r in result.impls
        )  # fmt: skip
        log(f"    {result.error or summary} ({result.seconds:.1f} s)")

    info["wall_s"] = time.perf_counter() - started
    info["load_end"] = load_average()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.md").write_text(bench_report.markdown(results, read, copy, info))
    (args.out / "results.json").write_text(bench_report.to_json(results, read, copy, info))
    problem = bench_report.plot(results, args.out / "results.png")
    log(problem or f"wrote {args.out}/results.md, results.json, results.png")
    print((args.out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
