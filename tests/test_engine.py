"""The stepping loop: no host synchronisation per step, coefficient reuse, evaluation bookkeeping."""

import contextlib
import math

import pytest
import torch
import torchdiffeq

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
    assert plan.evaluations == 10 + 3 * 3  # 3 block steps, 3 Picard sweeps
    assert [len(u.nodes) for u in plan.main] == [4] * 7


def _poisoned(lin, bad_from: float, value: float):
    """``N = sin(x)``, except ``value`` (NaN or inf) in one entry from time ``bad_from`` on."""

    def nonlinear(t, x):
        out = torch.sin(x)
        if float(t) >= bad_from - 1e-6:  # t arrives in the state's precision
            out = out.clone()
            out.reshape(-1)[-1] = value
        return out

    return SemiLinearODE(lin, nonlinear)


@pytest.mark.parametrize("order", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("warmup", ["lower_order", "full_order"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.complex128])
def test_non_finite_nonlinear_part_is_located_at_every_step(order, warmup, dtype):
    # the fused loop checks N in groups of K evaluations (and each warm-up evaluation on its own): every position
    # in a group, and the final partial group, must be reported at its own grid step
    lin = torch.tensor([-1.0, -30.0, -0.5], dtype=F64)
    steps = 11
    times = torch.linspace(0, 1, steps + 1, dtype=F64)
    for bad in range(steps):  # the warm-up's start pass and Picard sweeps included
        for value in (math.nan, math.inf):
            ode = _poisoned(lin, float(times[bad]), value)
            with pytest.raises(FloatingPointError, match=rf"grid step {bad} \("):
                torchdiffeq.odeint(
                    ode,
                    torch.ones(2, 3, dtype=dtype),
                    times[[0, -1]],
                    method=f"deis{order}",
                    options={"warmup": warmup, "step_size": 1 / steps},
                )


def test_finite_but_huge_float32_values_are_not_reported():
    # each entry of N near the float32 maximum: their float32 sum would overflow, the check sums in float64
    lin = torch.tensor(-1.0, dtype=F64)
    big = 3e38
    ode = SemiLinearODE(lin, lambda t, x: torch.full_like(x, big))
    out = torchdiffeq.odeint(
        ode,
        torch.zeros(64, dtype=torch.float32),
        torch.tensor([0.0, 0.01], dtype=F64),
        method="deis3",
        options={"step_size": 0.001},
    )
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("order", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("lower_order_final", [False, True])
def test_fused_loop_equals_the_unfused_update(order, lower_order_final):
    # with autograd tracking the state, the engine takes the unfused path (one update at a time); without, the
    # fused buffer. Both compute the same sums of the same float64 coefficients.
    lin = torch.tensor([-1.0, -300.0, 2.0j], dtype=torch.complex128)
    ode = SemiLinearODE(lin, lambda t, x: torch.sin(x) * torch.cos(t))
    x0 = torch.tensor([0.3, -1.0, 0.5 + 0.25j], dtype=torch.complex128)
    times = torch.cat([torch.linspace(0, 0.5, 9, dtype=F64), torch.linspace(0.5, 1, 4, dtype=F64)[1:] ** 1.1])
    for warmup in ("lower_order", "full_order"):
        options = {"warmup": warmup, "lower_order_final": lower_order_final}
        fused = torchdiffeq.odeint(ode, x0, times, method=f"deis{order}", options=options)
        tracked = torchdiffeq.odeint(ode, x0.clone().requires_grad_(), times, method=f"deis{order}", options=options)
        assert tracked.requires_grad and not fused.requires_grad
        torch.testing.assert_close(fused, tracked.detach(), rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize(
    "lin", [torch.tensor([-1e3, -2.0, 0.0, 0.3, 5.0], dtype=F64), torch.tensor([-2.0, 3j, -40 + 7j])]
)
def test_batched_plan_coefficients_equal_the_single_step_formula(lin):
    # the plan computes all geometries of a constant L together (numpy phi-functions, one batched product per node
    # count); each update must carry the coefficients of its own step as step_coefficients computes them alone
    from deis_ode.solvers.coefficients import step_coefficients

    form = SemiLinearODE(lin, lambda t, x: x).exponential_form()
    times = torch.cumsum(torch.tensor([0.0, 0.1, 0.13, 0.05, 0.2, 0.2, 0.2, 0.07, 0.31, 0.01], dtype=F64), 0)
    for warmup in ("lower_order", "full_order"):
        plan = build_plan(form, "t", times, 4, warmup)
        for update in plan.start + plan.block + plan.main:
            nodes = times[list(update.nodes)]
            transition, weights = step_coefficients(form, "t", times[update.source], times[update.target], nodes)
            torch.testing.assert_close(update.transition, transition, rtol=1e-14, atol=0)
            torch.testing.assert_close(
                torch.stack(update.weights), weights, rtol=2e-14, atol=1e-16 * weights.abs().max()
            )
