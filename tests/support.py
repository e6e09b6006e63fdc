"""Helpers shared by the tests: the backends that can run on this machine, seeded inputs."""

from __future__ import annotations

import os

import torch

import lowbit

#: Backends that run ops on CPU tensors here: reference, the native cpu backend when built, and
#: triton under Triton's interpreter (TRITON_INTERPRET=1, `nox -s triton`).
CPU_BACKENDS = [s.name for s in lowbit.backends.available() if s.available and s.serves("cpu")]
NATIVE_CPU_BACKENDS = [name for name in CPU_BACKENDS if name != "reference"]
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def randn(*shape, dtype=torch.float32, generator=None, scale=1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=generator) * scale).to(dtype)


def subprocess_env(**extra: str) -> dict[str, str]:
    """os.environ for a child Python that must import the lowbit under test (a source checkout or
    an installed wheel), even when it runs a script from another folder."""
    parent = os.path.dirname(os.path.dirname(os.path.abspath(lowbit.__file__)))
    path = os.pathsep.join(p for p in (parent, os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, **extra}
