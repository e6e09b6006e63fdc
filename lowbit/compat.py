"""Run code written for bitsandbytes on lowbit, unchanged: ``lowbit.compat.install()`` (opt-in).

::

    import lowbit.compat
    lowbit.compat.install()  # first: before transformers, peft or accelerate are imported

    import bitsandbytes as bnb  # lowbit
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=BitsAndBytesConfig(load_in_4bit=True))

After :func:`install`, in this process:

* ``import bitsandbytes`` gives a module whose attributes are lowbit's (``bnb.nn``, ``bnb.matmul``, ...)
  plus bitsandbytes' package flags (``__version__``, ``supported_torch_devices``, ``features``);
  ``bitsandbytes.X`` is the module ``lowbit.X`` itself for every ``X`` lowbit has (``functional``,
  ``nn``, ``nn.parametrize``, ``optim``, ``autograd``, ...); any other ``bitsandbytes.X`` raises
  ``ModuleNotFoundError`` naming the missing ``lowbit.X``.
* ``torch.ops.bitsandbytes`` is ``torch.ops.lowbit``: bitsandbytes' op names with its schemas
  (``quantize_4bit``, ``gemm_4bit``, ``int8_scaled_mm``, ... and lowbit's own extra ones).
* Libraries that first ask whether bitsandbytes is installed get "yes": the alias has an import spec
  (``importlib.util.find_spec``), and a distribution (``importlib.metadata``, through the
  ``find_distributions`` protocol of the same meta-path finder) named ``bitsandbytes`` with version
  :data:`VERSION`, e.g. ``0.50.2+lowbit.0.1.0``: the bitsandbytes release whose API lowbit follows,
  with lowbit's version as the PEP 440 local label. Its ``Summary`` names lowbit too. This is what
  transformers (``is_bitsandbytes_available``), accelerate and peft check.
* transformers and peft cache that answer: :func:`install` clears their caches. Some of their modules
  decide at import time (``transformers.integrations.bitsandbytes``, ``peft.tuners.*.bnb``); if one
  was imported before :func:`install`, a ``LowbitWarning`` names it: call :func:`install` earlier.

:func:`install` refuses (:class:`BitsandbytesPresentError`) when the real bitsandbytes is installed
or already imported: lowbit never shadows it. :func:`uninstall` undoes everything (modules that
already hold a reference to the alias keep it).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.metadata
import importlib.util
import pathlib
import sys
import types
import warnings
from collections.abc import Iterator
from typing import Any, Optional

import torch

import lowbit

from .core.registry import LowbitWarning

__all__ = ["ALIAS", "BITSANDBYTES_API_VERSION", "VERSION", "BitsandbytesPresentError", "install", "installed", "uninstall"]

#: The module name lowbit stands in for.
ALIAS = "bitsandbytes"
#: The bitsandbytes release whose API and formats lowbit follows (and checks itself against).
BITSANDBYTES_API_VERSION = "0.50.2"
#: What ``bitsandbytes.__version__`` and ``importlib.metadata.version("bitsandbytes")`` say.
VERSION = f"{BITSANDBYTES_API_VERSION}+lowbit.{lowbit.__version__}"
_SUMMARY = f"lowbit {lowbit.__version__} standing in for bitsandbytes {BITSANDBYTES_API_VERSION} (lowbit.compat.install())"
#: Device types lowbit has a backend for (``bitsandbytes.supported_torch_devices``, which transformers
#: intersects with the available devices before it quantizes).
SUPPORTED_TORCH_DEVICES = frozenset({"cpu", "cuda", "xpu"})

#: Availability checks that transformers and peft cache: (module, function).
_CACHED_PROBES = (
    ("transformers.utils.import_utils", "is_bitsandbytes_available"),
    ("peft.import_utils", "is_bnb_available"),
    ("peft.import_utils", "is_bnb_4bit_available"),
)


class BitsandbytesPresentError(RuntimeError):
    """The real bitsandbytes is installed or imported: lowbit will not stand in for it."""


class _AliasModule(types.ModuleType):
    """``bitsandbytes``: lowbit's namespace, plus bitsandbytes' package-level flags."""

    def __getattr__(self, name: str) -> Any:
        try:
            return getattr(lowbit, name)
        except AttributeError:
            raise AttributeError(
                f"module 'bitsandbytes' (lowbit {lowbit.__version__}, lowbit.compat) has no attribute {name!r}"
            ) from None

    def __dir__(self) -> list[str]:
        return sorted(set(dir(lowbit)) | set(self.__dict__))


class _AliasDistribution(importlib.metadata.Distribution):
    """The ``bitsandbytes`` distribution as ``importlib.metadata`` sees it: name, version, summary."""

    def read_text(self, filename: str) -> Optional[str]:
        if filename == "METADATA":
            return f"Metadata-Version: 2.1\nName: {ALIAS}\nVersion: {VERSION}\nSummary: {_SUMMARY}\n"
        if filename == "top_level.txt":
            return ALIAS + "\n"
        return None

    def locate_file(self, path) -> pathlib.Path:
        return pathlib.Path(lowbit.__file__).parent / path


def _normalized(name: str) -> str:
    return name.lower().replace("-", "_").replace(".", "_")


class _Finder(importlib.metadata.DistributionFinder, importlib.abc.Loader):
    """Finds ``bitsandbytes`` and ``bitsandbytes.*`` (import system) and the ``bitsandbytes``
    distribution (``importlib.metadata``)."""

    def __init__(self) -> None:
        self._lowbit_specs: dict[str, Any] = {}

    # -- modules --------------------------------------------------------------------------------
    def find_spec(self, fullname: str, path=None, target=None):
        if fullname == ALIAS:
            return importlib.machinery.ModuleSpec(ALIAS, self, origin=lowbit.__file__, is_package=True)
        if not fullname.startswith(ALIAS + "."):
            return None
        real = "lowbit" + fullname[len(ALIAS) :]
        try:
            found = importlib.util.find_spec(real)
        except ModuleNotFoundError:
            found = None
        if found is None:
            # stop here: no later finder may load some other file under the bitsandbytes name
            raise ModuleNotFoundError(
                f"No module named {fullname!r}: lowbit has no {real!r} (bitsandbytes is lowbit, lowbit.compat)",
                name=fullname,
            )
        return importlib.machinery.ModuleSpec(
            fullname, self, origin=found.origin, is_package=found.submodule_search_locations is not None
        )

    def create_module(self, spec) -> types.ModuleType:
        if spec.name == ALIAS:
            module = _AliasModule(ALIAS, lowbit.__doc__)
            module.__version__ = VERSION
            module.supported_torch_devices = set(SUPPORTED_TORCH_DEVICES)
            module.features = {"multi_backend"}  # bitsandbytes' flag for transformers/diffusers
            module.__path__ = []  # a package: its submodules come from this finder
            return module
        module = importlib.import_module("lowbit" + spec.name[len(ALIAS) :])
        self._lowbit_specs[spec.name] = module.__spec__
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        # lowbit's module ran when it was imported; the import system has just set its __spec__ to
        # the alias spec: give it back its own
        if module.__spec__.name in self._lowbit_specs:
            module.__spec__ = self._lowbit_specs.pop(module.__spec__.name)

    # -- distributions --------------------------------------------------------------------------
    def find_distributions(self, context: Optional[importlib.metadata.DistributionFinder.Context] = None) -> Iterator:
        name = None if context is None else context.name
        if name is None or _normalized(name) == ALIAS:
            yield _AliasDistribution()


_finder: Optional[_Finder] = None


def installed() -> bool:
    """Whether :func:`install` is in effect."""
    return _finder is not None


def _check_no_real_bitsandbytes() -> None:
    imported = sys.modules.get(ALIAS)
    if imported is not None:
        raise BitsandbytesPresentError(
            f"lowbit.compat.install(): bitsandbytes is already imported ({getattr(imported, '__file__', imported)}); "
            "lowbit does not replace a loaded bitsandbytes. Use one or the other in a process."
        )
    spec = importlib.util.find_spec(ALIAS)
    if spec is not None:
        raise BitsandbytesPresentError(
            f"lowbit.compat.install(): bitsandbytes is installed ({spec.origin}); lowbit does not shadow it. "
            "Uninstall it (pip uninstall bitsandbytes) to run bitsandbytes code on lowbit, or import lowbit directly."
        )
    try:
        dist = importlib.metadata.distribution(ALIAS)
    except importlib.metadata.PackageNotFoundError:
        return
    raise BitsandbytesPresentError(
        f"lowbit.compat.install(): a bitsandbytes {dist.version} distribution is installed (its package does not "
        "import); lowbit does not shadow it. Uninstall it first (pip uninstall bitsandbytes)."
    )


def _refresh_probes() -> None:
    """Forget the cached "is bitsandbytes installed?" answers of transformers and peft."""
    for module_name, function in _CACHED_PROBES:
        probe = getattr(sys.modules.get(module_name), function, None)
        if hasattr(probe, "cache_clear"):
            probe.cache_clear()


def _decided_at_import() -> list[str]:
    return sorted(
        name
        for name in sys.modules
        if name == "transformers.integrations.bitsandbytes" or (name.startswith("peft.tuners.") and name.endswith(".bnb"))
    )


def install() -> None:
    """Make ``bitsandbytes`` (modules, distribution metadata, ``torch.ops.bitsandbytes``) resolve to
    lowbit in this process; see the module docstring. Calling it again does nothing.

    Raises :class:`BitsandbytesPresentError` when the real bitsandbytes is installed or imported.
    """
    global _finder
    if _finder is not None:
        return
    _check_no_real_bitsandbytes()
    _finder = _Finder()
    sys.meta_path.insert(0, _finder)
    torch.ops.bitsandbytes = torch.ops.lowbit
    _refresh_probes()
    stale = _decided_at_import()
    if stale:
        warnings.warn(
            f"lowbit.compat.install(): {', '.join(stale)} were imported before install() and decided then that "
            "bitsandbytes is absent; call lowbit.compat.install() before importing transformers / peft",
            LowbitWarning,
            stacklevel=2,
        )


def uninstall() -> None:
    """Undo :func:`install`: ``bitsandbytes`` is no longer importable or listed as installed."""
    global _finder
    if _finder is None:
        return
    sys.meta_path.remove(_finder)
    _finder = None
    for name in [n for n in sys.modules if n == ALIAS or n.startswith(ALIAS + ".")]:
        del sys.modules[name]
    if torch.ops.__dict__.get(ALIAS) is torch.ops.lowbit:
        delattr(torch.ops, ALIAS)
    _refresh_probes()
