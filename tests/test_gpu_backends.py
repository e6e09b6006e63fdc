"""The GPU backends (cuda, hip): why they are unavailable, the ctypes binding, and parity with the
reference backend.

Three layers, so that most of this runs on machines without a GPU:

1. Unavailability reasons, in the order a user meets them (torch build, visible GPU, library
   built / loadable / right ABI and platform, code for the GPU's arch, runtime starts): torch is
   monkeypatched and the libraries are stubs compiled here with the C compiler.
2. Built libraries (``LOWBIT_CUDA_LIBRARY`` / ``LOWBIT_HIP_LIBRARY``, ``lowbit/_native/``,
   ``build/gpu/*/`` from the ``build_*`` nox sessions): every symbol binds, the ABI matches, the
   targets the library reports are the device code it embeds, the C ABI rejects bad arguments.
   Skipped with the reason when none is built.
3. Parity of every op with the reference (docs/design.md §5: quantize/dequantize bit-exact, int8 ops
   exact, float products within the accumulation-order bound stated in ``_product_close``,
   optimizers 1e-6 relative / >= 99.9% identical 8-bit codes), run on
   * the host emulation of the kernels (csrc/cuda/emu: the same .cu files compiled as C++, CTAs
     run one at a time with their threads as fibers, in varied orders, shared memory poisoned per
     CTA), through the same Python kernel wrappers as the real backend;
   * a real GPU (the cuda or hip backend) whenever one is present, else skipped with the reason.
"""

from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import types
from pathlib import Path
from typing import Optional

import pytest
import torch

import lowbit
from lowbit.backends import gpu_probe
from lowbit.backends.cuda import blockwise_8bit, int8, matmul_4bit, native, optimizers, quantize_4bit, runtime
from lowbit.backends.reference.quantize_4bit import decode_4bit
from lowbit.core import formats, registry
from lowbit.core.registry import KernelTable

ROOT = Path(__file__).resolve().parents[1]
CUDA_SRC = ROOT / "csrc" / "cuda"
sys.path.insert(0, str(ROOT / "ci"))
import gpu_build  # noqa: E402
import gpu_fatbin  # noqa: E402

FAMILIES = (quantize_4bit, blockwise_8bit, matmul_4bit, int8, optimizers)
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
KERNEL_SOURCES = ("quantize_4bit", "blockwise_8bit", "gemv_4bit", "int8", "optimizers", "paged", "capi")


# ---- compiling helpers (stubs, the emulation, the device-math test) -------------------------------
def _compiler(language: str) -> Optional[str]:
    names = ("c++", "g++", "clang++") if language == "c++" else ("cc", "gcc", "clang")
    return next((path for path in map(shutil.which, names) if path), None)


def _build(name: str, language: str, sources: list[Path], flags: list[str], text: str = "") -> Path:
    """Compile once per content (sources, flags, compiler); cached under build/gpu-tests/."""
    compiler = _compiler(language)
    if compiler is None or platform.system() != "Linux":
        pytest.skip(f"needs a {language} compiler on Linux to build {name}")
    digest = hashlib.sha256(" ".join([compiler, *flags, text]).encode())
    for source in [*sources, *(Path(f) for f in flags if f.endswith((".cu", ".cpp", ".c")))]:
        digest.update(source.read_bytes())
    headers = [*CUDA_SRC.glob("*.cuh"), *CUDA_SRC.glob("*.h"), *(CUDA_SRC / "emu").glob("*.h")]
    for header in sorted(headers + list((ROOT / "csrc" / "common").glob("*.h"))):
        digest.update(header.read_bytes())
    out_dir = ROOT / "build" / "gpu-tests" / digest.hexdigest()[:16]
    output = out_dir / name
    if not output.exists():
        out_dir.mkdir(parents=True, exist_ok=True)
        if text:
            source = out_dir / f"{name}.{'c' if language == 'c' else 'cpp'}"
            source.write_text(text)
            sources = [source]
        tmp = out_dir / f".{name}.{os.getpid()}"
        result = subprocess.run([compiler, *flags, *map(str, sources), "-o", str(tmp)], capture_output=True, text=True)
        if result.returncode != 0:
            pytest.fail(f"building {name} failed:\n{result.stderr[-4000:]}")
        tmp.replace(output)
    return output


def _stub_library(omit: str = "") -> Path:
    """A C library with every symbol of the GPU C ABI; identity answers come from LOWBIT_STUB_* at call time."""
    lines = [
        "#include <stdint.h>",
        "#include <stdlib.h>",
        "static const char *env(const char *k, const char *d) { const char *v = getenv(k); return v ? v : d; }",
        f'int32_t lowbit_cuda_abi_version(void) {{ return atoi(env("LOWBIT_STUB_ABI", "{native.ABI_VERSION}")); }}',
        'const char *lowbit_cuda_build_info(void) { return "stub for tests/test_gpu_backends.py"; }',
        'const char *lowbit_cuda_platform(void) { return env("LOWBIT_STUB_PLATFORM", "cuda"); }',
        'const char *lowbit_cuda_targets(void) { return env("LOWBIT_STUB_TARGETS", "sm_80 compute_80"); }',
        'const char *lowbit_cuda_last_error(void) { return env("LOWBIT_STUB_ERROR", ""); }',
        'int32_t lowbit_cuda_device_check(int32_t d) { (void)d; return atoi(env("LOWBIT_STUB_CHECK", "0")); }',
    ]
    defined = {line.split("(")[0].split()[-1].lstrip("*") for line in lines[3:]}
    for symbol in native.SIGNATURES:
        if symbol not in defined and symbol != omit:
            lines.append(f"int32_t {symbol}(void) {{ return 0; }}")
    return _build(f"libstub{'_no_' + omit if omit else ''}.so", "c", [], ["-shared", "-fPIC"], "\n".join(lines) + "\n")


# ---- 1. unavailability reasons --------------------------------------------------------------------
@pytest.fixture
def cuda_torch(monkeypatch):
    """Pretend torch is a CUDA build with one visible GPU of compute capability 8.6."""
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=0: (8, 6))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: "Fake GPU")
    return monkeypatch


@pytest.fixture
def rocm_torch(monkeypatch):
    """Pretend torch is a ROCm build with one visible gfx90a."""
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(torch.version, "hip", "6.2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: "Fake AMD GPU")
    props = types.SimpleNamespace(gcnArchName="gfx90a:sramecc+:xnack-")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index=0: props)
    return monkeypatch


def test_torch_without_cuda_is_the_first_reason_and_the_library_state_follows(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(torch.version, "hip", None)
    missing = tmp_path / "liblowbit_cuda.so"
    reason = gpu_probe.backend_problem(native.GpuLibrary("cuda", missing), rocm=False)
    assert reason.startswith(f"this torch ({torch.__version__}) was built without CUDA support; besides, ")
    assert f"native library liblowbit_cuda.so is not built (looked for {missing})" in reason
    assert "cmake -S csrc/cuda" in reason and "nox -s build_cuda" in reason


def test_rocm_torch_sends_cuda_users_to_hip_and_cuda_torch_has_no_hip(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.version, "hip", "6.2")
    reason = gpu_probe.backend_problem(native.GpuLibrary("cuda", tmp_path / "x.so"), rocm=False)
    assert reason.startswith("this torch is a ROCm build; use the hip backend")
    monkeypatch.setattr(torch.version, "hip", None)
    reason = gpu_probe.backend_problem(native.GpuLibrary("hip", tmp_path / "x.so"), rocm=True)
    assert reason.startswith("this torch is not a ROCm build (torch.version.hip is None)")
    assert "native library x.so is not built" in reason and "DLOWBIT_GPU_TOOLCHAIN=hip" in reason


def test_no_visible_gpu(cuda_torch, tmp_path):
    cuda_torch.setattr(torch.cuda, "is_available", lambda: False)
    reason = gpu_probe.backend_problem(native.GpuLibrary("cuda", tmp_path / "x.so"), rocm=False)
    assert reason.startswith("no GPU visible: torch.cuda.is_available() is False")


def test_library_not_built_says_how_to_build_it(cuda_torch, tmp_path):
    missing = tmp_path / "liblowbit_cuda.so"
    reason = gpu_probe.backend_problem(native.GpuLibrary("cuda", missing), rocm=False)
    assert reason.startswith(f"native library liblowbit_cuda.so is not built (looked for {missing}); build it")
    assert "cmake --install build/cuda" in reason and "LOWBIT_CUDA_LIBRARY" in reason


def test_environment_variable_picks_the_library(monkeypatch, tmp_path):
    path = tmp_path / "custom.so"
    monkeypatch.setenv("LOWBIT_CUDA_LIBRARY", str(path))
    monkeypatch.setenv("LOWBIT_HIP_LIBRARY", str(tmp_path / "hip.so"))
    assert native.GpuLibrary("cuda").library_path() == path
    assert native.GpuLibrary("hip").library_path() == tmp_path / "hip.so"


def test_library_that_fails_to_load(cuda_torch, tmp_path):
    broken = tmp_path / "liblowbit_cuda.so"
    broken.write_bytes(b"\x7fELF not a shared library")
    reason = gpu_probe.backend_problem(native.GpuLibrary("cuda", broken), rocm=False)
    assert reason.startswith(f"native library at {broken} failed to load: ")


def test_truncated_library_is_refused_before_dlopen(cuda_torch, tmp_path):
    """dlopen of a truncated file dies of SIGBUS: the shared loader (lowbit/backends/native_library.py)
    checks the ELF headers first."""
    truncated = tmp_path / "liblowbit_cuda.so"
    truncated.write_bytes(_stub_library().read_bytes()[:4096])
    reason = gpu_probe.backend_problem(native.GpuLibrary("cuda", truncated), rocm=False)
    assert reason.startswith(f"native library at {truncated} failed to load: it is truncated: ")


def test_library_missing_a_symbol(cuda_torch):
    stub = _stub_library(omit="lowbit_cuda_gemv_4bit")
    reason = gpu_probe.backend_problem(native.GpuLibrary("cuda", stub), rocm=False)
    assert reason.startswith(f"native library at {stub} lacks a symbol") and "lowbit_cuda_gemv_4bit" in reason


def test_abi_mismatch(cuda_torch):
    cuda_torch.setenv("LOWBIT_STUB_ABI", "99")
    stub = _stub_library()
    reason = gpu_probe.backend_problem(native.GpuLibrary("cuda", stub), rocm=False)
    assert reason == f"native library at {stub} has ABI version 99, this lowbit needs {native.ABI_VERSION}; rebuild it"


def test_hip_library_offered_as_cuda(cuda_torch):
    cuda_torch.setenv("LOWBIT_STUB_PLATFORM", "hip")
    stub = _stub_library()
    reason = gpu_probe.backend_problem(native.GpuLibrary("cuda", stub), rocm=False)
    assert reason == f"native library at {stub} is a hip build, not cuda"


def test_library_without_the_devices_arch(cuda_torch):
    cuda_torch.setattr(torch.cuda, "get_device_capability", lambda index=0: (7, 0))
    cuda_torch.setenv("LOWBIT_STUB_TARGETS", "sm_75 sm_80 sm_90 compute_90")
    reason = gpu_probe.backend_problem(native.GpuLibrary("cuda", _stub_library()), rocm=False)
    assert reason.startswith("GPU 0 (Fake GPU): the library was built without code for this GPU (compute capability 7.0, sm_70)")
    assert "it holds sm_75 sm_80 sm_90 compute_90" in reason and "build_cuda12" in reason


def test_library_that_runs_on_the_device_is_available(cuda_torch):
    cuda_torch.setenv("LOWBIT_STUB_TARGETS", "sm_75 sm_80 compute_80")
    assert gpu_probe.backend_problem(native.GpuLibrary("cuda", _stub_library()), rocm=False) is None


def test_runtime_that_cannot_start_on_this_driver(cuda_torch):
    cuda_torch.setenv("LOWBIT_STUB_CHECK", "3")
    message = "the CUDA runtime of this library (version 13000) cannot start: cudaErrorInsufficientDriver"
    cuda_torch.setenv("LOWBIT_STUB_ERROR", message)
    reason = gpu_probe.backend_problem(native.GpuLibrary("cuda", _stub_library()), rocm=False)
    assert reason == f"GPU 0 (Fake GPU): {message}"


def test_hip_arch_check(rocm_torch):
    rocm_torch.setenv("LOWBIT_STUB_PLATFORM", "hip")
    rocm_torch.setenv("LOWBIT_STUB_TARGETS", "gfx906 gfx90a gfx1030")
    stub = _stub_library()
    assert gpu_probe.backend_problem(native.GpuLibrary("hip", stub), rocm=True) is None
    props = types.SimpleNamespace(gcnArchName="gfx942:sramecc+:xnack-")
    rocm_torch.setattr(torch.cuda, "get_device_properties", lambda index=0: props)
    reason = gpu_probe.backend_problem(native.GpuLibrary("hip", stub), rocm=True)
    assert "built without code for this GPU (gfx942)" in reason and "gfx906 gfx90a gfx1030" in reason


# ---- which library variant, bound to which runtime ------------------------------------------------
@pytest.mark.parametrize(
    ("torch_cuda", "library", "runtime_name"),
    [
        ("12.1", "liblowbit_cuda12.so", "libcudart.so.12"),
        ("12.8", "liblowbit_cuda12.so", "libcudart.so.12"),
        ("12.9", "liblowbit_cuda12.so", "libcudart.so.12"),
        ("13.0", "liblowbit_cuda13.so", "libcudart.so.13"),
        ("13.1", "liblowbit_cuda13.so", "libcudart.so.13"),
        ("11.8", None, None),  # no CUDA 11 build
        ("14.0", None, None),
        (None, None, None),  # CPU-only torch
    ],
)
def test_cuda_variant_follows_torchs_cuda_major(torch_cuda, library, runtime_name):
    variant = runtime.cuda_variant(torch_cuda)
    assert (variant.library, variant.runtime) == (library, runtime_name)
    if library is not None:
        assert variant.reason == f"torch is built with CUDA {torch_cuda}: {library} links its shared {runtime_name}"
    elif torch_cuda is None:
        assert "torch.version.cuda is None" in variant.reason
    else:
        assert f"torch is built with CUDA {torch_cuda}; lowbit builds liblowbit_cuda12.so, liblowbit_cuda13.so only" == variant.reason


@pytest.mark.parametrize(
    ("torch_hip", "runtime_name"),
    [("6.2.41133-dd7f95766", "libamdhip64.so.6"), ("6.4.43482", "libamdhip64.so.6"), ("7.0.51831", "libamdhip64.so.7"), (None, None)],
)
def test_hip_variant_is_one_library_bound_to_torchs_rocm(torch_hip, runtime_name):
    variant = runtime.hip_variant(torch_hip)
    assert variant.library == ("liblowbit_hip.so" if torch_hip else None)
    assert variant.runtime == runtime_name


def test_library_file_name_follows_the_variant(cuda_torch, monkeypatch):
    monkeypatch.delenv("LOWBIT_CUDA_LIBRARY", raising=False)
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    assert native.GpuLibrary("cuda").name == "liblowbit_cuda12.so"
    assert native.GpuLibrary("cuda").library_path().name == "liblowbit_cuda12.so"
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    assert native.GpuLibrary("cuda").name == "liblowbit_cuda13.so"
    assert native.GpuLibrary("cuda").details()["variant"].startswith("torch is built with CUDA 13.0")
    monkeypatch.setattr(torch.version, "cuda", "11.8")
    library = native.GpuLibrary("cuda")
    assert not library.selected()
    assert library.load_error() == "no cuda library variant for this torch: torch is built with CUDA 11.8; lowbit builds liblowbit_cuda12.so, liblowbit_cuda13.so only"
    assert library.details()["library"] == "none"


def test_report_names_the_variant_and_why():
    """python -m lowbit: the library file the cuda backend would load, and why that one (in a fresh
    process: the registry probes each backend once, so torch must look like cu12.8 from the start)."""
    code = "import torch; torch.version.cuda = '12.8'; from lowbit.__main__ import report; report()"
    result = _run_python(code, PYTHONPATH=str(ROOT))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    row = next(i for i, line in enumerate(lines) if line.startswith("cuda "))
    assert lines[row + 1].split()[0] == "library:"
    assert lines[row + 1].endswith(
        "liblowbit_cuda12.so (torch is built with CUDA 12.8: liblowbit_cuda12.so links its shared libcudart.so.12)"
    )


def test_runtime_is_the_copy_torch_loaded(tmp_path):
    maps = (
        "7f00-7f01 r-xp 00000000 08:01 1 /venv/lib/python3.11/site-packages/nvidia/cuda_runtime/lib/libcudart.so.12\n"
        "7f02-7f03 r--p 00000000 08:01 2 /venv/lib/python3.11/site-packages/torch/lib/libamdhip64.so.6\n"
        "7f04-7f05 rw-p 00000000 00:00 0 [heap]\n"
    )
    loaded = runtime.loaded_libraries(maps)
    assert [p.name for p in loaded] == ["libcudart.so.12", "libamdhip64.so.6"]
    wheel_dir = tmp_path / "nvidia" / "cu13" / "lib"
    wheel_dir.mkdir(parents=True)
    (wheel_dir / "libcudart.so.13").write_bytes(b"")
    assert runtime.find_runtime("libcudart.so.12", loaded, [wheel_dir]) == loaded[0]  # the loaded copy first
    assert runtime.find_runtime("libcudart.so.13", loaded, [wheel_dir]) == wheel_dir / "libcudart.so.13"
    assert runtime.find_runtime("libamdhip64.so.6", loaded, []) == loaded[1]
    assert runtime.find_runtime("libamdhip64.so.7", loaded, [wheel_dir]) is None  # never another major
    assert runtime.find_runtime("libcudart.so.1", loaded, []) is None  # no prefix confusion with .so.12


def test_a_library_whose_runtime_is_missing_says_so(tmp_path):
    """A library that NEEDs libcudart.so.12 where neither the process nor torch's wheels have one."""
    compiler = _compiler("c")
    if compiler is None:
        pytest.skip("needs a C compiler")
    fake_runtime = tmp_path / "libcudart.so.12"
    subprocess.run([compiler, "-shared", "-fPIC", "-x", "c", "-", "-o", str(fake_runtime), "-Wl,-soname,libcudart.so.12"],
                   input="int lowbit_fake_cudart;\n", text=True, check=True)  # fmt: skip
    needs = tmp_path / "liblowbit_cuda12.so"
    subprocess.run([compiler, "-shared", "-fPIC", "-x", "c", "-", "-x", "none", "-Wl,--no-as-needed", str(fake_runtime), "-o", str(needs)],
                   input="int x;\n", text=True, check=True)  # fmt: skip
    fake_runtime.unlink()
    # in a fresh process: an earlier test may have loaded a real libcudart.so.12 into this one
    code = (
        "import torch; from lowbit.backends.cuda import native, runtime; torch.version.cuda = '12.8'; "
        f"runtime.runtime_dirs = lambda platform: []; print(native.GpuLibrary('cuda', {str(needs)!r}).load_error())"
    )
    result = _run_python(code, PYTHONPATH=str(ROOT))
    assert result.returncode == 0, result.stderr
    reason = result.stdout.strip()
    assert reason.startswith(f"native library at {needs} failed to load: ") and "libcudart.so.12" in reason
    assert "(liblowbit_cuda12.so needs libcudart.so.12, which is neither loaded in this process nor in torch's wheels" in reason


@pytest.mark.parametrize(
    ("name", "needed", "undefined", "problem"),
    [
        ("liblowbit_cuda12.so", ["libcudart.so.12", "libc.so.6"], {"__cudaRegisterFatBinary"}, None),
        ("liblowbit_cuda13.so", ["libcudart.so.13"], {"__cudaRegisterFatBinary"}, None),
        ("liblowbit_cuda13.so", ["libcudart.so.12"], {"__cudaRegisterFatBinary"}, "NEEDs ['libcudart.so.12'], not libcudart.so.13"),
        ("liblowbit_cuda13.so", ["libstdc++.so.6"], set(), "NEEDs no libcudart"),  # static cudart
        ("liblowbit_cuda13.so", ["libstdc++.so.6"], set(), "a static cudart is linked in"),
        ("liblowbit_hip.so", ["libstdc++.so.6"], {"__hipRegisterFatBinary"}, None),
        ("liblowbit_hip.so", ["libamdhip64.so.5"], {"__hipRegisterFatBinary"}, "it would load with one ROCm major only"),
        ("liblowbit_cuda.so", ["libcudart.so.12"], {"__cudaRegisterFatBinary"}, "carries no CUDA major"),
    ],
)
def test_build_check_of_the_runtime_link(name, needed, undefined, problem):
    problems = gpu_build.runtime_problems(Path(name), needed, undefined)
    if problem is None:
        assert problems == []
    else:
        assert any(problem in p for p in problems), problems


@pytest.mark.parametrize(
    ("targets", "capability", "runs"),
    [
        ("sm_80", (8, 0), True),
        ("sm_80", (8, 6), True),  # SASS runs on a later minor of the same major
        ("sm_80", (8, 9), True),
        ("sm_86", (8, 0), False),  # ... not on an earlier one
        ("sm_80", (9, 0), False),  # ... nor on another major
        ("sm_80 compute_80", (9, 0), True),  # PTX is JIT-compiled for newer GPUs
        ("sm_90 compute_90", (12, 0), True),
        ("sm_120 compute_120", (10, 0), False),
        ("sm_75 sm_80 sm_86 sm_89 sm_90 sm_100 sm_120 compute_120", (7, 0), False),
        ("sm_70 compute_70", (7, 0), True),
        ("sm_70 compute_70", (7, 5), True),
        ("", (8, 0), False),
    ],
)
def test_cuda_arch_compatibility(targets, capability, runs):
    assert (native.cuda_arch_problem(targets, capability) is None) == runs


def test_every_family_registers_its_ops():
    table = KernelTable("probe")
    for family in FAMILIES:
        family.install(table, native.GpuLibrary("cuda", Path("/nonexistent")))
    assert set(table.names()) == {
        "quantize_4bit", "dequantize_4bit", "dequantize_4bit.out", "quantize_blockwise", "dequantize_blockwise",
        "dequantize_blockwise.out", "gemv_4bit", "gemv_4bit.out", "matmul_4bit", "int8_vectorwise_quant",
        "int8_vectorwise_dequant", "int8_double_quant", "int8_linear_matmul", "int8_linear_matmul.out",
        "int8_mm_dequant", "int8_scaled_mm", "int8_mixed_scaled_mm", "optimizer_update_32bit",
        "optimizer_update_8bit_blockwise",
    }  # fmt: skip


def test_blockwise_8bit_blocks_above_4096_run_the_reference_kernel():
    """The GPU kernels stop at 4096 values per block; the larger 8-bit blocksizes never reach them."""
    table = KernelTable("probe")
    blockwise_8bit.install(table, native.GpuLibrary("cuda", Path("/nonexistent")))  # any call would fail
    reference = registry.get("reference").kernels
    x, code = torch.randn(3 * 16384 + 5), formats.dynamic_map()
    q, absmax = table.get("quantize_blockwise")(x, code, 16384)
    want_q, want_absmax = reference.get("quantize_blockwise")(x, code, 16384)
    assert torch.equal(q, want_q) and torch.equal(absmax, want_absmax)
    out = torch.empty(x.shape, dtype=torch.bfloat16)
    table.get("dequantize_blockwise.out")(q, absmax, code, 16384, torch.bfloat16, out)
    assert torch.equal(out, reference.get("dequantize_blockwise")(q, absmax, code, 16384, torch.bfloat16))


def test_kernels_refuse_host_tensors():
    """A kernel of the GPU backends never hands a host pointer to the GPU library."""
    table = KernelTable("probe")
    quantize_4bit.install(table, native.GpuLibrary("cuda", _stub_library()))
    with pytest.raises(ValueError, match="tensors must be on a GPU"):
        table.get("quantize_4bit")(torch.ones(8), 64, "nf4", torch.uint8)


def _run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("LOWBIT_")}
    environment.update(env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environment, timeout=120)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible: the GPU backends may well be available")
def test_report_and_forced_backend_name_the_reason(tmp_path):
    env = {"LOWBIT_CUDA_LIBRARY": str(tmp_path / "liblowbit_cuda.so"), "LOWBIT_HIP_LIBRARY": str(tmp_path / "hip.so")}
    report = _run_python("import sys; from lowbit.__main__ import main; sys.exit(main([]))", **env)
    assert report.returncode == 0, report.stderr
    lines = {line.split()[0]: line for line in report.stdout.splitlines() if line.split()}
    for name in ("cuda", "hip"):
        assert " unavailable " in lines[name], lines[name]
        assert f"liblowbit_{name}.so is not built" in lines[name] or "hip.so is not built" in lines[name]
    assert "built without CUDA support" in lines["cuda"] or "torch.cuda.is_available() is False" in lines["cuda"]
    forced = _run_python("import lowbit", LOWBIT_BACKEND="cuda", **env)
    assert forced.returncode != 0
    assert "LOWBIT_BACKEND='cuda' was requested but the cuda backend cannot run: " in forced.stderr
    assert "is not built" in forced.stderr and "Traceback" in forced.stderr  # an error, not a crash


# ---- 2. built libraries ------------------------------------------------------------------------------
def _built_libraries() -> list[tuple[str, Path]]:
    found: dict[Path, str] = {}
    for platform_name, variable in native.ENV_LIBRARY.items():
        if os.environ.get(variable):
            found[Path(os.environ[variable])] = platform_name
    for platform_name, names in native.LIBRARY_NAMES.items():
        for name in names:
            for path in [ROOT / "lowbit" / "_native" / name, *sorted((ROOT / "build").glob(f"*/{name}")),
                         *sorted((ROOT / "build").glob(f"*/*/{name}"))]:  # fmt: skip
                found.setdefault(path, platform_name)
    return [(platform_name, path) for path, platform_name in found.items() if path.is_file()]


BUILT = _built_libraries()


@pytest.mark.parametrize(
    ("platform_name", "path"),
    BUILT or [pytest.param(None, None, marks=pytest.mark.skip(reason="no GPU library built (python3 -m nox -s build_gpu_min builds some)"))],
    ids=[f"{p}:{path.parent.name}" for p, path in BUILT] or ["none"],
)
def test_built_library_binds_and_describes_itself(platform_name, path):
    # The library binds to the runtime of the process (torch's on a GPU machine): here, a system one
    # if there is one -- Debian's hipcc brings ROCm 5.2's libamdhip64; ci/cuda12_path.py's tree has
    # the CUDA 12 wheel's libcudart.so.12, a CUDA 13 toolkit libcudart.so.13.
    if platform_name == "hip":
        wanted = runtime.HIP_RUNTIME
    else:
        wanted = f"libcudart.so.{path.name[len('liblowbit_cuda'):].split('.')[0]}"
    system_dirs = [ROOT / "build" / "gpu" / "cuda12" / "lib64", Path("/usr/local/cuda/lib64"), Path("/usr/local/cuda/lib"),
                   Path("/usr/lib/x86_64-linux-gnu"), Path("/opt/rocm/lib")]  # fmt: skip
    system = runtime.find_runtime(wanted, [], [d for d in system_dirs if d.is_dir()])
    if system is not None:
        ctypes.CDLL(str(system), mode=os.RTLD_GLOBAL)
    library = native.GpuLibrary(platform_name, path)
    error = library.load_error()
    if error is not None and "failed to load" in error:
        pytest.skip(f"cannot load here: {error}")
    assert error is None, error
    lib = library.lib()
    assert lib.lowbit_cuda_abi_version() == native.ABI_VERSION
    targets = library.targets()
    assert targets, "the library reports no targets"
    # what it says it holds is what it holds
    listing = gpu_fatbin.list_targets(path)
    assert set(targets.split()) == set(listing["targets"]), (targets, listing["targets"])
    assert f"targets={targets}" in lib.lowbit_cuda_build_info().decode()
    # the runtime it binds to: the shared libcudart.so.<major> of its name / no versioned libamdhip64
    if shutil.which("readelf"):
        assert gpu_build.runtime_problems(path, *gpu_build.dynamic_section(path)) == []
    # the C ABI's own argument checks (no device needed: they run before any runtime call)
    _check_c_abi_refusals(lib)
    assert lib.lowbit_cuda_gemv_4bit_max_rows() == matmul_4bit.MAX_ROWS
    if not torch.cuda.is_available():
        assert lib.lowbit_cuda_device_check(0) != 0
        assert lib.lowbit_cuda_last_error().decode(), "a failed device check must say why"


def _check_c_abi_refusals(lib) -> None:
    """The C ABI's own argument checks (csrc/common/lowbit_capi_checks.h; they run before any runtime
    call, so no device is needed): declared lengths must agree with the shape, with the reason in
    lowbit_cuda_last_error()."""
    assert lib.lowbit_cuda_quantize_4bit(0, None, 10, 64, 1, None, 5, None, 1, 0, None) == 1
    assert lib.lowbit_cuda_last_error().decode() == "lowbit_cuda_quantize_4bit: A is a null pointer"
    assert lib.lowbit_cuda_quantize_4bit(0, None, 10, 48, 1, None, 5, None, 1, 0, None) == 1
    assert "blocksize = 48" in lib.lowbit_cuda_last_error().decode()
    assert lib.lowbit_cuda_quantize_4bit(0, None, 0, 64, 1, None, 0, None, 0, 0, None) == 0  # empty: nothing to do
    # a too-large n against the packed bytes and absmax the caller has
    packed, absmax, out = torch.zeros(32, dtype=torch.uint8), torch.ones(1), torch.empty(64)
    assert lib.lowbit_cuda_dequantize_4bit(0, *native.buf(packed), *native.buf(absmax), 64, 1, native.ptr(out), 1 << 20, 0, None) == 1
    assert lib.lowbit_cuda_last_error().decode() == "lowbit_cuda_dequantize_4bit: A_len = 32, but (n + 1) / 2 = 524288"
    assert lib.lowbit_cuda_gemv_4bit(0, None, 9, None, 0, 1, 8, None, 0, None, 16, 64, None, 0, 0, None, 0, None) == 1
    assert "rows = 9 must be in [0, 8]" in lib.lowbit_cuda_last_error().decode()
    state = torch.zeros(8, dtype=torch.uint8)
    args = native.args_struct(0.9, 0.999, 0.0, 0.0, 1e-8, 0.0, 1e-3, 1.0, 1)
    assert lib.lowbit_cuda_optimizer_update_8bit_blockwise(
        0, 0, None, None, 8, *native.buf(state), *native.buf(state), ctypes.byref(args), None, 256, None, 255,
        None, 1, None, 1, 0, None,
    ) == 1  # fmt: skip
    assert lib.lowbit_cuda_last_error().decode().endswith("qmap2_len = 255, but the size of an 8-bit code = 256")


def test_emulated_c_abi_refuses_inconsistent_sizes():
    """The GPU library's C ABI checks, on its host emulation (the same capi.cu)."""
    _check_c_abi_refusals(EmulatedLibrary(_emulation_library()).lib())


# ---- 3. parity ----------------------------------------------------------------------------------------
def test_device_math_equals_the_cpu_definitions():
    """csrc/common/lowbit_device.h vs lowbit_formats.h on the host: the 8-bit lookup entries (all 65536
    bins, sorted and unsorted codes), the register-only 4-bit encoder, the corrected HIP sqrt."""
    binary = _build(
        "device_math_test", "c++", [CUDA_SRC / "tests" / "device_math_test.cpp"],
        ["-std=c++17", "-O2", "-ffp-contract=off", f"-I{ROOT / 'csrc' / 'common'}"],
    )  # fmt: skip
    maps = [repr(float(v)) for signed in (True, False) for v in formats.dynamic_map(signed=signed).tolist()]
    result = subprocess.run([str(binary), *maps], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stdout + result.stderr


def test_emulator_exposes_a_missing_barrier_and_stale_shared_memory():
    """Planted bugs (csrc/cuda/tests/emu_race_test.cpp): a read of shared memory before the
    __syncthreads that orders it after the write, and a CTA reading shared memory only an earlier
    CTA wrote. The emulator's varied thread order and per-CTA poison expose both; the plain index
    order with persistent shared memory (LOWBIT_EMU_SCHEDULE=index, the emulator before them) does
    not -- which is why it matters. The correct forms pass under both."""
    binary = _build(
        "emu_race_test", "c++", [CUDA_SRC / "tests" / "emu_race_test.cpp", CUDA_SRC / "emu" / "emu_runtime.cpp"],
        ["-std=c++17", "-O1", "-U_FORTIFY_SOURCE", f"-I{CUDA_SRC}", f"-I{ROOT / 'csrc' / 'common'}"],
    )  # fmt: skip

    def run(schedule: Optional[str]) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k != "LOWBIT_EMU_SCHEDULE"}
        if schedule:
            env["LOWBIT_EMU_SCHEDULE"] = schedule
        result = subprocess.run([str(binary)], capture_output=True, text=True, env=env, timeout=60, check=True)
        return dict(line.split() for line in result.stdout.splitlines())

    assert run(None) == {"missing_barrier": "wrong", "with_barrier": "ok", "stale_shared": "wrong", "initialized_shared": "ok"}
    assert run("index") == {"missing_barrier": "ok", "with_barrier": "ok", "stale_shared": "ok", "initialized_shared": "ok"}


class EmulatedLibrary(native.GpuLibrary):
    """The host emulation of the GPU library: CPU tensors, device 0, no stream."""

    def __init__(self, path: Path):
        super().__init__("emulation", path)

    def launch_context(self, device):
        assert device.type == "cpu"
        return 0, ctypes.c_void_p(None)


def _emulation_library() -> Path:
    flags = [
        "-std=c++17", "-O1", "-fPIC", "-shared", "-DLOWBIT_EMULATION=1",
        "-ffp-contract=off", "-fno-fast-math", "-U_FORTIFY_SOURCE", "-Wall", "-Wextra", "-Wno-unknown-pragmas", "-Wno-unused-parameter",
        f"-I{CUDA_SRC}", f"-I{ROOT / 'csrc' / 'common'}", "-x", "c++",
        *[str(CUDA_SRC / f"{name}.cu") for name in KERNEL_SOURCES], "-x", "none",
    ]  # fmt: skip
    return _build("liblowbit_emulation.so", "c++", [CUDA_SRC / "emu" / "emu_runtime.cpp"], flags)


@dataclasses.dataclass
class Target:
    name: str
    kernels: KernelTable
    device: torch.device

    @property
    def emulated(self) -> bool:
        """The CPU emulation runs every thread as a fiber: tests trim their largest sweeps for it."""
        return self.name.startswith("emulation")

    def to(self, value):
        return value.to(self.device) if isinstance(value, torch.Tensor) else value


_TARGETS: dict[str, Target] = {}


def _target(name: str) -> Target:
    if name not in _TARGETS:
        if name == "gpu":
            backend = "hip" if torch.version.hip else "cuda"
            status = next(s for s in lowbit.backends.available() if s.name == backend)
            if not status.available:
                pytest.skip(f"{backend} backend unavailable: {status.reason}")
            _TARGETS["gpu"] = Target(backend, registry.get(backend).kernels, torch.device("cuda", torch.cuda.current_device()))
        else:
            library = EmulatedLibrary(_emulation_library())
            assert library.load_error() is None, library.load_error()
            table = KernelTable(name)
            for family in FAMILIES:
                family.install(table, library)
            _TARGETS[name] = Target(name, table, torch.device("cpu"))
    return _TARGETS[name]


# LOWBIT_TEST_TARGETS=gpu (benchmarks/gpu.py on a lent GPU) leaves the emulation out
TARGETS = [name for name in os.environ.get("LOWBIT_TEST_TARGETS", "emulation,gpu").split(",") if name]


@pytest.fixture(scope="module", params=TARGETS)
def target(request) -> Target:
    return _target(request.param)


def _reference(op: str):
    return registry.get("reference").kernels.get(op)


def _bits(t: torch.Tensor) -> torch.Tensor:
    widths = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    return t.view(widths[t.element_size()]) if t.is_floating_point() else t


def _assert_exact(got, want, context: str) -> None:
    if want is None:
        assert got is None, context
        return
    got = got.cpu()
    assert got.dtype == want.dtype and got.shape == want.shape, f"{context}: {got.dtype}{tuple(got.shape)} vs {want.dtype}{tuple(want.shape)}"
    differ = int((_bits(got) != _bits(want)).sum())
    assert differ == 0, f"{context}: {differ} of {want.numel()} elements differ"


def _input(n: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * 3
    if n > 200:
        x[:128] = 0  # all-zero blocks
        x[130:140] = torch.tensor([1e-30, -1e-30, 1e-38, 3e-39, -0.0, 0.0, 1.0, -1.0, 65504.0, -65504.0])
    return x.to(dtype)


LENGTHS = (1, 2, 3, 31, 63, 64, 65, 1000, 4096 * 2 + 7)


def test_quantize_4bit(target):
    op, reference = target.kernels.get("quantize_4bit"), _reference("quantize_4bit")
    for dtype in FLOAT_DTYPES:
        for blocksize in formats.BLOCKSIZES:
            for qt in formats.QUANT_TYPES:
                for n in LENGTHS:
                    x = _input(n, dtype, n + blocksize)
                    storage = torch.float16 if n % 4 == 0 else torch.uint8
                    got = op(target.to(x), blocksize, qt, storage)
                    want = reference(x, blocksize, qt, storage)
                    _assert_exact(got[0], want[0], f"packed {dtype} bs={blocksize} {qt} n={n}")
                    _assert_exact(got[1], want[1], f"absmax {dtype} bs={blocksize} {qt} n={n}")


def _sparse(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """A tensor of ``numel`` elements whose pages exist only once written (an anonymous private
    mapping without swap reservation): gigabytes of address space for a few written kilobytes."""
    import mmap

    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    noreserve = getattr(mmap, "MAP_NORESERVE", 0x4000)  # Linux's value; Python < 3.13 lacks the name
    buffer = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | noreserve)
    return torch.frombuffer(buffer, dtype=dtype, count=numel)


BEYOND_INT32 = 2**31 + 1000  # elements: every index past the first 2^31 needs 64-bit math


def test_index_math_beyond_2_31_elements(monkeypatch):
    """quantize_4bit, dequantize_4bit and gemv_4bit over more than 2^31 elements, in emulation:
    the buffers are sparse (only their ends are written) and the emulator runs only the last CTAs
    of each launch (LOWBIT_EMU_LAST_CTAS), whose indices all exceed 2^31. Their output must equal
    the reference's on the same trailing blocks: a 32-bit product or offset anywhere in the
    kernels' index math would read or write elsewhere."""
    target = _target("emulation")
    monkeypatch.setenv("LOWBIT_EMU_LAST_CTAS", "3")
    g = torch.Generator().manual_seed(11)
    # the last 3 CTAs cover > 1024 elements of quantize_4bit (512 per CTA), > 8192 of dequantize_4bit
    n, blocksize, tail = BEYOND_INT32, 64, 960
    start = (n - tail) // blocksize * blocksize
    x = _sparse(n, torch.bfloat16)
    x[start:] = torch.randn(n - start, generator=g).to(torch.bfloat16)
    packed, absmax = target.kernels.get("quantize_4bit")(x, blocksize, "nf4", torch.uint8)
    want_packed, want_absmax = _reference("quantize_4bit")(x[start:].clone(), blocksize, "nf4", torch.uint8)
    _assert_exact(packed.view(-1)[start // 2 :], want_packed.view(-1), "quantize_4bit packed beyond 2^31")
    _assert_exact(absmax[start // blocksize :], want_absmax, "quantize_4bit absmax beyond 2^31")

    out = target.kernels.get("dequantize_4bit")(packed.view(-1), absmax, blocksize, "nf4", [n], torch.bfloat16)
    want = _reference("dequantize_4bit")(want_packed.view(-1), want_absmax, blocksize, "nf4", [n - start], torch.bfloat16)
    _assert_exact(out[start:], want, "dequantize_4bit beyond 2^31")

    # gemv: N * K > 2^31 weights; the last 3 CTAs compute the last 24 features (8 per CTA)
    N, K, rows = (BEYOND_INT32 // 4096) + 5, 4096, 9
    B, absmax = _sparse(N * K // 2, torch.uint8), _sparse(N * K // blocksize, torch.float32)
    W = torch.randn(rows, K, generator=g)
    packed_rows, absmax_rows = _reference("quantize_4bit")(W, blocksize, "nf4", torch.uint8)
    B[(N - rows) * K // 2 :], absmax[(N - rows) * K // blocksize :] = packed_rows.view(-1), absmax_rows
    A = torch.randn(1, K, generator=g).to(torch.bfloat16)
    code = formats.code_tensor("nf4")
    got = target.kernels.get("gemv_4bit")(A, B, [N, K], absmax, code, blocksize)
    Wq = decode_4bit(B[(N - rows) * K // 2 :], absmax[(N - rows) * K // blocksize :], code, blocksize, rows * K).view(rows, K)
    _product_close(got[:, N - rows :], A, Wq, None, "gemv_4bit beyond 2^31")


def test_quantize_4bit_unaligned_input(target):
    """A view starting one element into its storage takes the kernels' scalar (unvectorized) path."""
    op, reference = target.kernels.get("quantize_4bit"), _reference("quantize_4bit")
    for dtype in FLOAT_DTYPES:
        for blocksize in (32, 256, 4096):
            base = target.to(_input(5001, dtype, blocksize))
            x = base[1:]
            got = op(x, blocksize, "nf4", torch.uint8)
            want = reference(x.cpu(), blocksize, "nf4", torch.uint8)
            _assert_exact(got[0], want[0], f"unaligned packed {dtype} bs={blocksize}")
            _assert_exact(got[1], want[1], f"unaligned absmax {dtype} bs={blocksize}")


def test_dequantize_4bit(target):
    op, op_out, reference = (target.kernels.get("dequantize_4bit"), target.kernels.get("dequantize_4bit.out"),
                             _reference("dequantize_4bit"))  # fmt: skip
    for qt in formats.QUANT_TYPES:
        for blocksize in (32, 64, 256, 4096):
            for n in LENGTHS:
                packed, absmax = _reference("quantize_4bit")(_input(n, torch.float32, n), blocksize, qt, torch.uint8)
                for dtype in FLOAT_DTYPES:
                    want = reference(packed, absmax, blocksize, qt, [n], dtype)
                    got = op(target.to(packed), target.to(absmax), blocksize, qt, [n], dtype)
                    _assert_exact(got, want, f"dequantize_4bit {qt} bs={blocksize} n={n} {dtype}")
                    out = target.to(torch.full((n,), float("nan"), dtype=dtype))
                    op_out(target.to(packed), target.to(absmax), blocksize, qt, [n], dtype, out)
                    _assert_exact(out, want, f"dequantize_4bit.out {qt} bs={blocksize} n={n} {dtype}")


def test_quantize_blockwise(target):
    op, reference = target.kernels.get("quantize_blockwise"), _reference("quantize_blockwise")
    for signed in (True, False):
        code = formats.dynamic_map(signed=signed)
        for dtype in FLOAT_DTYPES:
            for blocksize in formats.BLOCKSIZES:
                for n in LENGTHS:
                    x = _input(n, dtype, n * blocksize)
                    x = x if signed else x.abs()
                    got = op(target.to(x), target.to(code), blocksize)
                    want = reference(x, code, blocksize)
                    _assert_exact(got[0], want[0], f"q signed={signed} {dtype} bs={blocksize} n={n}")
                    _assert_exact(got[1], want[1], f"absmax signed={signed} {dtype} bs={blocksize} n={n}")


def test_quantize_blockwise_unsorted_code_matches_the_cpu_kernels(target):
    """For an unsorted code the lookup is the CPU's monotone sweep (lowbit_device.h), which the
    reference's bucketize does not model: compare with the native CPU backend."""
    cpu = next((s for s in lowbit.backends.available() if s.name == "cpu"), None)
    if cpu is None or not cpu.available:
        pytest.skip(f"native CPU backend unavailable: {cpu.reason if cpu else 'unknown'}")
    op, cpu_op = target.kernels.get("quantize_blockwise"), registry.get("cpu").kernels.get("quantize_blockwise")
    g = torch.Generator().manual_seed(7)
    code = torch.rand(256, generator=g) * 2 - 1
    code[0], code[-1] = -1.0, 1.0
    for blocksize in (64, 4096):
        x = _input(5000, torch.float32, blocksize)
        got = op(target.to(x), target.to(code), blocksize)
        want = cpu_op(x, code, blocksize)
        _assert_exact(got[0], want[0], f"unsorted code q bs={blocksize}")
        _assert_exact(got[1], want[1], f"unsorted code absmax bs={blocksize}")


def test_dequantize_blockwise(target):
    op, op_out, reference = (target.kernels.get("dequantize_blockwise"), target.kernels.get("dequantize_blockwise.out"),
                             _reference("dequantize_blockwise"))  # fmt: skip
    g = torch.Generator().manual_seed(0)
    code = formats.dynamic_map()
    for blocksize in (64, 256, 4096):
        for n in LENGTHS:
            q = torch.randint(0, 256, (n,), generator=g, dtype=torch.uint8)
            absmax = torch.rand(formats.num_blocks(n, blocksize), generator=g) * 10
            for dtype in FLOAT_DTYPES:
                want = reference(q, absmax, code, blocksize, dtype)
                got = op(target.to(q), target.to(absmax), target.to(code), blocksize, dtype)
                _assert_exact(got, want, f"dequantize_blockwise bs={blocksize} n={n} {dtype}")
                out = target.to(torch.full((n,), float("nan"), dtype=dtype))
                op_out(target.to(q), target.to(absmax), target.to(code), blocksize, dtype, out)
                _assert_exact(out, want, f"dequantize_blockwise.out bs={blocksize} n={n} {dtype}")


# Weight shapes (N, K): K % 32 == 0 takes the staged path (1024-wide K tiles: 4096 is four, 2080 two
# and a 32-wide tail), other K the generic one; blocks straddle rows when K % blocksize != 0; odd N;
# a single output. The emulation reports one SM, so N <= 8 splits K over 4 lane groups, 9..16
# over 2, larger N not (kWavesTarget in gemv_4bit.cu): every split runs.
PRODUCT_SHAPES = (
    (5, 4096), (7, 256), (33, 96), (9, 1000), (3, 1001), (1, 40), (11, 8), (2, 4104), (65, 64), (12, 2080), (17, 1056),
)  # fmt: skip
_MANTISSA_BITS = {torch.float16: 10, torch.bfloat16: 7}


def _product_close(got: torch.Tensor, A, W: torch.Tensor, bias, context: str) -> None:
    """got ~= A @ W.T (+ bias) within the float32 accumulation bound.

    The kernel sums K products in float32 (an FMA chain per lane, then a butterfly over 32 lanes);
    any order of K float32 additions is within K * 2^-24 * S of the exact sum, S = sum |A * W|
    (+ |bias|); we allow 2 K 2^-24 S, and for 16-bit outputs one more unit in the last place (the
    final rounding). Compared with the exact product in float64, so the bound is the kernel's own.
    """
    N, K = W.shape
    exact = A.double().reshape(-1, K) @ W.double().t()
    S = A.double().reshape(-1, K).abs() @ W.double().abs().t()
    if bias is not None:
        exact = exact + bias.double()
        S = S + bias.double().abs()
    g = got.cpu().double().reshape(-1, N)
    tol = 2 * K * 2.0**-24 * S
    if got.dtype != torch.float32:
        larger = torch.maximum(g.abs(), exact.abs()).clamp(min=torch.finfo(got.dtype).smallest_normal)
        tol = tol + torch.exp2((torch.frexp(larger)[1] - 1 - _MANTISSA_BITS[got.dtype]).double())
    bad = (g - exact).abs() > tol
    assert not bad.any(), f"{context}: {int(bad.sum())} outputs off, worst {(g - exact).abs().max().item():.3g}"


def test_gemv_4bit(target):
    gemv, gemv_out, matmul = (target.kernels.get(op) for op in ("gemv_4bit", "gemv_4bit.out", "matmul_4bit"))
    g = torch.Generator().manual_seed(1)
    quantize = _reference("quantize_4bit")
    cases = 0
    for qt in formats.QUANT_TYPES:
        for blocksize in (32, 256) if target.emulated else (32, 64, 256, 4096):
            for (N, K), dtype in zip(PRODUCT_SHAPES, FLOAT_DTYPES * 4):
                W = torch.randn(N, K, generator=g)
                B, absmax = quantize(W, blocksize, qt, torch.uint8)
                code = formats.code_tensor(qt)
                Wq = decode_4bit(B, absmax, code, blocksize, N * K).view(N, K)
                for lead in ((1,), (3,), (8,), (9,), (2, 3), (17,)):  # 9: two launches; 17: the reference
                    A = torch.randn(*lead, K, generator=g).to(dtype)
                    args = (target.to(A), target.to(B), [N, K], target.to(absmax), target.to(code), blocksize)
                    context = f"{qt} bs={blocksize} N={N} K={K} A{tuple(A.shape)} {dtype}"
                    out = gemv(*args)
                    assert out.shape == (*lead, N) and out.dtype == dtype, context
                    _product_close(out, A, Wq, None, "gemv_4bit " + context)
                    buffer = target.to(torch.full((*lead, N), float("nan"), dtype=dtype))
                    gemv_out(*args, buffer)
                    _product_close(buffer, A, Wq, None, "gemv_4bit.out " + context)
                    bias = torch.randn(N, generator=g).to(dtype if N % 2 else torch.float32)
                    _product_close(matmul(*args, target.to(bias)), A, Wq, bias, "matmul_4bit " + context)
                    cases += 1
                # activations that do not start on a 16-byte boundary take the generic path
                A = target.to(torch.randn(2 * K + 1, generator=g).to(dtype))[1:].view(2, K)
                out = gemv(A, *args[1:])
                _product_close(out, A.cpu(), Wq, None, f"gemv_4bit unaligned A {qt} bs={blocksize} N={N} K={K} {dtype}")
    assert cases > 0


INT8_SHAPES = ((1, 7), (5, 64), (33, 300), (2, 3, 40), (70, 16), (2, 2049))  # 2049: the two-pass quantizer


def _int8_input(shape, dtype, seed: int, outliers: bool) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g) * 2
    if outliers:
        flat = x.view(-1, shape[-1])
        flat[:, 1] *= 5  # an outlier column
        flat[0, -1] = 7.0  # a single outlier element
        flat[-1, 0] = 6.0  # exactly on the default threshold
    if len(shape) == 2 and shape[0] > 2:
        x[1] = 0  # an all-zero row
    return x.to(dtype)


def test_int8_vectorwise_quant_and_double_quant(target):
    quant, double = target.kernels.get("int8_vectorwise_quant"), target.kernels.get("int8_double_quant")
    for shape in INT8_SHAPES:
        for dtype in FLOAT_DTYPES:
            for threshold in (0.0, 6.0, 2.5):
                A = _int8_input(shape, dtype, sum(shape), outliers=threshold > 0)
                context = f"{tuple(shape)} {dtype} threshold={threshold}"
                got = quant(target.to(A), threshold)
                want = _reference("int8_vectorwise_quant")(A, threshold)
                for name, a, b in zip(("q", "row_stats", "outlier_cols"), got, want):
                    _assert_exact(a, b, f"int8_vectorwise_quant {name} {context}")
                got = double(target.to(A), threshold)
                want = _reference("int8_double_quant")(A, threshold)
                for name, a, b in zip(("q_rows", "q_cols", "row_stats", "col_stats", "outlier_cols"), got, want):
                    _assert_exact(a, b, f"int8_double_quant {name} {context}")


def test_int8_dequant_ops_and_products(target):
    g = torch.Generator().manual_seed(3)
    vdeq, linear, linear_out, mmdeq, scaled, mixed = (
        target.kernels.get(op) for op in ("int8_vectorwise_dequant", "int8_linear_matmul", "int8_linear_matmul.out",
                                          "int8_mm_dequant", "int8_scaled_mm", "int8_mixed_scaled_mm")
    )  # fmt: skip
    for M, K, N in ((1, 8, 3), (5, 13, 8), (17, 64, 24), (40, 96, 33)):
        A = torch.randint(-127, 128, (M, K), generator=g, dtype=torch.int8)
        B = torch.randint(-127, 128, (N, K), generator=g, dtype=torch.int8)
        stats = torch.rand(M, generator=g) * 10
        _assert_exact(vdeq(target.to(A), target.to(stats)), _reference("int8_vectorwise_dequant")(A, stats), f"vdeq {M}x{K}")
        want = _reference("int8_linear_matmul")(A, B)
        _assert_exact(linear(target.to(A), target.to(B)), want, f"int8_linear_matmul {M}x{K}x{N}")
        out = target.to(torch.zeros(M, N, dtype=torch.int32))
        linear_out(target.to(A), target.to(B), out)
        _assert_exact(out, want, f"int8_linear_matmul.out {M}x{K}x{N}")
        row, col = torch.rand(M, generator=g) * 5, torch.rand(N, generator=g) * 5
        for dtype in FLOAT_DTYPES:
            for bias in (None, torch.randn(N, generator=g).to(dtype), torch.randn(N, generator=g)):
                args = (want, row, col, dtype, bias)
                context = f"int8_mm_dequant {M}x{N} {dtype} bias={None if bias is None else bias.dtype}"
                _assert_exact(mmdeq(*map(target.to, args)), _reference("int8_mm_dequant")(*args), context)
                args = (A, B, row, col, bias, dtype)
                _assert_exact(scaled(*map(target.to, args)), _reference("int8_scaled_mm")(*args), "int8_scaled_mm " + context)
        for dtype in (torch.float16, torch.bfloat16):
            X = torch.randn(M, K, generator=g).to(dtype)
            X[:, 2] = 9.0
            CA, SCA, cols = _reference("int8_vectorwise_quant")(X, 6.0)
            SCB = torch.rand(N, generator=g) * 3
            args = (X, CA, B, SCA, SCB, cols, None)
            got, sub = mixed(*map(target.to, args))
            want, sub_want = _reference("int8_mixed_scaled_mm")(*args)
            _assert_exact(sub, sub_want, f"int8_mixed_scaled_mm sub_A {dtype}")
            torch.testing.assert_close(got.cpu(), want, rtol=1e-2, atol=1e-2 * float(want.abs().max()))


# Optimizer hyper-parameters: (beta1, beta2, beta3, alpha, eps, lr, gnorm_scale)
HYPER = (0.9, 0.999, 0.9999, 5.0, 1e-8, 1e-3, 0.5)
OPTIMIZER_NAMES = ("adam", "adamw", "lamb", "momentum", "lars", "lion", "rmsprop", "adagrad", "ademamix")


def _optim_tensors(name: str, n: int, dtype: torch.dtype, seed: int, eight_bit: bool):
    g = torch.Generator().manual_seed(seed)
    p = (torch.randn(n, generator=g)).to(dtype)
    grad = (torch.randn(n, generator=g) * 0.1).to(dtype)
    copies = 2 if name == "ademamix" else 1
    two = name in ("adam", "adamw", "lamb", "ademamix")
    positive_first = name in ("rmsprop", "adagrad")
    s1 = torch.rand(copies * n, generator=g) * 0.1 if positive_first else torch.randn(copies * n, generator=g) * 0.01
    s2 = torch.rand(n, generator=g) * 0.01 if two else None
    if not eight_bit:
        return grad, p, s1, s2
    qmap1 = formats.dynamic_map(signed=not positive_first)
    qmap2 = formats.dynamic_map(signed=False) if two else None
    q1, a1 = zip(*(_reference("quantize_blockwise")(s1.view(copies, n)[i].contiguous(), qmap1, 256) for i in range(copies)))
    q2, a2 = _reference("quantize_blockwise")(s2, qmap2, 256) if two else (None, None)
    return grad, p, torch.cat(q1), q2, qmap1, qmap2, torch.cat(a1), a2


def _close_rel(got, want, context: str, rtol: float = 1e-6) -> None:
    got = got.cpu().float()
    want = want.float()
    scale = float(want.abs().max()) if want.numel() else 1.0
    atol = rtol * scale  # relative to the tensor's scale: sums that cancel to ~0 carry absolute error
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol, msg=lambda m: f"{context}: {m}")


def _close_param(got: torch.Tensor, want: torch.Tensor, context: str) -> None:
    """1e-6 relative in float32; a 16-bit parameter may also differ by one unit in its last place."""
    if want.dtype == torch.float32:
        _close_rel(got, want, context)
        return
    g, w = got.cpu().double(), want.double()
    ulp = torch.exp2((torch.frexp(w.abs().clamp(min=1e-30))[1] - 1 - _MANTISSA_BITS[want.dtype]).double())
    bad = (g - w).abs() > torch.maximum(ulp, 1e-6 * w.abs())
    assert not bad.any(), f"{context}: {int(bad.sum())} parameters off"


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_optimizer_32bit(target, name):
    op, reference = target.kernels.get("optimizer_update_32bit"), _reference("optimizer_update_32bit")
    beta1, beta2, beta3, alpha, eps, lr, gnorm_scale = HYPER
    for dtype in (torch.float32, torch.bfloat16):
        for n in (1000, 4097):
            for step, weight_decay in ((1, 0.0), (3, 0.01)):
                grad, p, s1, s2 = _optim_tensors(name, n, dtype, n + step, eight_bit=False)
                max_unorm = 1.0 if name in ("lamb", "lars") else 0.0
                param_norm = float(p.float().norm())
                unorm = torch.zeros(1)
                want = [t.clone() if t is not None else None for t in (p, s1, s2, unorm)]
                got = [target.to(t.clone()) if t is not None else None for t in (p, s1, s2, unorm)]
                common = (max_unorm, param_norm, beta1, beta2, beta3, alpha, eps, weight_decay, step, lr, gnorm_scale)
                reference(name, grad.clone(), want[0], want[1], want[2], want[3], *common)
                op(name, target.to(grad), got[0], got[1], got[2], got[3], *common)
                context = f"{name} {dtype} n={n} step={step} wd={weight_decay}"
                _close_param(got[0], want[0], "p " + context)
                _close_rel(got[1], want[1], "state1 " + context)
                if s2 is not None:
                    _close_rel(got[2], want[2], "state2 " + context)
                if max_unorm > 0:
                    _close_rel(got[3], want[3], "unorm " + context)


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_optimizer_8bit_blockwise(target, name):
    op, reference = target.kernels.get("optimizer_update_8bit_blockwise"), _reference("optimizer_update_8bit_blockwise")
    beta1, beta2, beta3, alpha, eps, lr, gnorm_scale = HYPER
    n = 256 * 40 + 17
    for dtype in (torch.float32, torch.bfloat16):
        for step, weight_decay in ((1, 0.0), (5, 0.01)):
            grad, p, q1, q2, qmap1, qmap2, a1, a2 = _optim_tensors(name, n, dtype, step, eight_bit=True)
            # the non-finite policy (csrc/common/lowbit_optim.h): these elements keep their p and state
            for index, value in ((5, float("nan")), (300, float("inf")), (700, float("-inf")), (1000, 1e30)):
                grad[index] = value
            want = [t.clone() if t is not None else None for t in (p, q1, q2, a1, a2)]
            got = [target.to(t.clone()) if t is not None else None for t in (p, q1, q2, a1, a2)]
            reference(name, grad.clone(), want[0], want[1], want[2], beta1, beta2, beta3, alpha, eps, step, lr,
                      qmap1, qmap2, want[3], want[4], weight_decay, gnorm_scale)  # fmt: skip
            op(name, target.to(grad), got[0], got[1], got[2], beta1, beta2, beta3, alpha, eps, step, lr,
               target.to(qmap1), target.to(qmap2), got[3], got[4], weight_decay, gnorm_scale)  # fmt: skip
            context = f"{name} {dtype} step={step} wd={weight_decay}"
            assert torch.isfinite(got[0].cpu()).all() and torch.equal(got[0].cpu()[[5, 300, 700]], p[[5, 300, 700]]), context
            _close_param(got[0], want[0], "p " + context)
            for index, label in ((1, "state1"), (2, "state2")):
                if want[index] is not None:
                    same = float((got[index].cpu() == want[index]).float().mean())
                    assert same >= 0.999, f"{label} {context}: only {same:.4%} of the codes agree"
            _close_rel(got[3], want[3], "absmax1 " + context)
            if want[4] is not None:
                _close_rel(got[4], want[4], "absmax2 " + context)


LARGE_ELEMENTS, LARGE_INT8, LARGE_WEIGHT = 2**27 + 13, (4097, 14336), (14336, 4096)


def test_large_shapes(target):
    """Every op family on shapes of a real model (a 14336 x 4096 projection, 2^27 elements),
    against the reference backend on the same device."""
    if target.emulated:
        pytest.skip("minutes in emulation; test_index_math_beyond_2_31_elements covers the index math there")
    g = torch.Generator(device=target.device).manual_seed(5)
    ref = {op: _reference(op) for op in ("quantize_4bit", "dequantize_4bit", "quantize_blockwise", "int8_vectorwise_quant")}
    x = torch.randn(LARGE_ELEMENTS, generator=g, device=target.device).to(torch.bfloat16)
    got, want = target.kernels.get("quantize_4bit")(x, 64, "nf4", torch.uint8), ref["quantize_4bit"](x, 64, "nf4", torch.uint8)
    _assert_exact(got[0], want[0].cpu(), f"quantize_4bit {LARGE_ELEMENTS} packed")
    _assert_exact(got[1], want[1].cpu(), f"quantize_4bit {LARGE_ELEMENTS} absmax")
    args = (want[0], want[1], 64, "nf4", [x.numel()], torch.bfloat16)
    _assert_exact(target.kernels.get("dequantize_4bit")(*args), ref["dequantize_4bit"](*args).cpu(), f"dequantize_4bit {LARGE_ELEMENTS}")
    code = formats.dynamic_map().to(target.device)
    got, want = target.kernels.get("quantize_blockwise")(x, code, 4096), ref["quantize_blockwise"](x, code, 4096)
    _assert_exact(got[0], want[0].cpu(), f"quantize_blockwise {LARGE_ELEMENTS}")
    A = torch.randn(*LARGE_INT8, generator=g, device=target.device).to(torch.bfloat16)
    for name, a, b in zip(("q", "row_stats", "cols"), target.kernels.get("int8_vectorwise_quant")(A, 6.0), ref["int8_vectorwise_quant"](A, 6.0)):
        _assert_exact(a, b.cpu(), f"int8_vectorwise_quant {LARGE_INT8} {name}")
    N, K = LARGE_WEIGHT
    W = torch.randn(N, K, generator=g, device=target.device)
    B, absmax = ref["quantize_4bit"](W, 64, "nf4", torch.uint8)
    nf4 = formats.code_tensor("nf4").to(target.device)
    Wq = decode_4bit(B, absmax, nf4, 64, N * K).view(N, K)
    for rows in (1, 5, 16):
        A = torch.randn(rows, K, generator=g, device=target.device).to(torch.float16)
        out = target.kernels.get("gemv_4bit")(A, B, [N, K], absmax, nf4, 64)
        _product_close(out, A.cpu(), Wq.cpu(), None, f"gemv_4bit {rows}x{K} @ {N}x{K}")


def test_paged_memory(target):
    if target.emulated:
        library = EmulatedLibrary(_emulation_library())
    else:
        library = native.HIP if target.name == "hip" else native.CUDA
    lib = library.lib()
    supported = ctypes.c_int32(-1)
    assert lib.lowbit_cuda_managed_supported(0, ctypes.byref(supported)) == 0
    pointer = ctypes.c_void_p()
    nbytes = 1 << 20
    assert lib.lowbit_cuda_managed_alloc(nbytes, 0, ctypes.byref(pointer)) == 0, lib.lowbit_cuda_last_error()
    assert pointer.value
    if target.emulated or supported.value:
        stream = None if target.emulated else ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
        assert lib.lowbit_cuda_prefetch(pointer, nbytes, 0, stream) == 0, lib.lowbit_cuda_last_error()
        assert lib.lowbit_cuda_prefetch(pointer, nbytes, -1, stream) == 0, lib.lowbit_cuda_last_error()
    assert lib.lowbit_cuda_managed_free(pointer) == 0
    assert lib.lowbit_cuda_managed_alloc(-1, 0, ctypes.byref(pointer)) == 1  # bad size: an argument error
