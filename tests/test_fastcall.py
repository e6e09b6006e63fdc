"""The decode product called without ctypes: the CPython extension ``_lowbit_fastcall``
(csrc/capi/lowbit_fastcall.cpp, docs/design.md "Per-call cost"). It must give the bytes the
ctypes call gives, refuse bad arguments with an exception naming them, and leave lowbit on ctypes
-- never crashing -- where it is switched off, missing or broken."""

from __future__ import annotations

import os
import re
import shutil

import pytest
import torch

from lowbit import functional as F
from lowbit.backends.cpu import native
from support import NATIVE_CPU_BACKENDS, randn, run_python

pytestmark = pytest.mark.skipif(not NATIVE_CPU_BACKENDS, reason="native CPU library not built")

fastcall_module = native._fastcall()[0] if NATIVE_CPU_BACKENDS else None
needs_fastcall = pytest.mark.skipif(fastcall_module is None, reason=f"{native.FASTCALL_MODULE} not loaded")

N, K = 48, 128  # rows of N split over two threads; K two blocks of 64


@pytest.mark.skipif(
    not os.environ.get("LOWBIT_REQUIRE_NATIVE"), reason="set LOWBIT_REQUIRE_NATIVE=1 where the native build is expected (nox does)"
)
def test_fastcall_is_built_and_loaded():
    module, where = native._fastcall()
    assert module is not None, where
    assert native.details()["decode_call"] == f"{native.FASTCALL_MODULE} ({where})"


@needs_fastcall
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("exact", [False, True])
def test_fastcall_and_ctypes_give_the_same_bytes(dtype, rows, with_bias, exact):
    from lowbit.backends.cpu.interleaved_4bit import BoundProduct

    g = torch.Generator().manual_seed(rows * 7 + with_bias)
    packed, state = F.interleave_4bit(*F.quantize_4bit(randn(N, K, generator=g), quant_type="nf4"))
    A = randn(rows, K, dtype=dtype, generator=g)
    bias = randn(N, dtype=dtype, generator=g) if with_bias else None
    product = BoundProduct(packed, state.shape, state.absmax, state.code, state.blocksize)
    assert product.function is native.matmul_4bit_interleaved_function()
    fast = product(A, bias, exact)
    product.function = native.lib().lowbit_matmul_4bit_interleaved
    slow = product(A, bias, exact)
    assert fast.dtype == dtype and torch.equal(fast, slow)
    # and both are the product: against the dequantized weight in float64
    W = F.dequantize_4bit(*F.deinterleave_4bit(packed, state)).double()
    expected = A.double() @ W.T + (bias.double() if with_bias else 0)
    assert torch.allclose(fast.double(), expected, rtol=2e-2, atol=2e-2 * expected.abs().max().item())


def _arguments(**changes):
    """Valid arguments of the fast call for a 1 x 64 by 16 x 64 product, with ``changes``."""
    A, out = torch.ones(1, 64), torch.empty(1, 16)
    B, absmax, code = torch.zeros(512, dtype=torch.uint8), torch.ones(16), torch.zeros(16)
    keep = (A, out, B, absmax, code)
    args = {
        "function": native.matmul_4bit_interleaved_function().args[0], "a_dtype": 0, "A": A.data_ptr(), "M": 1,
        "K": 64, "B": B.data_ptr(), "B_len": 512, "absmax": absmax.data_ptr(), "absmax_len": 16,
        "code": code.data_ptr(), "code_len": 16, "N": 16, "blocksize": 64, "bias": None, "bias_len": 0,
        "bias_dtype": 0, "precision": 0, "out_dtype": 0, "out": out.data_ptr(), "num_threads": 1,
    }  # fmt: skip
    args.update(changes)
    return list(args.values()), keep


@needs_fastcall
def test_fastcall_runs_the_product_it_is_given():
    args, (A, out, *_) = _arguments()
    assert fastcall_module.matmul_4bit_interleaved(*args) == 0
    assert torch.equal(out, torch.zeros(1, 16))  # code all zero
    args, _ = _arguments(precision=5)  # the library's own refusal comes back as its status
    assert fastcall_module.matmul_4bit_interleaved(*args) == 1
    assert "precision" in native.lib().lowbit_last_error().decode()


@needs_fastcall
@pytest.mark.parametrize(
    "changes, error, words",
    [
        ({"M": 1.0}, TypeError, "argument M must be an int in the int64 range"),
        ({"A": "0x10"}, TypeError, "argument A must be an address (int) or None"),
        ({"K": 2**63}, OverflowError, "argument K must be an int in the int64 range"),
        ({"num_threads": 2**31}, OverflowError, "argument num_threads must be an int in the int32 range"),
        ({"a_dtype": -(2**31) - 1}, OverflowError, "argument a_dtype must be an int in the int32 range"),
        ({"function": None}, ValueError, "argument function must not be NULL"),
    ],
)
def test_fastcall_refuses_bad_arguments_by_name(changes, error, words):
    args, _ = _arguments(**changes)
    with pytest.raises(error, match=re.escape(f"lowbit_matmul_4bit_interleaved: {words}")):
        fastcall_module.matmul_4bit_interleaved(*args)


@needs_fastcall
def test_fastcall_wants_all_its_arguments():
    args, _ = _arguments()
    with pytest.raises(TypeError, match=r"its 19 arguments \(20\), got 19"):
        fastcall_module.matmul_4bit_interleaved(*args[:-1])


# A decode through an interleaved layer in a fresh process: which call it took, and its output.
DECODE = (
    "import torch, lowbit, lowbit.functional as F; from lowbit.backends.cpu import native; "
    "lowbit.set_cpu_precision('float32'); "
    "g = torch.Generator().manual_seed(0); "
    "w, s = F.interleave_4bit(*F.quantize_4bit(torch.randn(32, 64, generator=g), quant_type='nf4')); "
    "x = torch.randn(1, 64, generator=g); "
    "same = torch.allclose(lowbit.matmul_4bit(x, w, s), x @ F.dequantize_4bit(*F.deinterleave_4bit(w, s)).T, atol=1e-5); "
    "print('CALL', native.details()['decode_call']); print('SAME', same)"
)


def test_fastcall_can_be_switched_off():
    result = run_python(DECODE, **{native.ENV_FASTCALL: "0"})
    assert result.returncode == 0, result.stderr
    assert f"CALL ctypes ({native.ENV_FASTCALL}=0)" in result.stdout and "SAME True" in result.stdout


@needs_fastcall
@pytest.mark.parametrize(
    "module_bytes, reason",
    [(lambda data: data[:4096], "it is truncated"), (lambda data: b"not a module", "it is not an ELF shared library")],
)
def test_broken_fastcall_module_leaves_lowbit_on_ctypes(tmp_path, module_bytes, reason):
    library = tmp_path / native.LIBRARY_NAME
    shutil.copyfile(native.library_path(), library)
    data = open(native._fastcall()[1], "rb").read()
    broken = tmp_path / f"{native.FASTCALL_MODULE}.abi3.so"
    broken.write_bytes(module_bytes(data))
    result = run_python(DECODE, **{native.ENV_LIBRARY: str(library)})
    assert result.returncode == 0, result.stderr
    assert f"CALL ctypes ({broken}: {reason}" in result.stdout and "SAME True" in result.stdout


@needs_fastcall
def test_fastcall_module_built_for_another_abi_version_is_refused(monkeypatch):
    """The module carries the ABI version it was compiled against (its argument list); one built
    against another version than the library's is not used."""
    where = native._fastcall()[1]
    monkeypatch.setattr(native, "ABI_VERSION", native.ABI_VERSION + 1)
    native._fastcall.cache_clear()
    try:
        module, why = native._fastcall()
    finally:
        native._fastcall.cache_clear()  # found again, under the real version, by the next caller
    assert module is None
    assert why == f"{where} was built for ABI version {native.ABI_VERSION - 1}, not {native.ABI_VERSION}"
