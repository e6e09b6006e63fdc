"""The comparisons are only meaningful if the environment is the intended one."""

from __future__ import annotations

import os

import pytest
import torch

import lowbit

from .conftest import BNB_VERSION, CPU_BACKENDS, B, bitsandbytes

pytestmark = pytest.mark.compat


def test_bitsandbytes_version():
    assert bitsandbytes.__version__ == BNB_VERSION


def test_every_cpu_backend_is_compared():
    assert "reference" in CPU_BACKENDS
    if os.environ.get("LOWBIT_REQUIRE_NATIVE"):
        cpu = next(s for s in lowbit.backends.available() if s.name == "cpu")
        assert "cpu" in CPU_BACKENDS, (
            f"LOWBIT_REQUIRE_NATIVE is set but the native CPU backend is unavailable: {cpu.reason}"
        )


def test_denormals_are_not_flushed():
    """A native library built with -ffast-math can switch the whole process to flush-to-zero when
    it loads, which would silently change what both libraries compute on subnormal inputs."""
    B.quantize_blockwise(torch.randn(64))  # make sure bitsandbytes' native library is in use
    tiny = torch.tensor([1e-39, 2.0**-140], dtype=torch.float32)
    assert bool((tiny * 0.5 != 0).all()), "float32 subnormals are flushed to zero in this process"
    assert torch.get_default_dtype() == torch.float32


def test_backend_fixture_selects_the_backend(backend):
    """The ``backend`` fixture's selection holds inside the test body, where the ops run."""
    assert lowbit.backends.active("cpu") == backend
