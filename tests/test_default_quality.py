"""The promise of the diffusion defaults, checked: on diffusers' DDPM schedule with a narrow Gaussian mixture, deis3
with every default at 10 evaluations has at most half the median error of diffusers' DEIS (order 3, default grid)
and no more samples that end in a different mixture component than the reference (benchmarks/accuracy.py)."""

import math

import pytest
import torch
import torchdiffeq

from deis_ode import VPODE, VPSchedule, reference
from deis_ode.diffusion import GaussianMixture, GaussianMixtureEps, timesteps

diffusers = pytest.importorskip("diffusers")
F64 = torch.float64


def test_defaults_beat_diffusers_deis_at_ten_evaluations():
    schedule = VPSchedule.diffusers()
    mixture = GaussianMixture.default(dim=8)
    model = GaussianMixtureEps(mixture, schedule)
    x_start = torch.randn(256, 8, generator=torch.Generator().manual_seed(1), dtype=F64)
    t_start, t_end = 999.0, 0.0  # where diffusers' DEIS starts and the noise level its last step reaches

    lam = schedule.half_log_snr(torch.tensor([t_start, t_end], dtype=F64))
    ref = reference.solve(reference.InHalfLogSNR(VPODE(model, schedule)), x_start, lam, rtol=1e-10, atol=1e-10).states[
        -1
    ]

    ours = torchdiffeq.odeint(
        VPODE(model, schedule), x_start, timesteps(schedule, 10, t_start=t_start, t_end=t_end), method="deis3"
    )[-1]

    scheduler = diffusers.DEISMultistepScheduler(solver_order=3)
    scheduler.set_timesteps(10)
    theirs = x_start.clone()
    for step in scheduler.timesteps:
        theirs = scheduler.step(model(theirs, torch.tensor(float(step), dtype=F64)), step, theirs).prev_sample
    # diffusers keeps its noise levels in float32
    assert float(scheduler.sigmas[-1]) == pytest.approx(float(schedule.sigma(0.0) / schedule.alpha(0.0)), rel=1e-4)

    def median_error(x):
        return float(((x - ref).norm(dim=-1) / ref.norm(dim=-1)).median())

    def wrong(x):
        return int((mixture.classify(x) != mixture.classify(ref)).sum())

    ours_error, theirs_error = median_error(ours), median_error(theirs)
    assert math.isfinite(ours_error)
    assert ours_error <= 0.5 * theirs_error, (ours_error, theirs_error)
    assert wrong(ours) <= wrong(theirs), (wrong(ours), wrong(theirs))
