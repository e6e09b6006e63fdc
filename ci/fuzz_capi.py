#!/usr/bin/env python3
"""Build the libFuzzer target of the C ABI (csrc/fuzz/fuzz_capi.cpp) and run it; report executions,
findings and how often each entry point was accepted and refused.

    python3 ci/fuzz_capi.py                      # 1,000,000 executions over 2 workers (what CI runs)
    python3 ci/fuzz_capi.py --seconds 3600       # a long run: each worker fuzzes for an hour
    python3 ci/fuzz_capi.py --workers 8 --runs 50000000

Used by the ``fuzz`` nox session. The library and the target are built with clang,
``-fsanitize=fuzzer,address,undefined`` (CMake ``-DLOWBIT_FUZZ=ON``) into ``build/fuzz/``; the
workers share the corpus ``build/fuzz/corpus/`` (kept between runs, so long runs resume) and
write any failing input to ``build/fuzz/artifacts/``, with the command that reproduces it.
Fails when a worker finds anything (sanitizer report, a refused call that wrote to a buffer, ...)
or when an entry point was never accepted (the run did not get past its argument checks).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
BUILD = ROOT / "build" / "fuzz"
TARGET = "lowbit_fuzz_capi"
COMPILERS = ("clang++-19", "clang++-18", "clang++-17", "clang++-16", "clang++")
INSTALL_HINT = "Debian/Ubuntu: apt-get install clang-19 libclang-rt-19-dev"
SUMMARY = re.compile(r"^lowbit fuzz: (\w+) ok=(\d+) refused=(\d+) unsupported=(\d+)$", re.M)
EXECUTED = re.compile(r"^stat::number_of_executed_units: (\d+)$", re.M)


def log(message: str) -> None:
    print(f"[fuzz] {message}", flush=True)


def find_compiler() -> tuple[Optional[str], str]:
    """(clang++ that links a libFuzzer + ASan + UBSan program, None) or (None, why there is none)."""
    tried = []
    candidates = [os.environ["LOWBIT_FUZZ_CXX"]] if os.environ.get("LOWBIT_FUZZ_CXX") else list(COMPILERS)
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "probe.cpp"
        source.write_text('extern "C" int LLVMFuzzerTestOneInput(const unsigned char *, unsigned long) { return 0; }\n')
        for name in candidates:
            path = shutil.which(name)
            if path is None:
                continue
            probe = subprocess.run(
                [path, "-fsanitize=fuzzer,address,undefined", str(source), "-o", str(Path(tmp) / "probe")],
                capture_output=True, text=True,
            )  # fmt: skip
            if probe.returncode == 0:
                return path, ""
            tried.append(f"{name} ({(probe.stderr.strip().splitlines() or ['failed'])[-1]})")
    found = "; tried " + ", ".join(tried) if tried else "; no clang++ on PATH"
    return None, f"the fuzz target needs clang++ with libFuzzer and the ASan/UBSan runtimes ({INSTALL_HINT}){found}"


def build(compiler: str) -> Path:
    subprocess.run(
        ["cmake", "-S", str(ROOT), "-B", str(BUILD), "-G", "Ninja", f"-DCMAKE_CXX_COMPILER={compiler}",
         "-DCMAKE_BUILD_TYPE=RelWithDebInfo", "-DLOWBIT_FUZZ=ON"],
        check=True,
    )  # fmt: skip
    subprocess.run(["cmake", "--build", str(BUILD), "--target", TARGET], check=True)
    return BUILD / TARGET


def sanitizer_env(compiler: str) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("UBSAN_OPTIONS", "print_stacktrace=1:halt_on_error=1")
    version = re.search(r"clang\+\+-(\d+)$", compiler)
    symbolizer = shutil.which(f"llvm-symbolizer-{version.group(1)}" if version else "llvm-symbolizer")
    if symbolizer:
        env.setdefault("ASAN_SYMBOLIZER_PATH", symbolizer)
    return env


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=None, help="executions in total (default 1,000,000 unless --seconds)")
    parser.add_argument("--seconds", type=int, default=None, help="run each worker this long instead")
    parser.add_argument("--workers", type=int, default=2, help="parallel fuzzing processes (default 2)")
    parser.add_argument("--seed", type=int, default=1, help="seed of worker 0 (worker i gets seed + i)")
    args = parser.parse_args(argv)
    runs = args.runs if args.runs is not None or args.seconds is not None else 1_000_000

    compiler, problem = find_compiler()
    if compiler is None:
        log(problem)
        return 2
    log(f"compiler: {compiler}")
    binary = build(compiler)
    corpus, artifacts = BUILD / "corpus", BUILD / "artifacts"
    corpus.mkdir(exist_ok=True)
    artifacts.mkdir(exist_ok=True)
    limits = [f"-runs={runs // args.workers + (i < runs % args.workers)}" if runs is not None else "-runs=-1"
              for i in range(args.workers)]  # fmt: skip
    if args.seconds is not None:
        limits = [f"{limit} -max_total_time={args.seconds}" for limit in limits]
    env = sanitizer_env(compiler)
    start = time.monotonic()
    workers = []
    for i in range(args.workers):
        cmd = [str(binary), *limits[i].split(), f"-seed={args.seed + i}", f"-artifact_prefix={artifacts}/",
               "-print_final_stats=1", "-print_funcs=0", str(corpus)]  # fmt: skip
        log_path = BUILD / f"worker-{i}.log"
        log(f"worker {i}: {' '.join(cmd)} > {log_path}")
        workers.append((subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log_path.open("w"), env=env), log_path))
    outcomes: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    executions, findings = 0, []
    for i, (process, log_path) in enumerate(workers):
        status = process.wait()
        text = log_path.read_text(errors="replace")
        executions += sum(int(n) for n in EXECUTED.findall(text))
        for entry, *counts in SUMMARY.findall(text):
            for k, count in enumerate(counts):
                outcomes[entry][k] += int(count)
        if status != 0:
            crash = re.search(r"Test unit written to (\S+)", text)
            findings.append(f"worker {i} exited with {status}: see {log_path}" +
                            (f"; reproduce with {binary} {crash.group(1)}" if crash else ""))  # fmt: skip
    seconds = time.monotonic() - start
    for entry, (ok, refused, unsupported) in outcomes.items():
        log(f"{entry:32s} accepted {ok:9d}  refused {refused:9d}  unsupported {unsupported:6d}")
    log(f"{executions} executions in {seconds:.0f} s with {args.workers} workers, {len(findings)} findings")
    for finding in findings:
        log(f"FINDING: {finding}")
    never = [entry for entry, (ok, _, _) in outcomes.items() if ok == 0]
    if not findings and (not outcomes or never):
        log(f"entry points never accepted: {', '.join(never) or 'all (no summary in the logs)'}")
        return 1
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())
