"""lowbit: a multi-backend quantization runtime for PyTorch, byte-compatible with bitsandbytes.

``import lowbit as bnb`` is meant to work for the documented bitsandbytes API. Importing defines
the ``torch.ops.lowbit`` ops, loads the native CPU library if it can (else warns once and uses
the reference backend) and applies ``LOWBIT_BACKEND``.
"""

from . import backends, functional, optim  # noqa: E402
from .core import ops as _ops  # noqa: F401  (defines torch.ops.lowbit.*)
from .core import registry as _registry
from .core.quant_state import QuantState

__version__ = "0.1.0"
__all__ = ["QuantState", "__version__", "backends", "functional", "optim"]

_registry.initialize()
