"""Flow matching acceptance: sampling a point mass with its exact velocity model from pure noise (t = 1, alpha = 0)
to data (t = 0, sigma = 0), and the check that the eps split is refused where alpha = 0.

For data ``x0 = c`` (a point mass) the rectified-flow path is ``x_t = (1 - sigma_t) c + sigma_t eps``. Eliminating
``eps = (x - (1 - sigma) c) / sigma`` from the velocity ``dx/dt = sigma'(t) (eps - c)`` gives the exact model

    u(x, t) = sigma'(t) (x - c) / sigma(t)         (= (x - c) / t without shift),

finite on ``(0, 1]``, equal to ``x - c`` at ``t = 1``, and tending to ``sigma'(0) eps`` along the path as ``t -> 0``.
Its data prediction is exactly ``c`` at every ``(x, t)``, so every ``deis*`` method on the x0 split is exact, and the
exact ODE solution is ``x_t = (1 - sigma_t) c + sigma_t x_1``.
"""

from __future__ import annotations

import pytest
import torch
import torchdiffeq

import deis_ode  # noqa: F401  (registers the deis* methods)
from deis_ode import DiffusionODE, FlowSchedule
from deis_ode.diffusion import timesteps, to_x0

F64 = torch.float64
C = torch.tensor([0.3, -1.2, 2.0, 0.0], dtype=F64)


def point_mass_velocity(schedule: FlowSchedule, c: torch.Tensor):
    """The exact "flow" model of the point mass ``c``: ``u(x, t) = sigma'(t) (x - c) / sigma(t)``."""

    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t64 = t.to(F64)
        scale = (schedule.d_sigma(t64) / schedule.sigma(t64)).to(x.dtype)
        return scale * (x - c.to(x.dtype))

    return model


def _noise(batch: int = 6) -> torch.Tensor:
    return torch.randn(batch, C.numel(), dtype=F64, generator=torch.Generator().manual_seed(0))


def test_the_model_is_exact() -> None:
    schedule = FlowSchedule()
    model = point_mass_velocity(schedule, C)
    x1 = _noise()
    for t in (1.0, 0.7, 0.1, 1e-6):
        tt = torch.tensor(t, dtype=F64)
        x = (1.0 - t) * C + t * x1  # on the path, with eps = x1
        u = model(x, tt)
        assert torch.allclose(u, x1 - C, rtol=1e-9, atol=1e-9)  # the rectified-flow velocity eps - x0
        x0 = to_x0(u, x, schedule.alpha(tt), schedule.sigma(tt), "flow", d_alpha=-1.0, d_sigma=1.0)
        assert torch.allclose(x0, C.expand_as(x0), rtol=0, atol=1e-9)


@pytest.mark.parametrize("n", [5, 10])
def test_deis3_samples_a_point_mass_from_pure_noise_to_data(n: int) -> None:
    schedule = FlowSchedule()
    ode = DiffusionODE(point_mass_velocity(schedule, C), schedule, prediction="flow", extrapolate="x0")
    t = timesteps(schedule, n, "uniform")
    assert t[0] == 1.0 and t[-1] == 0.0 and t.numel() == n + 1
    x1 = _noise()
    states = torchdiffeq.odeint(ode, x1, t, method="deis3", options={"basis": "t"})
    assert torch.allclose(states[-1], C.expand_as(x1), rtol=0, atol=1e-6)
    # The whole trajectory is exact: x_t = (1 - t) c + t x_1.
    exact = (1.0 - t)[:, None, None] * C + t[:, None, None] * x1
    assert torch.allclose(states, exact, rtol=0, atol=1e-12)


@pytest.mark.parametrize("method", ["deis1", "deis2", "deis3", "deis4"])
@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("spacing", ["uniform", "logsnr"])
def test_every_method_is_exact_on_a_point_mass(method: str, shift: float, spacing: str) -> None:
    schedule = FlowSchedule(shift)
    ode = DiffusionODE(point_mass_velocity(schedule, C), schedule, prediction="flow", extrapolate="x0")
    t = timesteps(schedule, 8, spacing)
    x1 = _noise()
    states = torchdiffeq.odeint(ode, x1, t, method=method, options={"basis": "t"})
    sigma = schedule.sigma(t)[:, None, None]
    assert torch.allclose(states, (1.0 - sigma) * C + sigma * x1, rtol=0, atol=1e-12)
    assert torch.allclose(states[-1], C.expand_as(x1), rtol=0, atol=1e-12)


def test_float32_state() -> None:
    schedule = FlowSchedule()
    ode = DiffusionODE(point_mass_velocity(schedule, C), schedule, prediction="flow", extrapolate="x0")
    x1 = _noise().float()
    states = torchdiffeq.odeint(
        ode, x1, timesteps(schedule, 10, "uniform").float(), method="deis3", options={"basis": "t"}
    )
    assert states.dtype == torch.float32
    assert torch.allclose(states[-1], C.float().expand_as(x1), rtol=0, atol=1e-5)


def test_check_grid_refuses_the_eps_split_where_alpha_is_zero() -> None:
    schedule = FlowSchedule()
    model = point_mass_velocity(schedule, C)
    grid = timesteps(schedule, 5, "uniform")
    eps_ode = DiffusionODE(model, schedule, prediction="flow", extrapolate="eps")
    with pytest.raises(ValueError, match=r"alpha = 0 at t = 1\.0.*use extrapolate='x0'"):
        eps_ode.check_grid(grid)
    DiffusionODE(model, schedule, prediction="flow", extrapolate="x0").check_grid(grid)
    eps_ode.check_grid(timesteps(schedule, 5, "uniform", t_start=0.99))  # alpha > 0 everywhere: fine
    with pytest.raises(ValueError, match="outside the time range"):
        eps_ode.check_grid(torch.tensor([1.5, 0.5], dtype=F64))


def test_check_grid_accepts_eps_split_on_other_schedules() -> None:
    from deis_ode.diffusion import EDMSchedule, VPSchedule

    model = lambda x, t: torch.zeros_like(x)  # noqa: E731
    for schedule in (VPSchedule.cosine(), VPSchedule.linear(), EDMSchedule()):
        DiffusionODE(model, schedule).check_grid(timesteps(schedule, 10, "logsnr"))
