"""The pieces every benchmark case shares: what a case is, how it is timed, how it is checked.

A :class:`Case` is a name plus a ``build`` function. ``build`` makes the tensors (only when the
case runs, so one case's memory is freed before the next) and returns :class:`Impl` objects, one
per implementation: the library it belongs to, what it calls, a zero-argument callable, and
optionally a check of its output. :func:`run_case` then

1. calls every implementation once (warm-up; lowbit calls are traced to record which backend
   kernel served each op), and keeps going for fast calls until ``Budget.warmup_s`` is spent;
2. runs every check on the warm-up outputs, so a wrong result is flagged at no extra cost;
3. times each implementation for about ``Budget.target_s`` (``min_reps`` .. ``max_reps``
   calls) and reports the median. The calls are made in ``Budget.rounds`` blocks per
   implementation, the blocks of all implementations rotating (lowbit, bnb, torch, lowbit, ...)
   so that drifting machine load hits every library alike; each block starts with a short
   untimed re-warm (see :func:`_rewarm`).

An implementation that is missing (``fn=None``) or raises is reported as n/a with the reason;
it never stops the run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import math
import statistics
import time
from collections.abc import Iterator
from typing import Any, Callable, Optional

import torch

LIBS = ("lowbit", "bitsandbytes", "torch")


@dataclasses.dataclass
class Verdict:
    """Whether an implementation's output is right, and how that was decided."""

    ok: bool
    note: str


#: A check receives the implementation's warm-up output and the outputs of every library's
#: primary implementation (keyed by library name) and says whether the output is right.
Check = Callable[[Any, dict[str, Any]], Optional[Verdict]]


@dataclasses.dataclass
class Impl:
    lib: str  # one of LIBS
    label: str  # what is called, shown in the report
    fn: Optional[Callable[[], Any]] = None  # None: not available, see reason
    reason: str = ""
    check: Optional[Check] = None
    bytes_read: Optional[int] = None  # bytes one call must stream from memory (bandwidth cases)


def unavailable(lib: str, label: str, reason: str) -> Impl:
    return Impl(lib, label, None, reason)


@dataclasses.dataclass
class Case:
    name: str
    group: str
    build: Callable[[], list[Impl]]


@dataclasses.dataclass
class Budget:
    target_s: float  # timed seconds per implementation
    min_reps: int
    max_reps: int
    warmup_s: float  # keep warming up until this much time was spent (at least one call)
    rounds: int  # the timed calls are split into this many blocks per implementation, rotating
    rewarm_s: float  # untimed calls before each block (see _rewarm)

    @classmethod
    def full(cls) -> Budget:
        return cls(target_s=1.0, min_reps=3, max_reps=300, warmup_s=0.2, rounds=3, rewarm_s=0.03)

    @classmethod
    def quick(cls) -> Budget:
        return cls(target_s=0.1, min_reps=2, max_reps=10, warmup_s=0.05, rounds=1, rewarm_s=0.01)

    def reps_for(self, seconds_per_call: float) -> int:
        wanted = math.ceil(self.target_s / max(seconds_per_call, 1e-9))
        return max(self.min_reps, min(self.max_reps, wanted))


@dataclasses.dataclass
class ImplResult:
    lib: str
    label: str
    status: str  # "ok", "n/a", "error"
    reason: str = ""
    median_ms: Optional[float] = None
    min_ms: Optional[float] = None
    q1_ms: Optional[float] = None
    q3_ms: Optional[float] = None
    reps: int = 0
    verdict: Optional[Verdict] = None
    kernels: dict[str, str] = dataclasses.field(default_factory=dict)  # lowbit op -> backend
    bytes_read: Optional[int] = None
    round_ms: list[float] = dataclasses.field(default_factory=list)  # the median of each round's block

    @property
    def gbps(self) -> Optional[float]:
        """Bytes read per second at the median call."""
        if self.bytes_read is None or not self.median_ms:
            return None
        return self.bytes_read / (self.median_ms * 1e-3) / 1e9

    @property
    def best_gbps(self) -> Optional[float]:
        """Bytes read per second at the fastest call: what the machine can do (for references)."""
        if self.bytes_read is None or not self.min_ms:
            return None
        return self.bytes_read / (self.min_ms * 1e-3) / 1e9


@dataclasses.dataclass
class CaseResult:
    name: str
    group: str
    impls: list[ImplResult]
    seconds: float
    error: str = ""

    def primary(self, lib: str) -> Optional[ImplResult]:
        return next((r for r in self.impls if r.lib == lib), None)


def _describe(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:200]


# ------------------------------------------------------------------------------------------
# Which lowbit backend served each op
# ------------------------------------------------------------------------------------------
@contextlib.contextmanager
def trace_lowbit_kernels() -> Iterator[dict[str, str]]:
    """Record, for every ``torch.ops.lowbit`` op called inside the block, the backend whose
    kernel ran: the active backend's name, or ``"reference fallback"`` when it lacks the op."""
    seen: dict[str, str] = {}
    try:
        from lowbit.core import registry

        original = registry.kernel_for
    except (ImportError, AttributeError):  # lowbit reorganized: report nothing rather than fail
        yield seen
        return

    def traced(op_name: str, device_type: str):
        kernel = original(op_name, device_type)
        try:
            backend = registry.active(device_type)
            own = registry.get(backend).kernels.get(op_name)
            seen[op_name.split(".")[0]] = backend if own is kernel else "reference fallback"
        except Exception:  # noqa: BLE001 (tracing must never change what runs)
            seen[op_name.split(".")[0]] = "?"
        return kernel

    registry.kernel_for = traced
    try:
        yield seen
    finally:
        registry.kernel_for = original


# ------------------------------------------------------------------------------------------
# Running one case
# ------------------------------------------------------------------------------------------
def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def _warm_up(impl: Impl, budget: Budget) -> tuple[float, Any, dict[str, str]]:
    """Call ``impl`` until warm; returns the last call's seconds, the first output, the kernels."""
    kernels: dict[str, str] = {}
    if impl.lib == "lowbit":
        with trace_lowbit_kernels() as kernels:
            seconds, out = _timed(impl.fn)
    else:
        seconds, out = _timed(impl.fn)
    spent, calls = seconds, 1
    while spent < budget.warmup_s and calls < 1000:
        seconds, _ = _timed(impl.fn)
        spent, calls = spent + seconds, calls + 1
    return seconds, out, dict(kernels)


def _rewarm(fn: Callable[[], Any], seconds_per_call: float, budget: Budget) -> None:
    """Untimed calls before a block of timed ones. Each library runs its own thread pool (torch's
    and bitsandbytes' OpenMP runtimes, lowbit's threads); right after another library ran, its
    threads still spin and a fast call takes up to twice as long for the first millisecond or
    so. Calls of 0.1 s or more are not affected measurably and get no re-warm."""
    if seconds_per_call >= 0.1:
        return
    spent = calls = 0
    while calls < 2 or (spent < budget.rewarm_s and calls < 1000):
        spent += _timed(fn)[0]
        calls += 1


def run_case(case: Case, budget: Budget) -> CaseResult:
    gc.collect()
    start = time.perf_counter()
    try:
        impls = case.build()
    except Exception as err:  # noqa: BLE001 (a broken case must not stop the others)
        return CaseResult(case.name, case.group, [], time.perf_counter() - start, _describe(err))

    results = [ImplResult(i.lib, i.label, "n/a", i.reason, bytes_read=i.bytes_read) for i in impls]
    outputs: dict[int, Any] = {}  # warm-up output of each implementation
    estimate: dict[int, float] = {}
    for index, impl in enumerate(impls):
        if impl.fn is None:
            continue
        try:
            seconds, outputs[index], results[index].kernels = _warm_up(impl, budget)
            estimate[index] = seconds
        except Exception as err:  # noqa: BLE001
            results[index].status, results[index].reason = "error", _describe(err)

    primary = {}  # the output of each library's first implementation (what checks compare with)
    for index, impl in enumerate(impls):
        if impl.lib not in primary:
            primary[impl.lib] = outputs.get(index)
    primary = {lib: out for lib, out in primary.items() if out is not None}
    for index, out in outputs.items():
        if impls[index].check is not None:
            try:
                results[index].verdict = impls[index].check(out, primary)
            except Exception as err:  # noqa: BLE001
                results[index].verdict = Verdict(False, f"check failed: {_describe(err)}")
    outputs.clear()
    primary.clear()

    reps = {index: budget.reps_for(seconds) for index, seconds in estimate.items()}
    samples: dict[int, list[float]] = {index: [] for index in reps}
    rounds: dict[int, list[float]] = {index: [] for index in reps}  # per round, that block's median
    gc.collect()
    gc.disable()
    try:
        for round_ in range(budget.rounds):
            for index, total in reps.items():
                share = total // budget.rounds + (round_ < total % budget.rounds)
                if index not in samples or share == 0:
                    continue
                try:
                    _rewarm(impls[index].fn, estimate[index], budget)
                    block = [_timed(impls[index].fn)[0] for _ in range(share)]
                    samples[index] += block
                    rounds[index].append(statistics.median(block) * 1e3)
                except Exception as err:  # noqa: BLE001
                    results[index].status, results[index].reason = "error", _describe(err)
                    del samples[index]
    finally:
        gc.enable()

    for index, times in samples.items():
        ms = sorted(t * 1e3 for t in times)
        quartiles = statistics.quantiles(ms, n=4) if len(ms) > 1 else [ms[0]] * 3
        result = results[index]
        result.status, result.reps = "ok", len(ms)
        result.median_ms, result.min_ms = statistics.median(ms), ms[0]
        result.q1_ms, result.q3_ms = quartiles[0], quartiles[2]
        result.round_ms = rounds[index]
    del impls
    gc.collect()
    return CaseResult(case.name, case.group, results, time.perf_counter() - start)


# ------------------------------------------------------------------------------------------
# Checks
# ------------------------------------------------------------------------------------------
def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref|, in float64."""
    out, ref = out.double(), ref.double()
    return ((out - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def close_to(ref: torch.Tensor, tol: float, what: str) -> Check:
    """The output is within ``tol`` (relative to max |ref|) of ``ref``."""

    def check(out: Any, _: dict[str, Any]) -> Verdict:
        err = rel_err(out, ref)
        return Verdict(err <= tol, f"rel err {err:.1e} vs {what} (tol {tol:.0e})")

    return check


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for item in value for t in _tensors(item)]
    absmax = getattr(value, "absmax", None)  # a QuantState: compare its absmax
    return [absmax] if isinstance(absmax, torch.Tensor) else []


def same_as(lib: str, what: str = "") -> Check:
    """Every tensor of the output (including a QuantState's absmax) is bit-identical to the
    output of ``lib``'s primary implementation."""

    def check(out: Any, primary: dict[str, Any]) -> Optional[Verdict]:
        if lib not in primary:
            return None
        mine, theirs = _tensors(out), _tensors(primary[lib])
        equal = len(mine) == len(theirs) and all(
            a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b) for a, b in zip(mine, theirs)
        )
        return Verdict(equal, f"{what or 'output'} {'bit-identical to' if equal else 'DIFFERS from'} {lib}")

    return check


def equals(ref: torch.Tensor, what: str) -> Check:
    """The output is bit-identical to ``ref`` (an exactly computed result)."""

    def check(out: Any, _: dict[str, Any]) -> Verdict:
        equal = out.shape == ref.shape and out.dtype == ref.dtype and torch.equal(out, ref)
        return Verdict(equal, f"{'equals' if equal else 'DIFFERS from'} {what}")

    return check


def all_of(*checks: Check) -> Check:
    """Every check must pass; notes are joined."""

    def check(out: Any, primary: dict[str, Any]) -> Optional[Verdict]:
        verdicts = [v for v in (c(out, primary) for c in checks) if v is not None]
        if not verdicts:
            return None
        return Verdict(all(v.ok for v in verdicts), "; ".join(v.note for v in verdicts))

    return check
