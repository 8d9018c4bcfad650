"""Empirical order, evaluation counting, grids and the built-in problems."""

from __future__ import annotations

import math

import pytest
import torch
import torchdiffeq
from torch import nn

from deis_ode import reference
from deis_ode.semilinear import SemiLinearODE
from deis_ode.verify import (
    PROBLEMS,
    OrderTable,
    count_evaluations,
    empirical_order,
    expected_order,
    fit_slope,
    make_grid,
)

GENERIC_PROBLEMS = ["scalar", "diagonal", "time-varying", "stiff"]


def _deis_registered() -> bool:
    try:
        import deis_ode  # noqa: F401
    except Exception:  # noqa: BLE001 - the solver may not import yet
        return False
    from torchdiffeq._impl.odeint import SOLVERS

    return all(f"deis{k}" in SOLVERS for k in range(1, 5))


needs_deis = pytest.mark.skipif(not _deis_registered(), reason="deis* methods are not registered")


# --------------------------------------------------------------------------- counting


def test_count_evaluations_counts_and_restores_a_function():
    ode, x0, t0, t1, _ = PROBLEMS["diagonal"]()
    original = ode.nonlinear
    grid = torch.linspace(t0, t1, 6, dtype=torch.float64)
    with count_evaluations(ode) as calls:
        torchdiffeq.odeint(ode, x0, grid, method="euler")
        assert calls.count == 5
        torchdiffeq.odeint(ode, x0, grid, method="rk4")
        assert calls.count == 5 + 4 * 5
    assert ode.nonlinear is original
    assert "nonlinear" not in ode._modules


def test_count_evaluations_restores_on_error():
    ode, x0, *_ = PROBLEMS["scalar"]()
    original = ode.nonlinear
    with pytest.raises(RuntimeError, match="boom"), count_evaluations(ode):
        raise RuntimeError("boom")
    assert ode.nonlinear is original


def test_count_evaluations_with_a_module_keeps_parameters_visible():
    net = nn.Linear(3, 3).double()
    ode = SemiLinearODE(-1.0, lambda_module(net))
    params = {id(p) for p in ode.parameters()}
    with count_evaluations(ode) as calls:
        assert {id(p) for p in ode.parameters()} == params
        ode(torch.tensor(0.0, dtype=torch.float64), torch.ones(2, 3, dtype=torch.float64))
        ode(torch.tensor(0.0, dtype=torch.float64), torch.ones(2, 3, dtype=torch.float64))
    assert calls.count == 2
    assert ode.nonlinear is ode._modules["nonlinear"]
    assert isinstance(ode.nonlinear, _TimeLinear)


def test_count_evaluations_nested():
    ode, x0, *_ = PROBLEMS["scalar"]()
    t = torch.tensor(0.0, dtype=torch.float64)
    with count_evaluations(ode) as outer:
        ode(t, x0)
        with count_evaluations(ode) as inner:
            ode(t, x0)
        ode(t, x0)
    assert (outer.count, inner.count) == (3, 1)


def test_count_evaluations_rejects_objects_without_the_attribute():
    with pytest.raises(TypeError, match="nonlinear"), count_evaluations(object()):
        pass


class _TimeLinear(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, t, x):
        return torch.tanh(self.net(x)) * torch.cos(t)


def lambda_module(net: nn.Module) -> nn.Module:
    return _TimeLinear(net)


# --------------------------------------------------------------------------- grids and slopes


@pytest.mark.parametrize("kind", ["uniform", "random"])
@pytest.mark.parametrize(("t0", "t1"), [(0.0, 2.0), (1.0, 1e-3)])
def test_make_grid_ends_exactly_and_is_monotone(kind, t0, t1):
    for n in (1, 5, 8, 33):
        grid = make_grid(kind, n, t0, t1, seed=3)
        assert grid.dtype == torch.float64 and grid.shape == (n + 1,)
        assert grid[0].item() == t0 and grid[-1].item() == t1
        steps = (grid[1:] - grid[:-1]) * math.copysign(1.0, t1 - t0)
        assert (steps > 0).all()
        if kind == "random" and n > 1:
            ratios = steps[1:] / steps[:-1]
            assert ratios.max() <= 3.0 + 1e-12 and ratios.min() >= 1 / 3 - 1e-12
            assert not torch.allclose(steps, steps.mean().expand_as(steps))


def test_make_grid_random_is_seeded():
    assert torch.equal(make_grid("random", 16, 0.0, 1.0, seed=1), make_grid("random", 16, 0.0, 1.0, seed=1))
    assert not torch.equal(make_grid("random", 16, 0.0, 1.0, seed=1), make_grid("random", 16, 0.0, 1.0, seed=2))


def test_make_grid_callable_and_errors():
    grid = make_grid(lambda n, a, b: torch.linspace(a**0.5, b**0.5, n + 1) ** 2, 4, 1.0, 0.01)
    assert grid.dtype == torch.float64 and grid[-1].item() == 0.01
    with pytest.raises(ValueError, match="grid must be"):
        make_grid("chebyshev", 4, 0.0, 1.0)
    with pytest.raises(ValueError, match="monotone"):
        make_grid(lambda n, a, b: torch.tensor([0.0, 0.7, 0.5, 1.0]), 3, 0.0, 1.0)
    with pytest.raises(ValueError, match="at least one step"):
        make_grid("uniform", 0, 0.0, 1.0)


def test_fit_slope_and_expected_order():
    h = [0.1, 0.05, 0.025]
    assert fit_slope(h, [3 * x**3 for x in h]) == pytest.approx(3.0)
    assert expected_order("deis3") == 3
    assert expected_order("deis3", "lower_order") == 2
    assert expected_order("deis1", "lower_order") == 1
    assert expected_order("deis4", "full_order") == 4
    assert expected_order("rk4") == 4 and expected_order("euler") == 1 and expected_order("midpoint") == 2
    assert expected_order("explicit_adams") is None


# --------------------------------------------------------------------------- empirical order


@pytest.mark.parametrize(("method", "order"), [("euler", 1), ("midpoint", 2), ("rk4", 4)])
@pytest.mark.parametrize("grid", ["uniform", "random"])
def test_empirical_order_of_torchdiffeq_methods(method, order, grid):
    ode, x0, t0, t1, steps = PROBLEMS["diagonal"]()
    table = empirical_order(method, ode, x0, t0, t1, steps, grid=grid)
    assert isinstance(table, OrderTable)
    assert table.expected == order
    assert table.slope == pytest.approx(order, abs=0.2)
    assert table.steps == list(steps)
    stages = {"euler": 1, "midpoint": 2, "rk4": 4}[method]
    assert table.nfe == [stages * n for n in steps]
    assert len(table.local_slopes) == len(steps) - 1
    assert all(e1 < e0 for e0, e1 in zip(table.errors, table.errors[1:], strict=False))


def test_empirical_order_downward_and_given_reference():
    ode, x0, *_ = PROBLEMS["scalar"]()
    ref = reference.solve(ode, x0, [1.0, 0.0])
    table = empirical_order("rk4", ode, x0, 1.0, 0.0, (8, 16, 32), reference=ref)
    assert table.slope == pytest.approx(4.0, abs=0.3)
    again = empirical_order("rk4", ode, x0, 1.0, 0.0, (8, 16, 32), reference=ref.states[-1])
    assert again.errors == table.errors


def test_order_table_prints_aligned():
    ode, x0, t0, t1, _ = PROBLEMS["scalar"]()
    text = str(empirical_order("euler", ode, x0, t0, t1, (8, 16, 32), problem="scalar"))
    lines = text.splitlines()
    assert "method euler" in lines[0] and "problem scalar" in lines[0] and "expected order 1" in lines[0]
    assert "fitted slope" in lines[0]
    rows = lines[3:]
    assert len(rows) == 3
    assert len({len(row.rstrip()) for row in rows[1:]}) == 1  # equal widths once local slopes appear
    assert rows[0].split()[0] == "8" and rows[-1].split()[0] == "32"


def test_empirical_order_validates_inputs():
    ode, x0, t0, t1, _ = PROBLEMS["scalar"]()
    with pytest.raises(ValueError, match="two step counts"):
        empirical_order("euler", ode, x0, t0, t1, (8,))
    with pytest.raises(ValueError, match="shape"):
        empirical_order("euler", ode, x0, t0, t1, (8, 16), reference=torch.zeros(7))


# --------------------------------------------------------------------------- problems


@pytest.mark.parametrize("name", GENERIC_PROBLEMS)
def test_problems_are_well_formed(name):
    problem = PROBLEMS[name]()
    ode, x0, t0, t1, steps = problem
    assert x0.dtype == torch.float64 and t0 != t1 and len(steps) >= 2
    drift = ode(torch.tensor(t0, dtype=torch.float64), x0)
    assert drift.shape == x0.shape and torch.isfinite(drift).all()


def test_vp_mixture_problem_is_well_formed():
    pytest.importorskip("deis_ode.diffusion")
    ode, x0, t0, t1, _ = PROBLEMS["vp-mixture"]()
    assert (t0, t1) == (1.0, 1e-3)
    assert PROBLEMS["vp-mixture"]().expected_orders("deis4") == (2, 4)
    drift = ode(torch.tensor(t0, dtype=torch.float64), x0)
    assert drift.shape == x0.shape and torch.isfinite(drift).all()


# --------------------------------------------------------------------------- the deis* methods


@needs_deis
@pytest.mark.parametrize("grid", ["uniform", "random"])
@pytest.mark.parametrize("name", GENERIC_PROBLEMS)
@pytest.mark.parametrize("method", ["deis1", "deis2", "deis3", "deis4", "deis5"])
def test_deis_orders_match_theory(method, name, grid):
    problem = PROBLEMS[name]()
    ode, x0, t0, t1, _ = problem
    table = empirical_order(method, ode, x0, t0, t1, problem.steps_for(method), grid=grid, problem=name)
    assert table.expected == int(method[-1])
    assert table.slope == pytest.approx(table.expected, abs=0.2), str(table)


@needs_deis
@pytest.mark.parametrize("method", ["deis2", "deis3", "deis4"])
def test_deis_lower_order_warmup_costs_no_evaluations(method):
    ode, x0, t0, t1, _ = PROBLEMS["diagonal"]()
    table = empirical_order(method, ode, x0, t0, t1, (16, 32, 64), options={"warmup": "lower_order"})
    assert table.nfe == [16, 32, 64]
    assert table.expected == 2
    assert table.slope == pytest.approx(2.0, abs=0.2), str(table)
