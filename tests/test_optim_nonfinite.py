"""The optimizers' non-finite policy (README, "Overflow and non-finite values"; the per-element rule
is csrc/common/lowbit_optim.h, the reference lowbit/backends/reference/optimizers.py).

8-bit state: an element whose gradient is NaN/Inf, or whose update overflows, keeps its parameter
and state; the other 255 values of its state block, and every other parameter, are updated as if
it were not there. 32-bit state: the bad value stays in its own element (as in torch.optim).
Bit-for-bit agreement of the native kernels (every ISA) with the reference on such gradients is in
test_parity.py (NONFINITE_GRADIENTS); the GPU kernels' in test_gpu_backends.py.
"""

from __future__ import annotations

import pytest
import torch

import lowbit
import lowbit.optim as O
from support import CPU_BACKENDS

#: every optimizer with 8-bit blockwise state, and hyper-parameters that move a parameter visibly
EIGHT_BIT = {
    "Adam8bit": dict(lr=1e-2),
    "AdamW8bit": dict(lr=1e-2, weight_decay=1e-2),
    "AdEMAMix8bit": dict(lr=5e-3),
    "LAMB8bit": dict(lr=1e-2),
    "LARS8bit": dict(lr=0.1, momentum=0.9),
    "SGD8bit": dict(lr=0.1, momentum=0.9),
    "Lion8bit": dict(lr=3e-3),
    "RMSprop8bit": dict(lr=2e-3),
    "Adagrad8bit": dict(lr=0.05),
}
N = 4 * 256  # four state blocks (min_8bit_size lowered to N below)
BAD = 300  # in the second block


@pytest.fixture(params=CPU_BACKENDS, ids=lambda name: f"backend={name}")
def backend(request):
    with lowbit.backends.use(request.param):
        yield request.param


def _steps(cls_name: str, gradients: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(initial parameter, parameter after one step per gradient, optimizer state)."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(N))
    initial = p.detach().clone()
    optimizer = getattr(O, cls_name)([p], min_8bit_size=N, **EIGHT_BIT[cls_name])
    for grad in gradients:
        p.grad = grad.clone()
        optimizer.step()
    return initial, p.detach().clone(), optimizer.state[p]


def _gradient(seed: int) -> torch.Tensor:
    return torch.randn(N, generator=torch.Generator().manual_seed(seed)) * 0.1


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("cls_name", EIGHT_BIT)
def test_8bit_step_skips_a_non_finite_gradient_element(cls_name, value, backend):
    bad = _gradient(1)
    bad[BAD] = value
    initial, after_one, state = _steps(cls_name, [bad])
    assert after_one[BAD] == initial[BAD], "the element with the bad gradient must keep its parameter"
    assert torch.isfinite(after_one).all()
    # the rest of its block moved, and the next clean step moves everything and stays finite
    block = torch.arange(256, 512) != BAD
    assert (after_one[256:512][block] != initial[256:512][block]).any()
    _, after_two, state = _steps(cls_name, [bad, _gradient(2)])
    assert torch.isfinite(after_two).all(), f"{int((~torch.isfinite(after_two)).sum())} parameters became non-finite"
    for key, value in state.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            assert torch.isfinite(value).all(), f"state {key!r} holds non-finite values"


@pytest.mark.parametrize("cls_name", EIGHT_BIT)
def test_8bit_step_survives_gradients_whose_square_overflows(cls_name, backend):
    huge = torch.full((N,), 1e30)
    huge[::2] = -1e30
    _, after, state = _steps(cls_name, [huge, _gradient(2)])
    assert torch.isfinite(after).all()
    for key, value in state.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            assert torch.isfinite(value).all(), f"state {key!r} holds non-finite values"


def test_32bit_step_confines_a_non_finite_gradient_to_its_element(backend):
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(N))
    optimizer = O.Adam32bit([p], lr=1e-2)
    for seed in (1, 2):
        grad = _gradient(seed)
        grad[BAD] = float("nan") if seed == 1 else grad[BAD]
        p.grad = grad
        optimizer.step()
    finite = torch.isfinite(p.detach())
    assert not finite[BAD] and int((~finite).sum()) == 1
