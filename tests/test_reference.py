"""scipy reference solutions against closed forms."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from deis_ode import reference
from deis_ode.semilinear import SemiLinearODE
from deis_ode.verify import PROBLEMS


def forced_linear_exact(a: float, x0: torch.Tensor, t0: float, t: torch.Tensor) -> torch.Tensor:
    """x' = a x + sin t, x(t0) = x0: x = (x0 - p(t0)) e^{a (t - t0)} + p(t), p = -(a sin t + cos t) / (1 + a^2)."""

    def particular(s):
        return -(a * torch.sin(s) + torch.cos(s)) / (1 + a * a)

    t = t.to(torch.float64)
    tt = t.reshape(-1, *([1] * x0.dim()))
    t0_ = torch.tensor(t0, dtype=torch.float64)
    return (x0 - particular(t0_)) * torch.exp(a * (tt - t0)) + particular(tt)


def forced_linear(a: float) -> SemiLinearODE:
    return SemiLinearODE(a, lambda t, x: torch.sin(t).expand_as(x))


def test_scalar_linear_with_sin_forcing_matches_closed_form():
    x0 = torch.tensor([1.0, -3.0, 0.25], dtype=torch.float64)
    t = torch.linspace(0.0, 3.0, 7, dtype=torch.float64)
    sol = reference.solve(forced_linear(-2.0), x0, t)
    assert sol.states.shape == (7, 3)
    assert sol.states.dtype == torch.float64 and sol.states.device.type == "cpu"
    torch.testing.assert_close(sol.states, forced_linear_exact(-2.0, x0, 0.0, t), rtol=0, atol=1e-10)
    assert sol.method == "DOP853" and sol.rtol == 1e-12 and sol.atol == 1e-12 and sol.nfev > 0
    torch.testing.assert_close(sol.t, t)
    assert torch.equal(sol.states[0], x0)


def test_decreasing_times():
    x0 = torch.tensor([0.5, -1.0], dtype=torch.float64)
    t = torch.tensor([2.0, 1.5, 0.2, -0.5], dtype=torch.float64)
    sol = reference.solve(forced_linear(-1.0), x0, t)
    torch.testing.assert_close(sol.states, forced_linear_exact(-1.0, x0, 2.0, t), rtol=0, atol=1e-10)


def test_batched_state_and_float32_input():
    x0 = torch.arange(6, dtype=torch.float32).reshape(2, 3) / 4
    t = [0.0, 0.5, 1.0]
    sol = reference.solve(forced_linear(-0.5), x0, t)
    assert sol.states.shape == (3, 2, 3) and sol.states.dtype == torch.float64
    expected = forced_linear_exact(-0.5, x0.double(), 0.0, torch.tensor(t))
    torch.testing.assert_close(sol.states, expected, rtol=0, atol=1e-10)


def test_complex_diagonal_with_oscillating_forcing():
    # x' = L x + c e^{i w t}: x = (x0 - p(0)) e^{L t} + p(t), p(t) = c e^{i w t} / (i w - L)
    lam = torch.tensor([-1.0 + 2.0j, 0.5j, -0.3 - 1.0j], dtype=torch.complex128)
    c = torch.tensor([1.0, -0.5j, 0.25 + 0.25j], dtype=torch.complex128)
    w = 1.7
    ode = SemiLinearODE(lam, lambda t, x: c * torch.exp(1j * w * t))
    x0 = torch.tensor([1.0 + 1.0j, 2.0, -1.0j], dtype=torch.complex128)
    t = torch.tensor([0.0, 0.5, 1.0, 2.0], dtype=torch.float64)
    sol = reference.solve(ode, x0, t)
    assert sol.states.dtype == torch.complex128 and sol.states.shape == (4, 3)
    particular = c / (1j * w - lam)
    tt = t.to(torch.complex128)[:, None]
    expected = (x0 - particular) * torch.exp(lam * tt) + particular * torch.exp(1j * w * tt)
    torch.testing.assert_close(sol.states, expected, rtol=0, atol=1e-10)


def test_complex_drift_on_real_state_is_rejected():
    ode = SemiLinearODE(torch.tensor([1j]), lambda t, x: torch.zeros_like(x))
    with pytest.raises(ValueError, match="complex"):
        reference.solve(ode, torch.ones(1), [0.0, 1.0])


@pytest.mark.parametrize("method", ["Radau", "BDF", "LSODA"])
@pytest.mark.parametrize("problem", ["diagonal", "stiff"])
def test_implicit_methods_agree_with_dop853(method, problem):
    ode, x0, t0, t1, _ = PROBLEMS[problem]()
    t = torch.linspace(t0, t1, 5, dtype=torch.float64)
    explicit = reference.solve(ode, x0, t)
    implicit = reference.solve(ode, x0, t, method=method)
    assert implicit.method == method
    # BDF and LSODA are lower order: they meet the same tolerance less tightly.
    tol = 1e-9 if method == "Radau" else 1e-7
    torch.testing.assert_close(implicit.states, explicit.states, rtol=0, atol=tol)


def test_radau_finite_difference_and_autograd_jacobians_agree():
    ode, x0, t0, t1, _ = PROBLEMS["stiff"]()
    auto = reference.solve(ode, x0, [t0, t1], method="Radau")
    fd = reference.solve(ode, x0, [t0, t1], method="Radau", jac="fd")
    torch.testing.assert_close(auto.states, fd.states, rtol=0, atol=1e-9)


def test_radau_on_complex_state():
    lam = torch.tensor([-50.0 + 3.0j, -0.5 - 1.0j], dtype=torch.complex128)
    ode = SemiLinearODE(lam, lambda t, x: 0.1 * x * x.conj())  # not holomorphic: needs the real-system Jacobian
    x0 = torch.tensor([1.0 + 0.5j, -0.5j], dtype=torch.complex128)
    a = reference.solve(ode, x0, [0.0, 0.5, 1.0], method="Radau")
    b = reference.solve(ode, x0, [0.0, 0.5, 1.0])
    torch.testing.assert_close(a.states, b.states, rtol=0, atol=1e-9)


@pytest.mark.parametrize(
    "t",
    [[0.0, 1.0, 1.0], [0.0, 1.0, 0.5], [1.0, 0.0, 0.5], [[0.0, 1.0]], [0.0, math.nan], []],
    ids=["repeated", "not-monotone", "not-monotone-down", "2-d", "nan", "empty"],
)
def test_bad_times_raise(t):
    with pytest.raises(ValueError, match="t must"):
        reference.solve(forced_linear(-1.0), torch.ones(2), t)


def test_single_time_returns_initial_state():
    sol = reference.solve(forced_linear(-1.0), torch.ones(2), [0.3])
    assert sol.states.shape == (1, 2) and sol.nfev == 0


def test_unknown_method_and_bad_jac_raise():
    with pytest.raises(ValueError, match="unknown method"):
        reference.solve(forced_linear(-1.0), torch.ones(2), [0.0, 1.0], method="dopri5")
    with pytest.raises(ValueError, match="jac"):
        reference.solve(forced_linear(-1.0), torch.ones(2), [0.0, 1.0], method="Radau", jac="exact")


def test_scipy_failure_is_reported():
    blow_up = SemiLinearODE(0.0, lambda t, x: x * x)  # x' = x^2, x(0) = 1 blows up at t = 1
    with pytest.raises(RuntimeError, match="failed"):
        reference.solve(blow_up, torch.ones(1), [0.0, 2.0])


def test_wrong_drift_shape_is_reported():
    with pytest.raises(ValueError, match="shape"):
        reference.solve(lambda t, x: x.sum(), torch.ones(3), [0.0, 1.0])


@given(
    a=st.floats(-3.0, 1.0),
    x0=st.floats(-5.0, 5.0),
    t0=st.floats(-2.0, 2.0),
    span=st.floats(-2.0, 2.0).filter(lambda s: abs(s) > 1e-3),
)
def test_forced_linear_property(a, x0, t0, span):
    x = torch.tensor([x0], dtype=torch.float64)
    t = torch.tensor([t0, t0 + span / 2, t0 + span], dtype=torch.float64)
    sol = reference.solve(forced_linear(a), x, t)
    expected = forced_linear_exact(a, x, t0, t)
    scale = max(1.0, expected.abs().max().item())
    # scipy controls the local error; the problem amplifies it by up to exp(|a span|) (integrating a decaying
    # mode backwards), which no integrator avoids
    growth = math.exp(abs(a * span))
    torch.testing.assert_close(sol.states, expected, rtol=0, atol=1e-9 * scale * growth)


def test_drift_in_half_log_snr_gives_the_states_at_the_matching_times():
    # on the smooth VP-linear schedule the reference in t and the reference in lambda = log(alpha / sigma) must agree
    from deis_ode import VPODE, VPSchedule
    from deis_ode.diffusion import GaussianMixture, GaussianMixtureEps

    schedule = VPSchedule.linear()
    drift = VPODE(GaussianMixtureEps(GaussianMixture.default(dim=4), schedule), schedule)
    x0 = torch.linspace(-2.0, 2.0, 8, dtype=torch.float64).reshape(2, 4)
    t = torch.tensor([1.0, 0.5, 0.05], dtype=torch.float64)
    in_t = reference.solve(drift, x0, t).states
    in_lambda = reference.solve(reference.InHalfLogSNR(drift), x0, schedule.half_log_snr(t)).states
    torch.testing.assert_close(in_lambda, in_t, rtol=1e-9, atol=1e-9)
