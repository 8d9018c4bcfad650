"""The discrete-time VP schedule: exact at the training timesteps, strictly monotone lambda in between, derivatives,
the exact inverse, range errors, and the betas of diffusers' training schedules."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
import torchdiffeq
from hypothesis import given
from hypothesis import strategies as st

import deis_ode  # noqa: F401  (registers the deis* methods)
from deis_ode.diffusion import VPODE, DiscreteVPSchedule, VPSchedule

F64 = torch.float64
HAS_DIFFUSERS = importlib.util.find_spec("diffusers") is not None

DIFFUSERS_CONFIGS = [
    {"beta_schedule": "linear"},
    {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
    {"beta_schedule": "squaredcos_cap_v2"},
]


def _schedules() -> list[DiscreteVPSchedule]:
    betas = 0.02 + 0.3 * torch.rand(40, generator=torch.Generator().manual_seed(1), dtype=F64)
    return [VPSchedule.diffusers(**config) for config in DIFFUSERS_CONFIGS] + [
        VPSchedule.from_betas(betas),
        VPSchedule.discrete([0.9, 0.5]),  # one interval: lambda is linear
    ]


SCHEDULES = _schedules()
IDS = ["linear", "scaled_linear", "squaredcos_cap_v2", "random40", "two-levels"]


def _central_difference(fn, t: torch.Tensor, h: float) -> torch.Tensor:
    return (fn(t + h) - fn(t - h)) / (2.0 * h)


# ---------------------------------------------------------------------------------------------------------------
# Exact at the integers


@pytest.mark.parametrize("schedule", SCHEDULES, ids=IDS)
def test_exact_at_the_training_timesteps(schedule: DiscreteVPSchedule) -> None:
    a = schedule.alphas_cumprod
    i = torch.arange(schedule.num_train_timesteps, dtype=F64)
    torch.testing.assert_close(schedule.alpha(i) ** 2, a, rtol=4e-15, atol=0)
    # sigma^2 = 1 - a to relative accuracy, also where a is close to 1 (t = 0 of the linear schedule: 1 - a = 1e-4).
    torch.testing.assert_close(schedule.sigma(i) ** 2, -torch.expm1(torch.log(a)), rtol=4e-15, atol=0)
    torch.testing.assert_close(schedule.half_log_snr(i), 0.5 * (torch.log(a) - torch.log1p(-a)), rtol=0, atol=0)
    assert schedule.time_range == (0.0, float(a.numel() - 1))


@pytest.mark.parametrize("schedule", SCHEDULES, ids=IDS)
def test_variance_preserving_and_consistent(schedule: DiscreteVPSchedule) -> None:
    t = torch.linspace(0.0, schedule.time_range[1], 4001, dtype=F64)
    alpha, sigma = schedule.alpha(t), schedule.sigma(t)
    torch.testing.assert_close(alpha**2 + sigma**2, torch.ones_like(t), rtol=0, atol=4e-16)
    torch.testing.assert_close(schedule.log_alpha(t) - schedule.log_sigma(t), schedule.half_log_snr(t))
    torch.testing.assert_close(schedule.d_log_alpha(t) - schedule.d_log_sigma(t), schedule.d_half_log_snr(t))


def test_betas_round_trip() -> None:
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=F64)
    schedule = VPSchedule.from_betas(betas)
    torch.testing.assert_close(schedule.alphas_cumprod, torch.cumprod(1.0 - betas, 0), rtol=1e-14, atol=0)
    torch.testing.assert_close(schedule.betas, betas, rtol=1e-11, atol=0)
    assert schedule == VPSchedule.diffusers()
    assert hash(schedule) == hash(VPSchedule.diffusers())
    assert schedule != VPSchedule.diffusers("scaled_linear")
    assert "linear" in repr(VPSchedule.diffusers()) and "1000" in repr(VPSchedule.diffusers())
    assert "alphas_cumprod" in repr(schedule)
    assert VPSchedule.diffusers(trained_betas=betas) == schedule


def test_two_levels_interpolate_lambda_linearly() -> None:
    schedule = VPSchedule.discrete([0.9, 0.5])
    lam0, lam1 = 0.5 * math.log(0.9 / 0.1), 0.0
    t = torch.linspace(0.0, 1.0, 11, dtype=F64)
    torch.testing.assert_close(schedule.half_log_snr(t), lam0 + t * (lam1 - lam0), rtol=1e-15, atol=1e-15)
    torch.testing.assert_close(schedule.d_half_log_snr(t), torch.full_like(t, lam1 - lam0), rtol=1e-15, atol=0)


# ---------------------------------------------------------------------------------------------------------------
# Monotone lambda


@given(
    t=st.floats(0.0, 999.0, allow_nan=False),
    gap=st.floats(1e-7, 999.0, allow_nan=False),
    which=st.sampled_from(range(3)),
)
def test_lambda_strictly_decreasing(t: float, gap: float, which: int) -> None:
    schedule = SCHEDULES[which]
    later = min(t + gap, 999.0)
    if later <= t:
        return
    lam = schedule.half_log_snr(torch.tensor([t, later], dtype=F64))
    assert float(lam[1]) < float(lam[0])
    assert float(schedule.d_half_log_snr(torch.tensor(t, dtype=F64))) < 0.0


@given(
    betas=st.lists(st.floats(1e-5, 0.9, allow_nan=False), min_size=2, max_size=30),
)
def test_lambda_strictly_decreasing_for_any_betas(betas: list[float]) -> None:
    """Secants that jump by orders of magnitude between neighbours: the interpolant must not overshoot."""
    schedule = VPSchedule.from_betas(betas)
    t = torch.linspace(0.0, schedule.time_range[1], 200 * len(betas) + 1, dtype=F64)
    lam = schedule.half_log_snr(t)
    assert bool((lam[1:] < lam[:-1]).all())
    assert bool((schedule.d_half_log_snr(t) < 0.0).all())
    # between the knots lambda stays between them (no overshoot)
    knots = schedule.half_log_snr(torch.arange(len(betas), dtype=F64))
    i = torch.clamp(torch.floor(t), max=len(betas) - 2).long()
    assert bool(((lam <= knots[i]) & (lam >= knots[i + 1])).all())


@pytest.mark.parametrize("schedule", SCHEDULES[:3], ids=IDS[:3])
def test_slope_is_continuous_at_the_knots(schedule: DiscreteVPSchedule) -> None:
    i = torch.arange(1.0, 999.0, dtype=F64)
    left, right = schedule.d_half_log_snr(i - 1e-9), schedule.d_half_log_snr(i + 1e-9)
    torch.testing.assert_close(left, right, rtol=1e-6, atol=0)


# ---------------------------------------------------------------------------------------------------------------
# Derivatives


@pytest.mark.parametrize("schedule", SCHEDULES, ids=IDS)
def test_derivatives_match_finite_differences_and_autograd(schedule: DiscreteVPSchedule) -> None:
    end = schedule.time_range[1]
    generator = torch.Generator().manual_seed(0)
    t = 1e-3 + (end - 2e-3) * torch.rand(300, generator=generator, dtype=F64)
    pairs = [
        (schedule.half_log_snr, schedule.d_half_log_snr),
        (schedule.log_alpha, schedule.d_log_alpha),
        (schedule.log_sigma, schedule.d_log_sigma),
    ]
    for fn, d_fn in pairs:
        exact = d_fn(t)
        torch.testing.assert_close(_central_difference(fn, t, 1e-5), exact, rtol=1e-6, atol=1e-12)
        leaf = t.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(fn(leaf).sum(), leaf)
        torch.testing.assert_close(grad, exact, rtol=1e-12, atol=0)


# ---------------------------------------------------------------------------------------------------------------
# The inverse


@pytest.mark.parametrize("schedule", SCHEDULES, ids=IDS)
def test_inverse_round_trip(schedule: DiscreteVPSchedule) -> None:
    end = schedule.time_range[1]
    generator = torch.Generator().manual_seed(2)
    t = torch.cat([torch.arange(end + 1, dtype=F64), end * torch.rand(2000, generator=generator, dtype=F64)])
    back = schedule.t_of_half_log_snr(schedule.half_log_snr(t))
    torch.testing.assert_close(back, t, rtol=0, atol=2e-15 * end)
    # the integers come back exactly
    i = torch.arange(end + 1, dtype=F64)
    assert torch.equal(schedule.t_of_half_log_snr(schedule.half_log_snr(i)), i)
    # lambda -> t -> lambda over the whole range
    lo, hi = schedule.half_log_snr(torch.tensor([end, 0.0], dtype=F64)).tolist()
    lam = torch.linspace(lo, hi, 3001, dtype=F64)
    t_lam = schedule.t_of_half_log_snr(lam)
    # to round-off in lambda plus that of t itself (one ulp of t ~ 999 moves lambda by |lambda'| 1.1e-13)
    ulp_t = torch.nextafter(t_lam, torch.tensor(math.inf, dtype=F64)) - t_lam
    tol = 4e-15 * (1.0 + lam.abs()) + 2.0 * ulp_t * schedule.d_half_log_snr(t_lam).abs()
    assert bool(((schedule.half_log_snr(t_lam) - lam).abs() <= tol).all())
    # through log alpha too
    torch.testing.assert_close(schedule.t_of_log_alpha(schedule.log_alpha(t[-100:])), t[-100:], rtol=1e-12, atol=0)


def test_inverse_accepts_scalars() -> None:
    schedule = VPSchedule.diffusers()
    lam = float(schedule.half_log_snr(123.25))
    assert abs(float(schedule.t_of_half_log_snr(lam)) - 123.25) < 1e-12


# ---------------------------------------------------------------------------------------------------------------
# Errors


def test_out_of_range_raises() -> None:
    schedule = VPSchedule.diffusers()
    for bad in (-1e-9, 999.0 + 1e-9, math.nan, -math.inf):
        for fn in (schedule.log_alpha, schedule.sigma, schedule.d_log_sigma, schedule.d_half_log_snr):
            with pytest.raises(ValueError, match="outside"):
                fn(torch.tensor([1.0, bad], dtype=F64))
    lo, hi = schedule.half_log_snr(torch.tensor([999.0, 0.0], dtype=F64)).tolist()
    for bad in (hi + 1e-6, lo - 1e-6, math.inf, math.nan):
        with pytest.raises(ValueError, match="lambda"):
            schedule.t_of_half_log_snr(torch.tensor(bad, dtype=F64))
    with pytest.raises(ValueError, match="outside"):
        schedule.check_times(torch.tensor([1000.0]))


@pytest.mark.parametrize(
    ("values", "match"),
    [
        ([0.9], "at least two"),
        ([[0.9, 0.5]], "1-D"),
        ([0.9, 0.9, 0.5], "strictly decreasing"),
        ([0.5, 0.9], "strictly decreasing"),
        ([1.0, 0.5], "open interval"),
        ([0.5, 0.0], "open interval"),
        ([0.5, math.nan], "open interval"),
    ],
)
def test_bad_alphas_cumprod(values: list, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        VPSchedule.discrete(values)


def test_bad_betas_and_configs() -> None:
    with pytest.raises(ValueError, match="open interval"):
        VPSchedule.from_betas([0.1, 0.0, 0.2])
    with pytest.raises(ValueError, match="beta_schedule"):
        VPSchedule.diffusers("sigmoid")
    with pytest.raises(ValueError, match="num_train_timesteps"):
        VPSchedule.diffusers(num_train_timesteps=1)


# ---------------------------------------------------------------------------------------------------------------
# With the solver: deis1 on integer times is DDIM written with alphas_cumprod


def test_deis1_on_training_timesteps_is_ddim() -> None:
    schedule = VPSchedule.diffusers()
    a = schedule.alphas_cumprod

    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x) * (1.0 + t / 1000.0)

    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    grid = torch.tensor([999.0, 749.0, 500.0, 250.0, 17.0, 0.0], dtype=F64)
    out = torchdiffeq.odeint(VPODE(model, schedule), x, grid, method="deis1")
    expected = x
    for s, t in zip(grid[:-1].long().tolist(), grid[1:].long().tolist(), strict=True):
        eps = model(expected, torch.tensor(float(s), dtype=F64))
        x0 = (expected - (1.0 - a[s]).sqrt() * eps) / a[s].sqrt()
        expected = a[t].sqrt() * x0 + (1.0 - a[t]).sqrt() * eps
    torch.testing.assert_close(out[-1], expected, rtol=1e-13, atol=1e-13)


# ---------------------------------------------------------------------------------------------------------------
# diffusers' own training schedules


@pytest.mark.skipif(not HAS_DIFFUSERS, reason="diffusers is not installed")
@pytest.mark.parametrize("config", DIFFUSERS_CONFIGS, ids=IDS[:3])
def test_betas_agree_with_diffusers(config: dict) -> None:
    from diffusers import DDPMScheduler

    theirs = DDPMScheduler(**config)
    ours = VPSchedule.diffusers(**config)
    # diffusers works in float32: the betas agree to a few float32 units of round-off ...
    torch.testing.assert_close(ours.betas, theirs.betas.to(F64), rtol=5e-7, atol=0)
    # ... and so do the cumulative products, up to the round-off of 1000 float32 products and of the float32 beta
    # 0.999 where the cosine schedule is capped (1 - beta then carries a relative error of about 1e-5).
    rtol = 3e-5 if config["beta_schedule"] == "squaredcos_cap_v2" else 2e-6
    torch.testing.assert_close(ours.alphas_cumprod, theirs.alphas_cumprod.to(F64), rtol=rtol, atol=0)
    trained = VPSchedule.diffusers(trained_betas=theirs.betas)
    torch.testing.assert_close(trained.alphas_cumprod, theirs.alphas_cumprod.to(F64), rtol=2e-6, atol=0)
