"""Exactness of deisK on diffusion drifts: a prediction that is a polynomial of degree < K in the basis
variable (t, rho or log rho) is integrated exactly, for both splits, on random non-uniform grids.

Closed form used as the reference: with the eps split, d(x / alpha) / d rho = eps, so
x(t) = alpha(t) [x(t_0) / alpha(t_0) + int_{rho(t_0)}^{rho(t)} eps drho]; with the x0 split,
d(x / sigma) / d(1 / rho) = x0. The integrals are computed by scipy quad in rho.
"""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.integrate import quad

from deis_ode import VEODE, VPODE, VESchedule, VPSchedule
from deis_ode.solvers.multistep import build_plan

F64 = torch.float64


def basis_of(schedule, basis, rho):
    """The basis variable as a function of rho (scalar float)."""
    if basis == "rho":
        return rho
    if basis == "logrho":
        return math.log(rho)
    return float(schedule.t_of_half_log_snr(torch.tensor(-math.log(rho), dtype=F64)))


@settings(max_examples=30, deadline=None)
@given(
    order=st.integers(1, 4),
    basis=st.sampled_from(["t", "rho", "logrho"]),
    split=st.sampled_from(["eps", "x0"]),
    family=st.sampled_from(["vp", "ve", "discrete"]),
    extra=st.integers(0, 5),
    seed=st.integers(0, 2**31 - 1),
)
def test_each_step_is_exact_for_a_polynomial_prediction(order, basis, split, family, extra, seed):
    rng = np.random.default_rng(seed)
    # the discrete (diffusers DDPM) schedule is a cubic between training timesteps: its t basis is integrated
    # piecewise between them
    schedule = {"vp": VPSchedule.linear(), "ve": VESchedule(0.02, 20.0), "discrete": VPSchedule.diffusers()}[family]
    start, end = (999.0, 50.0) if family == "discrete" else (1.0, 0.1)
    steps = order + extra
    h = rng.uniform(0.4, 2.5, size=steps)
    times = torch.tensor(start - (start - end) * np.concatenate([[0.0], np.cumsum(h) / h.sum()]), dtype=F64)
    coef = rng.normal(size=order)

    scale = start if basis == "t" else 1.0  # a polynomial in t / t_max keeps the terms of order one

    def q(u):
        return sum(c * (u / scale) ** k for k, c in enumerate(coef))

    def model(x, t):  # the prediction of the extrapolated kind, x-independent
        rho = float(torch.exp(-schedule.half_log_snr(t.double())))
        return torch.full_like(x, q(basis_of(schedule, basis, rho)))

    cls = VEODE if family == "ve" else VPODE
    ode = cls(model, schedule, prediction=split, extrapolate=split)
    rho = torch.exp(-schedule.half_log_snr(times))
    alpha, sigma = schedule.alpha(times), schedule.sigma(times)

    def piecewise_quad(f, a, b, clock):
        """int_a^b f, split where the discrete schedule has knots (integer times) so each piece is smooth. The
        knots are visited in the direction of integration, from a to b: in any other order the pieces still sum
        to int_a^b, but some of them span knots, where quad loses digits."""
        lo, hi = sorted((float(times_of_clock(clock, a)), float(times_of_clock(clock, b))))
        knots = [clock(k) for k in np.arange(math.floor(lo) + 1, math.ceil(hi)) if family == "discrete"]
        cuts = [a, *sorted(knots, reverse=a > b), b]
        assert all((c0 - c1) * (a - b) >= 0 for c0, c1 in zip(cuts[:-1], cuts[1:], strict=True))
        return sum(quad(f, c0, c1, epsrel=1e-13, epsabs=0)[0] for c0, c1 in zip(cuts[:-1], cuts[1:], strict=True))

    def times_of_clock(clock, value):
        lam = -math.log(value) if clock is rho_of else math.log(value)
        return schedule.t_of_half_log_snr(torch.tensor(lam, dtype=F64))

    def rho_of(k):
        return float(torch.exp(-schedule.half_log_snr(torch.tensor(float(k), dtype=F64))))

    def inv_rho_of(k):
        return 1.0 / rho_of(k)

    def exact_step(i, j, x_i):
        """x(t_j) from x(t_i) = x_i in closed form."""
        if split == "eps":
            integral = piecewise_quad(lambda r: q(basis_of(schedule, basis, r)), float(rho[i]), float(rho[j]), rho_of)
            return alpha[j] * (x_i / alpha[i] + integral)
        integral = piecewise_quad(
            lambda k: q(basis_of(schedule, basis, 1.0 / k)), 1.0 / float(rho[i]), 1.0 / float(rho[j]), inv_rho_of
        )
        return sigma[j] * (x_i / sigma[i] + integral)

    plan = build_plan(ode.exponential_form(), basis, times, order, "lower_order")
    x_start = 0.7
    for update in plan.main:
        if len(update.nodes) < order:
            continue
        exact_next = exact_step(update.source, update.target, x_start)
        x = torch.tensor([x_start], dtype=F64)
        stepped = update.transition * x + sum(
            w * ode.nonlinear_part(times[n], x) for w, n in zip(update.weights, update.nodes, strict=True)
        )
        assert stepped.item() == pytest.approx(float(exact_next), rel=1e-10, abs=1e-10)


@settings(max_examples=25, deadline=None)
@given(
    order=st.integers(1, 4),
    case=st.sampled_from([("eps", "t"), ("eps", "rho"), ("eps", "logrho"), ("x0", "t"), ("x0", "rho")]),
    extra=st.integers(0, 4),
    seed=st.integers(0, 2**31 - 1),
)
def test_last_step_to_sigma_zero_is_exact(order, case, extra, seed):
    """A step that ends exactly at sigma = 0 (VP at t = 0): the limits of the coefficients are used there.

    Reference: eps split, x(0) = alpha_0 [x_a / alpha_a + int_{rho_a}^0 eps drho]; x0 split, x(0) = alpha_0 x0(0).
    """
    split, basis = case
    rng = np.random.default_rng(seed)
    schedule = VPSchedule.linear()
    steps = order + extra
    h = rng.uniform(0.4, 2.5, size=steps)
    times = torch.tensor(0.5 * (1.0 - np.concatenate([[0.0], np.cumsum(h) / h.sum()])), dtype=F64)  # 0.5 -> 0
    times[-1] = 0.0
    coef = rng.normal(size=order)

    def basis_at(t):
        lam = float(schedule.half_log_snr(torch.tensor(t, dtype=F64)))
        return {"t": t, "rho": math.exp(-lam), "logrho": -lam}[basis]

    def q(u):
        return sum(c * u**k for k, c in enumerate(coef))

    def model(x, t):
        return torch.full_like(x, q(basis_at(float(t))))

    ode = VPODE(model, schedule, prediction=split, extrapolate=split)
    plan = build_plan(ode.exponential_form(), basis, times, order, "lower_order")
    last = plan.main[-1]
    if len(last.nodes) < order:
        return
    x_a = torch.tensor([0.3], dtype=F64)
    stepped = last.transition * x_a + sum(
        w * ode.nonlinear_part(times[n], x_a) for w, n in zip(last.weights, last.nodes, strict=True)
    )
    a = last.source
    alpha_a, alpha_0 = float(schedule.alpha(times[a])), float(schedule.alpha(times[-1]))
    if split == "eps":
        rho_a = float(torch.exp(-schedule.half_log_snr(times[a])))

        def integrand(rho):
            lam = -math.log(rho)
            return q(
                {"t": float(schedule.t_of_half_log_snr(torch.tensor(lam, dtype=F64))), "rho": rho, "logrho": -lam}[
                    basis
                ]
            )

        exact = alpha_0 * (0.3 / alpha_a - quad(integrand, 0.0, rho_a, epsrel=1e-13, epsabs=1e-15, limit=200)[0])
    else:
        exact = alpha_0 * q(basis_at(0.0))
    assert stepped.item() == pytest.approx(exact, rel=1e-9, abs=1e-10)
