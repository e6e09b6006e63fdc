"""lowbit.compat: ``import bitsandbytes`` resolving to lowbit (opt-in), as import system, package
metadata and torch.ops see it; refusal when the real bitsandbytes is present; clean uninstall.

transformers / peft / Trainer running through the alias: tests/test_integrations_compat.py.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import importlib.util
import pickle
import sys
import types

import pytest
import torch

import lowbit
import lowbit.compat as compat
from lowbit.core.registry import LowbitWarning

#: Every op of bitsandbytes' torch.library namespace (bitsandbytes/_ops.py), overloads included.
BITSANDBYTES_OPS = (
    "int8_mixed_scaled_mm", "int8_scaled_mm", "int8_linear_matmul", "int8_linear_matmul.out",
    "int8_vectorwise_quant", "int8_vectorwise_dequant", "int8_mm_dequant", "int8_double_quant",
    "dequantize_4bit", "dequantize_4bit.out", "quantize_4bit", "gemm_4bit", "dequantize_blockwise",
    "dequantize_blockwise.out", "quantize_blockwise", "gemv_4bit", "gemv_4bit.out", "optimizer_update_32bit",
    "optimizer_update_8bit_blockwise",
)  # fmt: skip

REAL_BITSANDBYTES = compat.installed() is False and importlib.util.find_spec("bitsandbytes") is not None


@pytest.fixture
def alias():
    if REAL_BITSANDBYTES:
        pytest.skip("the real bitsandbytes is installed here; lowbit.compat refuses to shadow it")
    compat.install()
    try:
        yield importlib.import_module("bitsandbytes")
    finally:
        compat.uninstall()


def test_bitsandbytes_modules_are_lowbits(alias):
    import bitsandbytes.autograd._functions
    import bitsandbytes.functional as bnb_functional
    import bitsandbytes.nn.parametrize
    from bitsandbytes.nn import Linear4bit
    from bitsandbytes.optim import PagedAdamW8bit

    assert bnb_functional is lowbit.functional and bitsandbytes.nn.parametrize is lowbit.nn.parametrize
    assert bitsandbytes.autograd._functions is lowbit.autograd._functions
    assert Linear4bit is lowbit.nn.Linear4bit and PagedAdamW8bit is lowbit.optim.PagedAdamW8bit
    assert alias.nn is lowbit.nn and alias.optim is lowbit.optim and alias.matmul_4bit is lowbit.matmul_4bit
    assert sys.modules["bitsandbytes.nn"] is lowbit.nn and lowbit.nn.__spec__.name == "lowbit.nn"  # specs kept
    # the package-level flags transformers reads
    assert alias.__version__ == compat.VERSION and "lowbit" in alias.__version__
    assert "cpu" in alias.supported_torch_devices and "multi_backend" in alias.features
    assert not hasattr(lowbit, "supported_torch_devices")  # the flags belong to the alias only
    with pytest.raises(ModuleNotFoundError, match="bitsandbytes.cextension.*lowbit has no 'lowbit.cextension'"):
        importlib.import_module("bitsandbytes.cextension")
    with pytest.raises(AttributeError, match="'bitsandbytes' .*lowbit.*no attribute 'nonexistent'"):
        alias.nonexistent  # noqa: B018
    # objects made through the alias are lowbit's, and pickle as such
    layer = alias.nn.Linear4bit(64, 32, quant_type="nf4").to("cpu")
    assert pickle.loads(pickle.dumps(layer.weight)).quant_state == layer.weight.quant_state


def test_bitsandbytes_counts_as_installed_with_a_version_naming_lowbit(alias):
    spec = importlib.util.find_spec("bitsandbytes")
    assert spec is not None and spec.name == "bitsandbytes"
    assert importlib.metadata.version("bitsandbytes") == compat.VERSION
    metadata = importlib.metadata.metadata("bitsandbytes")
    assert metadata["Name"] == "bitsandbytes" and "lowbit" in metadata["Summary"]
    assert "bitsandbytes" in importlib.metadata.packages_distributions()["bitsandbytes"]
    release = tuple(int(part) for part in compat.VERSION.split("+")[0].split("."))
    assert release == (0, 50, 2) and compat.VERSION.split("+")[1] == f"lowbit.{lowbit.__version__}"


def test_torch_ops_bitsandbytes_are_lowbits_ops(alias):
    for name in BITSANDBYTES_OPS:
        base, _, overload = name.partition(".")
        op = getattr(getattr(torch.ops.bitsandbytes, base), overload or "default")
        assert op is getattr(getattr(torch.ops.lowbit, base), overload or "default"), name
    W = torch.randn(32, 64)
    packed, absmax = torch.ops.bitsandbytes.quantize_4bit(W, 64, "nf4", torch.uint8)
    assert torch.equal(packed, lowbit.functional.quantize_4bit(W, quant_type="nf4")[0])


def test_install_is_idempotent_and_uninstall_restores_everything():
    if REAL_BITSANDBYTES:
        pytest.skip("the real bitsandbytes is installed here")
    meta_path = list(sys.meta_path)
    compat.install()
    compat.install()
    assert compat.installed() and len(sys.meta_path) == len(meta_path) + 1
    import bitsandbytes.nn  # noqa: F401

    compat.uninstall()
    assert not compat.installed() and sys.meta_path == meta_path
    assert not [name for name in sys.modules if name.split(".")[0] == "bitsandbytes"]
    assert importlib.util.find_spec("bitsandbytes") is None
    with pytest.raises(importlib.metadata.PackageNotFoundError):
        importlib.metadata.version("bitsandbytes")
    assert torch.ops.__dict__.get("bitsandbytes") is not torch.ops.lowbit
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("bitsandbytes")
    compat.uninstall()  # a second time: nothing to do


def _refused(match: str) -> None:
    meta_path = list(sys.meta_path)
    with pytest.raises(compat.BitsandbytesPresentError, match=match):
        compat.install()
    assert not compat.installed() and sys.meta_path == meta_path


def test_refuses_an_installed_bitsandbytes(tmp_path, monkeypatch):
    (tmp_path / "bitsandbytes").mkdir()
    (tmp_path / "bitsandbytes" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    _refused(r"bitsandbytes is installed \(.*bitsandbytes/__init__.py\)")


def test_refuses_bitsandbytes_metadata_without_its_package(tmp_path, monkeypatch):
    dist_info = tmp_path / "bitsandbytes-0.50.2.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: bitsandbytes\nVersion: 0.50.2\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    assert importlib.util.find_spec("bitsandbytes") is None  # metadata only
    _refused("a bitsandbytes 0.50.2 distribution is installed")


def test_refuses_an_imported_bitsandbytes(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", types.ModuleType("bitsandbytes"))
    _refused("bitsandbytes is already imported")


def test_clears_cached_probes_and_warns_about_modules_that_decided_at_import(monkeypatch):
    if REAL_BITSANDBYTES:
        pytest.skip("the real bitsandbytes is installed here")
    calls = []

    @functools.lru_cache
    def is_bitsandbytes_available():
        calls.append(1)
        return importlib.util.find_spec("bitsandbytes") is not None

    probe_module = types.ModuleType("transformers.utils.import_utils")
    probe_module.is_bitsandbytes_available = is_bitsandbytes_available
    monkeypatch.setitem(sys.modules, "transformers.utils.import_utils", probe_module)
    monkeypatch.setitem(sys.modules, "peft.tuners.lora.bnb", types.ModuleType("peft.tuners.lora.bnb"))
    assert is_bitsandbytes_available() is False
    try:
        with pytest.warns(LowbitWarning, match=r"peft\.tuners\.lora\.bnb were imported before install\(\)"):
            compat.install()
        assert is_bitsandbytes_available() is True and len(calls) == 2
    finally:
        compat.uninstall()
    assert is_bitsandbytes_available() is False and len(calls) == 3
