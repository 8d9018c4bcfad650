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
    family=st.sampled_from(["vp", "ve"]),
    extra=st.integers(0, 5),
    seed=st.integers(0, 2**31 - 1),
)
def test_each_step_is_exact_for_a_polynomial_prediction(order, basis, split, family, extra, seed):
    rng = np.random.default_rng(seed)
    schedule = VPSchedule.linear() if family == "vp" else VESchedule(0.02, 20.0)
    steps = order + extra
    h = rng.uniform(0.4, 2.5, size=steps)
    times = torch.tensor(1.0 - 0.9 * np.concatenate([[0.0], np.cumsum(h) / h.sum()]), dtype=F64)  # 1 -> 0.1
    coef = rng.normal(size=order)

    def q(u):
        return sum(c * u**k for k, c in enumerate(coef))

    def model(x, t):  # the prediction of the extrapolated kind, x-independent
        rho = float(torch.exp(-schedule.half_log_snr(t.double())))
        return torch.full_like(x, q(basis_of(schedule, basis, rho)))

    cls = VPODE if family == "vp" else VEODE
    ode = cls(model, schedule, prediction=split, extrapolate=split)
    rho = torch.exp(-schedule.half_log_snr(times))
    alpha, sigma = schedule.alpha(times), schedule.sigma(times)

    def exact_step(i, j, x_i):
        """x(t_j) from x(t_i) = x_i in closed form."""
        if split == "eps":
            integral = quad(
                lambda r: q(basis_of(schedule, basis, r)), float(rho[i]), float(rho[j]), epsrel=1e-13, epsabs=0
            )[0]
            return alpha[j] * (x_i / alpha[i] + integral)
        integral = quad(
            lambda k: q(basis_of(schedule, basis, 1.0 / k)),
            1.0 / float(rho[i]),
            1.0 / float(rho[j]),
            epsrel=1e-13,
            epsabs=0,
        )[0]
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
