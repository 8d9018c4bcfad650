"""Noise schedules: closed forms against 60-digit references, derivatives, the exact inverse of lambda, ranges."""

from __future__ import annotations

import math
from decimal import Decimal, localcontext

import pytest
import torch

from deis_ode.diffusion import LinearVPSchedule, NoiseSchedule, VESchedule, VPSchedule

F64 = torch.float64

# Times that probe both ends of [0, 1] as well as the middle.
EDGE_TIMES = [1e-14, 1e-10, 1e-6, 1e-3, 0.01, 0.1, 0.3, 0.5, 0.7, 0.9, 0.999, 1.0 - 1e-9, 1.0]


# ---------------------------------------------------------------------------------------------------------------
# High-precision references (Decimal, 60 digits), written from the definitions only.


def _vp_linear_ref(t: float, beta_min: float, beta_max: float) -> dict[str, Decimal]:
    """log alpha = -int_0^t beta / 2 with beta(t) = beta_min + t (beta_max - beta_min); sigma^2 = 1 - alpha^2."""
    with localcontext() as ctx:
        ctx.prec = 60
        t, b0, b1 = Decimal(t), Decimal(beta_min), Decimal(beta_max)
        log_alpha = -(b0 * t + (b1 - b0) * t * t / 2) / 2
        alpha2 = (2 * log_alpha).exp()
        sigma2 = 1 - alpha2
        log_sigma = sigma2.ln() / 2
        return {"log_alpha": log_alpha, "log_sigma": log_sigma, "lambda": log_alpha - log_sigma}


def _central_difference(fn, t: float, key: str) -> float:
    """d fn(t)[key] / dt by a central difference with h = 1e-25 in 60-digit arithmetic (error ~ 1e-35)."""
    h = 1e-25
    with localcontext() as ctx:
        ctx.prec = 60
        up, down = fn(Decimal(t) + Decimal(h))[key], fn(Decimal(t) - Decimal(h))[key]
        return float((up - down) / (2 * Decimal(h)))


def _rel_close(actual: float, expected: float, rtol: float) -> bool:
    return abs(actual - expected) <= rtol * abs(expected)


SCHEDULES = [(0.1, 20.0), (0.0, 10.0), (1.0, 1.0), (0.05, 40.0)]


# ---------------------------------------------------------------------------------------------------------------
# VP


@pytest.mark.parametrize(("beta_min", "beta_max"), SCHEDULES)
def test_vp_linear_matches_high_precision_reference(beta_min: float, beta_max: float) -> None:
    schedule = VPSchedule.linear(beta_min, beta_max)
    t = torch.tensor(EDGE_TIMES, dtype=F64)
    got = {
        "log_alpha": schedule.log_alpha(t),
        "log_sigma": schedule.log_sigma(t),
        "lambda": schedule.half_log_snr(t),
    }
    for i, ti in enumerate(EDGE_TIMES):
        ref = _vp_linear_ref(ti, beta_min, beta_max)
        for key, values in got.items():
            expected = float(ref[key])
            # Relative accuracy of a few ulps on every value, including log sigma ~ 0.5 log(beta_min t) near t = 0.
            assert _rel_close(float(values[i]), expected, 1e-14) or abs(float(values[i]) - expected) < 1e-15, (
                key,
                ti,
                float(values[i]),
                expected,
            )


def test_vp_alpha_sigma_preserve_variance() -> None:
    schedule = VPSchedule.linear()
    t = torch.linspace(0.0, 1.0, 10001, dtype=F64)
    alpha, sigma = schedule.alpha(t), schedule.sigma(t)
    torch.testing.assert_close(alpha**2 + sigma**2, torch.ones_like(t), rtol=0, atol=4e-16)
    assert float(alpha[0]) == 1.0 and float(sigma[0]) == 0.0
    # sigma^2 = 1 - exp(-u) = u - u^2 / 2 + O(u^3) with u = int_0^t beta: relative accuracy for small t.
    small = torch.tensor([1e-12, 1e-9, 1e-7], dtype=F64)
    u = 0.1 * small + 9.95 * small**2
    torch.testing.assert_close(schedule.sigma(small) ** 2, u - u**2 / 2, rtol=1e-14, atol=0)


@pytest.mark.parametrize(("beta_min", "beta_max"), SCHEDULES)
def test_vp_derivatives_against_autograd(beta_min: float, beta_max: float) -> None:
    schedule = VPSchedule.linear(beta_min, beta_max)
    t = torch.tensor([1e-6, 1e-3, 0.1, 0.4, 0.8, 1.0], dtype=F64, requires_grad=True)
    for fn, d_fn in [
        (schedule.log_alpha, schedule.d_log_alpha),
        (schedule.log_sigma, schedule.d_log_sigma),
        (schedule.half_log_snr, schedule.d_half_log_snr),
    ]:
        (grad,) = torch.autograd.grad(fn(t).sum(), t)
        torch.testing.assert_close(d_fn(t.detach()), grad, rtol=1e-12, atol=0)


@pytest.mark.parametrize(("beta_min", "beta_max"), SCHEDULES)
def test_vp_derivatives_against_high_precision_differences(beta_min: float, beta_max: float) -> None:
    schedule = VPSchedule.linear(beta_min, beta_max)

    def ref(t: Decimal) -> dict[str, Decimal]:
        return _vp_linear_ref(t, beta_min, beta_max)

    times = [1e-10, 1e-4, 0.05, 0.5, 0.95]
    t = torch.tensor(times, dtype=F64)
    pairs = [
        ("log_alpha", schedule.d_log_alpha(t)),
        ("log_sigma", schedule.d_log_sigma(t)),
        ("lambda", schedule.d_half_log_snr(t)),
    ]
    for key, values in pairs:
        for i, ti in enumerate(times):
            expected = _central_difference(ref, ti, key)
            assert _rel_close(float(values[i]), expected, 1e-13) or abs(float(values[i]) - expected) < 1e-15, (
                key,
                ti,
                float(values[i]),
                expected,
            )


def test_vp_beta_is_minus_twice_d_log_alpha() -> None:
    schedule = VPSchedule.linear(0.1, 20.0)
    t = torch.linspace(0, 1, 11, dtype=F64)
    torch.testing.assert_close(schedule.beta(t), 0.1 + 19.9 * t, rtol=1e-15, atol=1e-15)
    torch.testing.assert_close(-2.0 * schedule.d_log_alpha(t), 0.1 + 19.9 * t, rtol=1e-15, atol=1e-15)


@pytest.mark.parametrize(("beta_min", "beta_max"), SCHEDULES)
def test_vp_half_log_snr_inverse_round_trip(beta_min: float, beta_max: float) -> None:
    schedule = VPSchedule.linear(beta_min, beta_max)
    t = torch.cat(
        [
            torch.logspace(-14, -1, 60, dtype=F64),
            torch.linspace(0.1, 1.0, 200, dtype=F64),
            1.0 - torch.logspace(-14, -2, 30, dtype=F64),
        ]
    )
    lam = schedule.half_log_snr(t)
    back = schedule.t_of_half_log_snr(lam)
    torch.testing.assert_close(back, t, rtol=5e-14, atol=0)
    # and lambda -> t -> lambda over the whole lambda range
    lam_grid = torch.linspace(float(lam.min()), float(lam.max()), 500, dtype=F64)
    torch.testing.assert_close(
        schedule.half_log_snr(schedule.t_of_half_log_snr(lam_grid)), lam_grid, rtol=1e-13, atol=1e-13
    )
    # the end point: lambda(0) = +inf maps back to t = 0
    assert float(schedule.t_of_half_log_snr(torch.tensor(math.inf, dtype=F64))) == 0.0


@pytest.mark.parametrize("schedule", [VPSchedule.linear(), VPSchedule.linear(0.0, 5.0), VESchedule(0.01, 50.0)])
def test_half_log_snr_strictly_decreasing(schedule: NoiseSchedule) -> None:
    t = torch.linspace(*schedule.time_range, 20001, dtype=F64)[1:]
    lam = schedule.half_log_snr(t)
    assert bool((lam[1:] < lam[:-1]).all())
    assert bool((schedule.d_half_log_snr(t) < 0).all())


def test_vp_large_negative_log_alpha_has_no_overflow() -> None:
    # beta_max huge: log alpha(1) ~ -2500, alpha^-2 overflows if formed directly.
    schedule = VPSchedule.linear(0.1, 10000.0)
    t = torch.tensor([0.5, 1.0], dtype=F64)
    lam = schedule.half_log_snr(t)
    torch.testing.assert_close(lam, schedule.log_alpha(t), rtol=1e-15, atol=0)  # sigma = 1 to double precision
    assert bool(torch.isfinite(schedule.d_half_log_snr(t)).all())
    torch.testing.assert_close(schedule.t_of_half_log_snr(lam), t, rtol=1e-14, atol=0)


def test_vp_schedule_is_abstract_and_validates() -> None:
    with pytest.raises(TypeError):
        VPSchedule()  # type: ignore[abstract]
    assert isinstance(VPSchedule.linear(), VPSchedule)
    assert isinstance(VPSchedule.linear(), LinearVPSchedule)
    assert VPSchedule.linear() == LinearVPSchedule(0.1, 20.0)
    with pytest.raises(ValueError, match="beta_min"):
        VPSchedule.linear(-0.1, 20.0)
    with pytest.raises(ValueError, match="beta_max"):
        VPSchedule.linear(1.0, 0.5)
    with pytest.raises(ValueError, match="beta_max"):
        VPSchedule.linear(0.0, 0.0)
    with pytest.raises(ValueError, match="finite"):
        VPSchedule.linear(0.1, math.inf)


# ---------------------------------------------------------------------------------------------------------------
# VE


def test_ve_closed_forms() -> None:
    smin, smax = 0.02, 80.0
    schedule = VESchedule(smin, smax)
    times = [0.0, 1e-9, 0.25, 0.5, 0.75, 1.0]
    t = torch.tensor(times, dtype=F64)
    expected_sigma = torch.tensor([smin * (smax / smin) ** ti for ti in times], dtype=F64)
    torch.testing.assert_close(schedule.sigma(t), expected_sigma, rtol=1e-14, atol=0)
    torch.testing.assert_close(schedule.alpha(t), torch.ones_like(t), rtol=0, atol=0)
    torch.testing.assert_close(schedule.d_log_alpha(t), torch.zeros_like(t), rtol=0, atol=0)
    torch.testing.assert_close(schedule.d_log_sigma(t), torch.full_like(t, math.log(smax / smin)), rtol=1e-15, atol=0)
    torch.testing.assert_close(schedule.half_log_snr(t), -torch.log(expected_sigma), rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(
        schedule.d_half_log_snr(t), torch.full_like(t, -math.log(smax / smin)), rtol=1e-15, atol=0
    )
    assert float(schedule.sigma(torch.tensor(0.0))) == pytest.approx(smin, rel=1e-15)
    assert float(schedule.sigma(torch.tensor(1.0))) == pytest.approx(smax, rel=1e-14)
    # exact inverse
    lam = -torch.log(torch.tensor([smin, 0.1, 1.0, 10.0, smax], dtype=F64))
    t_back = schedule.t_of_half_log_snr(lam)
    torch.testing.assert_close(schedule.sigma(t_back), torch.exp(-lam), rtol=1e-14, atol=0)


def test_ve_derivatives_against_autograd() -> None:
    schedule = VESchedule(0.01, 50.0)
    t = torch.linspace(0, 1, 7, dtype=F64, requires_grad=True)
    for fn, d_fn in [(schedule.log_sigma, schedule.d_log_sigma), (schedule.half_log_snr, schedule.d_half_log_snr)]:
        (grad,) = torch.autograd.grad(fn(t).sum(), t)
        torch.testing.assert_close(d_fn(t.detach()), grad, rtol=1e-14, atol=0)


@pytest.mark.parametrize(
    ("smin", "smax", "match"),
    [
        (0.0, 1.0, "sigma_min"),
        (-1.0, 1.0, "sigma_min"),
        (1.0, 1.0, "sigma_max"),
        (2.0, 1.0, "sigma_max"),
        (0.1, math.inf, "sigma_max"),
        (math.nan, 1.0, "sigma_min"),
    ],
)
def test_ve_validates_arguments(smin: float, smax: float, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        VESchedule(smin, smax)


# ---------------------------------------------------------------------------------------------------------------
# Common behaviour


@pytest.mark.parametrize("schedule", [VPSchedule.linear(), VESchedule(0.01, 50.0)])
def test_dtype_shape_and_inputs(schedule: NoiseSchedule) -> None:
    t32 = torch.rand(2, 3, dtype=torch.float32)
    for name in [
        "log_alpha",
        "log_sigma",
        "d_log_alpha",
        "d_log_sigma",
        "alpha",
        "sigma",
        "half_log_snr",
        "d_half_log_snr",
    ]:
        out = getattr(schedule, name)(t32)
        assert out.dtype == F64 and out.shape == (2, 3), name
        # float32 input is upcast before computing: same as float64 input of the same values
        torch.testing.assert_close(out, getattr(schedule, name)(t32.to(F64)), rtol=0, atol=0)
        scalar = getattr(schedule, name)(0.5)
        assert scalar.dtype == F64 and scalar.shape == ()
    assert schedule.t_of_half_log_snr(0.0).dtype == F64
    assert schedule.time_range == (0.0, 1.0)
    assert all(isinstance(v, float) for v in schedule.time_range)


@pytest.mark.parametrize("schedule", [VPSchedule.linear(), VESchedule(0.01, 50.0)])
def test_check_times(schedule: NoiseSchedule) -> None:
    schedule.check_times(torch.tensor([0.0, 0.5, 1.0]))
    schedule.check_times(1.0, name="t_end")
    with pytest.raises(ValueError, match=r"t_end.*1\.5.*\[0\.0, 1\.0\]"):
        schedule.check_times(torch.tensor([0.2, 1.5]), name="t_end")
    with pytest.raises(ValueError, match=r"^t = -0\.25"):
        schedule.check_times(torch.tensor([[0.1, -0.25]]))
    with pytest.raises(ValueError, match="nan"):
        schedule.check_times(torch.tensor([0.1, math.nan]), name="grid")
