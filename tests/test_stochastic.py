"""The stochastic exponential integrator ``deis_ode.sdeint``: eta = 0 is the ODE method, deis1 is DDIM with
stochasticity, noise sources, reproducibility, the interface."""

from __future__ import annotations

import math

import pytest
import torch
import torchdiffeq
import torchsde

import deis_ode
from deis_ode.diffusion import VEODE, VPODE, GaussianMixture, GaussianMixtureEps, VESchedule, VPSchedule
from deis_ode.solvers.stochastic import sdeint

torch.set_num_threads(1)
F64 = torch.float64


def _mixture() -> GaussianMixture:
    return GaussianMixture(
        torch.tensor([[1.0, 0.0, 0.5], [-1.0, 0.5, 0.0]], dtype=F64), torch.tensor([0.4, 0.7]), torch.tensor([1.0, 2.0])
    )


def _vp_drift(extrapolate: str = "x0") -> VPODE:
    schedule = VPSchedule.linear()
    return VPODE(GaussianMixtureEps(_mixture(), schedule), schedule, extrapolate=extrapolate)


def _grid(n: int = 12, t_end: float = 1e-3) -> torch.Tensor:
    return torch.linspace(1.0, t_end**0.5, n + 1, dtype=F64) ** 2  # quadratic in t, decreasing


def _x_T(batch: int = 5, seed: int = 0, dtype=F64) -> torch.Tensor:
    return torch.randn(batch, 3, generator=torch.Generator().manual_seed(seed), dtype=F64).to(dtype)


# --- eta = 0: the probability-flow ODE method -----------------------------------------------------------------------


@pytest.mark.parametrize("split", ["eps", "x0"])
@pytest.mark.parametrize("method", ["deis1", "deis2", "deis3"])
@pytest.mark.parametrize("basis", ["logrho", "rho", "t"])
def test_eta_zero_is_the_ode_method(split, method, basis):
    drift = _vp_drift(split)
    t, x = _grid(), _x_T()
    ode = torchdiffeq.odeint(drift, x, t, method=method, options={"basis": basis})
    sde = sdeint(drift.reverse_sde(0.0), x, -t, method=method, basis=basis)
    torch.testing.assert_close(sde, ode, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_eta_zero_is_the_ode_method_with_options(dtype):
    drift = _vp_drift("x0")
    t, x = _grid(6), _x_T(dtype=dtype)
    ode = torchdiffeq.odeint(drift, x, t, method="deis3", options={"lower_order_final": True, "step_size": 0.05})
    sde = sdeint(drift.reverse_sde(0.0), x, -t, method="deis3", lower_order_final=True, dt=0.05)
    assert sde.dtype == dtype
    torch.testing.assert_close(sde, ode, rtol=0, atol=1e-5 if dtype == torch.float32 else 1e-13)


def test_eta_zero_ve():
    schedule = VESchedule(0.01, 50.0)
    drift = VEODE(GaussianMixtureEps(_mixture(), schedule), schedule, extrapolate="x0")
    t = torch.linspace(1.0, 0.0, 11, dtype=F64)
    x = 50.0 * _x_T()
    ode = torchdiffeq.odeint(drift, x, t, method="deis2", options={"lower_order_final": True})
    sde = sdeint(drift.reverse_sde(0.0), x, -t, method="deis2", lower_order_final=True)
    torch.testing.assert_close(sde, ode, rtol=1e-13, atol=1e-12)


# --- deis1 is DDIM with stochasticity (DDPM ancestral sampling at eta = 1) -------------------------------------------


def _ddim(drift: VPODE, x: torch.Tensor, t: torch.Tensor, noise: list[torch.Tensor], eta: float) -> torch.Tensor:
    """DDIM (Song, Meng, Ermon 2021, eq. 12) on the grid ``t``: ``x_b = alpha_b x0 + sqrt(sigma_b^2 - c^2) eps + c xi``
    with the noise level ``c^2 = sigma_b^2 (1 - exp(-2 eta^2 (lambda_b - lambda_a)))``."""
    schedule = drift.schedule
    for n in range(t.numel() - 1):
        a_a, s_a = schedule.alpha(t[n]), schedule.sigma(t[n])
        a_b, s_b = schedule.alpha(t[n + 1]), schedule.sigma(t[n + 1])
        eps = drift.model(x, t[n])
        x0 = (x - s_a * eps) / a_a
        h = schedule.half_log_snr(t[n + 1]) - schedule.half_log_snr(t[n])
        c = s_b * torch.sqrt(-torch.expm1(-2.0 * eta**2 * h))
        x = a_b * x0 + torch.sqrt(s_b**2 - c**2) * eps + c * noise[n]
    return x


def _ddpm(drift: VPODE, x: torch.Tensor, t: torch.Tensor, noise: list[torch.Tensor]) -> torch.Tensor:
    """DDPM ancestral sampling written with alpha-bar: DDIM's eta = 1 noise
    ``sqrt((1 - abar_b) / (1 - abar_a)) sqrt(1 - abar_a / abar_b)`` (DDIM paper, eq. 16)."""
    schedule = drift.schedule
    for n in range(t.numel() - 1):
        abar_a, abar_b = schedule.alpha(t[n]) ** 2, schedule.alpha(t[n + 1]) ** 2
        eps = drift.model(x, t[n])
        x0 = (x - torch.sqrt(1 - abar_a) * eps) / torch.sqrt(abar_a)
        c = torch.sqrt((1 - abar_b) / (1 - abar_a)) * torch.sqrt(1 - abar_a / abar_b)
        x = torch.sqrt(abar_b) * x0 + torch.sqrt(1 - abar_b - c**2) * eps + c * noise[n]
    return x


@pytest.mark.parametrize("eta", [0.3, 1.0])
def test_deis1_is_ddim_with_generator_noise(eta):
    drift = _vp_drift("x0")
    t, x = _grid(8, 1e-2), _x_T()
    ours = sdeint(drift.reverse_sde(eta), x, -t, method="deis1", generator=torch.Generator().manual_seed(3))[-1]
    gen = torch.Generator().manual_seed(3)
    noise = [torch.randn(x.shape, generator=gen, dtype=F64) for _ in range(t.numel() - 1)]
    torch.testing.assert_close(ours, _ddim(drift, x, t, noise, eta), rtol=1e-12, atol=1e-12)
    if eta == 1.0:
        torch.testing.assert_close(ours, _ddpm(drift, x, t, noise), rtol=1e-12, atol=1e-12)


def test_deis1_is_ddim_with_brownian_noise():
    """With a Brownian motion the standard normal of step n is ``(W(s_{n+1}) - W(s_n)) / sqrt(s_{n+1} - s_n)``."""
    drift = _vp_drift("x0")
    t, x = _grid(8, 1e-2), _x_T()
    s = -t
    bm = torchsde.BrownianInterval(s[0].item(), s[-1].item(), size=x.shape, dtype=F64, entropy=5)
    ours = sdeint(drift.reverse_sde(1.0), x, s, bm=bm, method="deis1")[-1]
    noise = [bm(s[n].item(), s[n + 1].item()) / torch.sqrt(s[n + 1] - s[n]) for n in range(t.numel() - 1)]
    torch.testing.assert_close(ours, _ddpm(drift, x, t, noise), rtol=1e-12, atol=1e-12)


# --- noise sources and reproducibility ------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:Should have tb<=t1")  # torchsde's own float steps overshoot t1 by round-off
def test_fixed_seeds_reproduce_samples_exactly():
    drift = _vp_drift("x0")
    sde = drift.reverse_sde(1.0)
    t, x = _grid(), _x_T()
    a = sdeint(sde, x, -t, method="deis2", generator=torch.Generator().manual_seed(1))
    b = sdeint(sde, x, -t, method="deis2", generator=torch.Generator().manual_seed(1))
    c = sdeint(sde, x, -t, method="deis2", generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    torch.manual_seed(7)
    d = sdeint(sde, x, -t, method="deis2")
    torch.manual_seed(7)
    e = sdeint(sde, x, -t, method="deis2")
    assert torch.equal(d, e)

    def bm(entropy):
        return torchsde.BrownianInterval(-1.0, -1e-3, size=x.shape, dtype=F64, entropy=entropy)

    f = sdeint(sde, x, -t, bm=bm(9), method="deis3")
    g = sdeint(sde, x, -t, bm=bm(9), method="deis3")
    assert torch.equal(f, g)
    shared = bm(9)  # a BrownianInterval answers repeated and out-of-order queries from the same path
    h = sdeint(sde, x, -t, bm=shared, method="deis3")
    torchsde.sdeint(sde, x, -t, bm=shared, method="euler", dt=0.01)
    assert torch.equal(h, sdeint(sde, x, -t, bm=shared, method="deis3"))
    assert torch.equal(f, h)


def test_same_path_as_torchsde():
    """On one Brownian path, deis1 and torchsde's Euler-Maruyama with the same small step agree closely (both are
    first-order approximations of the same pathwise solution), and much more closely than on independent paths."""
    drift = _vp_drift("x0")
    sde = drift.reverse_sde(1.0)
    x = _x_T(64)
    s = torch.tensor([-1.0, -0.1], dtype=F64)

    def bm(entropy):
        return torchsde.BrownianInterval(-1.0, -0.1, size=x.shape, dtype=F64, entropy=entropy)

    ours = sdeint(sde, x, s, bm=bm(0), method="deis1", dt=1 / 256)[-1]
    theirs = torchsde.sdeint(sde, x, s, bm=bm(0), method="euler", dt=1 / 256)[-1]
    other = torchsde.sdeint(sde, x, s, bm=bm(1), method="euler", dt=1 / 256)[-1]
    same = (ours - theirs).norm(dim=1).mean()
    independent = (ours - other).norm(dim=1).mean()
    assert same < 0.05 and same < 0.05 * independent


def test_noise_variance_is_used_exactly():
    """A recording Brownian motion: the injected noise of step n is ``sqrt(V_n / ds) dW``."""
    drift = _vp_drift("x0")
    sde = drift.reverse_sde(0.8)
    t = _grid(5, 1e-2)
    s = -t
    x = torch.zeros(1, 3, dtype=F64)

    def zero_model(x, t):
        return torch.zeros_like(x)

    # With eps = 0, x0 = x / alpha and x_b = (alpha_b / alpha_a) x_a + noise: check the step's noise directly.
    quiet = VPODE(zero_model, drift.schedule, extrapolate="x0").reverse_sde(0.8)
    for n in range(t.numel() - 1):
        calls = []

        def bm(a, b, calls=calls):
            calls.append((a, b))
            return torch.ones(1, 3, dtype=F64)

        out = sdeint(quiet, x, s[n : n + 2], bm=bm, method="deis1")[-1]
        expected = math.sqrt(float(sde.noise_variance(s[n], s[n + 1])) / float(s[n + 1] - s[n]))
        assert calls == [(s[n].item(), s[n + 1].item())]
        torch.testing.assert_close(out, torch.full((1, 3), expected, dtype=F64), rtol=1e-14, atol=0)


# --- the interface --------------------------------------------------------------------------------------------------


def test_outputs_evaluations_and_callback():
    drift = _vp_drift("x0")
    calls = []

    def model(x, t):
        calls.append(float(t))
        return drift.model(x, t)

    sde = VPODE(model, drift.schedule, extrapolate="x0").reverse_sde(1.0, shape=(3,))
    t = torch.tensor([1.0, 0.5, 0.1], dtype=F64)
    seen = []
    ys = sdeint(
        sde, _x_T(), -t, method="deis2", dt=0.1, generator=torch.Generator(), callback=lambda *a: seen.append(a)
    )
    assert ys.shape == (3, 5, 3)
    assert torch.equal(ys[0], _x_T())
    assert len(calls) == 5 + 4 == len(seen)  # ceil(0.5 / 0.1) + ceil(0.4 / 0.1) steps, one evaluation each
    assert calls[0] == 1.0 and seen[0][0] == 0 and float(seen[0][1]) == -1.0


def test_exported():
    assert deis_ode.sdeint is sdeint
    assert deis_ode.diffusion.ReverseDiffusionSDE is type(_vp_drift().reverse_sde())


def test_errors():
    drift = _vp_drift("x0")
    sde = drift.reverse_sde(1.0)
    t, x = _grid(4), _x_T()
    with pytest.raises(ValueError, match="method must be one of"):
        sdeint(sde, x, -t, method="deis4")
    with pytest.raises(ValueError, match="strictly increasing.*pass -t"):
        sdeint(sde, x, t)
    with pytest.raises(TypeError, match="semi-linear SDE"):
        sdeint(drift, x, -t)
    with pytest.raises(ValueError, match="either bm or generator"):
        sdeint(sde, x, -t, bm=lambda a, b: x, generator=torch.Generator())
    with pytest.raises(ValueError, match="bm returned increments of shape"):
        sdeint(sde, x, -t, bm=lambda a, b: torch.zeros(2, 3, dtype=F64))
    with pytest.raises(ValueError, match="basis must be one of"):
        sdeint(sde, x, -t, basis="lambda")
    with pytest.raises(ValueError, match="dt must be a positive finite number"):
        sdeint(sde, x, -t, dt=-0.1)
    with pytest.raises(ValueError, match="time range"):
        sdeint(sde, x, torch.tensor([-1.5, -0.5], dtype=F64))
    with pytest.raises(TypeError, match="real floating point"):
        sdeint(sde, torch.zeros(2, 3, dtype=torch.int64), -t)
