"""The core every backend shares: formats, QuantState, the op schemas and the backend registry.

Importing it defines the ``torch.ops.lowbit`` ops, so any entry point into lowbit has them.
"""

from . import ops  # noqa: F401
