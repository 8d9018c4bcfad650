"""The diffusion SDEs as torchsde modules: forward SDE, reverse family, forward noising, exact noise variances."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torchsde
from scipy import integrate

from deis_ode.diffusion import (
    VEODE,
    VPODE,
    DiffusionODE,
    EDMSchedule,
    FlowSchedule,
    GaussianMixture,
    GaussianMixtureEps,
    VESchedule,
    VPSchedule,
)
from deis_ode.diffusion.sde import ForwardDiffusionSDE, ReverseDiffusionSDE, add_noise, diffusion_squared
from deis_ode.solvers.coefficients import lagrange_monomials, step_coefficients

torch.set_num_threads(1)
F64 = torch.float64

SCHEDULES = {
    "vp_linear": VPSchedule.linear(),
    "vp_cosine": VPSchedule.cosine(),
    "ve": VESchedule(0.01, 50.0),
    "edm": EDMSchedule(),
    "flow": FlowSchedule(),
}


def _mixture(dim: int = 2) -> GaussianMixture:
    means = torch.tensor([[1.0, 0.0], [-1.0, 0.5]], dtype=F64)[:, :dim]
    return GaussianMixture(means, torch.tensor([0.6, 0.8]), torch.tensor([1.0, 2.0]))


def _drift(schedule, extrapolate: str = "x0") -> DiffusionODE:
    return DiffusionODE(GaussianMixtureEps(_mixture(), schedule), schedule, extrapolate=extrapolate)


def _interior(schedule, n: int = 7) -> torch.Tensor:
    lo, hi = schedule.time_range
    return torch.linspace(lo + 0.05 * (hi - lo), hi - 0.05 * (hi - lo), n, dtype=F64)


# --- the forward SDE ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_diffusion_squared_is_the_variance_growth(name):
    """``g^2 = d sigma^2 / dt - 2 (d log alpha / dt) sigma^2``: the conditional variance of the forward SDE is
    ``sigma_t^2``, checked by central differences."""
    schedule = SCHEDULES[name]
    t = _interior(schedule)
    h = 1e-6 * (schedule.time_range[1] - schedule.time_range[0])
    d_var = (schedule.sigma(t + h) ** 2 - schedule.sigma(t - h) ** 2) / (2 * h)
    expected = d_var - 2.0 * schedule.d_log_alpha(t) * schedule.sigma(t) ** 2
    torch.testing.assert_close(diffusion_squared(schedule, t), expected, rtol=1e-6, atol=1e-9)


def test_diffusion_squared_at_sigma_zero():
    assert diffusion_squared(VPSchedule.linear(), 0.0).item() == pytest.approx(0.1)  # beta_min
    assert diffusion_squared(EDMSchedule(), 0.0).item() == 0.0
    assert diffusion_squared(FlowSchedule(), 0.0).item() == 0.0


def test_forward_sde_marginal_matches_add_noise():
    """Euler-Maruyama paths of the forward SDE from a fixed x0 have the moments of ``add_noise``: mean
    ``alpha_t x0``, variance ``sigma_t^2`` (within Monte-Carlo error and the O(dt) bias)."""
    schedule = VPSchedule.linear()
    sde = VPODE(GaussianMixtureEps(_mixture(), schedule), schedule).forward_sde()
    assert isinstance(sde, ForwardDiffusionSDE)
    n, t1 = 4000, 0.5
    x0 = torch.tensor([1.5, -0.5], dtype=F64).expand(n, 2).contiguous()
    bm = torchsde.BrownianInterval(0.0, t1, size=(n, 2), dtype=F64, entropy=11)
    xt = torchsde.sdeint(sde, x0, torch.tensor([0.0, t1], dtype=F64), bm=bm, method="euler", dt=1e-3)[-1]
    alpha, sigma = schedule.alpha(t1).item(), schedule.sigma(t1).item()
    se = sigma / math.sqrt(n)
    torch.testing.assert_close(xt.mean(0), alpha * x0[0], atol=5 * se + 1e-3, rtol=0)
    torch.testing.assert_close(
        xt.var(0), torch.full((2,), sigma**2, dtype=F64), atol=5 * sigma**2 * math.sqrt(2 / n), rtol=0
    )


def test_add_noise():
    schedule = VPSchedule.linear()
    x0 = torch.randn(5, 3, dtype=F64)
    noise = torch.randn(5, 3, dtype=F64)
    expected = schedule.alpha(0.3) * x0 + schedule.sigma(0.3) * noise
    torch.testing.assert_close(add_noise(schedule, x0, 0.3, noise), expected, rtol=1e-15, atol=0)
    t = torch.linspace(0.1, 0.9, 5, dtype=F64)
    per_sample = add_noise(schedule, x0, t, noise)
    torch.testing.assert_close(per_sample, schedule.alpha(t)[:, None] * x0 + schedule.sigma(t)[:, None] * noise)
    a = add_noise(schedule, x0, 0.3, generator=torch.Generator().manual_seed(4))
    b = ForwardDiffusionSDE(schedule).add_noise(x0, 0.3, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b)
    assert add_noise(schedule, x0.float(), 0.3).dtype == torch.float32
    with pytest.raises(ValueError, match="noise has shape"):
        add_noise(schedule, x0, 0.3, noise[:2])
    with pytest.raises(ValueError, match="one time per sample"):
        add_noise(schedule, x0, torch.tensor([0.1, 0.2]))
    with pytest.raises(ValueError, match="outside the time range"):
        add_noise(schedule, x0, 1.5)


# --- the reverse family ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["vp_linear", "ve", "edm"])
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_reverse_drift_is_the_textbook_formula(name, eta):
    """``dx/dt = f x - (1 + eta^2) / 2 g^2 score`` with the mixture's exact score, in both splits; ``ds = -dt``."""
    schedule = SCHEDULES[name]
    mixture = _mixture()
    x = 2.0 * torch.randn(6, 2, dtype=F64, generator=torch.Generator().manual_seed(1))
    for t in _interior(schedule, 4):
        alpha, sigma = schedule.alpha(t), schedule.sigma(t)
        score = mixture.score(x, alpha, sigma)
        g2 = diffusion_squared(schedule, t)
        expected = -(schedule.d_log_alpha(t) * x - 0.5 * (1 + eta**2) * g2 * score)
        for split in ("eps", "x0"):
            sde = _drift(schedule, split).reverse_sde(eta)
            torch.testing.assert_close(sde.f(-t, x), expected, rtol=1e-10, atol=1e-10)
            torch.testing.assert_close(sde.g(-t, x), torch.full_like(x, eta * g2.sqrt().item()))


def test_reverse_sde_at_eta_zero_is_the_probability_flow():
    schedule = VPSchedule.linear()
    for split in ("eps", "x0"):
        drift = _drift(schedule, split)
        sde = drift.reverse_sde(0.0)
        x = torch.randn(4, 2, dtype=F64)
        t = torch.tensor(0.37, dtype=F64)
        torch.testing.assert_close(sde.f(-t, x), -drift(t, x), rtol=1e-14, atol=1e-14)
        assert torch.equal(sde.g(-t, x), torch.zeros_like(x))


@pytest.mark.parametrize("method", ["euler", "milstein", "srk"])
@pytest.mark.parametrize("split", ["eps", "x0"])
def test_reverse_sde_runs_in_torchsde(method, split):
    schedule = VPSchedule.linear()
    sde = _drift(schedule, split).reverse_sde(1.0)
    assert isinstance(sde, ReverseDiffusionSDE)
    assert (sde.noise_type, sde.sde_type) == ("diagonal", "ito")
    x = torch.randn(3, 2, dtype=F64)
    t = torch.tensor([1.0, 0.5, 0.1], dtype=F64)
    bm = torchsde.BrownianInterval(-1.0, -0.1, size=x.shape, dtype=F64, entropy=0, levy_area_approximation="space-time")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchsde's own float steps may overshoot t1 by round-off
        ys = torchsde.sdeint(sde, x, sde.solver_time(t), bm=bm, method=method, dt=0.01)
    assert ys.shape == (3, 3, 2) and bool(torch.isfinite(ys).all())


def test_reverse_sde_ve_runs_in_torchsde():
    schedule = VESchedule(0.01, 50.0)
    drift = VEODE(GaussianMixtureEps(_mixture(), schedule), schedule)
    x = 50.0 * torch.randn(3, 2, dtype=F64)
    ys = torchsde.sdeint(drift.reverse_sde(1.0), x, torch.tensor([-1.0, -0.2], dtype=F64), method="euler", dt=0.01)
    assert bool(torch.isfinite(ys).all())


def test_reverse_sde_shape_option():
    """States are flat ``(batch, channels)`` for torchsde; ``shape`` gives the model its own shape."""
    schedule = VPSchedule.linear()
    seen = []

    def model(x, t):
        seen.append(tuple(x.shape))
        return 0.1 * x

    sde = VPODE(model, schedule).reverse_sde(1.0, shape=(2, 3))
    y = torch.randn(4, 6, dtype=F64)
    out = sde.f(torch.tensor(-0.5, dtype=F64), y)
    assert out.shape == (4, 6) and seen == [(4, 2, 3)]
    assert "shape=(2, 3)" in repr(sde)


def test_reverse_sde_validation():
    schedule = VPSchedule.linear()
    drift = _drift(schedule)
    with pytest.raises(ValueError, match="eta"):
        drift.reverse_sde(-1.0)
    with pytest.raises(ValueError, match="eta"):
        drift.reverse_sde(float("nan"))
    with pytest.raises(TypeError, match="DiffusionODE"):
        ReverseDiffusionSDE(lambda t, x: x, 1.0)
    with pytest.raises(TypeError, match="NoiseSchedule"):
        ForwardDiffusionSDE("vp")


# --- what the stochastic integrator reads ---------------------------------------------------------------------------


def _transition_and_kernel(sde: ReverseDiffusionSDE):
    """``Phi(t_b, tau)`` and ``W(tau)`` from the SDE's own drift coefficients (those torchsde integrates), by
    quadrature in the diffusion time ``t``."""

    def linear(t: float) -> float:
        return float(sde._linear(torch.tensor(t, dtype=F64)))

    def weight(t: float) -> float:
        return float(sde._weight(torch.tensor(t, dtype=F64)))

    def transition(t_b: float, tau: float) -> float:  # exp(int_tau^{t_b} L)
        return math.exp(integrate.quad(linear, tau, t_b, epsabs=0, epsrel=1e-13)[0])

    return transition, weight


@pytest.mark.parametrize("name", ["vp_linear", "ve"])
@pytest.mark.parametrize("split", ["eps", "x0"])
@pytest.mark.parametrize("eta", [0.0, 0.7, 1.0])
def test_exponential_form_matches_the_drift(name, split, eta):
    """The coefficients the stochastic integrator uses, ``Phi(t_b, t_a)`` and
    ``C_j = int Phi(t_b, tau) W(tau) l_j(lambda(tau)) dtau``, equal quadratures of the drift that torchsde sees."""
    schedule = SCHEDULES[name]
    sde = _drift(schedule, split).reverse_sde(eta)
    transition, weight = _transition_and_kernel(sde)
    form = sde.exponential_form()
    t_a, t_b = 0.6, 0.5
    node_t = [0.6, 0.7, 0.8]
    lam = [float(schedule.half_log_snr(t)) for t in node_t]
    h = float(schedule.half_log_snr(t_b)) - lam[0]
    theta = torch.tensor([(v - lam[0]) / h for v in lam], dtype=F64)
    for k in (1, 3):
        phi, c = step_coefficients(
            form,
            "logrho",
            torch.tensor(-t_a, dtype=F64),
            torch.tensor(-t_b, dtype=F64),
            -torch.tensor(node_t[:k], dtype=F64),
        )
        assert float(phi) == pytest.approx(transition(t_b, t_a), rel=1e-11)
        a_k = lagrange_monomials(theta[:k])
        for j, row in enumerate(a_k.tolist()):

            def integrand(tau: float, row=row) -> float:
                x = (float(schedule.half_log_snr(tau)) - lam[0]) / h
                return transition(t_b, tau) * weight(tau) * sum(coef * x**i for i, coef in enumerate(row))

            expected = integrate.quad(integrand, t_a, t_b, epsabs=0, epsrel=1e-12)[0]
            assert float(c[j]) == pytest.approx(expected, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("name", ["vp_linear", "ve"])
@pytest.mark.parametrize("split", ["eps", "x0"])
@pytest.mark.parametrize("eta", [0.0, 0.3, 1.0, 2.0])
def test_noise_variance_is_exact(name, split, eta):
    """``V = int_{t_b}^{t_a} Phi(t_b, tau)^2 eta^2 g(tau)^2 dtau`` by quadrature, against the closed form."""
    schedule = SCHEDULES[name]
    sde = _drift(schedule, split).reverse_sde(eta)
    transition, _ = _transition_and_kernel(sde)
    for t_a, t_b in ((0.6, 0.5), (0.95, 0.3), (0.2, 0.19)):

        def integrand(tau: float, t_b=t_b) -> float:
            return transition(t_b, tau) ** 2 * eta**2 * float(diffusion_squared(schedule, tau))

        expected = integrate.quad(integrand, t_b, t_a, epsabs=0, epsrel=1e-12)[0]
        got = float(sde.noise_variance(-t_a, -t_b))
        assert got == pytest.approx(expected, rel=1e-9, abs=1e-300)


def test_noise_variance_limits():
    """Steps that reach sigma = 0 (x0 split: no noise) or start at alpha = 0 (flow: the full marginal variance)."""
    edm = EDMSchedule()
    sde = _drift(edm, "x0").reverse_sde(1.0)
    assert float(sde.noise_variance(-0.002, 0.0)) == 0.0
    flow = FlowSchedule()
    sde = _drift(flow, "x0").reverse_sde(1.0)
    assert float(sde.noise_variance(-1.0, -0.5)) == pytest.approx(0.25)  # sigma_b^2
    assert float(_drift(flow, "x0").reverse_sde(0.0).noise_variance(-1.0, -0.5)) == 0.0
