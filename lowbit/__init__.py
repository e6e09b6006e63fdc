"""lowbit: a multi-backend quantization runtime for PyTorch, byte-compatible with bitsandbytes.

``import lowbit as bnb`` is meant to work for the documented bitsandbytes API. Importing defines
the ``torch.ops.lowbit`` ops (``lowbit.core``), loads the native CPU library if it can (else warns once and uses
the reference backend) and applies ``LOWBIT_BACKEND``.
"""

from . import autograd, backends, functional, nn, optim
from .autograd import MatmulLtState, matmul, matmul_4bit
from .core import registry as _registry
from .core.quant_state import QuantState

__version__ = "0.1.0"
__all__ = [
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
]

_registry.initialize()
