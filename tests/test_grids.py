"""Sampling time grids: shape, exact ends, monotonicity and range for every schedule and spacing (hypothesis); the
formulas of each spacing; the diffusers spacings against diffusers' own schedulers; user grids; errors."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from deis_ode import EDMSchedule, FlowSchedule
from deis_ode.diffusion import SPACINGS, NoiseSchedule, VESchedule, VPSchedule, diffusers_timesteps, timesteps

F64 = torch.float64
HAS_DIFFUSERS = importlib.util.find_spec("diffusers") is not None

CONTINUOUS_SPACINGS = ["uniform", "power", "logsnr", "karras"]
DIFFUSERS_SPACINGS = ["linspace", "leading", "trailing"]

SCHEDULES: dict[str, NoiseSchedule] = {
    "vp-linear": VPSchedule.linear(),
    "vp-cosine": VPSchedule.cosine(),
    "vp-discrete": VPSchedule.diffusers(),
    "ve": VESchedule(),
    "edm": EDMSchedule(),
    "flow": FlowSchedule(),
    "flow-shift3": FlowSchedule(3.0),
}
DISCRETE = {n: VPSchedule.diffusers(num_train_timesteps=n) for n in (20, 100, 1000)}


def _check_grid(grid: torch.Tensor, schedule: NoiseSchedule, n: int, start: float, end: float) -> None:
    lo, hi = schedule.time_range
    assert grid.dtype == F64 and grid.dim() == 1
    assert grid.numel() == n + 1, grid
    assert float(grid[0]) == start and float(grid[-1]) == end
    assert bool((grid[1:] < grid[:-1]).all()), grid  # strictly decreasing: no repeated point, no zero step
    assert bool(((grid >= lo) & (grid <= hi)).all())
    assert torch.unique(grid).numel() == grid.numel()


@st.composite
def _ends(draw, schedule: NoiseSchedule) -> tuple[float | None, float | None]:
    """(t_start, t_end) with t_start - t_end at least 1e-3 of the range (None: the default end)."""
    lo, hi = schedule.time_range
    a = draw(st.one_of(st.none(), st.floats(0.0, 1.0)))
    b = draw(st.one_of(st.none(), st.floats(0.0, 1.0)))
    t_start = None if a is None else lo + max(a, 1e-3) * (hi - lo)
    t_end = None if b is None else lo + b * (hi - lo)
    start = hi if t_start is None else t_start
    end = lo if t_end is None else t_end
    assume(start - end >= 1e-3 * (hi - lo))
    return t_start, t_end


@given(
    name=st.sampled_from(sorted(SCHEDULES)),
    spacing=st.sampled_from(CONTINUOUS_SPACINGS),
    n=st.integers(1, 60),
    data=st.data(),
)
def test_every_grid_is_strictly_decreasing_with_exact_ends(name: str, spacing: str, n: int, data) -> None:
    schedule = SCHEDULES[name]
    t_start, t_end = data.draw(_ends(schedule))
    lo, hi = schedule.time_range
    grid = timesteps(schedule, n, spacing, t_start=t_start, t_end=t_end)
    _check_grid(grid, schedule, n, hi if t_start is None else t_start, lo if t_end is None else t_end)


@given(
    size=st.sampled_from(sorted(DISCRETE)),
    spacing=st.sampled_from(DIFFUSERS_SPACINGS),
    n=st.integers(1, 60),
    steps_offset=st.sampled_from([0, 1]),
)
def test_diffusers_spacings_give_integer_grids_ending_at_zero(
    size: int, spacing: str, n: int, steps_offset: int
) -> None:
    schedule = DISCRETE[size]
    if n >= size:
        with pytest.raises(ValueError, match="n < num_train_timesteps"):
            timesteps(schedule, n, spacing, steps_offset=steps_offset)
        return
    steps = diffusers_timesteps(spacing, n, size, steps_offset)
    if float(steps[0]) > size - 1:  # "leading" with an offset can leave the training range
        with pytest.raises(ValueError, match="outside the time range"):
            timesteps(schedule, n, spacing, steps_offset=steps_offset)
        return
    grid = timesteps(schedule, n, spacing, steps_offset=steps_offset)
    # The last diffusers timestep can be 0 itself (e.g. "trailing" with n > 2 N / 3): then it is not repeated.
    expected_points = n + 1 - int(float(steps[-1]) == 0.0)
    _check_grid(grid, schedule, expected_points - 1, float(steps[0]), 0.0)
    assert torch.equal(grid[:-1], grid[:-1].round())


@pytest.mark.skipif(not HAS_DIFFUSERS, reason="diffusers is not installed")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # diffusers' numpy 2 copy= notice, once per call
@pytest.mark.parametrize(
    ("spacing", "steps_offset"), [("linspace", 0), ("leading", 0), ("leading", 1), ("trailing", 0)]
)
@pytest.mark.parametrize("size", [20, 100, 1000])
def test_diffusers_spacings_match_diffusers(spacing: str, size: int, steps_offset: int) -> None:
    """Our n-step grid is diffusers' DEISMultistepScheduler timesteps followed by t = 0; DDIMScheduler gives the same
    "trailing" timesteps for n steps, and its "linspace" / "leading" timesteps for n + 1 steps are the whole grid."""
    from diffusers import DDIMScheduler, DEISMultistepScheduler

    config = {"num_train_timesteps": size, "timestep_spacing": spacing, "steps_offset": steps_offset}
    deis, ddim, ddim_plus = DEISMultistepScheduler(**config), DDIMScheduler(**config), DDIMScheduler(**config)
    schedule = DISCRETE[size]
    for n in range(1, size):
        steps = diffusers_timesteps(spacing, n, size, steps_offset)
        if float(steps[0]) > size - 1:
            continue
        deis.set_timesteps(n)
        # diffusers' float arange can add a timestep -1 for some (N, n) with "trailing": outside the range, dropped.
        reference = [float(v) for v in deis.timesteps.tolist() if v >= 0]
        assert steps.tolist() == reference, (n, steps.tolist(), reference)
        grid = timesteps(schedule, n, spacing, steps_offset=steps_offset)
        assert grid.tolist() == (reference + [0.0] if reference[-1] != 0.0 else reference)
        ddim.set_timesteps(n)
        if spacing == "trailing":
            assert steps.tolist() == [float(v) for v in ddim.timesteps.tolist() if v >= 0]
        elif steps_offset == 0 and n + 1 <= size:
            ddim_plus.set_timesteps(n + 1)
            assert grid.tolist() == [float(v) for v in ddim_plus.timesteps.tolist()]


# ---------------------------------------------------------------------------------------------------------------
# The formulas


def test_uniform_and_power_formulas() -> None:
    schedule = VPSchedule.linear()
    grid = timesteps(schedule, 4, "uniform", t_end=1e-3)
    expected = torch.tensor([1.0, 0.75025, 0.5005, 0.25075, 1e-3], dtype=F64)
    assert torch.allclose(grid, expected, rtol=1e-15, atol=0)
    grid = timesteps(schedule, 10, "power", t_end=1e-3)  # DEIS' quadratic grid
    i = torch.arange(11, dtype=F64)
    expected = (1.0 + i / 10 * (math.sqrt(1e-3) - 1.0)) ** 2
    assert torch.allclose(grid, expected, rtol=1e-14, atol=0)
    grid = timesteps(schedule, 10, "power", power=3.0, t_start=0.8, t_end=1e-3)
    expected = (0.8 ** (1 / 3) + i / 10 * (1e-3 ** (1 / 3) - 0.8 ** (1 / 3))) ** 3
    assert torch.allclose(grid, expected, rtol=1e-14, atol=0)
    assert torch.equal(timesteps(schedule, 5), timesteps(schedule, 5, "power"))  # the default spacing


@pytest.mark.parametrize("name", ["vp-linear", "vp-cosine", "vp-discrete", "ve"])
def test_logsnr_is_uniform_in_lambda(name: str) -> None:
    schedule = SCHEDULES[name]
    lo, hi = schedule.time_range
    end = lo + 1e-3 * (hi - lo)
    grid = timesteps(schedule, 12, "logsnr", t_end=end)
    lam = schedule.half_log_snr(grid)
    steps = lam[1:] - lam[:-1]
    assert torch.allclose(steps, steps.mean().expand_as(steps), rtol=1e-9, atol=0)


def test_karras_on_edm_is_karras_grid() -> None:
    """n formula points from sigma_max to sigma_min, then sigma = 0 (Karras et al., appendix; k-diffusion)."""
    schedule = EDMSchedule()
    n, r = 10, 7.0
    grid = timesteps(schedule, n, "karras")
    ramp = torch.arange(n, dtype=F64) / (n - 1)
    sigma = (80.0 ** (1 / r) + ramp * (0.002 ** (1 / r) - 80.0 ** (1 / r))) ** r
    expected = torch.cat([sigma, torch.zeros(1, dtype=F64)])
    assert torch.allclose(grid, expected, rtol=1e-13, atol=0)
    # A positive t_end is a formula point itself: n + 1 points from rho(t_start) to rho(t_end).
    grid = timesteps(schedule, n, "karras", t_end=0.01, rho=5.0)
    ramp = torch.arange(n + 1, dtype=F64) / n
    expected = (80.0 ** (1 / 5) + ramp * (0.01 ** (1 / 5) - 80.0 ** (1 / 5))) ** 5
    assert torch.allclose(grid, expected, rtol=1e-13, atol=0)


def test_karras_is_in_rho_for_a_vp_schedule() -> None:
    schedule = VPSchedule.linear()
    grid = timesteps(schedule, 8, "karras", t_end=1e-3)
    rho = torch.exp(-schedule.half_log_snr(grid))
    ramp = torch.arange(9, dtype=F64) / 8
    hi, lo = float(rho[0]), float(rho[-1])
    expected = (hi ** (1 / 7) + ramp * (lo ** (1 / 7) - hi ** (1 / 7))) ** 7
    assert torch.allclose(rho, expected, rtol=1e-12, atol=0)


def test_infinite_lambda_ends_take_one_point_each() -> None:
    """Flow: alpha = 0 at t = 1 and sigma = 0 at t = 0; the neighbours sit one uniform step inside, the rest is
    uniform in lambda between them."""
    schedule = FlowSchedule()
    grid = timesteps(schedule, 6, "logsnr")
    assert grid[0] == 1.0 and grid[-1] == 0.0
    assert float(grid[1]) == pytest.approx(1.0 - 1.0 / 6, rel=1e-14)
    assert float(grid[-2]) == pytest.approx(1.0 / 6, rel=1e-14)
    lam = schedule.half_log_snr(grid[1:-1])
    steps = lam[1:] - lam[:-1]
    assert torch.allclose(steps, steps.mean().expand_as(steps), rtol=1e-12, atol=0)
    assert timesteps(schedule, 1, "karras").tolist() == [1.0, 0.0]
    assert timesteps(schedule, 2, "logsnr").tolist() == [1.0, 0.5, 0.0]
    # EDM's sigma_min replaces the infinite end at t = 0 (one step to 0 at the end).
    grid = timesteps(EDMSchedule(), 5, "logsnr")
    assert float(grid[-2]) == pytest.approx(0.002, rel=1e-13) and grid[-1] == 0.0


def test_ends_at_sigma_zero_by_default_where_the_schedule_reaches_it() -> None:
    for name in ("vp-cosine", "edm", "flow"):
        schedule = SCHEDULES[name]
        grid = timesteps(schedule, 7, "uniform")
        assert float(schedule.sigma(grid[-1])) == 0.0
    grid = timesteps(VESchedule(), 3, "uniform")  # VE never reaches sigma = 0: its smallest time
    assert grid[-1] == 0.0 and float(VESchedule().sigma(grid[-1])) == pytest.approx(0.01)


def test_degenerate_grids_drop_repeated_points() -> None:
    start = 0.5
    end = math.nextafter(math.nextafter(start, 0.0), 0.0)  # two ulps below
    grid = timesteps(VPSchedule.linear(), 10, "uniform", t_start=start, t_end=end)
    assert grid.tolist() == [start, math.nextafter(start, 0.0), end]


# ---------------------------------------------------------------------------------------------------------------
# User grids


@given(
    name=st.sampled_from(sorted(SCHEDULES)),
    fracs=st.lists(st.floats(0.0, 1.0), min_size=2, max_size=30, unique=True),
    increasing=st.booleans(),
)
def test_user_times_round_trip(name: str, fracs: list[float], increasing: bool) -> None:
    schedule = SCHEDULES[name]
    lo, hi = schedule.time_range
    values = sorted({lo + f * (hi - lo) for f in fracs}, reverse=not increasing)
    assume(len(values) >= 2)
    grid = timesteps(schedule, times=values)
    assert grid.tolist() == sorted(values, reverse=True)
    assert torch.equal(timesteps(schedule, len(values) - 1, times=torch.tensor(values, dtype=F64)), grid)


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_user_sigmas_map_to_times(name: str) -> None:
    schedule = SCHEDULES[name]
    lo, hi = schedule.time_range
    t = torch.linspace(hi, lo, 9, dtype=F64)
    rho = torch.exp(-schedule.half_log_snr(t))  # inf where alpha = 0, 0 where sigma = 0
    grid = timesteps(schedule, sigmas=rho)
    assert grid[0] == hi and grid[-1] == lo
    assert torch.allclose(grid, t, rtol=1e-9, atol=1e-12 * (hi - lo))
    assert torch.equal(timesteps(schedule, sigmas=rho.flip(0)), grid)


def test_user_grid_errors() -> None:
    schedule = VPSchedule.linear()
    with pytest.raises(ValueError, match="strictly monotone"):
        timesteps(schedule, times=[1.0, 0.5, 0.7])
    with pytest.raises(ValueError, match="strictly monotone"):
        timesteps(schedule, times=[1.0, 0.5, 0.5])
    with pytest.raises(ValueError, match="outside the time range"):
        timesteps(schedule, times=[1.5, 0.5])
    with pytest.raises(ValueError, match="outside"):
        timesteps(VESchedule(), sigmas=[100.0, 1.0])
    with pytest.raises(ValueError, match=">= 0"):
        timesteps(EDMSchedule(), sigmas=[1.0, -1.0])
    with pytest.raises(ValueError, match="not both"):
        timesteps(schedule, times=[1.0, 0.5], sigmas=[1.0, 0.5])
    with pytest.raises(ValueError, match="cannot be combined"):
        timesteps(schedule, spacing="uniform", times=[1.0, 0.5])
    with pytest.raises(ValueError, match="cannot be combined"):
        timesteps(schedule, t_end=0.1, times=[1.0, 0.5])
    with pytest.raises(ValueError, match="does not match"):
        timesteps(schedule, 3, times=[1.0, 0.5])
    with pytest.raises(ValueError, match="at least two"):
        timesteps(schedule, times=[1.0])


# ---------------------------------------------------------------------------------------------------------------
# Errors


def test_argument_errors() -> None:
    schedule = VPSchedule.linear()
    for bad in (0, -3, 1.5, True):
        with pytest.raises(ValueError, match="n must"):
            timesteps(schedule, bad, "uniform")
    with pytest.raises(ValueError, match="n, the number of steps"):
        timesteps(schedule)
    with pytest.raises(ValueError, match="unknown spacing 'cosine'") as info:
        timesteps(schedule, 5, "cosine")
    assert all(repr(s) in str(info.value) for s in SPACINGS)
    with pytest.raises(ValueError, match="t_start = 1.5 is outside"):
        timesteps(schedule, 5, "uniform", t_start=1.5)
    with pytest.raises(ValueError, match="t_end = -0.1 is outside"):
        timesteps(schedule, 5, "uniform", t_end=-0.1)
    with pytest.raises(ValueError, match="greater than t_end"):
        timesteps(schedule, 5, "uniform", t_start=0.3, t_end=0.3)
    with pytest.raises(ValueError, match="power must be"):
        timesteps(schedule, 5, "power", power=0.0)
    with pytest.raises(ValueError, match="rho must be"):
        timesteps(schedule, 5, "karras", rho=-1.0)
    with pytest.raises(ValueError, match="needs num_train_timesteps"):
        timesteps(schedule, 5, "trailing")
    with pytest.raises(ValueError, match="fixes the first time"):
        timesteps(VPSchedule.diffusers(), 5, "trailing", t_start=900.0)
    with pytest.raises(ValueError, match="lies above the last"):
        timesteps(VPSchedule.diffusers(), 5, "trailing", t_end=500.0)
    with pytest.raises(TypeError, match="NoiseSchedule"):
        timesteps("linear", 5)  # type: ignore[arg-type]
    # The diffusers spacings run on a continuous schedule only when the integer timesteps lie in its range.
    with pytest.raises(ValueError, match="outside the time range"):
        timesteps(schedule, 5, "linspace", num_train_timesteps=1000)


def test_diffusers_spacing_with_t_end_inside_the_range() -> None:
    grid = timesteps(VPSchedule.diffusers(), 4, "trailing", t_end=10.0)
    assert grid.tolist() == [999.0, 749.0, 499.0, 249.0, 10.0]
    grid = timesteps(VPSchedule.diffusers(), 4, "linspace", t_end=250.0)  # equal to the last timestep: not repeated
    assert grid.tolist() == [999.0, 749.0, 500.0, 250.0]


def test_default_spacing_is_power_and_karras_for_edm() -> None:
    # EDM's time is the noise level itself: its default is Karras' grid (benchmarks/family.py), the others' quadratic
    edm = EDMSchedule()
    assert torch.equal(timesteps(edm, 6), timesteps(edm, 6, "karras"))
    assert not torch.equal(timesteps(edm, 6), timesteps(edm, 6, "power"))
    vp = VPSchedule.linear()
    assert torch.equal(timesteps(vp, 6), timesteps(vp, 6, "power"))


def test_sigma_ramps_follow_their_formulas():
    import numpy as np
    import scipy.stats

    from deis_ode.diffusion.grids import sigma_ramp

    lo, hi, n = 0.03, 14.6, 9
    karras = sigma_ramp("karras", lo, hi, n)
    assert karras[0] == pytest.approx(hi) and karras[-1] == pytest.approx(lo)
    assert np.allclose(np.diff(karras ** (1 / 7)), (lo ** (1 / 7) - hi ** (1 / 7)) / (n - 1))
    exponential = sigma_ramp("exponential", lo, hi, n)
    assert np.allclose(np.diff(np.log(exponential)), (np.log(lo) - np.log(hi)) / (n - 1))
    beta = sigma_ramp("beta", lo, hi, n)
    quantiles = (beta - lo) / (hi - lo)
    assert np.allclose(scipy.stats.beta.cdf(quantiles, 0.6, 0.6), 1 - np.linspace(0, 1, n), atol=1e-12)
    with pytest.raises(ValueError, match="unknown sigma ramp"):
        sigma_ramp("linear", lo, hi, n)
