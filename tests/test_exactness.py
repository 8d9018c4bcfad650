"""Exactness: deisK integrates N exactly when N is a polynomial of degree < K in the basis variable.

With x(t) = P(t) a polynomial of degree K-1, the ODE dx/dt = L x + N(t) with N = P' - L P has a
polynomial N of degree K-1, so the K-node exponential quadrature is exact: every step from exact past
values, and, with the full-order warm-up, the whole solve.
"""

import numpy as np
import pytest
import torch
import torchdiffeq
from hypothesis import given, settings
from hypothesis import strategies as st

from deis_ode import SemiLinearODE
from deis_ode.solvers.multistep import build_plan

F64 = torch.float64


def random_grid(rng, steps, decreasing):
    h = rng.uniform(0.3, 3.0, size=steps) * 0.8 / steps
    t = np.concatenate([[0.0], np.cumsum(h)]) + rng.uniform(-1, 1)
    return torch.tensor(t[::-1].copy() if decreasing else t, dtype=F64)


def random_problem(rng, order, kind, decreasing=False):
    """Real parts of L are mostly negative in the direction of integration (a stable problem: backward
    integration of a stiff decaying mode amplifies round-off by exp(|L h|), which no method can avoid)."""
    dim = 3
    if kind == "scalar":
        lin = torch.tensor(rng.uniform(-4, 2), dtype=F64)
    elif kind == "diagonal":
        lin = torch.tensor(rng.uniform(-30, 3, size=dim), dtype=F64)
    else:  # complex diagonal (dispersive + damped)
        lin = torch.tensor(rng.uniform(-3, 0, size=dim) + 1j * rng.uniform(-20, 20, size=dim))
    if decreasing:
        lin = -lin.real + (1j * lin.imag if lin.is_complex() else 0)
    coef = torch.tensor(rng.normal(size=(order, dim)), dtype=F64)  # P(t) = sum_k coef[k] t^k
    if kind == "complex":
        coef = coef + 1j * torch.tensor(rng.normal(size=(order, dim)), dtype=F64)

    def poly(t):
        return sum(coef[k] * t**k for k in range(order))

    def dpoly(t):
        return sum(k * coef[k] * t ** (k - 1) for k in range(1, order)) if order > 1 else torch.zeros_like(coef[0])

    ode = SemiLinearODE(lin, lambda t, x: (dpoly(t) - lin * poly(t)).to(x.dtype))
    return ode, poly


settings_kw = dict(max_examples=40, deadline=None)


@settings(**settings_kw)
@given(
    order=st.integers(1, 4),
    kind=st.sampled_from(["scalar", "diagonal", "complex"]),
    decreasing=st.booleans(),
    extra=st.integers(0, 8),
    seed=st.integers(0, 2**31 - 1),
)
def test_each_step_is_exact_for_polynomial_n(order, kind, decreasing, extra, seed):
    rng = np.random.default_rng(seed)
    ode, poly = random_problem(rng, order, kind, decreasing)
    times = random_grid(rng, order + extra, decreasing)
    plan = build_plan(ode.exponential_form(), "t", times, order, "lower_order")
    scale = max(poly(t).abs().max().item() for t in times)
    for update in plan.main:
        if len(update.nodes) < order:
            continue  # warm-up steps of lower order are exact only for lower degrees
        x_next = update.transition * poly(times[update.source])
        for w, node in zip(update.weights, update.nodes, strict=True):
            x_next = x_next + w * ode.nonlinear_part(times[node], poly(times[node]))
        assert (x_next - poly(times[update.target])).abs().max().item() <= 1e-11 * scale


@settings(**settings_kw)
@given(
    order=st.integers(1, 4),
    kind=st.sampled_from(["scalar", "diagonal", "complex"]),
    decreasing=st.booleans(),
    extra=st.integers(0, 8),
    seed=st.integers(0, 2**31 - 1),
)
def test_whole_solve_is_exact_with_full_order_warmup(order, kind, decreasing, extra, seed):
    rng = np.random.default_rng(seed)
    ode, poly = random_problem(rng, order, kind, decreasing)
    times = random_grid(rng, max(order - 1, 1) + extra, decreasing)
    x0 = poly(times[0]).to(torch.complex128 if kind == "complex" else F64)
    xs = torchdiffeq.odeint(ode, x0, times, method=f"deis{order}", options={"warmup": "full_order"})
    exact = torch.stack([poly(t) for t in times])
    assert (xs - exact).abs().max().item() <= 1e-10 * exact.abs().max().item()


@pytest.mark.parametrize("order", [2, 3, 4])
def test_lower_order_warmup_is_not_exact(order):
    """The counterpart that shows the test above can fail: the lower-order warm-up is inexact for degree K-1."""
    rng = np.random.default_rng(1)
    ode, poly = random_problem(rng, order, "diagonal")
    times = random_grid(rng, order + 3, False)
    xs = torchdiffeq.odeint(ode, poly(times[0]), times, method=f"deis{order}", options={"warmup": "lower_order"})
    exact = torch.stack([poly(t) for t in times])
    assert (xs - exact).abs().max().item() > 1e-8 * exact.abs().max().item()
