"""Error-controlled DEIS (``adaptive_deis2`` .. ``adaptive_deis5``): tolerance proportionality against scipy, the
order of the error estimate, rejections, output times, every linear form, diffusion drifts and bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torchdiffeq
from hypothesis import given, settings
from hypothesis import strategies as st
from torchdiffeq._impl.odeint import SOLVERS

import deis_ode
from deis_ode import SemiLinearODE, reference
from deis_ode.adaptive import AdaptiveDEISSolver
from deis_ode.diffusion import VPODE, GaussianMixture, GaussianMixtureEps, VPSchedule
from deis_ode.solvers.adaptive import DiagonalCoefficients

F64 = torch.float64


# References: scipy LSODA at rtol = atol = 1e-13 (on the stiff problem it agrees with Radau at 1e-13 to 7e-12 relative,
# 50x below the smallest error asserted here, in a tenth of the time).


def stiff_problem() -> tuple[SemiLinearODE, torch.Tensor]:
    """A smooth stiff problem: 16 modes with L from -1 to -1e4, a nonlinear and a forcing term."""
    linear = -torch.logspace(0, 4, 16, dtype=F64)
    ode = SemiLinearODE(linear, lambda t, x: torch.sin(x) + torch.cos(2.0 * t))
    return ode, torch.linspace(-1.0, 1.0, 16, dtype=F64)


def relative(out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Relative 2-norm error of each output (rows)."""
    return torch.linalg.vector_norm((out - ref).reshape(len(out), -1), dim=1) / torch.linalg.vector_norm(
        ref.reshape(len(ref), -1), dim=1
    )


@pytest.fixture(scope="module")
def stiff_reference():
    ode, x0 = stiff_problem()
    t = torch.tensor([0.0, 0.5, 2.0], dtype=F64)
    return ode, x0, t, reference.solve(ode, x0, t, method="LSODA", rtol=1e-13, atol=1e-13).states


def test_registered():
    names = deis_ode.register()
    for k in range(2, 6):
        assert f"adaptive_deis{k}" in names
        assert SOLVERS[f"adaptive_deis{k}"] is deis_ode.adaptive.METHODS[f"adaptive_deis{k}"]


@pytest.mark.parametrize("order", [3, 4, 5])
def test_tolerance_proportionality(stiff_reference, order):
    """Over rtol 1e-3 .. 1e-9 the achieved error stays within 10x of the tolerance and falls with it: by at least
    four decades over the six."""
    ode, x0, t, ref = stiff_reference
    errors = []
    for rtol in (1e-3, 1e-5, 1e-7, 1e-9):
        out = torchdiffeq.odeint(ode, x0, t, method=f"adaptive_deis{order}", rtol=rtol, atol=rtol)
        err = float(relative(out, ref)[1:].max())
        assert err < 10 * rtol, (rtol, err)
        errors.append(err)
    assert errors[0] / errors[-1] > 1e4, errors


def test_order2_tolerance(stiff_reference):
    ode, x0, t, ref = stiff_reference
    for rtol in (1e-3, 1e-5):
        out = torchdiffeq.odeint(ode, x0, t, method="adaptive_deis2", rtol=rtol, atol=rtol)
        assert float(relative(out, ref)[1:].max()) < 10 * rtol


@pytest.mark.parametrize("order", [2, 3, 4, 5])
def test_error_estimate_order(order):
    """From an exact history on a uniform grid, the estimate of one step scales as h^K and matches the local error of
    the (K-1)-node predictor, while the corrected step's own local error scales as h^(K+1)."""
    lam = torch.tensor([-3.0, -20.0, 0.5], dtype=F64)

    def forcing(t: float) -> float:
        return math.cos(3.0 * t) + 0.5 * math.exp(0.7 * t)

    def exact(t1: float, t0: float, x: torch.Tensor) -> torch.Tensor:
        # x(t1) = e^{L (t1 - t0)} x + int_t0^t1 e^{L (t1 - s)} f(s) ds (Gauss-Legendre, 40 nodes: exact to round-off)
        nodes, weights = np.polynomial.legendre.leggauss(40)
        s = 0.5 * (t1 - t0) * nodes + 0.5 * (t1 + t0)
        f = torch.tensor([forcing(v) for v in s], dtype=F64)
        kernel = torch.exp(lam[None, :] * torch.tensor(t1 - s, dtype=F64)[:, None])
        integral = 0.5 * (t1 - t0) * (torch.tensor(weights, dtype=F64)[:, None] * kernel * f[:, None]).sum(0)
        return torch.exp(lam * (t1 - t0)) * x + integral

    coefficients = DiagonalCoefficients(lam, torch.zeros(3, dtype=F64))
    estimates, errors, mismatch = [], [], []
    t_n = 1.0
    x_n = torch.tensor([0.3, -0.2, 1.0], dtype=F64)
    h0 = {2: 0.004, 3: 0.008, 4: 0.016, 5: 0.032}[order]  # the asymptotic range, above round-off
    for h in (h0, h0 / 2, h0 / 4):
        predictor, corrector = coefficients.step(h, (h,) * (order - 2))
        history = [torch.full((3,), forcing(t_n - j * h), dtype=F64) for j in range(order - 1)]
        x_pred = (predictor * torch.stack([x_n, *history])).sum(0)
        n_new = torch.full((3,), forcing(t_n + h), dtype=F64)
        x_new, est = (corrector * torch.stack([x_n, *history, n_new])).sum(1)
        assert float((x_new - x_pred - est).abs().max()) < 1e-14
        truth = exact(t_n + h, t_n, x_n)
        estimates.append(float(est.abs().max()))
        errors.append(float((x_new - truth).abs().max()))
        mismatch.append(float((est - (truth - x_pred)).abs().max()) / estimates[-1])
    slopes_est = [math.log2(a / b) for a, b in zip(estimates, estimates[1:], strict=False)]
    slopes_err = [math.log2(a / b) for a, b in zip(errors, errors[1:], strict=False)]
    assert abs(slopes_est[-1] - order) < 0.1, slopes_est
    assert abs(slopes_err[-1] - (order + 1)) < 0.2, slopes_err
    assert mismatch[-1] < 0.05, mismatch  # the estimate is the predictor's local error to leading order


@settings(max_examples=8)
@given(
    seed=st.integers(0, 2**31 - 1),
    dim=st.integers(1, 6),
    order=st.integers(3, 5),
    rtol=st.sampled_from([1e-4, 1e-6]),
)
def test_random_stable_problems_meet_tolerance(seed, dim, order, rtol):
    """On random stable diagonal problems (|L| from 1e-2 to 1e4, a smooth nonlinearity and forcing), the achieved
    error at the end stays within 10x of the tolerance."""
    g = torch.Generator().manual_seed(seed)
    linear = -torch.exp(torch.empty(dim, dtype=F64).uniform_(math.log(1e-2), math.log(1e4), generator=g))
    a = torch.empty(dim, dtype=F64).uniform_(-1, 1, generator=g)
    omega = float(torch.empty(1, dtype=F64).uniform_(0.5, 3.0, generator=g))
    ode = SemiLinearODE(linear, lambda t, x: a * torch.tanh(x) + torch.sin(omega * t))
    x0 = torch.empty(dim, dtype=F64).uniform_(-1, 1, generator=g)
    t = torch.tensor([0.0, 2.0], dtype=F64)
    ref = reference.solve(ode, x0, t, method="LSODA", rtol=1e-13, atol=1e-13).states
    out = torchdiffeq.odeint(ode, x0, t, method=f"adaptive_deis{order}", rtol=rtol, atol=rtol)
    scale = rtol * (1.0 + float(ref[-1].abs().max()))
    assert float((out[-1] - ref[-1]).abs().max()) < 10 * scale


def sharp_front() -> tuple[SemiLinearODE, torch.Tensor]:
    """A forcing with a front of width 0.01 at t = 1 on a smooth background: the step must collapse there."""

    def nonlinear(t, x):
        return torch.tanh((t - 1.0) / 0.01) + 0.5 * torch.sin(3.0 * t) + 0.1 * torch.sin(x)

    return SemiLinearODE(torch.tensor([-1.0, -100.0], dtype=F64), nonlinear), torch.tensor([1.0, 0.0], dtype=F64)


@pytest.mark.parametrize("rtol", [1e-5, 1e-7])
def test_rejections_are_counted_and_dropped(rtol):
    ode, x0 = sharp_front()
    rejected = []
    ode.callback_reject_step = lambda t, y, dt: rejected.append(float(t))
    t = torch.tensor([0.0, 2.0], dtype=F64)
    out = torchdiffeq.odeint(ode, x0, t, method="adaptive_deis4", rtol=rtol, atol=rtol)
    stats = AdaptiveDEISSolver.last_stats
    assert stats.rejected > 0 and stats.rejected == len(rejected)
    assert any(abs(r - 1.0) < 0.05 for r in rejected)  # rejections happen at the front
    # one evaluation per attempted step (the predicted state's N) and one at the start
    assert stats.evaluations == stats.accepted + stats.rejected + 1
    ref = reference.solve(ode, x0, t, method="LSODA", rtol=1e-13, atol=1e-13).states
    assert float((out[-1] - ref[-1]).abs().max()) < 10 * rtol


def test_max_num_steps_says_how_far_it_got():
    ode, x0 = stiff_problem()
    t = torch.tensor([0.0, 2.0], dtype=F64)
    with pytest.raises(RuntimeError, match=r"max_num_steps = 5 exceeded: reached t = .* after \d+ accepted"):
        torchdiffeq.odeint(ode, x0, t, method="adaptive_deis3", rtol=1e-8, atol=1e-8, options={"max_num_steps": 5})


def test_step_underflow_names_the_time():
    ode = SemiLinearODE(torch.tensor(-1.0, dtype=F64), lambda t, x: x * x)  # x' = -x + x^2 blows up in finite time
    x0 = torch.tensor([3.0], dtype=F64)  # x = 3 / (3 - 2 e^t): blow-up at t = log(1.5) = 0.405
    with pytest.raises((RuntimeError, FloatingPointError), match=r"t = 0\.40"):
        torchdiffeq.odeint(ode, x0, torch.tensor([0.0, 1.0], dtype=F64), method="adaptive_deis3", rtol=1e-6, atol=1e-6)


def test_non_finite_nonlinear_part_names_the_time():
    def bad(t, x):
        return x * (float("nan") if float(t) > 0.5 else 1.0)

    ode = SemiLinearODE(torch.tensor(-1.0, dtype=F64), bad)
    with pytest.raises(FloatingPointError, match=r"NaN or inf at t = 0\.5"):
        torchdiffeq.odeint(ode, torch.ones(2, dtype=F64), torch.tensor([0.0, 1.0], dtype=F64), method="adaptive_deis3")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rtol": 0.0}, "rtol must be a positive finite"),
        ({"rtol": -1e-6}, "rtol must be a positive finite"),
        ({"rtol": float("nan")}, "rtol must be a positive finite"),
        ({"atol": float("inf")}, "atol must be a positive finite"),
        ({"atol": 0.0}, "atol must be a positive finite"),
        ({"atol": torch.tensor([1e-6, -1.0])}, "atol must be positive and finite"),
        ({"options": {"step_size": 0.1}}, r"unknown option\(s\) \['step_size'\]; valid options are .*first_step"),
        ({"options": {"safety": 1.5}}, "safety must be in"),
        ({"options": {"ifactor": 0.5}}, "ifactor must be > 1"),
        ({"options": {"dfactor": 2.0}}, "dfactor must be in"),
        ({"options": {"first_step": -1.0}}, "first_step must be a positive"),
        ({"options": {"max_num_steps": 0}}, "max_num_steps must be a positive integer"),
        ({"options": {"basis": "rho"}}, "basis must be one of"),
    ],
)
def test_bad_input(kwargs, match):
    ode, x0 = stiff_problem()
    with pytest.raises(ValueError, match=match):
        torchdiffeq.odeint(ode, x0, torch.tensor([0.0, 1.0], dtype=F64), method="adaptive_deis3", **kwargs)


def test_float32_tolerance_floor():
    ode, x0 = stiff_problem()
    x32 = x0.float()
    t = torch.tensor([0.0, 1.0])
    with pytest.raises(ValueError, match=r"rtol = 1e-08 is below what a torch.float32 state can deliver"):
        torchdiffeq.odeint(ode, x32, t, method="adaptive_deis3", rtol=1e-8, atol=1e-8)
    out = torchdiffeq.odeint(ode, x32, t, method="adaptive_deis3", rtol=1e-5, atol=1e-5)
    assert out.dtype == torch.float32
    ref = torchdiffeq.odeint(ode, x0, t.double(), method="adaptive_deis3", rtol=1e-10, atol=1e-10)
    assert float((out[-1].double() - ref[-1]).abs().max()) < 1e-4


def test_outputs_are_stepped_to_at_the_method_order():
    """With 21 output times every output carries the tolerance-proportional error (outputs are grid points, no
    interpolation): the errors at all outputs fall 100x when the tolerance does."""
    ode, x0 = stiff_problem()
    t = torch.linspace(0.0, 2.0, 21, dtype=F64)
    ref = reference.solve(ode, x0, t, method="LSODA", rtol=1e-13, atol=1e-13).states
    worst = []
    for rtol in (1e-5, 1e-7):
        out = torchdiffeq.odeint(ode, x0, t, method="adaptive_deis4", rtol=rtol, atol=rtol)
        err = relative(out, ref)[1:]
        assert float(err.max()) < 10 * rtol
        worst.append(float(err.max()))
    assert 30 < worst[0] / worst[1] < 300


def test_complex_and_large_hl():
    """A complex diagonal L with |Re L| up to 1e3 and a decreasing t: torchdiffeq reverses time, the adapter
    integrates in the user's time (the flow decays backwards in time: Re L > 0)."""
    linear = torch.complex(torch.logspace(-1, 3, 6, dtype=F64), torch.linspace(-30, 30, 6, dtype=F64))
    ode = SemiLinearODE(linear, lambda t, x: torch.exp(1j * t) * torch.tanh(x.real))
    x0 = torch.complex(torch.linspace(-1, 1, 6, dtype=F64), torch.linspace(1, -1, 6, dtype=F64))
    t = torch.tensor([1.0, 0.5, 0.0], dtype=F64)
    ref = reference.solve(ode, x0, t, method="LSODA", rtol=1e-13, atol=1e-13).states
    out = torchdiffeq.odeint(ode, x0, t, method="adaptive_deis4", rtol=1e-7, atol=1e-7)
    assert float(relative(out, ref)[1:].max()) < 1e-6
    assert AdaptiveDEISSolver.last_stats.t_reached == 0.0


def test_dense_matrix_linear_part():
    g = torch.Generator().manual_seed(3)
    a = torch.randn(4, 4, generator=g, dtype=F64)
    matrix = -(a @ a.T) * 20.0 - torch.eye(4, dtype=F64)  # symmetric negative definite, |L| up to ~1e3
    ode = SemiLinearODE(matrix, lambda t, x: torch.sin(x) + torch.cos(t), matrix=True)
    x0 = torch.tensor([[1.0, -0.5, 0.2, 0.0]], dtype=F64)
    t = torch.tensor([0.0, 1.0], dtype=F64)
    ref = reference.solve(ode, x0, t, method="LSODA", rtol=1e-13, atol=1e-13).states
    out = torchdiffeq.odeint(ode, x0, t, method="adaptive_deis3", rtol=1e-7, atol=1e-7)
    assert float(relative(out, ref)[-1]) < 1e-6


@pytest.mark.parametrize("extrapolate", ["eps", "x0"])
def test_diffusion_drift(extrapolate):
    """A VP probability-flow ODE with the exact mixture model, sampled from t = 999 to t = 1 (decreasing time)."""
    schedule = VPSchedule.diffusers()
    mixture = GaussianMixture.default(dim=4)
    ode = VPODE(GaussianMixtureEps(mixture, schedule), schedule, extrapolate=extrapolate)
    x0 = torch.randn(8, 4, generator=torch.Generator().manual_seed(0), dtype=F64)
    t = torch.tensor([999.0, 1.0], dtype=F64)
    lam = schedule.half_log_snr(t)
    with torch.no_grad():
        ref = reference.solve(reference.InHalfLogSNR(ode), x0, lam, rtol=1e-11, atol=1e-11).states[-1]
        out = torchdiffeq.odeint(ode, x0, t, method="adaptive_deis3", rtol=1e-6, atol=1e-6)[-1]
    assert float((out - ref).abs().max()) < 1e-4
    assert AdaptiveDEISSolver.last_stats.evaluations < 400


@pytest.mark.parametrize("case", ["complex", "batched real, repeated L"])
def test_large_state_path_matches_small_state_path(monkeypatch, case):
    """States above FUSED_MAX_ELEMENTS take one pass per term (per-geometry weights) instead of the small state's
    host arithmetic (per-step phi factors and small mixing matrices): the same steps, the same result to round-off
    (a complex state with real L; a batch of real states with a repeated symbol, whose phi-functions are evaluated
    on its distinct values and scattered)."""
    from deis_ode.solvers import adaptive as stepper

    if case == "complex":
        linear = -torch.logspace(-1, 3, 40, dtype=F64)
        x0 = torch.complex(torch.linspace(-1, 1, 40, dtype=F64), torch.linspace(0, 1, 40, dtype=F64))
    else:
        linear = -torch.cat([torch.logspace(-1, 3, 20, dtype=F64)] * 2)
        x0 = torch.linspace(-1, 1, 120, dtype=F64).reshape(3, 40)
    ode = SemiLinearODE(linear, lambda t, x: 0.5 * x * torch.cos(x.real) + torch.sin(t))
    t = torch.tensor([0.0, 0.5, 1.0], dtype=F64)
    small = torchdiffeq.odeint(ode, x0, t, method="adaptive_deis4", rtol=1e-8, atol=1e-8)
    steps = AdaptiveDEISSolver.last_stats.accepted
    monkeypatch.setattr(stepper, "FUSED_MAX_ELEMENTS", 0)
    large = torchdiffeq.odeint(ode, x0, t, method="adaptive_deis4", rtol=1e-8, atol=1e-8)
    assert AdaptiveDEISSolver.last_stats.accepted == steps
    assert float((large - small).abs().max()) < 1e-13


def test_time_dependent_linear_part_and_weight():
    """A time-dependent diagonal L (integrated by quadrature per step) and a weight W(t): the general coefficient
    path (step_coefficients twice per step)."""
    base = -torch.logspace(0, 2, 4, dtype=F64)
    ode = SemiLinearODE(
        lambda t: base * (1.0 + 0.5 * torch.sin(t)), lambda t, x: torch.cos(x) + t, weight=lambda t: 1.0 + 0.3 * t
    )
    x0 = torch.tensor([1.0, 0.5, -0.5, 2.0], dtype=F64)
    t = torch.tensor([0.0, 1.0], dtype=F64)
    ref = reference.solve(ode, x0, t, method="LSODA", rtol=1e-13, atol=1e-13).states
    out = torchdiffeq.odeint(ode, x0, t, method="adaptive_deis4", rtol=1e-6, atol=1e-6)
    assert float(relative(out, ref)[-1]) < 1e-5


def test_dense_real_matrix_with_a_complex_state():
    """A real matrix ``L`` acting on a complex state (the matrix product needs one dtype: the coefficients are
    promoted) agrees with LSODA."""
    g = torch.Generator().manual_seed(4)
    a = torch.randn(4, 4, generator=g, dtype=F64)
    matrix = -(a @ a.T) * 20.0 - torch.eye(4, dtype=F64)
    ode = SemiLinearODE(matrix, lambda t, x: torch.sin(x) + torch.cos(t), matrix=True)
    x0 = torch.complex(torch.tensor([1.0, -0.5, 0.2, 0.0], dtype=F64), torch.tensor([0.3, 0.0, -0.4, 0.1], dtype=F64))
    t = torch.tensor([0.0, 1.0], dtype=F64)
    ref = reference.solve(ode, x0, t, method="LSODA", rtol=1e-13, atol=1e-13).states
    out = torchdiffeq.odeint(ode, x0, t, method="adaptive_deis3", rtol=1e-7, atol=1e-7)
    assert out.dtype == torch.complex128
    assert float(relative(out, ref)[1:].max()) < 1e-6


def test_operator_linear_parts_run_by_krylov_products_and_match_the_dense_matrix():
    """Sparse and matrix-free linear parts take two Krylov products per step (tests/test_adaptive_krylov.py has
    the rest); here the sparse path against the same matrix dense (``matrix=True``)."""
    d = 6
    lap = torch.diag(torch.full((d,), -2.0, dtype=torch.float64)) + torch.diag(
        torch.ones(d - 1, dtype=torch.float64), 1
    )
    x0, t = torch.linspace(-1.0, 1.0, d, dtype=torch.float64), torch.tensor([0.0, 1.0], dtype=torch.float64)
    sparse = deis_ode.SemiLinearODE(lap.to_sparse(), lambda t, x: torch.sin(x))
    dense = deis_ode.SemiLinearODE(lap, lambda t, x: torch.sin(x), matrix=True)
    out = torchdiffeq.odeint(sparse, x0, t, method="adaptive_deis3", rtol=1e-8, atol=1e-8)
    out_dense = torchdiffeq.odeint(dense, x0, t, method="adaptive_deis3", rtol=1e-8, atol=1e-8)
    assert float(relative(out, out_dense)[-1]) < 1e-9
    assert sparse.krylov_stats.calls == 2 * (
        AdaptiveDEISSolver.last_stats.accepted + AdaptiveDEISSolver.last_stats.rejected
    )
