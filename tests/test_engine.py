"""The stepping loop: no host synchronisation per step, coefficient reuse, evaluation bookkeeping."""

import contextlib

import torch

from deis_ode import VPODE, SemiLinearODE, VPSchedule
from deis_ode.diffusion import GaussianMixture, GaussianMixtureEps
from deis_ode.solvers.multistep import build_plan, place_plan, run_plan

F64 = torch.float64
SYNCING = ("item", "tolist", "__bool__", "__int__", "__float__", "numpy", "cpu")


@contextlib.contextmanager
def count_host_syncs(monkeypatch):
    """Counts calls of tensor methods that copy a value to the host (each one a synchronisation on a GPU)."""
    calls = []
    for name in SYNCING:
        original = getattr(torch.Tensor, name)

        def wrapper(self, *args, _original=original, _name=name, **kwargs):
            calls.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, wrapper)
    try:
        yield calls
    finally:
        monkeypatch.undo()


def _loop_syncs(monkeypatch, ode, x0, times, order, warmup, basis="t"):
    plan = place_plan(build_plan(ode.exponential_form(), basis, times, order, warmup), x0)
    t_state = times.to(x0.dtype)
    with count_host_syncs(monkeypatch) as calls:
        run_plan(plan, ode.nonlinear_part, x0, t_state, [times.numel() - 1])
    return calls


def test_the_loop_synchronises_once_whatever_the_number_of_steps(monkeypatch):
    lin = torch.tensor([-1.0, -3.0, 0.5], dtype=F64)
    ode = SemiLinearODE(lin, lambda t, x: torch.sin(t + x))
    x0 = torch.ones(3, dtype=torch.float32)
    for steps in (10, 40):
        for warmup in ("lower_order", "full_order"):
            calls = _loop_syncs(monkeypatch, ode, x0, torch.linspace(0, 1, steps + 1, dtype=F64), 3, warmup)
            assert len(calls) == 1, calls  # the single finiteness check after the loop


def test_diffusion_sampling_loop_synchronises_once(monkeypatch):
    schedule = VPSchedule.linear()
    ode = VPODE(GaussianMixtureEps(GaussianMixture.default(dim=4), schedule), schedule)
    x0 = torch.randn(8, 4)
    for steps in (10, 30):
        times = torch.linspace(1.0, 1e-3, steps + 1, dtype=F64)
        calls = _loop_syncs(monkeypatch, ode, x0, times, 3, "lower_order", basis="logrho")
        assert len(calls) == 1, calls


def test_uniform_grid_with_constant_linear_part_reuses_coefficients():
    lin = torch.tensor([-1.0, -3.0], dtype=F64)
    ode = SemiLinearODE(lin, lambda t, x: torch.cos(x))
    plan = build_plan(ode.exponential_form(), "t", torch.linspace(0, 1, 51, dtype=F64), 4, "lower_order")
    distinct = {id(u.transition) for u in plan.main}
    assert len(distinct) == 4  # 1, 2, 3 nodes during the warm-up, then one table for all remaining steps


def test_plan_counts_and_orders():
    ode = SemiLinearODE(-1.0, lambda t, x: x)
    times = torch.linspace(0, 1, 11, dtype=F64)
    plan = build_plan(ode.exponential_form(), "t", times, 3, "lower_order", lower_order_final=True)
    assert [len(u.nodes) for u in plan.main] == [1, 2, 3, 3, 3, 3, 3, 3, 2, 1]
    assert plan.evaluations == 10
    plan = build_plan(ode.exponential_form(), "t", times, 4, "full_order")
    assert plan.evaluations == 10 + 9
    assert [len(u.nodes) for u in plan.main] == [4] * 7
