"""The reference backend: every op of docs/design.md §5 in plain, device-agnostic torch.

This is the definition of correct. Other backends are tested against it op by op
(``tests/test_parity.py``), and it is bit-compatible with bitsandbytes 0.50.2 on CPU where
docs/design.md requires bit-exactness (``tests/compat/``). Clarity beats speed here.
"""

from ...core.registry import KernelTable

kernels = KernelTable("reference")

from . import blockwise_8bit, int8, interleaved_4bit, matmul_4bit, optimizers, quantize_4bit  # noqa: E402,F401  (register kernels)


def probe() -> None:
    """Always available: needs nothing but torch."""
    return None


def details() -> dict:
    return {"implementation": "pure torch, any device"}
