"""The cosine VP, EDM and rectified-flow schedules: closed forms against 50-digit references, identities,
derivatives (autograd and high-precision differences), the exact inverse of lambda, the ends of the time range, the
flow time shift, and the drift at the ends where alpha or sigma vanishes."""

from __future__ import annotations

import math

import mpmath
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from deis_ode import DiffusionODE, EDMSchedule, FlowSchedule
from deis_ode.diffusion import VEODE, CosineVPSchedule, NoiseSchedule, VPSchedule

F64 = torch.float64
mpmath.mp.dps = 50


def _rel_err(actual: torch.Tensor, expected: list[float]) -> float:
    exp = torch.tensor(expected, dtype=F64)
    finite = torch.isfinite(exp)
    assert torch.equal(actual[~finite], exp[~finite]), (actual, exp)
    if not bool(finite.any()):
        return 0.0
    return float(((actual[finite] - exp[finite]).abs() / exp[finite].abs().clamp(min=1e-300)).max())


# ---------------------------------------------------------------------------------------------------------------
# High-precision references from the definitions.


def _cosine_ref(t, s: float = 0.008):
    """(log alpha, log sigma, lambda) of alpha^2 = f(t) / f(0), f = cos^2((t + s) / (1 + s) pi / 2)."""
    t, s = mpmath.mpf(t), mpmath.mpf(s)
    f = lambda u: mpmath.cos((u + s) / (1 + s) * mpmath.pi / 2) ** 2  # noqa: E731
    alpha2 = f(t) / f(0)
    log_alpha = mpmath.log(alpha2) / 2 if alpha2 > 0 else mpmath.ninf
    log_sigma = mpmath.log(1 - alpha2) / 2 if alpha2 < 1 else mpmath.ninf
    return log_alpha, log_sigma


def _flow_ref(t, shift: float):
    t, k = mpmath.mpf(t), mpmath.mpf(shift)
    sigma = k * t / (1 + (k - 1) * t)
    return mpmath.log(1 - sigma), mpmath.log(sigma)


def _reference(schedule: NoiseSchedule, t: float):
    if isinstance(schedule, CosineVPSchedule):
        return _cosine_ref(t, schedule.s)
    if isinstance(schedule, FlowSchedule):
        return _flow_ref(t, schedule.shift)
    return mpmath.mpf(0), mpmath.log(mpmath.mpf(t))


SCHEDULES = [
    VPSchedule.cosine(),
    VPSchedule.cosine(s=0.0, lambda_min=-5.0),
    VPSchedule.cosine(s=0.1),
    EDMSchedule(),
    EDMSchedule(0.01, 10.0),
    FlowSchedule(),
    FlowSchedule(3.0),
    FlowSchedule(0.25),
]
IDS = ["cosine", "cosine-s0", "cosine-s0.1", "edm", "edm-small", "flow", "flow-shift3", "flow-shift0.25"]


def _probe_times(schedule: NoiseSchedule) -> list[float]:
    lo, hi = schedule.time_range
    fracs = [1e-12, 1e-8, 1e-4, 0.01, 0.1, 0.3, 0.5, 0.7, 0.9, 0.99, 0.9999, 1.0 - 1e-9]
    return [lo + f * (hi - lo) for f in fracs]


@pytest.mark.parametrize("schedule", SCHEDULES, ids=IDS)
def test_closed_forms_match_high_precision(schedule: NoiseSchedule) -> None:
    times = _probe_times(schedule)
    t = torch.tensor(times, dtype=F64)
    refs = [_reference(schedule, ti) for ti in times]
    log_alpha = [float(r[0]) for r in refs]
    log_sigma = [float(r[1]) for r in refs]
    lam = [float(r[0] - r[1]) for r in refs]
    # Relative accuracy everywhere (log alpha ~ 1e-14 near t = 0 included); absolute ~1e-16 where the value is 0.
    for got, exp in ((schedule.log_alpha(t), log_alpha), (schedule.log_sigma(t), log_sigma)):
        nonzero = [i for i, v in enumerate(exp) if v != 0.0]
        assert _rel_err(got[nonzero], [exp[i] for i in nonzero]) < 1e-13
        assert all(abs(float(got[i])) < 1e-15 for i in range(len(exp)) if exp[i] == 0.0)
    assert _rel_err(schedule.half_log_snr(t), lam) < 1e-12


@pytest.mark.parametrize("schedule", SCHEDULES, ids=IDS)
def test_derivatives_match_autograd_and_high_precision(schedule: NoiseSchedule) -> None:
    times = _probe_times(schedule)
    t = torch.tensor(times, dtype=F64, requires_grad=True)
    for fn, d_fn in (
        (schedule.log_alpha, schedule.d_log_alpha),
        (schedule.log_sigma, schedule.d_log_sigma),
        (schedule.half_log_snr, schedule.d_half_log_snr),
        (schedule.alpha, schedule.d_alpha),
        (schedule.sigma, schedule.d_sigma),
    ):
        out = fn(t)
        expected = d_fn(t.detach())
        if not out.requires_grad:  # a constant (alpha = 1 of EDM)
            assert torch.equal(expected, torch.zeros_like(expected)), fn.__name__
            continue
        (grad,) = torch.autograd.grad(out.sum(), t)
        assert torch.allclose(grad, expected, rtol=1e-10, atol=1e-12), (fn.__name__, grad, expected)
    # And against a 50-digit derivative of the definitions.
    for ti in times[2:]:
        ref_a = mpmath.diff(lambda u: _reference(schedule, u)[0], ti)
        ref_s = mpmath.diff(lambda u: _reference(schedule, u)[1], ti)
        got_a = float(schedule.d_log_alpha(ti))
        got_s = float(schedule.d_log_sigma(ti))
        assert abs(got_a - float(ref_a)) <= 1e-11 * max(abs(float(ref_a)), 1e-3), (ti, got_a, ref_a)
        assert abs(got_s - float(ref_s)) <= 1e-11 * abs(float(ref_s)), (ti, got_s, ref_s)


@pytest.mark.parametrize("schedule", SCHEDULES, ids=IDS)
def test_inverse_half_log_snr_round_trip(schedule: NoiseSchedule) -> None:
    lo, hi = schedule.time_range
    t = torch.cat([torch.tensor(_probe_times(schedule), dtype=F64), torch.linspace(lo, hi, 1001, dtype=F64)[1:-1]])
    back = schedule.t_of_half_log_snr(schedule.half_log_snr(t))
    # The inverse is well conditioned in relative terms: |dt / t| ~ |d lambda| / |t lambda'|.
    cond = 1.0 + (schedule.half_log_snr(t).abs() / (t * schedule.d_half_log_snr(t)).abs())
    assert bool(((back - t).abs() <= 8e-16 * cond * t.abs() + 1e-300).all()), float(((back - t).abs() / t).max())
    # and lambda(t(lambda)) = lambda on a lambda grid
    ends = torch.tensor([hi - 1e-9 * (hi - lo), lo + 1e-9 * (hi - lo)], dtype=F64)
    lam_lo, lam_hi = (float(v) for v in schedule.half_log_snr(ends))
    lam = torch.linspace(lam_lo, lam_hi, 201, dtype=F64)
    t_lam = schedule.t_of_half_log_snr(lam)
    # lambda(t) is only as accurate as t: rounding t moves lambda by ~1e-16 |t lambda'(t)| (large where alpha ~ 0).
    tol = 4e-16 * (t_lam * schedule.d_half_log_snr(t_lam)).abs() + 1e-14 * lam.abs().clamp(min=1.0)
    assert bool(((schedule.half_log_snr(t_lam) - lam).abs() <= tol).all())


@given(st.floats(-10.0, 30.0))
def test_cosine_inverse_is_continuous_across_zero_lambda(lam: float) -> None:
    schedule = VPSchedule.cosine()
    t = schedule.t_of_half_log_snr(lam)
    # lambda(t) can only be as accurate as t: a rounding of t moves lambda by ~1e-16 t |lambda'(t)|.
    tol = 4e-16 * float((t * schedule.d_half_log_snr(t)).abs()) + 1e-14 * max(1.0, abs(lam))
    assert abs(float(schedule.half_log_snr(t)) - lam) <= tol
    assert float(schedule.t_of_log_alpha(schedule.log_alpha(t))) == pytest.approx(float(t), rel=1e-9, abs=1e-14)


# ---------------------------------------------------------------------------------------------------------------
# Cosine


def test_cosine_is_a_vp_schedule_with_the_documented_range() -> None:
    schedule = VPSchedule.cosine()
    assert isinstance(schedule, CosineVPSchedule) and isinstance(schedule, VPSchedule)
    assert schedule == CosineVPSchedule(0.008, -10.0) and hash(schedule) == hash(CosineVPSchedule())
    assert schedule != VPSchedule.cosine(s=0.01)
    assert repr(schedule) == "VPSchedule.cosine(s=0.008, lambda_min=-10.0)"
    lo, hi = schedule.time_range
    assert lo == 0.0 and 0.9999 < hi < 1.0
    assert float(schedule.half_log_snr(hi)) == pytest.approx(-10.0, abs=1e-11)
    assert float(schedule.alpha(hi)) > 0.0
    t = torch.linspace(0.0, hi, 5001, dtype=F64)
    assert torch.allclose(schedule.alpha(t) ** 2 + schedule.sigma(t) ** 2, torch.ones_like(t), rtol=0, atol=4e-16)
    lam = schedule.half_log_snr(t)
    assert bool((lam[1:] < lam[:-1]).all())
    # The ends: sigma = 0 exactly at t = 0 (lambda = +inf), alpha = 0 exactly at t = 1 (outside the range).
    assert float(schedule.sigma(0.0)) == 0.0 and float(schedule.half_log_snr(0.0)) == math.inf
    assert float(schedule.alpha(1.0)) == 0.0
    assert float(schedule.t_of_half_log_snr(math.inf)) == 0.0


def test_cosine_matches_diffusers_squaredcos_cap_v2_alphas_cumprod() -> None:
    """diffusers' betas telescope: alphas_cumprod[i] = f((i + 1) / N) / f(0) while beta is below its 0.999 cap."""
    n = 1000
    discrete = VPSchedule.diffusers("squaredcos_cap_v2", num_train_timesteps=n)
    cosine = VPSchedule.cosine()
    i = torch.arange(n - 1, dtype=F64)
    assert torch.allclose(discrete.alphas_cumprod[: n - 1], cosine.alpha((i + 1) / n) ** 2, rtol=1e-11, atol=0)
    # The floor lambda_min = -10 is close to the last (capped) training level.
    assert float(discrete.half_log_snr(n - 1.0)) == pytest.approx(cosine.lambda_min, abs=0.2)


def test_cosine_validates_its_arguments() -> None:
    with pytest.raises(ValueError, match="s must be"):
        CosineVPSchedule(s=-0.1)
    with pytest.raises(ValueError, match="lambda_min"):
        CosineVPSchedule(lambda_min=math.inf)


# ---------------------------------------------------------------------------------------------------------------
# EDM


def test_edm_identities_and_range() -> None:
    schedule = EDMSchedule()
    assert schedule.time_range == (0.0, 80.0)
    t = torch.tensor([0.0, 0.002, 1.0, 80.0], dtype=F64)
    assert torch.equal(schedule.alpha(t), torch.ones_like(t))
    assert torch.equal(schedule.sigma(t), t)
    assert torch.equal(schedule.half_log_snr(t), -torch.log(t))
    assert torch.allclose(schedule.t_of_half_log_snr(-torch.log(t)), t, rtol=4e-16, atol=0)
    assert torch.equal(schedule.d_sigma(t[1:]), torch.ones(3, dtype=F64))
    assert schedule == EDMSchedule(0.002, 80.0) and schedule != EDMSchedule(0.002, 81.0)
    assert repr(schedule) == "EDMSchedule(sigma_min=0.002, sigma_max=80.0)"
    with pytest.raises(ValueError, match="sigma_min"):
        EDMSchedule(sigma_min=0.0)
    with pytest.raises(ValueError, match="sigma_max"):
        EDMSchedule(sigma_min=1.0, sigma_max=0.5)
    with pytest.raises(ValueError, match="outside the time range"):
        schedule.check_times(torch.tensor([81.0]))


# ---------------------------------------------------------------------------------------------------------------
# Rectified flow


@pytest.mark.parametrize("shift", [1.0, 3.0, 0.5, 7.5])
def test_flow_shift_formula(shift: float) -> None:
    schedule = FlowSchedule(shift)
    t = torch.linspace(0.0, 1.0, 1001, dtype=F64)
    sigma = shift * t / (1.0 + (shift - 1.0) * t)
    assert torch.allclose(schedule.sigma(t), sigma, rtol=4e-16, atol=0)
    assert torch.allclose(schedule.alpha(t), 1.0 - sigma, rtol=1e-15, atol=2e-16)
    assert torch.allclose(schedule.alpha(t) + schedule.sigma(t), torch.ones_like(t), rtol=0, atol=3e-16)
    # d sigma / dt and d alpha / dt are finite at both ends.
    ds = shift / (1.0 + (shift - 1.0) * t) ** 2
    assert torch.allclose(schedule.d_sigma(t), ds, rtol=1e-15, atol=0)
    assert torch.equal(schedule.d_alpha(t), -schedule.d_sigma(t))
    # rho = shift t / (1 - t): a shift multiplies rho, i.e. translates lambda.
    inner = t[1:-1]
    assert torch.allclose(
        schedule.half_log_snr(inner), FlowSchedule().half_log_snr(inner) - math.log(shift), rtol=1e-14, atol=1e-14
    )


def test_flow_without_shift_is_straight_interpolation() -> None:
    schedule = FlowSchedule()
    t = torch.tensor([0.0, 0.25, 0.5, 1.0], dtype=F64)
    assert torch.equal(schedule.alpha(t), 1.0 - t)
    assert torch.equal(schedule.sigma(t), t)


def test_flow_ends() -> None:
    schedule = FlowSchedule(3.0)
    assert schedule.time_range == (0.0, 1.0)
    assert float(schedule.alpha(1.0)) == 0.0 and float(schedule.sigma(0.0)) == 0.0
    assert float(schedule.half_log_snr(1.0)) == -math.inf and float(schedule.half_log_snr(0.0)) == math.inf
    assert float(schedule.t_of_half_log_snr(-math.inf)) == 1.0 and float(schedule.t_of_half_log_snr(math.inf)) == 0.0
    assert float(schedule.d_sigma(0.0)) == 3.0 and float(schedule.d_sigma(1.0)) == pytest.approx(1.0 / 3.0)
    with pytest.raises(ValueError, match="shift"):
        FlowSchedule(0.0)
    assert repr(schedule) == "FlowSchedule(shift=3.0)" and schedule == FlowSchedule(3) and schedule != FlowSchedule()


def test_default_d_alpha_d_sigma_of_the_base_class() -> None:
    schedule = VPSchedule.linear()
    t = torch.linspace(0.01, 1.0, 11, dtype=F64)
    assert torch.allclose(schedule.d_alpha(t), schedule.alpha(t) * schedule.d_log_alpha(t), rtol=1e-15, atol=0)
    assert torch.allclose(schedule.d_sigma(t), schedule.sigma(t) * schedule.d_log_sigma(t), rtol=1e-15, atol=0)


# ---------------------------------------------------------------------------------------------------------------
# Drifts on the new schedules


def test_diffusion_ode_accepts_any_schedule_and_veode_keeps_its_check() -> None:
    model = lambda x, t: torch.zeros_like(x)  # noqa: E731
    for schedule in (EDMSchedule(), FlowSchedule(), VPSchedule.cosine()):
        assert DiffusionODE(model, schedule).schedule is schedule
    with pytest.raises(TypeError, match="VESchedule"):
        VEODE(model, EDMSchedule())


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_drift_is_finite_at_both_ends(shift: float) -> None:
    """forward(t, x) is the velocity the model returns, also at t = 1 (alpha = 0, x0 split) and t = 0 (sigma = 0,
    eps split), where the weights alpha lambda' and -sigma lambda' are products 0 * inf in their naive form."""
    schedule = FlowSchedule(shift)
    x = torch.tensor([[0.5, -1.0, 2.0]], dtype=F64)

    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.sin(x) + t

    for extrapolate, t in (("x0", 1.0), ("eps", 0.0), ("x0", 0.5), ("eps", 0.5)):
        ode = DiffusionODE(model, schedule, prediction="flow", extrapolate=extrapolate)
        tt = torch.tensor(t, dtype=F64)
        if (extrapolate, t) == ("eps", 0.0):
            # L = d log alpha/dt is finite at sigma = 0, but the eps conversion of a flow output divides by sigma:
            # only the weight can be checked there.
            assert math.isfinite(float(ode._weight(tt))) and float(ode._weight(tt)) == pytest.approx(shift)
            continue
        assert torch.allclose(ode(tt, x), model(x, tt), rtol=1e-14, atol=1e-14), (extrapolate, t)
