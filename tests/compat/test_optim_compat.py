"""lowbit.optim against bitsandbytes.optim: signatures, update steps, checkpoints.

docs/design.md §5 requires, for the same parameters and gradients, identical codes in >= 99.9 % of the
8-bit state entries and parameters within 1e-6 relative (both for 32-bit state). On CPU both
libraries follow the same formulas: the reference backend agrees bit for bit; the native kernels
round square roots correctly (torch's vectorized float32 sqrt does not always) and sum LAMB/LARS
norms in another order, so their parameters differ in the last bits. The thresholds are the
contract, and a failure message gives the measured agreement.
"""

from __future__ import annotations

import copy
import inspect
import warnings

import pytest
import torch

import lowbit.optim as LO

from .conftest import case_seed

pytestmark = pytest.mark.compat

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import bitsandbytes.optim as BO

#: The shape of the optimized parameter: > 4096 elements (8-bit state applies), not a multiple of
#: the 256-element block (a partial last block).
SHAPE = (97, 131)

#: (class name, constructor arguments); every family, 8-bit and 32-bit.
CASES = [
    ("AdamW8bit", dict(lr=1e-3, weight_decay=1e-2)),
    ("Adam8bit", dict(lr=1e-3)),
    ("Lion8bit", dict(lr=1e-4, weight_decay=1e-2)),
    ("SGD8bit", dict(lr=1e-2, momentum=0.9, weight_decay=1e-3)),
    ("RMSprop8bit", dict(lr=1e-3, weight_decay=1e-3)),
    ("Adagrad8bit", dict(lr=1e-2)),
    ("AdEMAMix8bit", dict(lr=1e-3)),
    ("AdEMAMix8bit", dict(lr=1e-3, t_alpha=3, t_beta3=3)),
    ("LAMB8bit", dict(lr=1e-3)),
    ("AdamW", dict(lr=1e-3, weight_decay=1e-2)),
    ("Lion", dict(lr=1e-4)),
    ("SGD", dict(lr=1e-2, momentum=0.9)),
    ("RMSprop", dict(lr=1e-3)),
    ("Adagrad", dict(lr=1e-2)),
    ("LAMB", dict(lr=1e-3)),
    ("LARS", dict(lr=1e-2, momentum=0.9)),
]


def _case_id(case) -> str:
    name, kwargs = case
    return name + "".join(f"-{k}={v}" for k, v in kwargs.items() if k.startswith("t_"))


def _bnb_optimizer_classes() -> list[str]:
    return sorted(
        name
        for name in dir(BO)
        if inspect.isclass(getattr(BO, name)) and issubclass(getattr(BO, name), torch.optim.Optimizer)
    )


@pytest.mark.parametrize("name", _bnb_optimizer_classes())
def test_constructor_signature_matches(name):
    """lowbit accepts every argument bitsandbytes does, at the same position, with the same default.

    lowbit appends percentile_clipping and block_wise (dropped in bitsandbytes 0.45, still passed
    by older user code). A variant's fixed optim_bits (where bitsandbytes keeps it in the
    signature) accepts 8 or 32, so its default is not compared."""
    ours = inspect.signature(getattr(LO, name).__init__).parameters
    theirs = inspect.signature(getattr(BO, name).__init__).parameters
    assert list(ours)[: len(theirs)] == list(theirs)
    fixed = getattr(getattr(LO, name), "_fixed", {})
    for arg, param in theirs.items():
        if arg not in fixed:
            assert ours[arg].default == param.default, arg


def _run(cls, kwargs, steps: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    p = torch.nn.Parameter(torch.randn(SHAPE, generator=g))
    opt = cls([p], **kwargs)
    for _ in range(steps):
        p.grad = torch.randn(SHAPE, generator=g) * 0.1
        opt.step()
    return p.detach(), opt.state[p], opt


def _code_agreement(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype == torch.uint8
    return (ours == theirs).float().mean().item()


def _assert_same_step(ours_p, ours_state, theirs_p, theirs_state, what: str) -> None:
    # "within 1e-6 relative", per element, relative to the element or, for elements near zero, to
    # the tensor's RMS: the native kernels take correctly rounded square roots where this torch's
    # vectorized sqrt is up to 1 ulp off, and a 1-ulp change in an Adam denominator moves an element
    # that ends near 0 by ~1e-8 of the step, which is no relative measure of that element.
    scale = torch.maximum(theirs_p.abs(), theirs_p.pow(2).mean().sqrt())
    rel = ((ours_p - theirs_p).abs() / scale.clamp_min(1e-30)).max().item()
    assert rel <= 1e-6, f"{what}: parameters differ by up to {rel:.3g} relative"
    assert ours_state.keys() == theirs_state.keys(), what
    assert ours_state["step"] == theirs_state["step"]
    for key in ("state1", "state2"):
        if key not in theirs_state:
            continue
        ours_s, theirs_s = ours_state[key], theirs_state[key]
        if theirs_s.dtype == torch.uint8:
            agreement = _code_agreement(ours_s, theirs_s)
            assert agreement >= 0.999, f"{what}: {key} codes agree in {100 * agreement:.4f}% of entries"
        else:
            torch.testing.assert_close(ours_s, theirs_s, rtol=1e-6, atol=1e-12, msg=f"{what}: {key}")
    for key in ("absmax1", "absmax2"):
        if key in theirs_state:
            torch.testing.assert_close(
                ours_state[key], theirs_state[key], rtol=1e-6, atol=0, msg=f"{what}: {key}"
            )
            assert ours_state[key].shape == theirs_state[key].shape


@pytest.mark.parametrize("steps", [1, 4])
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_steps_match_bitsandbytes(case, steps, backend):
    name, kwargs = case
    seed = case_seed("optim", _case_id(case), steps)
    ours_p, ours_state, _ = _run(getattr(LO, name), kwargs, steps, seed)
    theirs_p, theirs_state, _ = _run(getattr(BO, name), kwargs, steps, seed)
    _assert_same_step(ours_p, ours_state, theirs_p, theirs_state, f"{name} after {steps} step(s)")


@pytest.mark.parametrize("direction", ["bitsandbytes->lowbit", "lowbit->bitsandbytes"])
@pytest.mark.parametrize("name", ["AdamW8bit", "AdEMAMix8bit", "Lion"])
def test_checkpoints_load_in_the_other_library(name, direction, backend):
    """A state_dict saved by one library resumes in the other exactly as in the first."""
    source, target = (BO, LO) if direction.startswith("bitsandbytes") else (LO, BO)
    g = torch.Generator().manual_seed(case_seed("checkpoint", name))
    start = torch.randn(SHAPE, generator=g)
    grads = [torch.randn(SHAPE, generator=g) * 0.1 for _ in range(4)]

    def steps(opt, p, todo):
        for grad in todo:
            p.grad = grad.clone()
            opt.step()

    p = torch.nn.Parameter(start.clone())
    uninterrupted = getattr(source, name)([p])
    steps(uninterrupted, p, grads[:2])
    saved_p, saved = (
        p.detach().clone(),
        copy.deepcopy(uninterrupted.state_dict()),
    )  # state_dict holds live tensors
    steps(uninterrupted, p, grads[2:])

    q = torch.nn.Parameter(saved_p)
    resumed = getattr(target, name)([q])
    resumed.load_state_dict(saved)
    steps(resumed, q, grads[2:])
    _assert_same_step(q.detach(), resumed.state[q], p.detach(), uninterrupted.state[p], f"{name} {direction}")


def test_module_override_gives_the_same_state_dtypes():
    layouts = []
    for lib in (BO, LO):
        manager = lib.GlobalOptimManager.get_instance()
        manager.initialize()
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Embedding(512, 16), torch.nn.Flatten(), torch.nn.Linear(64, 128))
        manager.register_module_override(model[0], "weight", {"optim_bits": 32})
        opt = lib.AdamW8bit(model.parameters())
        model(torch.randint(0, 512, (8, 4))).sum().backward()
        opt.step()
        layouts.append(
            {
                i: {k: v.dtype for k, v in opt.state[p].items() if torch.is_tensor(v)}
                for i, p in enumerate(model.parameters())
            }
        )
        manager.initialize()
    assert layouts[0] == layouts[1]
