"""Helpers shared by the tests: the backends that can run on this machine, seeded inputs."""

from __future__ import annotations

import os
import subprocess
import sys

import torch

import lowbit
from lowbit.backends.cpu import native
from lowbit.core import registry

#: Backends that run ops on CPU tensors here: reference, the native cpu backend when built, and
#: triton under Triton's interpreter (TRITON_INTERPRET=1, `nox -s triton`).
CPU_BACKENDS = [s.name for s in lowbit.backends.available() if s.available and s.serves("cpu")]
NATIVE_CPU_BACKENDS = [name for name in CPU_BACKENDS if name != "reference"]
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def fixed_point_bound(A: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, shapeB) -> torch.Tensor:
    """What the fast precision's 16-bit fixed point (formats.FIXED_*) may add to each output of
    A @ W.T, W (N, K) in the standard layout with (N, K/blocksize) absmax: each activation moves by
    at most 2^-14 of the largest magnitude in its row, each code value by 2^-13 of the largest code
    (times its block's absmax)."""
    N, K = shapeB
    rows = A.double().reshape(-1, K)
    scales = absmax.double().reshape(N, -1).abs()
    largest_weight = scales.amax(1) * code.double().abs().max()
    weight_sums = (scales.repeat_interleave(K // scales.shape[1], 1) * code.double().abs().max()).sum(1)
    activation_error = rows.abs().amax(1, keepdim=True) * weight_sums * 2.0**-14
    code_error = rows.abs().sum(1, keepdim=True) * largest_weight * 2.0**-13
    return activation_error + code_error


def randn(*shape, dtype=torch.float32, generator=None, scale=1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=generator) * scale).to(dtype)


def subprocess_env(**extra: str) -> dict[str, str]:
    """os.environ for a child Python that must import the lowbit under test (a source checkout or
    an installed wheel), even when it runs a script from another folder."""
    path = os.pathsep.join(p for p in (LOWBIT_PARENT, os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, **extra}


#: The folder that holds the lowbit under test (a source checkout or site-packages).
LOWBIT_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(lowbit.__file__)))
#: Variables that choose lowbit's backend and native build: a child starts without them, then
#: gets the ones a test gives.
_STEERING = (registry.ENV_BACKEND, native.ENV_LIBRARY, native.ENV_ISA, native.ENV_FASTCALL)


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    """``python -c code`` in a fresh process with ``env`` (UserWarnings always shown), for what is
    read at import: environment variables, the native library's loading."""
    environment = {k: v for k, v in os.environ.items() if k not in _STEERING}
    environment.update(env)
    # run beside the lowbit under test, so that `-c` imports that one and not a checkout in cwd
    return subprocess.run(
        [sys.executable, "-W", "always::UserWarning", "-c", code],
        capture_output=True, text=True, env=environment, timeout=120, cwd=LOWBIT_PARENT,
    )  # fmt: skip
