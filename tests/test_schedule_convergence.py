"""Every schedule x model output x split converges at the method's order to the scipy reference, on an analytic
Gaussian-mixture problem (the model's output of each kind is built from the exact score by its definition)."""

import math

import pytest
import torch
import torchdiffeq
from torch import nn

from deis_ode import DiffusionODE, EDMSchedule, FlowSchedule, VESchedule, VPSchedule, reference
from deis_ode.diffusion import GaussianMixture

F64 = torch.float64
SCHEDULES = {
    "vp-linear": VPSchedule.linear(),
    "vp-cosine": VPSchedule.cosine(),
    "vp-discrete": VPSchedule.diffusers(),
    "ve": VESchedule(0.01, 50.0),
    "edm": EDMSchedule(),
    "flow": FlowSchedule(shift=3.0),
}
PREDICTIONS = ("eps", "x0", "v", "score", "flow")
MIXTURE = GaussianMixture.default(dim=3, n_modes=3)


class ExactModel(nn.Module):
    """Outputs the prediction of the given kind, exactly, for the noised marginals of ``MIXTURE``."""

    def __init__(self, schedule, prediction):
        super().__init__()
        self.schedule, self.prediction = schedule, prediction

    def forward(self, x, t):
        t = t.to(F64)
        a, s = self.schedule.alpha(t), self.schedule.sigma(t)
        score = MIXTURE.score(x.to(F64), a, s)
        eps, x0 = -s * score, (x + s**2 * score) / a
        out = {
            "eps": eps,
            "x0": x0,
            "score": score,
            "v": a * eps - s * x0,
            "flow": self.schedule.d_alpha(t) * x0 + self.schedule.d_sigma(t) * eps,
        }[self.prediction]
        return out.to(x.dtype)


LAMBDAS = (-2.5, 2.0)  # from noisy to fairly clean: a range every schedule covers
STEPS = (48, 96)  # asymptotic for every case (at 12 -> 24 steps the eps split still shows 2.4)


@pytest.fixture(scope="module")
def references():
    x_start = torch.randn(4, 3, generator=torch.Generator().manual_seed(3), dtype=F64)
    refs = {}
    for name, schedule in SCHEDULES.items():
        ode = DiffusionODE(ExactModel(schedule, "eps"), schedule, prediction="eps")
        lam = torch.tensor(LAMBDAS, dtype=F64)
        refs[name] = reference.solve(
            reference.InHalfLogSNR(ode),
            x_start * schedule.sigma(schedule.t_of_half_log_snr(lam[0])),
            lam,
            rtol=1e-12,
            atol=1e-12,
        )
    return x_start, refs


@pytest.mark.parametrize("split", ["eps", "x0"])
@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("name", list(SCHEDULES))
def test_deis3_converges_at_order_three(references, name, prediction, split):
    schedule = SCHEDULES[name]
    x_start, refs = references
    ode = DiffusionODE(ExactModel(schedule, prediction), schedule, prediction=prediction, extrapolate=split)
    errors = []
    for n in STEPS:
        grid = schedule.t_of_half_log_snr(torch.linspace(*LAMBDAS, n + 1, dtype=F64))  # uniform in log-SNR
        out = torchdiffeq.odeint(
            ode, refs[name].states[0], grid, method="deis3", options={"basis": "logrho", "warmup": "full_order"}
        )
        errors.append(float((out[-1] - refs[name].states[-1]).abs().max()))
    slope = math.log2(errors[0] / errors[1])
    assert min(errors) > 1e-10, errors
    assert abs(slope - 3) < 0.3, (errors, slope)
