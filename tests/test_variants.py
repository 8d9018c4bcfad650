"""The DEIS paper's diffusion variants: iPNDM (``ipndm``, ``ipndm_v``) and rho-Runge-Kutta (``deis_rk2..4``).

Problem: the probability-flow ODE of the linear-beta VP schedule with the exact noise model of a 4-dimensional
Gaussian mixture, checked against the scipy reference. On the full range ``t = 1 -> 0.1`` the ratio
``rho(1) / rho(0.1)`` is about 450, so a grid uniform in ``rho`` spends almost all its steps at high noise and
is far too coarse at the data end for affordable step counts (the slopes there are still 1.8 / 2.8 / 3.7 at
256..2048 steps); the orders are measured on ``t = 1 -> 0.1`` with grids uniform in ``log rho`` (a one-step
method keeps its order on any smoothly mapped grid) and on ``t = 0.5 -> 0.1`` (``rho`` from 3.4 to 0.34) with
grids uniform in ``rho``.
"""

import math

import numpy as np
import pytest
import torch
import torchdiffeq
from torchdiffeq._impl.odeint import SOLVERS

import deis_ode
from deis_ode import VEODE, VPODE, SemiLinearODE, VESchedule, VPSchedule, reference
from deis_ode.diffusion import GaussianMixture, GaussianMixtureEps
from deis_ode.solvers.ipndm import IPNDM_COEFFICIENTS, build_ipndm_plan, build_ipndm_v_plan
from deis_ode.solvers.rho_rk import build_rho_rk_plan
from deis_ode.verify import count_evaluations, empirical_order

F64 = torch.float64
RK = ["deis_rk2", "deis_rk3", "deis_rk4"]
VARIANTS = ["ipndm", "ipndm_v", *RK]
SCHEDULE = VPSchedule.linear()


def _stack(weights) -> torch.Tensor:
    """A plan's weights (float64 tensors or Python floats) as one float64 tensor."""
    return torch.stack([torch.as_tensor(w, dtype=torch.float64) for w in weights])


def rho_of(t):
    return torch.exp(-SCHEDULE.half_log_snr(torch.as_tensor(t, dtype=F64)))


def grid_in(variable):
    """A grid factory ``(n, t0, t1) -> times`` uniform in ``rho`` or in ``log rho``."""

    def grid(n, t0, t1):
        r0, r1 = rho_of(t0).item(), rho_of(t1).item()
        if variable == "rho":
            rho = torch.linspace(r0, r1, n + 1, dtype=F64)
        else:
            rho = torch.exp(torch.linspace(math.log(r0), math.log(r1), n + 1, dtype=F64))
        return SCHEDULE.t_of_half_log_snr(-torch.log(rho))

    return grid


def random_grid(n, t0=1.0, t1=0.1, seed=0):
    h = np.random.default_rng(seed).uniform(0.4, 2.5, size=n)
    return torch.tensor(t0 + (t1 - t0) * np.concatenate([[0.0], np.cumsum(h) / h.sum()]), dtype=F64)


@pytest.fixture(scope="module")
def mixture_problem():
    ode = VPODE(GaussianMixtureEps(GaussianMixture.default(dim=4), SCHEDULE), SCHEDULE, extrapolate="eps")
    x0 = torch.randn(8, 4, generator=torch.Generator().manual_seed(0), dtype=F64)
    return ode, x0


def _order(problem, method, t0, t1, variable, steps):
    ode, x0 = problem
    ref = reference.solve(ode, x0, torch.tensor([t0, t1], dtype=F64), rtol=1e-13, atol=1e-13)
    return empirical_order(method, ode, x0, t0, t1, steps=steps, grid=grid_in(variable), reference=ref)


# ----------------------------------------------------------------------------------------------- observed order


@pytest.mark.parametrize("order", [2, 3, 4])
@pytest.mark.parametrize(
    ("t0", "variable", "steps"),
    [(1.0, "logrho", (32, 64, 128, 256)), (0.5, "rho", (32, 64, 128, 256))],
)
def test_rho_runge_kutta_shows_its_order(mixture_problem, order, t0, variable, steps):
    table = _order(mixture_problem, f"deis_rk{order}", t0, 0.1, variable, steps)
    assert min(table.errors) > 1e-11, table  # above the reference's own accuracy
    assert abs(table.slope - order) <= 0.2, str(table)
    assert table.nfe == [order * n for n in steps]


def test_ipndm_shows_order_two_on_a_grid_uniform_in_rho(mixture_problem):
    """On a grid uniform in rho the fixed coefficients are the true Adams-Bashforth coefficients, but the
    lower-order start is not: the first (Euler) step leaves an O(h^2) error that the later steps carry to the
    end, so the global error is C_2 h^2 + C_4 h^4. C_2 is small (eps is nearly linear in x at high noise, where the
    start is), so coarse grids show the AB4 slope of ~4 (3.9, 3.7, 4.6 between 16 and 128 steps) and the slope
    settles at 2 only from about 256 steps on."""
    table = _order(mixture_problem, "ipndm", 0.5, 0.1, "rho", (256, 512, 1024, 2048))
    assert min(table.errors) > 1e-11, table
    assert abs(table.slope - 2.0) <= 0.2, str(table)
    assert table.nfe == [256, 512, 1024, 2048]


# ------------------------------------------------------------------------------------ iPNDM and the deis4 engine


def test_ipndm_v_is_deis4_in_the_rho_basis_with_the_lower_order_start(mixture_problem):
    ode, x0 = mixture_problem
    t = random_grid(13)
    ipndm_v = torchdiffeq.odeint(ode, x0, t, method="ipndm_v")
    deis4 = torchdiffeq.odeint(ode, x0, t, method="deis4", options={"basis": "rho", "warmup": "lower_order"})
    assert torch.allclose(ipndm_v, deis4, rtol=1e-14, atol=1e-14)


def test_ipndm_v_second_step_has_the_variable_step_ab2_coefficients():
    """Integrating the line through (rho_{n-1}, eps_{n-1}), (rho_n, eps_n) over [rho_n, rho_{n+1}] gives the
    coefficients h_n (1 + r / 2) and -h_n r / 2, r = h_n / h_{n-1}, in x / alpha."""
    times = random_grid(6, seed=3)
    plan = build_ipndm_v_plan(VPODE(lambda x, t: x, SCHEDULE, extrapolate="eps").exponential_form(), times)
    rho, alpha = rho_of(times), SCHEDULE.alpha(times)
    update = plan.main[1]
    assert update.nodes == (1, 0)
    h1, h0 = rho[2] - rho[1], rho[1] - rho[0]
    r = h1 / h0
    expected = alpha[2] * h1 * torch.stack([1 + r / 2, -r / 2])
    assert torch.allclose(_stack(update.weights), expected, rtol=1e-12, atol=0)
    assert [len(u.nodes) for u in plan.main] == [1, 2, 3, 4, 4, 4]


def test_ipndm_uses_the_fixed_coefficients_and_agrees_with_ipndm_v_only_on_grids_uniform_in_rho():
    form = VPODE(lambda x, t: x, SCHEDULE, extrapolate="eps").exponential_form()
    for times, uniform in [(grid_in("rho")(9, 1.0, 0.1), True), (random_grid(9), False)]:
        fixed, variable = build_ipndm_plan(form, times), build_ipndm_v_plan(form, times)
        rho, alpha = rho_of(times), SCHEDULE.alpha(times)
        for n, (a, b) in enumerate(zip(fixed.main, variable.main, strict=True)):
            assert a.nodes == b.nodes == tuple(range(n, n - min(4, n + 1), -1))
            ddim = alpha[n + 1] * (rho[n + 1] - rho[n])
            expected = torch.tensor([float(c) for c in IPNDM_COEFFICIENTS[len(a.nodes)]], dtype=F64) * ddim
            assert torch.allclose(_stack(a.weights), expected, rtol=1e-12, atol=0)
            assert float(a.transition) == pytest.approx(float(b.transition), rel=1e-15)
            close = torch.allclose(_stack(a.weights), _stack(b.weights), rtol=1e-9, atol=0)
            assert close == (uniform or n == 0), (n, uniform)


def test_ipndm_is_exact_for_a_constant_noise_prediction():
    """The coefficients of every step sum to one DDIM weight, so a constant eps is integrated exactly on any grid:
    x(t) = alpha(t) (x_0 / alpha_0 + c (rho(t) - rho_0))."""
    c = 0.37
    ode = VPODE(lambda x, t: torch.full_like(x, c), SCHEDULE, extrapolate="eps")
    times = random_grid(11, seed=5)
    x0 = torch.tensor([0.5, -1.0], dtype=F64)
    for method in ("ipndm", "ipndm_v"):
        xs = torchdiffeq.odeint(ode, x0, times, method=method)
        alpha, rho = SCHEDULE.alpha(times)[:, None], rho_of(times)[:, None]
        exact = alpha * (x0 / alpha[0] + c * (rho - rho[0]))
        assert torch.allclose(xs, exact, rtol=1e-11, atol=1e-11), method


# ------------------------------------------------------------------------------------------ rho-RK exactness


@pytest.mark.parametrize("order", [2, 3, 4])
@pytest.mark.parametrize("schedule", [VPSchedule.linear(), VESchedule(0.02, 20.0)], ids=["vp", "ve"])
def test_rho_runge_kutta_is_exact_for_a_polynomial_in_rho_of_degree_below_its_order(order, schedule):
    """With eps = q(rho) independent of x, d(x / alpha)/d rho = q(rho) is a quadrature, which the method's weights
    b at nodes c integrate exactly up to degree order - 1."""
    rng = np.random.default_rng(order)
    coef = rng.normal(size=order)  # degree order - 1

    def q(rho):
        return sum(a * rho**k for k, a in enumerate(coef))

    def big_q(rho):  # the antiderivative
        return sum(a * rho ** (k + 1) / (k + 1) for k, a in enumerate(coef))

    def model(x, t):
        return torch.full_like(x, q(torch.exp(-schedule.half_log_snr(t.double())).item()))

    cls = VPODE if isinstance(schedule, VPSchedule) else VEODE
    ode = cls(model, schedule)
    t0, t1 = (1.0, 0.1) if isinstance(schedule, VPSchedule) else (1.0, 0.3)
    times = random_grid(7, t0, t1, seed=order)
    x0 = torch.tensor([0.7, -0.2], dtype=F64)
    xs = torchdiffeq.odeint(ode, x0, times, method=f"deis_rk{order}")
    rho = torch.exp(-schedule.half_log_snr(times))
    alpha = schedule.alpha(times)
    exact = alpha[:, None] * (x0 / alpha[0] + (big_q(rho) - big_q(rho[0]))[:, None])
    assert torch.allclose(xs, exact, rtol=1e-10, atol=1e-10)

    if order == 2:  # and not beyond: a quadratic term is not integrated exactly by Heun's method
        coef = np.append(coef, 1.0)
        xs = torchdiffeq.odeint(ode, x0, times, method="deis_rk2")
        exact = alpha[:, None] * (x0 / alpha[0] + (big_q(rho) - big_q(rho[0]))[:, None])
        assert not torch.allclose(xs, exact, rtol=1e-6, atol=1e-6)


def test_stage_times_are_where_rho_takes_its_stage_values():
    form = VPODE(lambda x, t: x, SCHEDULE, extrapolate="eps").exponential_form()
    times = random_grid(5, seed=2)
    plan = build_rho_rk_plan(form, times, 4)
    rho = rho_of(times)
    stage_rho = rho_of(plan.stage_times).reshape(5, 4)
    h = rho[1:] - rho[:-1]
    for i, c in enumerate((0.0, 0.5, 0.5, 1.0)):
        assert torch.allclose(stage_rho[:, i], rho[:-1] + c * h, rtol=1e-13, atol=0)
    assert plan.evaluations == 20


# ---------------------------------------------------------------------------------------- front end, NFE, errors


def test_variants_are_registered():
    for name in VARIANTS:
        assert SOLVERS[name] is deis_ode.METHODS[name]
        assert name in deis_ode.register()


@pytest.mark.parametrize(
    ("method", "per_step"), [("ipndm", 1), ("ipndm_v", 1), ("deis_rk2", 2), ("deis_rk3", 3), ("deis_rk4", 4)]
)
def test_evaluations_per_step(mixture_problem, method, per_step):
    ode, x0 = mixture_problem
    t = random_grid(9)
    with count_evaluations(ode) as calls:
        xs = torchdiffeq.odeint(ode, x0, t, method=method)
    assert calls.count == per_step * 9
    assert xs.shape == (10, *x0.shape)


@pytest.mark.parametrize("method", VARIANTS)
def test_a_generic_semilinear_ode_is_rejected(method):
    ode = SemiLinearODE(-1.0, lambda t, x: torch.sin(x))
    with pytest.raises(ValueError, match="diffusion drift"):
        torchdiffeq.odeint(ode, torch.ones(2, dtype=F64), torch.tensor([0.0, 1.0], dtype=F64), method=method)


@pytest.mark.parametrize("method", VARIANTS)
def test_an_x0_split_drift_gives_the_same_samples(method):
    """The variants integrate the eps form; from an x0-split drift they take eps = (x - alpha x0) / sigma."""
    model = lambda x, t: torch.sin(x) * (1 + t)  # noqa: E731
    t = torch.linspace(1.0, 0.1, 7, dtype=F64)
    x = torch.linspace(-1, 1, 6, dtype=F64).reshape(3, 2)
    outs = [
        torchdiffeq.odeint(VPODE(model, SCHEDULE, prediction="eps", extrapolate=split), x, t, method=method)
        for split in ("eps", "x0")
    ]
    assert torch.allclose(outs[0], outs[1], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", VARIANTS)
def test_unknown_options_raise(method):
    ode = VPODE(lambda x, t: x, SCHEDULE, extrapolate="eps")
    with pytest.raises(ValueError, match="unknown option"):
        torchdiffeq.odeint(
            ode, torch.ones(2, dtype=F64), torch.tensor([1.0, 0.1], dtype=F64), method=method, options={"basis": "rho"}
        )


def test_plan_builders_reject_other_forms_directly():
    form = SemiLinearODE(-1.0, lambda t, x: x).exponential_form()
    times = torch.tensor([0.0, 0.5, 1.0], dtype=F64)
    for build in (build_ipndm_plan, build_ipndm_v_plan, lambda f, t: build_rho_rk_plan(f, t, 3)):
        with pytest.raises(ValueError, match="diffusion drift"):
            build(form, times)
    with pytest.raises(ValueError, match="orders"):
        build_rho_rk_plan(VPODE(lambda x, t: x, SCHEDULE, extrapolate="eps").exponential_form(), times, 5)


def test_rho_runge_kutta_needs_the_inverse_schedule():
    import dataclasses

    form = dataclasses.replace(
        VPODE(lambda x, t: x, SCHEDULE, extrapolate="eps").exponential_form(), t_of_half_log_snr=None
    )
    with pytest.raises(ValueError, match="inverse"):
        build_rho_rk_plan(form, random_grid(3), 3)
    build_rho_rk_plan(form, random_grid(3), 2)  # Heun's stages are grid points: no inverse needed


# the error at step_size 0.01 on the problem below, about a third of it measured: 7.4e-4, 1.35e-5 and 5.7e-7. One
# order less costs a factor of about 1 / h = 100 (deis1, deis2, deis3 there: 3.3e-2, 1.8e-3, 3.2e-4).
STEP_SIZE_BOUND = {"deis_rk2": 2e-3, "deis_rk3": 4e-5, "deis_rk4": 2e-6}


@pytest.mark.parametrize("method", RK)
def test_step_size_intermediate_outputs_float32_and_callbacks(mixture_problem, method):
    ode, x0 = mixture_problem
    t = torch.tensor([1.0, 0.5, 0.1], dtype=F64)
    ref = reference.solve(ode, x0, t, rtol=1e-13, atol=1e-13).states
    xs = torchdiffeq.odeint(ode, x0, t, method=method, options={"step_size": 0.01})
    error = float((xs - ref).abs().max())
    assert error < STEP_SIZE_BOUND[method]
    # halving the step divides the error by 2^p for order p: at least 2^(p - 1/2) (measured 4.1, 8.9, 15.5), which
    # a method of order p - 1 (2^(p - 1)) does not reach
    order = int(method[-1])
    coarse = torchdiffeq.odeint(ode, x0, t, method=method, options={"step_size": 0.02})
    assert float((coarse - ref).abs().max()) / error >= 2 ** (order - 0.5)
    xs32 = torchdiffeq.odeint(ode, x0.float(), t.float(), method=method, options={"step_size": 0.01})
    assert xs32.dtype == torch.float32
    assert (xs32.double() - xs).abs().max() < 1e-4

    seen = []

    class Drift(VPODE):
        def callback_step(self, t0, y0, dt):
            seen.append(float(t0))

    drift = Drift(GaussianMixtureEps(GaussianMixture.default(dim=4), SCHEDULE), SCHEDULE)
    torchdiffeq.odeint(drift, x0, random_grid(6), method=method)
    assert len(seen) == 6


def test_forward_time_matches_the_reference(mixture_problem):
    ode, x0 = mixture_problem
    t = torch.tensor([0.1, 0.5], dtype=F64)
    ref = reference.solve(ode, x0, t, rtol=1e-13, atol=1e-13).states[-1]
    xs = torchdiffeq.odeint(ode, x0, t, method="deis_rk4", options={"step_size": 0.01})
    assert (xs[-1] - ref).abs().max() < 2e-5 * ref.abs().max()  # measured 5.1e-6


@pytest.mark.parametrize("method", VARIANTS)
def test_non_finite_noise_prediction_is_reported_once_with_its_time(method):
    def model(x, t):
        return x * torch.where(t < 0.5, torch.nan, 1.0)

    ode = VPODE(model, SCHEDULE, extrapolate="eps")
    with pytest.raises(FloatingPointError, match="NaN or inf"):
        torchdiffeq.odeint(
            ode,
            torch.ones(2, dtype=F64),
            torch.tensor([1.0, 0.1], dtype=F64),
            method=method,
            options={"step_size": 0.1},
        )
