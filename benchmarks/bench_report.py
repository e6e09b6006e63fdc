"""Turn case results into results.md (tables), results.json (raw numbers) and results.png (plot)."""

from __future__ import annotations

import dataclasses
import json
import re
import statistics
from pathlib import Path
from typing import Any, Optional

from bench_cases import NATIVE_STACK_LABEL, SIDE_READ_LABEL
from bench_core import LIBS, CaseResult, ImplResult
from bench_machine import isa_of

SHORT = {"lowbit": "lowbit", "bitsandbytes": "bnb", "torch": "torch"}
NOISY = 1.5  # a median this many times the fastest call: the cell shows the minimum too
OFFSET = {"lowbit": 0.0, "bitsandbytes": -0.17, "torch": 0.17}  # plot rows: keep equal values apart


def fmt_ms(ms: Optional[float]) -> str:
    if ms is None:
        return ""
    for limit, digits in ((100, 0), (10, 1), (1, 2)):
        if ms >= limit:
            return f"{ms:.{digits}f}"
    return f"{ms:.3f}"


def fmt_ratio(ratio: Optional[float]) -> str:
    if ratio is None:
        return ""
    if ratio < 1:
        return f"{ratio:.2g}×"
    return f"{ratio:.1f}×" if ratio >= 10 else f"{ratio:.2f}×"


def ratio(other: Optional[ImplResult], lowbit: Optional[ImplResult]) -> Optional[float]:
    """other ÷ lowbit: above 1, lowbit is faster."""
    if other is None or lowbit is None or not other.median_ms or not lowbit.median_ms:
        return None
    return other.median_ms / lowbit.median_ms


def wrong(result: Optional[ImplResult]) -> bool:
    return result is not None and result.verdict is not None and not result.verdict.ok


@dataclasses.dataclass
class Row:
    """One table row: a case's primary implementations, or one extra implementation."""

    case: CaseResult
    label: str
    cells: dict[str, Optional[ImplResult]]  # lib -> the implementation shown in that column
    lowbit: Optional[ImplResult]  # the lowbit result ratios divide by
    extra: bool


def rows(results: list[CaseResult]) -> list[Row]:
    found = []
    for case in results:
        primary = {lib: case.primary(lib) for lib in LIBS}
        found.append(Row(case, case.name, primary, primary["lowbit"], False))
        for impl in case.impls:
            if impl is not primary[impl.lib]:
                cells = {lib: (impl if lib == impl.lib else None) for lib in LIBS}
                found.append(Row(case, f"↳ {SHORT[impl.lib]}: {impl.label}", cells, primary["lowbit"], True))
    return found


class Footnotes:
    def __init__(self) -> None:
        self.texts: list[str] = []

    def ref(self, text: str) -> str:
        if text not in self.texts:
            self.texts.append(text)
        return f"[{self.texts.index(text) + 1}]"

    def render(self) -> list[str]:
        return [f"[{i}] {text}  " for i, text in enumerate(self.texts, 1)]


def cell(result: Optional[ImplResult], notes: Footnotes) -> str:
    if result is None:
        return ""
    if result.status != "ok":
        return f"{result.status} {notes.ref(f'{SHORT[result.lib]}: {result.reason}')}"
    text = fmt_ms(result.median_ms)
    if result.min_ms and result.median_ms >= NOISY * result.min_ms:
        text += f" (min {fmt_ms(result.min_ms)})"
    return text + (" ✗" if wrong(result) else "")


def kernels(result: Optional[ImplResult], details: dict[str, Any]) -> str:
    """The lowbit backend (and ISA) that ran the case's ops; ops that fell back are named."""
    if result is None or not result.kernels:
        return "—"
    by_backend: dict[str, list[str]] = {}
    for op, backend in result.kernels.items():
        by_backend.setdefault(backend, []).append(op)
    parts = []
    for backend, ops in by_backend.items():
        if backend == "reference fallback":
            parts.append(f"reference fallback: {', '.join(ops)}")
        else:
            isa = isa_of(backend, details)
            parts.append(f"{backend}/{isa}" if isa else backend)
    return "; ".join(sorted(parts))


def check_text(result: Optional[ImplResult]) -> str:
    if result is None or result.verdict is None:
        return "–"
    return ("✓ " if result.verdict.ok else "✗ ") + result.verdict.note


def markdown(results: list[CaseResult], read: CaseResult, copy: CaseResult, info: dict[str, Any]) -> str:
    notes = Footnotes()
    machine, details = info["machine"], info["lowbit"]
    lines = [
        "# lowbit benchmarks",
        "",
        f"{machine['cpu']}, {machine['logical_cpus']} logical CPUs, {info['threads']} torch threads, "
        f"LLC {machine['llc_bytes'] >> 20} MiB ({machine['llc_source']}); "
        f"lowbit {info['versions']['lowbit'].split()[0]} (cpu backend: {details['active_cpu_backend']}), "
        f"bitsandbytes {info['versions']['bitsandbytes']}, torch {info['versions']['torch']}; "
        f"{info['mode']} run of {info['wall_s']:.0f} s on {info['started']}{load_text(info)}.",
        "",
        *load_warning(info),
        "Times are medians in ms (lower is better). Ratios are **other ÷ lowbit**: above 1× lowbit is faster, "
        "below 1× slower. ✗ marks an output that failed its check (its time is not a valid comparison). "
        f"'(min …)' follows a median that is ≥ {NOISY}× the fastest call: that measurement was disturbed.",
        "",
        "| case | lowbit ms | bnb ms | torch ms | torch op | bnb ÷ lowbit | torch ÷ lowbit | lowbit check | lowbit kernels |",
        "|---|---:|---:|---:|---|---:|---:|---|---|",
    ]
    for row in rows(results):
        if row.case.error and not row.extra:
            lines.append(f"| {row.label} | error {notes.ref(row.case.name + ': ' + row.case.error)} |||||||")
            continue
        lowbit, bnb, torch_ = (row.cells[lib] for lib in LIBS)
        # an extra row shows its own time in its library's column, else lowbit's primary time
        if lowbit is not None or not row.extra:
            lowbit_cell = cell(lowbit, notes)
        else:
            lowbit_cell = fmt_ms(row.lowbit.median_ms) if row.lowbit else ""
        checked = row.cells[next(lib for lib in LIBS if row.cells[lib] is not None)] if row.extra else lowbit
        torch_op = torch_.label if torch_ is not None and not row.extra else ""
        lines.append(
            f"| {row.label} | {lowbit_cell} | {cell(bnb, notes)} | {cell(torch_, notes)} | {torch_op} "
            f"| {fmt_ratio(ratio(bnb, row.lowbit))} | {fmt_ratio(ratio(torch_, row.lowbit))} "
            f"| {check_text(checked)} | {kernels(lowbit, details) if not row.extra else ''} |"
        )
    lines += ["", "## Memory bandwidth", "", bandwidth_table(results, read, copy), ""]
    lines += ["## Memory per 4096×4096 layer at inference", "", resident_table(info.get("resident", [])), ""]
    lines += ["## Error of the products (16×4096×4096 NF4, vs the float64 product)", "",
              precision_table(info.get("precision", [])), ""]  # fmt: skip
    lines += ["## Notes", "", *notes_text(results, read, copy, info), "", *notes.render()]
    return "\n".join(lines) + "\n"


def load_text(info: dict[str, Any]) -> str:
    """The 1-minute load average at the run's start and end, where the OS reports one."""
    start, end = info["load_start"], info.get("load_end")
    if start is None:
        return ""
    return f"; 1-minute load average {start:.1f} at its start" + (f", {end:.1f} at its end" if end is not None else "")


def load_warning(info: dict[str, Any]) -> list[str]:
    """Say so when other processes competed for the CPUs: a multi-threaded call whose thread is
    preempted waits at its barrier for a scheduler time slice (milliseconds)."""
    start, end = info["load_start"], info.get("load_end")
    if start is None or start < 0.5 * info["threads"]:
        return []
    return [
        f"**Load warning:** the 1-minute load average was {start:.1f} when the run started"
        + (f" and {end:.1f} at its end" if end is not None else "")
        + f" on {info['machine']['logical_cpus']} CPUs: other processes competed for the cores, and calls that "
        "split work statically over threads (OpenMP) suffer most. Compare with a run on an idle machine.",
        "",
    ]


def precision_table(errors: list[tuple[str, float, float]]) -> str:
    lines = ["| product | max error ÷ max |product| | mean error ÷ mean |product| |", "|---|---:|---:|"]
    lines += [f"| {what} | {worst:.2e} | {mean:.2e} |" for what, worst, mean in errors]
    return "\n".join(lines)


def resident_table(resident: list[tuple[str, int]]) -> str:
    """Bytes each implementation keeps per layer (weights and scales), against the standard layout."""
    standard = {what.split(",")[0]: size for what, size in resident if "standard layout" in what}
    lines = ["| layer held as | bytes | MiB | vs standard layout |", "|---|---:|---:|---:|"]
    for what, size in resident:
        base = standard.get(what.split(",")[0])
        lines.append(f"| {what} | {size:,} | {size / 2**20:.2f} | {f'{size / base:.3f}×' if base else ''} |")
    return "\n".join(lines)


def short_case(name: str) -> str:
    """A decode case's name without the stack size ('decode: 1 token nf4 bf16')."""
    return re.sub(r" through .*?\) ", " ", name)


def bandwidth_table(results: list[CaseResult], read: CaseResult, copy: CaseResult) -> str:
    """Every bandwidth case's implementations against the machine's read bandwidth (what a stream
    of weights can reach) and copy bandwidth."""
    measured = [r.impls[0] if r.impls and r.impls[0].best_gbps else None for r in (read, copy)]
    read_gbps, copy_gbps = (m.best_gbps if m is not None else None for m in measured)
    lines = [
        "| what | MiB per call | ms | GB/s | % of read | % of copy |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    share = lambda gbps, base: f"{gbps / base:.0%}" if base else ""  # noqa: E731
    for result, what in zip(measured, ("read", "read + write")):
        if result is not None:
            lines.append(f"| {result.label} ({what}; fastest call) | {result.bytes_read / 2**20:.0f} "
                         f"| {fmt_ms(result.min_ms)} | {result.best_gbps:.1f} | {share(result.best_gbps, read_gbps)} "
                         f"| {share(result.best_gbps, copy_gbps)} |")  # fmt: skip
    for case in results:
        if case.group != "bandwidth":
            continue
        side = next((r for r in case.impls if r.label == SIDE_READ_LABEL and r.gbps), None)
        for result in case.impls:
            if result.gbps is None or result.label == SIDE_READ_LABEL:
                continue
            of_read = f"{side_share(result, side):.0%}" if side else share(result.gbps, read_gbps)
            lines.append(
                f"| {short_case(case.name)}: {SHORT[result.lib]} {result.label}"
                f"{' ✗' if wrong(result) else ''} "
                f"| {result.bytes_read / 2**20:.0f} | {fmt_ms(result.median_ms)} | {result.gbps:.1f} "
                f"| {of_read} | {share(result.gbps, copy_gbps)} |"
            )
    return "\n".join(lines)


def side_share(result: ImplResult, side: ImplResult) -> float:
    """``result``'s rate as a share of the side-by-side read's: per round (its block and the read's
    block of the same rotation, seconds apart), then the median over the rounds. A shared host's
    bandwidth can change within a case; a round compares blocks of the same minutes."""
    if len(result.round_ms) != len(side.round_ms) or not result.round_ms:
        return result.gbps / side.gbps  # a result without rounds (an older results.json)
    ratios = [
        (result.bytes_read / mine) / (side.bytes_read / theirs) for mine, theirs in zip(result.round_ms, side.round_ms)
    ]
    return statistics.median(ratios)


def notes_text(results: list[CaseResult], read: CaseResult, copy: CaseResult, info: dict[str, Any]) -> list[str]:
    reps = [r.reps for case in results for r in case.impls if r.status == "ok"]
    budget = info["budget"]
    return [
        f"- Timing: every implementation is warmed up, then called about {budget['target_s']} s worth "
        f"({budget['min_reps']}–{budget['max_reps']} calls; this run {min(reps, default=0)}–{max(reps, default=0)}), "
        f"in {budget['rounds']} block(s) per implementation, the blocks of a case's implementations rotating and "
        "each starting with a short untimed re-warm (the libraries' thread pools contend for the cores right "
        "after a switch); the median is shown. "
        "Quartiles, minimum and repetition counts are in results.json.",
        "- Same tensors: 4-bit weights are quantized once by lowbit and bitsandbytes gets the same bytes "
        "(the quantize_4bit rows check that both libraries write identical bytes). Weights are NF4, blocksize 64, "
        "float32 absmax without double quantization, unless a case names fp4 or nf4-dq (double quantization).",
        "- bitsandbytes 4-bit on CPU: `bitsandbytes.nn.Linear4bit` repacks its weight for inference on AVX512-BF16 CPUs "
        "(`functional._convert_weight_packed_for_cpu`, absmax to bf16) and its `gemv_4bit` / `matmul_4bit` CPU "
        "kernel expects that layout; the bnb column uses it. Rows marked 'standard layout' call the same functions "
        "on the packed bytes `quantize_4bit` returns.",
        "- torch columns: dense `F.linear` runs on the dequantized 4-bit weight, i.e. the same product; "
        "`_weight_int4pack_mm_for_cpu` (torch's int4 weight-only format, group 64) runs on random int4 weights of "
        "the same shape and is timed, not checked. Quantize/dequantize rows have no torch equivalent.",
        "- dequantize_4bit: the plain rows return a new tensor, and most of their time is the first touch of "
        "its pages (page faults zero-filling 64 MiB for fp32, the same for both libraries); the 'into out=' rows "
        "write a preallocated output, touched once before timing, so they time the kernel itself.",
        "- Decode: one token (or 2–64, speculative decoding and small batches) through a stack of "
        "4096×4096 layers, each layer's output feeding the next; the packed weights exceed the "
        f"{info['machine']['llc_bytes'] >> 20} MiB last-level cache 2.5 times, and every implementation keeps a "
        "separate copy of its tensors per layer (dense float weights: enough copies, cycled, to exceed 2.5× the LLC "
        "too), so every token streams the weights from memory. Layer j's weight is the stack's NF4/FP4 weight with "
        "its rows rolled (the same values on every side). lowbit runs `lowbit.matmul_4bit` on the interleaved "
        "layout a `Linear4bit` takes in eval mode; bitsandbytes `bnb.matmul_4bit` on the layout its `Linear4bit` "
        "takes for CPU inference. The check: the first layer's output within 1e-2 of the float64 product, the last "
        "one within 0.1 of torch's (16-bit activations drift a little per layer). GB/s = bytes the implementation "
        "must read per token (packed weights + the absmax it reads: float32, decoded once at placement for lowbit's "
        "nf4-dq, bf16 for bitsandbytes' CPU layout; dense weights for F.linear; int4 weights + scales/zeros for "
        "int4pack_mm) ÷ time per token; activations are negligible.",
        f"- Read bandwidth: `src.sum()` over {read.impls[0].bytes_read >> 20 if read.impls else '?'} MiB of float32 "
        "(≥ 4× LLC, advised to be huge pages as lowbit's interleaved weights are), torch's vectorized reduction on the "
        "same threads: the rate at which a stream of weights can be "
        "read, taken at its fastest call (the machine's capability, which load only lowers). Each decode case "
        "also times `src.sum()` over as many bytes as lowbit's stack, in huge pages, in the same rotation as the "
        f"decodes (the '{SIDE_READ_LABEL}' rows: torch ÷ lowbit there is lowbit's share of it): a shared host's "
        "bandwidth moves between cases, and even within one, so there '% of read' compares each decode with that "
        "read round by round (the median of a round's block against the read's block of the same rotation, then the "
        "median of those ratios; elsewhere with the fastest call); copy bandwidth is taken once, at its fastest "
        f"call. Each 1-token decode case also times lowbit's stack without Python ('{NATIVE_STACK_LABEL}'): the "
        "library function its decode path calls, with every argument computed beforehand; the difference between "
        "lowbit's two rows is what its Python costs per layer.",
        f"- Copy bandwidth: `dst.copy_(src)` on {copy.impls[0].bytes_read // 2 >> 20 if copy.impls else '?'} MiB "
        "buffers (≥ 4× LLC), counted as bytes read + bytes written (2× the buffer) per second. Write-allocate "
        "caches also read the destination before overwriting it, so the memory bus carries up to 3× the buffer; "
        "that extra traffic is not counted.",
        "- Placement: what each library does once when a layer is placed for CPU inference, on one 4096×4096 NF4 "
        "weight (8 MiB packed + absmax): lowbit's layout change (`F.interleave_4bit`; nf4-dq also decodes the "
        "nested absmax to float32 once), checked to convert back bit-exactly; bitsandbytes' repacking; torch's "
        "int4pack conversion (from int32 codes).",
        "- SmolLM2: one greedy decode step of SmolLM2-135M-Instruct through transformers (KV cache cropped back to "
        "the 64-token prompt after every step); torch ÷ lowbit is fp32 time ÷ NF4 time. lowbit and bitsandbytes "
        "quantize the same float32 checkpoint to the same NF4 bytes (blocksize 64), compute in float32; the "
        "embedding/lm_head stays float32 (bfloat16 in the 'bfloat16 model' rows).",
        "- lowbit kernels: the backend (and the ISA its build or dispatch reports) whose kernel served each "
        "`torch.ops.lowbit` op during the case; ops the active backend lacks, which ran the pure-torch "
        "reference kernel, are named after 'reference fallback'.",
    ]


def to_json(results: list[CaseResult], read: CaseResult, copy: CaseResult, info: dict[str, Any]) -> str:
    def encode(result: CaseResult) -> dict[str, Any]:
        data = dataclasses.asdict(result)
        for impl, raw in zip(result.impls, data["impls"]):
            raw["gbps"] = impl.gbps
        return data

    return json.dumps(
        {**info, "read": encode(read), "copy": encode(copy), "cases": [encode(r) for r in results]}, indent=1, default=str
    )


def plot(results: list[CaseResult], path: Path) -> Optional[str]:
    """A two-panel dot plot: time per library, and other ÷ lowbit. Returns why not, if it can't."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        return f"matplotlib unavailable ({err}); no plot"

    shown = [row for row in rows(results) if any(r is not None and r.median_ms for r in row.cells.values())]
    colors = {"lowbit": "#1f77b4", "bitsandbytes": "#ff7f0e", "torch": "#2ca02c"}
    fig, (left, right) = plt.subplots(1, 2, figsize=(15, 1.2 + 0.36 * len(shown)), sharey=True)
    for y, row in enumerate(shown):
        for lib in LIBS:
            result = row.cells[lib]
            if lib == "lowbit" and row.extra:
                result = row.lowbit
            if result is None or not result.median_ms:
                continue
            bad, at = wrong(result), y + OFFSET[lib]
            left.scatter(result.median_ms, at, color=colors[lib], marker="x" if bad else "o", s=36, zorder=3)
            value = ratio(result, row.lowbit) if lib != "lowbit" else None
            if value:
                right.scatter(value, at, color=colors[lib], marker="x" if bad else "o", s=36, zorder=3)
                right.annotate(fmt_ratio(value), (value, at), textcoords="offset points", xytext=(6, -3), fontsize=7)
    labels = [row.label if len(row.label) < 70 else row.label[:67] + "…" for row in shown]
    left.set_yticks(range(len(shown)), labels, fontsize=8)
    left.invert_yaxis()
    left.set_xscale("log")
    left.set_xlabel("median ms per call (log)")
    right.set_xscale("log")
    right.axvline(1.0, color="gray", linewidth=1)
    right.set_xlabel("other ÷ lowbit (log): right of the line, lowbit is faster")
    for axis in (left, right):
        axis.grid(True, axis="x", which="both", alpha=0.3)
    handles = [plt.Line2D([], [], color=c, marker="o", linestyle="", label=lib) for lib, c in colors.items()]
    handles.append(plt.Line2D([], [], color="gray", marker="x", linestyle="", label="failed its check"))
    ratios = [x for collection in right.collections for x in collection.get_offsets()[:, 0]]
    right.set_xlim(min(ratios + [1.0]) / 2, max(ratios + [1.0]) * 2)
    fig.legend(handles=handles, loc="upper right", ncol=len(handles), fontsize=8)
    fig.suptitle("lowbit vs bitsandbytes vs torch (CPU)", x=0.3)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
