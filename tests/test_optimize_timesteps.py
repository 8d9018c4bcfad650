"""optimize_timesteps: deterministic, a valid grid with the requested ends, strictly better than the default grid on
its calibration problem, clear errors for bad input, and a result that the scheduler and timesteps() accept."""

import json
import math

import pytest
import torch
import torchdiffeq

from deis_ode import reference
from deis_ode.diffusion import (
    VPODE,
    DiffusionODE,
    FlowSchedule,
    GaussianMixture,
    GaussianMixtureEps,
    VPSchedule,
    optimize_timesteps,
    timesteps,
)

F64 = torch.float64
MIXTURE = GaussianMixture(
    torch.tensor([[2.0, 0.0], [-1.0, 1.5], [-1.0, -1.5]], dtype=F64),
    torch.tensor([0.1, 0.2, 0.15], dtype=F64),
    torch.tensor([1.0, 2.0, 1.0], dtype=F64),
)
FAST = {"candidates": 24, "teacher_substeps": 3, "refine_sweeps": 2}


def _problem():
    schedule = VPSchedule.linear()
    ode = VPODE(GaussianMixtureEps(MIXTURE, schedule), schedule)
    x = torch.randn(16, 2, generator=torch.Generator().manual_seed(3), dtype=F64)
    return schedule, ode, x


def test_deterministic_monotone_with_the_requested_ends():
    schedule, ode, x = _problem()
    first = optimize_timesteps(ode, x, 4, t_end=1e-3, **FAST)
    second = optimize_timesteps(ode, x.clone(), 4, t_end=1e-3, **FAST)
    assert torch.equal(first, second)
    assert first.dtype == F64 and first.shape == (5,)
    assert float(first[0]) == 1.0 and float(first[-1]) == 1e-3
    assert bool((first[1:] < first[:-1]).all())


def test_strictly_better_than_the_default_grid_on_the_calibration_batch():
    schedule, ode, x = _problem()
    grid, info = optimize_timesteps(ode, x, 4, t_end=1e-3, return_info=True, **FAST)
    lam = schedule.half_log_snr(torch.tensor([1.0, 1e-3], dtype=F64))
    ref = reference.solve(reference.InHalfLogSNR(ode), x, lam, rtol=1e-10, atol=1e-10).states[-1]

    def error(t):
        return float((torchdiffeq.odeint(ode, x, t, method="deis3")[-1] - ref).norm(dim=-1).mean())

    default = error(timesteps(schedule, 4, t_end=1e-3))
    assert error(grid) < 0.8 * default
    # the cost is reported: the teacher's evaluations plus n per solve
    assert info.teacher_evaluations >= FAST["candidates"] * FAST["teacher_substeps"]
    assert info.model_evaluations == info.teacher_evaluations + 4 * info.solves
    assert info.objective <= info.objectives["power 2"] and info.seconds > 0.0


def test_flow_schedule_from_pure_noise_with_a_data_prediction():
    schedule = FlowSchedule()

    def x0_model(x, t):  # the posterior mean: finite at alpha = 0 and at sigma = 0
        alpha, sigma = schedule.alpha(t.to(F64)), schedule.sigma(t.to(F64))
        resp = MIXTURE.component_posterior(x, alpha, sigma)
        var = alpha**2 * MIXTURE.stds**2 + sigma**2
        gain = (alpha * MIXTURE.stds**2 / var)[:, None]
        means = MIXTURE.means + gain * (x[..., None, :] - alpha * MIXTURE.means)
        return (resp[..., None] * means).sum(-2).to(x.dtype)

    ode = DiffusionODE(x0_model, schedule, prediction="x0")
    x = torch.randn(8, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    grid = optimize_timesteps(ode, x, 3, **FAST)
    assert float(grid[0]) == 1.0 and float(grid[-1]) == 0.0 and bool((grid[1:] < grid[:-1]).all())
    out = torchdiffeq.odeint(ode, x, grid, method="deis3")[-1]
    assert bool(torch.isfinite(out).all())


def test_round_trips_into_timesteps_json_and_the_scheduler():
    pytest.importorskip("diffusers")
    from deis_ode.scheduler import DEISMultistepScheduler

    schedule = VPSchedule.diffusers()
    ode = VPODE(GaussianMixtureEps(MIXTURE, schedule), schedule)
    x = torch.randn(8, 2, generator=torch.Generator().manual_seed(1), dtype=F64)
    grid = optimize_timesteps(ode, x, 5, **FAST)
    assert float(grid[0]) == 999.0 and float(grid[-1]) == 0.0
    saved = json.loads(json.dumps(grid.tolist()))
    assert torch.equal(timesteps(schedule, times=saved), grid)
    scheduler = DEISMultistepScheduler(solver_order=3, final_sigmas_type="sigma_min")
    rho = (schedule.sigma(grid) / schedule.alpha(grid)).tolist()
    scheduler.set_timesteps(sigmas=rho[:-1], timesteps=saved[:-1])
    assert len(scheduler.timesteps) == 5
    assert scheduler.timesteps.to(F64).tolist() == pytest.approx(saved[:-1])
    # float32 levels (as diffusers); the last is the float32 training level of t = 0 (8e-5 off)
    assert scheduler.sigmas.to(F64).tolist() == pytest.approx(rho, rel=2e-4)


def test_bad_input_is_rejected_with_the_argument_named():
    schedule, ode, x = _problem()
    with pytest.raises(ValueError, match="n must be >= 1"):
        optimize_timesteps(ode, x, 0)
    with pytest.raises(ValueError, match="t_end = 2.0 lies outside"):
        optimize_timesteps(ode, x, 3, t_end=2.0)
    with pytest.raises(ValueError, match="t_start must be greater than t_end"):
        optimize_timesteps(ode, x, 3, t_start=0.5, t_end=0.6)
    with pytest.raises(ValueError, match="candidates must be >= 5"):
        optimize_timesteps(ode, x, 5, candidates=4)
    with pytest.raises(ValueError, match="shaped as the model expects"):
        optimize_timesteps(ode, torch.randn(4, 3, dtype=F64), 3, **FAST)
    with pytest.raises(ValueError, match="non-empty batch"):
        optimize_timesteps(ode, torch.zeros(0, 2, dtype=F64), 3)
    with pytest.raises(ValueError, match="finite"):
        optimize_timesteps(ode, torch.full((2, 2), math.nan, dtype=F64), 3)
    with pytest.raises(TypeError, match="DiffusionODE"):
        optimize_timesteps(lambda t, y: y, x, 3)
