"""lowbit: a multi-backend quantization runtime for PyTorch, byte-compatible with bitsandbytes.

``import lowbit as bnb`` is meant to work for the documented bitsandbytes API. Importing defines
the ``torch.ops.lowbit`` ops (``lowbit.core``), loads the native CPU library if it can (else warns once and uses
the reference backend) and applies ``LOWBIT_BACKEND``.
"""

import os as _os

from . import autograd, backends, functional, nn, optim
from .autograd import MatmulLtState, matmul, matmul_4bit
from .autograd.matmul_4bit import CPU_PRECISIONS, set_cpu_precision
from .autograd.matmul_4bit import ENV_CPU_PRECISION as _ENV_CPU_PRECISION
from .core import registry as _registry
from .core.quant_state import QuantState

__version__ = "0.1.0"
__all__ = [
    "CPU_PRECISIONS",
    "MatmulLtState",
    "QuantState",
    "__version__",
    "autograd",
    "backends",
    "functional",
    "matmul",
    "matmul_4bit",
    "nn",
    "optim",
    "set_cpu_precision",
]

_registry.initialize()
if _os.environ.get(_ENV_CPU_PRECISION):
    try:
        set_cpu_precision(_os.environ[_ENV_CPU_PRECISION])
    except ValueError as _err:
        raise ValueError(f"{_ENV_CPU_PRECISION}: {_err}") from None
