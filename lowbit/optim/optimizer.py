"""The machinery every lowbit optimizer shares (bitsandbytes' ``optim/optimizer.py`` API).

:class:`Optimizer8bit` does all the work: hyper-parameter checks, per-parameter configuration
(:class:`GlobalOptimManager` overrides), state allocation (32-bit, 8-bit blockwise, paged), the
update through ``torch.ops.lowbit.optimizer_update_32bit`` / ``optimizer_update_8bit_blockwise``
(so whichever backend is active runs the kernel), percentile clipping, and a ``state_dict``
that round-trips bit for bit and uses bitsandbytes' layout, so checkpoints load in either library.

:class:`Optimizer1State` and :class:`Optimizer2State` only give it bitsandbytes' constructor
signatures. Each optimizer file defines one family class (``AdamW``...) and its variants
(``AdamW8bit``, ``PagedAdamW``...) as two-line subclasses that fix ``optim_bits``/``is_paged``
through ``_fixed`` (see :meth:`Optimizer8bit.__init_subclass__`).
"""

from __future__ import annotations

import copy
import inspect
import warnings
from collections import defaultdict
from itertools import chain
from typing import Any, ClassVar, Optional

import torch

from ..core import checks, formats, ops
from . import paged

#: bitsandbytes' key (kept for checkpoint compatibility) under which ``state_dict`` nests the
#: quantization tensors of each parameter, so that FSDP does not try to gather them like
#: parameter-shaped state.
FSDP_QUANT_STATE_KEY = "__bnb_optimizer_quant_state__"
#: The per-parameter state keys that are not parameter-shaped (bitsandbytes' list).
QUANT_STATE_KEYS = frozenset(
    {"qmap1", "qmap2", "max1", "max2", "new_max1", "new_max2", "state1", "state2", "gnorm_vec",
     "absmax1", "absmax2", "unorm_vec"}
)  # fmt: skip
#: Percentile clipping keeps this many past squared gradient norms per parameter (bitsandbytes).
GNORM_HISTORY = 100


class MockArgs:
    """The ``args`` object bitsandbytes builds from keyword arguments (attribute access)."""

    def __init__(self, initial_data: dict[str, Any]):
        for key, value in initial_data.items():
            setattr(self, key, value)


class GlobalOptimManager:
    """Per-parameter optimizer overrides, shared by every optimizer of the process (a singleton).

    Typical use: keep an embedding's state in 32 bits while the rest is 8-bit::

        mng = GlobalOptimManager.get_instance()
        mng.register_module_override(model.embed, "weight", {"optim_bits": 32})

    or ``mng.register_parameters(model.parameters())`` then
    ``mng.override_config(model.fc1.weight, "optim_bits", 32)``. Any key of the optimizer's
    configuration can be overridden (``lr``, ``betas``, ``eps``, ``weight_decay``, ``optim_bits``,
    ``min_8bit_size``, ``percentile_clipping``...). ``optim_bits`` and ``min_8bit_size`` take
    effect when the parameter's state is created (its first step); the others at every step.
    """

    _instance: ClassVar[Optional[GlobalOptimManager]] = None

    def __init__(self):
        raise RuntimeError("Call GlobalOptimManager.get_instance() instead")

    def initialize(self) -> None:
        """Forget every override."""
        self.pid2config: dict[int, dict[str, Any]] = {}
        self.index2config: dict[tuple[int, int], dict[str, Any]] = {}
        self.optimizer = None
        self.uses_config_override = False
        self.module_weight_config_triple: list[tuple[torch.nn.Module, str, dict[str, Any]]] = []

    @classmethod
    def get_instance(cls) -> GlobalOptimManager:
        if cls._instance is None:
            cls._instance = cls.__new__(cls)
            cls._instance.initialize()
        return cls._instance

    def register_parameters(self, params) -> None:
        """Remember the (group, position) of already-overridden parameters, as an optimizer
        built on ``params`` will see them (so an override survives the parameter being replaced)."""
        groups = list(params)
        if groups and not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        for gindex, group in enumerate(groups):
            for pindex, p in enumerate(group["params"]):
                if id(p) in self.pid2config:
                    self.index2config[(gindex, pindex)] = self.pid2config[id(p)]

    def override_config(self, parameters, key=None, value=None, key_value_dict=None) -> None:
        """Override ``key=value`` (or every item of ``key_value_dict``) for ``parameters``
        (a tensor or an iterable of tensors)."""
        if key is not None and value is not None and key_value_dict is not None:
            raise ValueError("override_config: pass either key and value, or key_value_dict, not both")
        self.uses_config_override = True
        if isinstance(parameters, torch.Tensor):
            parameters = [parameters]
        if key is not None and value is not None:
            key_value_dict = {key: value}
        if key_value_dict is None:
            return
        for p in parameters:
            # a copy per parameter: a later override of one parameter must not leak to the others
            self.pid2config.setdefault(id(p), {}).update(key_value_dict)

    def register_module_override(
        self, module: torch.nn.Module, param_name: str, config: dict[str, Any]
    ) -> None:
        """Override ``config`` for ``module.<param_name>`` in every optimizer that holds it
        (resolved at the optimizer's first step)."""
        self.module_weight_config_triple.append((module, param_name, config))


def parse_betas(betas) -> tuple[float, ...]:
    """bitsandbytes also accepts betas as a string, e.g. ``"(0.9, 0.999)"`` from a config file."""
    if isinstance(betas, str):
        try:
            betas = [float(b) for b in betas.replace("(", "").replace(")", "").split(",") if b.strip()]
        except ValueError:
            raise ValueError(f"betas must be numbers such as '(0.9, 0.999)', got {betas!r}") from None
    if isinstance(betas, torch.Tensor) or not isinstance(betas, (tuple, list)):
        raise TypeError(f"betas must be a tuple of numbers, got {type(betas).__name__} {betas!r}")
    return tuple(betas)


class Optimizer8bit(torch.optim.Optimizer):
    """Base of every lowbit optimizer: 32-bit, 8-bit blockwise and paged state (see module doc).

    State per parameter (bitsandbytes' names and layout): ``step`` (int), ``state1`` and, for
    two-state optimizers, ``state2`` (parameter-shaped; AdEMAMix's ``state1`` holds two moments,
    shape ``(2, *p.shape)``). 32-bit state is float32. 8-bit state is uint8 codes with float32
    ``absmax1``/``absmax2`` per 256-element block, ``qmap1`` = the signed dynamic map (first
    moments, and the single state of every one-state optimizer, as bitsandbytes uses it) and
    ``qmap2`` = the unsigned dynamic map (second moments). Parameters with fewer than
    ``min_8bit_size`` elements always get 32-bit state.
    """

    #: How many betas the family's update reads (AdEMAMix: 3).
    _n_betas: ClassVar[int] = 2
    #: Set by a variant subclass (``AdamW8bit``...): the constructor arguments it fixes.
    _fixed: ClassVar[dict[str, Any]] = {}
    #: Fixed arguments that bitsandbytes nevertheless keeps in a family's variant signatures
    #: (``optim_bits`` of Adam8bit, ``is_paged`` of PagedAdam...): a family lists them here.
    _variants_keep: ClassVar[frozenset[str]] = frozenset()
    #: Besides its own, the ``optim_bits`` a variant that keeps the argument accepts: bitsandbytes'
    #: "compatibility default" 32 (Adam8bit...); Adagrad8bit accepts only its own 8.
    _variants_also_accept_bits: ClassVar[tuple[int, ...]] = (32,)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "_fixed" in cls.__dict__:
            cls.__init__ = _variant_init(cls)
            if cls.__doc__ is None:
                bits, is_paged = cls._fixed.get("optim_bits"), cls._fixed.get("is_paged")
                what = ", ".join(([f"{bits}-bit state"] if bits else []) + (["paged"] if is_paged else []))
                cls.__doc__ = f"{cls.__mro__[1].__name__} with {what} (bitsandbytes' ``{cls.__name__}``)."

    def __init__(
        self,
        params,
        defaults: dict[str, Any],
        optim_bits: int = 32,
        is_paged: bool = False,
        *,
        optimizer_name: Optional[str] = None,
        args=None,
        min_8bit_size: int = 4096,
        max_unorm: float = 0.0,
        skip_zeros: bool = False,
        percentile_clipping: int = 100,
        block_wise: bool = True,
        beta_names: tuple[str, ...] = (),
    ):
        # set before torch's __init__, which calls add_param_group (our checks) for each group
        self._beta_names = beta_names
        super().__init__(params, defaults)
        if optimizer_name is not None and optimizer_name not in ops.OPTIMIZERS:
            raise ValueError(f"optimizer_name must be one of {ops.OPTIMIZERS}, got {optimizer_name!r}")
        self.optimizer_name = optimizer_name
        self.initialized = False
        self.is_paged = bool(is_paged)
        self.mng = GlobalOptimManager.get_instance()
        self.non_castable_tensor_keys = set(QUANT_STATE_KEYS)
        self.name2qmap: dict[str, torch.Tensor] = {}
        self._managed_ptrs: set[int] = set()  # data pointers of this optimizer's paged buffers
        if args is None:
            args = MockArgs(
                dict(
                    optim_bits=optim_bits,
                    min_8bit_size=min_8bit_size,
                    max_unorm=max_unorm,
                    skip_zeros=skip_zeros,
                    percentile_clipping=percentile_clipping,
                    block_wise=block_wise,
                )
            )
        self.args = args
        self._check_bits_config(self._args_config())
        if self._args_config()["optim_bits"] == 8:
            self.fill_qmap()

    # ------------------------------------------------------------------ configuration
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        group["betas"] = parse_betas(group["betas"])
        self._check_group(group)

    def _check_group(self, group: dict[str, Any]) -> None:
        """A clear error naming the argument, for every param group and every override."""
        for key in ("lr", "eps", "weight_decay"):
            checks.number(group[key], key, 0.0)
        betas = group["betas"]
        if len(betas) != self._n_betas:
            names = ", ".join(self._beta_names or [f"beta{i + 1}" for i in range(self._n_betas)])
            raise ValueError(f"betas must hold {self._n_betas} values ({names}), got {betas!r}")
        for i, beta in enumerate(betas):
            name = self._beta_names[i] if i < len(self._beta_names) else f"betas[{i}]"
            checks.number(beta, name, 0.0, 1.0, high_open=True)
        if "alpha" in group:
            checks.number(group["alpha"], "alpha", 0.0)
        for key in ("t_alpha", "t_beta3"):
            value = group.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"{key} must be None or an int >= 0 (a number of steps), got {value!r}")

    def _args_config(self) -> dict[str, Any]:
        args = self.args
        return {
            "optim_bits": args.optim_bits,
            "min_8bit_size": args.min_8bit_size,
            "max_unorm": getattr(args, "max_unorm", 0.0),
            "skip_zeros": getattr(args, "skip_zeros", False),
            # gone from bitsandbytes 0.45+, still accepted (older user code passes them)
            "percentile_clipping": getattr(args, "percentile_clipping", 100),
            "block_wise": getattr(args, "block_wise", True),
        }

    @staticmethod
    def _check_bits_config(config: dict[str, Any]) -> None:
        if config["optim_bits"] not in (8, 32) or isinstance(config["optim_bits"], bool):
            raise ValueError(f"optim_bits must be 8 or 32, got {config['optim_bits']!r}")
        size = config["min_8bit_size"]
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ValueError(f"min_8bit_size must be an int >= 0, got {size!r}")
        checks.number(config["max_unorm"], "max_unorm", 0.0)
        pc = config["percentile_clipping"]
        if isinstance(pc, bool) or not isinstance(pc, int) or not 0 <= pc <= 100:
            raise ValueError(f"percentile_clipping must be an int in [0, 100] (100 = off), got {pc!r}")
        if config["optim_bits"] == 8 and not config["block_wise"]:
            raise ValueError(
                "block_wise=False (one absmax per tensor) is not supported: lowbit keeps 8-bit "
                "optimizer state blockwise (256 elements per absmax). Use block_wise=True (the default)."
            )

    def get_config(self, gindex: int, pindex: int, group: dict[str, Any]) -> dict[str, Any]:
        """The configuration of one parameter: its group, the optimizer's args, then overrides."""
        config = {key: group[key] for key in ("betas", "eps", "weight_decay", "lr")}
        config.update(
            alpha=group.get("alpha", 0.0), t_alpha=group.get("t_alpha"), t_beta3=group.get("t_beta3")
        )
        config.update(self._args_config())
        p = self.param_groups[gindex]["params"][pindex]
        overrides = [
            self.mng.index2config.get((gindex, pindex)),
            self.mng.pid2config.get(id(p)),  # works whether or not register_parameters was called
        ]
        for override in filter(None, overrides):
            config.update(override)
            config["betas"] = parse_betas(config["betas"])
            self._check_group(config)
        return config

    def check_overrides(self) -> None:
        """Resolve ``register_module_override`` entries to this optimizer's parameters."""
        for module, attr, config in self.mng.module_weight_config_triple:
            target = getattr(module, attr)
            if not isinstance(target, torch.Tensor):
                raise TypeError(f"register_module_override: {type(module).__name__}.{attr} is not a tensor")
            for gindex, group in enumerate(self.param_groups):
                for pindex, p in enumerate(group["params"]):
                    if p is target:
                        self.mng.pid2config[id(p)] = config
                        self.mng.index2config[(gindex, pindex)] = config

    # ------------------------------------------------------------------ state
    def fill_qmap(self) -> None:
        self.name2qmap["dynamic"] = formats.dynamic_map(signed=True)
        self.name2qmap["udynamic"] = formats.dynamic_map(signed=False)

    def _qmap(self, name: str, device: torch.device) -> torch.Tensor:
        # one tensor per device, shared by every parameter's state (as bitsandbytes does)
        if name not in self.name2qmap:
            self.fill_qmap()
        self.name2qmap[name] = self.name2qmap[name].to(device)
        return self.name2qmap[name]

    def get_state_buffer(self, p: torch.Tensor, dtype=torch.float32, shape=None) -> torch.Tensor:
        """A zero state buffer for ``p``: managed (paged) memory when paging applies."""
        shape = tuple(p.shape if shape is None else shape)
        if self.is_paged:
            if p.device.type != "cuda":
                paged.warn_unpaged(f"does not exist for {p.device.type} tensors")
            elif p.numel() >= paged.MIN_PAGED_NUMEL:
                buffer = paged.managed_zeros(shape, dtype, p.device)
                if buffer is not None:
                    self._managed_ptrs.add(buffer.data_ptr())
                    return buffer
                paged.warn_unpaged(
                    "this CUDA runtime could not provide (cudaMallocManaged unavailable or failed)"
                )
        return torch.zeros(shape, dtype=dtype, device=p.device)

    def _two_states(self) -> bool:
        return self.optimizer_name in ops.OPTIMIZERS_TWO_STATES

    @torch.no_grad()
    def init_state(self, group: dict[str, Any], p: torch.Tensor, gindex: int, pindex: int) -> None:
        if self.optimizer_name is None:
            raise NotImplementedError("Optimizer8bit needs an optimizer_name (use one of its subclasses)")
        config = self.get_config(gindex, pindex, group)
        self._check_bits_config(config)
        eight_bit = config["optim_bits"] == 8 and p.numel() >= config["min_8bit_size"]
        dtype = torch.uint8 if eight_bit else torch.float32
        # AdEMAMix keeps two first moments (fast and slow EMA) in one (2, *shape) state1
        copies = 2 if self.optimizer_name == "ademamix" else 1
        state = self.state[p]
        state["step"] = 0
        state["state1"] = self.get_state_buffer(p, dtype, (copies, *p.shape) if copies > 1 else None)
        if self._two_states():
            state["state2"] = self.get_state_buffer(p, dtype)
        if eight_bit:
            blocks = formats.num_blocks(p.numel(), ops.OPTIMIZER_8BIT_BLOCKSIZE)
            state["qmap1"] = self._qmap("dynamic", p.device)
            state["absmax1"] = torch.zeros((copies, blocks) if copies > 1 else (blocks,), device=p.device)
            if self._two_states():
                state["qmap2"] = self._qmap("udynamic", p.device)
                state["absmax2"] = torch.zeros((blocks,), device=p.device)
        if config["percentile_clipping"] < 100:
            state["gnorm_vec"] = torch.zeros((GNORM_HISTORY,), device=p.device)
        if config["max_unorm"] > 0.0:
            state["unorm_vec"] = torch.zeros((1,), device=p.device)

    def prefetch_state(self, p: torch.Tensor) -> None:
        if self.is_paged:
            for key in ("state1", "state2"):
                buffer = self.state[p].get(key)
                if buffer is not None and buffer.data_ptr() in self._managed_ptrs:
                    paged.prefetch(buffer)

    def to_gpu(self) -> None:
        """Move state to its parameter's device (state loaded or created before ``model.cuda()``)."""
        for group in self.param_groups:
            for p in group["params"]:
                for key, value in self.state.get(p, {}).items():
                    if isinstance(value, torch.Tensor) and value.device != p.device:
                        self.state[p][key] = value.to(p.device)

    # ------------------------------------------------------------------ update
    def _schedule(self, config: dict[str, Any], step: int) -> tuple[float, float]:
        """``(beta3, alpha)`` at ``step``; AdEMAMix overrides it for its warm-up schedules."""
        betas = config["betas"]
        return (float(betas[2]) if len(betas) >= 3 else 0.0), float(config["alpha"])

    @staticmethod
    def _gnorm_scale(grad: torch.Tensor, state: dict[str, Any], step: int, percentile: int) -> float:
        """bitsandbytes' percentile clipping: scale the gradient down to the ``percentile``-th
        smallest of the last 100 gradient norms. As in bitsandbytes the history starts as zeros,
        so the first ``100 - percentile`` steps clip the gradient to zero."""
        if percentile >= 100:
            return 1.0
        history = state["gnorm_vec"]
        history[step % GNORM_HISTORY] = grad.float().square().sum()
        current = history[step % GNORM_HISTORY].sqrt()
        clip = history.sort().values[percentile].sqrt()
        return float(clip / current) if bool(current > clip) else 1.0

    @torch.no_grad()
    def update_step(self, group: dict[str, Any], p: torch.Tensor, gindex: int, pindex: int) -> None:
        state = self.state[p]
        state["step"] += 1
        if p.numel() == 0:  # nothing to update (torch's optimizers accept empty parameters too)
            return
        if not p.is_contiguous():  # the ops take contiguous tensors only
            p.data = p.data.contiguous()
        if not p.grad.is_contiguous():
            p.grad = p.grad.contiguous()
        grad = p.grad
        config = self.get_config(gindex, pindex, group)
        step = state["step"]
        beta1, beta2 = (float(b) for b in (tuple(config["betas"]) + (0.0, 0.0))[:2])
        beta3, alpha = self._schedule(config, step)
        gnorm_scale = self._gnorm_scale(grad, state, step, config["percentile_clipping"])
        lr, eps, weight_decay = float(config["lr"]), float(config["eps"]), float(config["weight_decay"])
        name, skip_zeros = self.optimizer_name, bool(config["skip_zeros"])

        if state["state1"].dtype == torch.float32:
            # LAMB/LARS trust ratio: the kernel compares the update norm with max_unorm * ||p||
            max_unorm = float(config["max_unorm"])
            param_norm = float(p.data.float().norm()) if max_unorm > 0.0 else 0.0
            unorm_vec = state.get("unorm_vec") if max_unorm > 0.0 else None
            torch.ops.lowbit.optimizer_update_32bit(
                name, grad, p, state["state1"], state.get("state2"), unorm_vec, max_unorm, param_norm, beta1, beta2,
                beta3, alpha, eps, weight_decay, step, lr, gnorm_scale, skip_zeros,
            )  # fmt: skip
        else:
            # no trust ratio here: the blockwise kernels have none (bitsandbytes ignores max_unorm too)
            torch.ops.lowbit.optimizer_update_8bit_blockwise(
                name, grad, p, state["state1"], state.get("state2"), beta1, beta2, beta3, alpha, eps, step, lr,
                state["qmap1"], state.get("qmap2"), state["absmax1"], state.get("absmax2"), weight_decay,
                gnorm_scale, skip_zeros,
            )  # fmt: skip

    @torch.no_grad()
    def step(self, closure=None):
        """Perform one optimization step (``closure`` re-evaluates the model and returns the loss)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self.initialized:
            self.check_overrides()
            self.to_gpu()
            self.initialized = True
        for gindex, group in enumerate(self.param_groups):
            for pindex, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                if len(self.state[p]) == 0:
                    self.init_state(group, p, gindex, pindex)
                self.prefetch_state(p)
                self.update_step(group, p, gindex, pindex)
        return loss

    # ------------------------------------------------------------------ checkpoints
    def _check_saved_group(self, saved: Any, group: dict[str, Any], index: int) -> None:
        """A saved param group holds every hyper-parameter the update reads, each valid. Keys only
        AdEMAMix reads (``alpha``...), absent from older checkpoints, are taken from ``group``."""
        where = f"state_dict['param_groups'][{index}]"
        if not isinstance(saved, dict) or not isinstance(saved.get("params"), list):
            raise ValueError(f"{where} must be a dict with a 'params' list")
        required = {"lr", "betas", "eps", "weight_decay"}
        if self.optimizer_name == "ademamix":
            required |= {"alpha", "t_alpha", "t_beta3"}
        missing = sorted(required - set(saved))
        if missing:
            raise ValueError(f"{where} lacks {missing}, which {type(self).__name__} reads")
        for key, value in group.items():
            if key != "params":
                saved.setdefault(key, value)
        try:
            saved["betas"] = parse_betas(saved["betas"])
            self._check_group(saved)
        except (TypeError, ValueError) as err:
            raise type(err)(f"{where}: {err}") from None

    def _check_saved_state(self, state: dict[str, Any], p: torch.Tensor, config: dict[str, Any], key) -> None:
        """One parameter's saved state matches what :meth:`init_state` would create for ``p``."""
        where = f"state_dict['state'][{key!r}]"
        copies = 2 if self.optimizer_name == "ademamix" else 1
        expected = {"step", "state1"} | ({"state2"} if self._two_states() else set())
        step = state.get("step")
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"{where}['step'] must be an int >= 0, got {step!r}")

        def tensor(name: str, dtypes, shape: tuple[int, ...]) -> torch.Tensor:
            if name not in state:
                raise ValueError(
                    f"{where} has no {name!r}, which {type(self).__name__} needs here "
                    "(was it saved by another optimizer?)"
                )
            value = checks.tensor(state[name], f"{where}[{name!r}]", dtypes, nonempty=False)
            if tuple(value.shape) != shape:
                raise ValueError(f"{where}[{name!r}] has shape {tuple(value.shape)}, expected {shape}")
            if value.device.type == "meta":
                raise ValueError(f"{where}[{name!r}] is a meta tensor (no data to load)")
            return value

        state1_shape = (copies, *p.shape) if copies > 1 else tuple(p.shape)
        state1 = tensor("state1", (torch.float32, torch.uint8), state1_shape)
        if self._two_states():
            tensor("state2", (state1.dtype,), tuple(p.shape))
        if state1.dtype == torch.uint8:
            blocks = formats.num_blocks(p.numel(), ops.OPTIMIZER_8BIT_BLOCKSIZE)
            maps = [("qmap1", "absmax1", (copies, blocks) if copies > 1 else (blocks,))]
            if self._two_states():
                maps.append(("qmap2", "absmax2", (blocks,)))
            for qmap, absmax, absmax_shape in maps:
                checks.code(tensor(qmap, (torch.float32,), (256,)), f"{where}[{qmap!r}]", 256, state[qmap].device)
                if not bool(torch.isfinite(tensor(absmax, (torch.float32,), absmax_shape)).all()):
                    raise ValueError(f"{where}[{absmax!r}] contains NaN or Inf")
                expected |= {qmap, absmax}
        if config["percentile_clipping"] < 100:
            tensor("gnorm_vec", (torch.float32,), (GNORM_HISTORY,))
            expected.add("gnorm_vec")
        if state1.dtype == torch.float32 and config["max_unorm"] > 0.0:
            tensor("unorm_vec", (torch.float32,), (1,))
            expected.add("unorm_vec")
        unexpected = sorted(set(state) - expected - {"gnorm_vec", "unorm_vec"})
        if unexpected:
            bits = "8-bit" if state1.dtype == torch.uint8 else "32-bit"
            raise ValueError(
                f"{where} holds {unexpected}, which {type(self).__name__} with {bits} state does not have "
                "(was it saved by another optimizer?)"
            )

    def state_dict(self) -> dict[str, Any]:
        """torch's state dict, with each parameter's quantization tensors nested under
        ``FSDP_QUANT_STATE_KEY`` exactly as bitsandbytes does (checkpoints load in either)."""
        state_dict = super().state_dict()
        wrapped = {}
        for index, param_state in state_dict["state"].items():
            param_state = dict(param_state)  # torch's copy is shallow: never edit the live state
            quant = {
                key: param_state.pop(key) for key in list(param_state) if key in self.non_castable_tensor_keys
            }
            if quant:
                param_state[FSDP_QUANT_STATE_KEY] = quant
            wrapped[index] = param_state
        state_dict["state"] = wrapped
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any], move_to_device: bool = True) -> None:
        """Load a state from :meth:`state_dict` (lowbit's or bitsandbytes').

        Unlike torch, tensors keep their saved dtype (32-bit state of a float16 parameter stays
        float32; torch would cast it to float16 and lose the bits that make a resumed run equal an
        uninterrupted one) and are copied, so the loaded state never aliases ``state_dict``.
        ``move_to_device`` moves them to their parameter's device."""
        if not isinstance(state_dict, dict):
            raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
        state_dict = state_dict.copy()
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            state_dict = hook(self, state_dict) or state_dict
        for key, kind in (("state", dict), ("param_groups", list)):
            if not isinstance(state_dict.get(key), kind):
                raise ValueError(f"state_dict[{key!r}] must be a {kind.__name__}, got {state_dict.get(key)!r:.80}")
        groups, saved_groups = self.param_groups, copy.deepcopy(state_dict["param_groups"])
        if len(groups) != len(saved_groups):
            raise ValueError("loaded state dict has a different number of parameter groups")
        for index, (group, saved) in enumerate(zip(groups, saved_groups)):
            self._check_saved_group(saved, group, index)
        if any(len(g["params"]) != len(s["params"]) for g, s in zip(groups, saved_groups)):
            raise ValueError(
                "loaded state dict contains a parameter group that doesn't match the size of optimizer's group"
            )
        id_map = dict(
            zip(
                chain.from_iterable(g["params"] for g in saved_groups),
                chain.from_iterable(g["params"] for g in groups),
            )
        )

        def restore(param: torch.Tensor, value):
            if isinstance(value, torch.Tensor):
                return value.to(param.device, copy=True) if move_to_device else value.clone()
            if isinstance(value, dict):
                return {key: restore(param, v) for key, v in value.items()}
            if isinstance(value, (list, tuple)):
                return type(value)(restore(param, v) for v in value)
            return value

        # Everything is validated before anything is assigned: a bad entry raises and leaves the
        # optimizer as it was (it would otherwise fail only at the next step, half-updated).
        position = {
            id(p): (gindex, pindex) for gindex, g in enumerate(groups) for pindex, p in enumerate(g["params"])
        }
        loaded: dict[Any, dict[str, Any]] = {}
        for key, value in state_dict["state"].items():
            if key not in id_map:  # state of no current parameter: kept as is (as torch does)
                continue
            if not isinstance(value, dict):
                raise ValueError(f"state_dict['state'][{key!r}] must be a dict, got {type(value).__name__}")
            param_state = dict(value)
            quant = param_state.pop(FSDP_QUANT_STATE_KEY, {})
            if not isinstance(quant, dict):
                raise ValueError(f"state_dict['state'][{key!r}][{FSDP_QUANT_STATE_KEY!r}] must be a dict")
            param_state.update(quant)
            p = id_map[key]
            gindex, pindex = position[id(p)]
            self._check_saved_state(param_state, p, self.get_config(gindex, pindex, saved_groups[gindex]), key)
            loaded[key] = param_state

        state: defaultdict[Any, dict[str, Any]] = defaultdict(dict)
        for key, value in state_dict["state"].items():
            state[id_map[key] if key in id_map else key] = (
                restore(id_map[key], loaded[key]) if key in id_map else value
            )

        for group, saved in zip(groups, saved_groups):
            saved["params"] = group["params"]
            if "param_names" in group and "param_names" not in saved:
                saved["param_names"] = group["param_names"]
        self.__setstate__({"state": state, "param_groups": saved_groups})
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)


class Optimizer2State(Optimizer8bit):
    """Base of two-state optimizers (Adam, AdamW, LAMB, AdEMAMix): bitsandbytes' signature."""

    def __init__(
        self,
        optimizer_name: str,
        params,
        lr: float = 1e-3,
        betas=(0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        optim_bits: int = 32,
        args=None,
        min_8bit_size: int = 4096,
        max_unorm: float = 0.0,
        skip_zeros: bool = False,
        is_paged: bool = False,
        alpha: float = 0.0,
        t_alpha: Optional[int] = None,
        t_beta3: Optional[int] = None,
        *,
        percentile_clipping: int = 100,
        block_wise: bool = True,
        beta_names: tuple[str, ...] = (),
    ):
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            alpha=alpha,
            t_alpha=t_alpha,
            t_beta3=t_beta3,
        )
        super().__init__(
            params, defaults, optim_bits, is_paged, optimizer_name=optimizer_name, args=args,
            min_8bit_size=min_8bit_size, max_unorm=max_unorm, skip_zeros=skip_zeros,
            percentile_clipping=percentile_clipping, block_wise=block_wise, beta_names=beta_names,
        )  # fmt: skip


class Optimizer1State(Optimizer8bit):
    """Base of one-state optimizers (SGD with momentum, LARS, Lion, RMSprop, Adagrad)."""

    def __init__(
        self,
        optimizer_name: str,
        params,
        lr: float = 1e-3,
        betas=(0.9, 0.0),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        optim_bits: int = 32,
        args=None,
        min_8bit_size: int = 4096,
        max_unorm: float = 0.0,
        skip_zeros: bool = False,
        is_paged: bool = False,
        *,
        percentile_clipping: int = 100,
        block_wise: bool = True,
        beta_names: tuple[str, ...] = (),
    ):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        super().__init__(
            params, defaults, optim_bits, is_paged, optimizer_name=optimizer_name, args=args,
            min_8bit_size=min_8bit_size, max_unorm=max_unorm, skip_zeros=skip_zeros,
            percentile_clipping=percentile_clipping, block_wise=block_wise, beta_names=beta_names,
        )  # fmt: skip


def _variant_init(cls: type) -> Any:
    """``__init__`` of a variant (``AdamW8bit``, ``PagedLion``...): its family's constructor with
    the ``_fixed`` arguments forced and removed from the signature, except those the family keeps
    (as bitsandbytes does). A kept ``optim_bits`` accepts the variant's own value and the family's
    ``_variants_also_accept_bits``, a kept ``is_paged`` anything; the variant's values win."""
    family, fixed, name = cls.__mro__[1], dict(cls._fixed), cls.__name__
    accepted = (fixed.get("optim_bits"), *family._variants_also_accept_bits)

    def kept(p: inspect.Parameter) -> inspect.Parameter:
        # a kept optim_bits defaults to the variant's own value where the family's is refused
        return p.replace(default=fixed["optim_bits"]) if p.name == "optim_bits" and p.default not in accepted else p

    signature = inspect.signature(family.__init__)
    signature = signature.replace(
        parameters=[
            kept(p) for p in signature.parameters.values() if p.name not in fixed or p.name in family._variants_keep
        ]
    )

    def __init__(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        arguments = dict(bound.arguments)
        del arguments["self"]
        if "optim_bits" in fixed and arguments.get("optim_bits", fixed["optim_bits"]) not in accepted:
            raise ValueError(
                f"{name} always uses {fixed['optim_bits']}-bit state; got optim_bits={arguments['optim_bits']!r}"
            )
        arguments.update(fixed)
        family.__init__(self, **arguments)

    __init__.__signature__ = signature  # type: ignore[attr-defined]
    __init__.__qualname__ = f"{name}.__init__"
    __init__.__doc__ = family.__init__.__doc__
    return __init__


def reject_amsgrad(amsgrad: bool, owner: object) -> None:
    if amsgrad:
        raise ValueError(f"{type(owner).__name__} does not support amsgrad=True (neither does bitsandbytes)")


def require_momentum(momentum: float, owner: object) -> None:
    if momentum == 0:
        raise NotImplementedError(
            f"{type(owner).__name__} without momentum is not supported (as in bitsandbytes); use torch.optim.SGD"
        )


def warn_ignored(owner: object, **values: Any) -> None:
    """Arguments bitsandbytes accepts and silently ignores: accept them too, but say so."""
    ignored = ", ".join(f"{key}={value!r}" for key, value in values.items() if value)
    if ignored:
        warnings.warn(
            f"{type(owner).__name__} ignores {ignored}, as bitsandbytes does: its kernel has no such option",
            UserWarning,
            stacklevel=3,
        )


__all__ = [
    "FSDP_QUANT_STATE_KEY",
    "GlobalOptimManager",
    "MockArgs",
    "Optimizer1State",
    "Optimizer2State",
    "Optimizer8bit",
]
