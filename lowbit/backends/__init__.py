"""Backends: one sub-package per backend, same file names for the same op families.

The registry itself lives in ``lowbit.core.registry``; this package re-exports the parts a user
touches: :func:`available`, :func:`use`, :func:`active`, :func:`get`.
"""

from ..core.registry import BackendError, BackendStatus, active, available, forced, get, use

__all__ = ["BackendError", "BackendStatus", "active", "available", "forced", "get", "use"]
