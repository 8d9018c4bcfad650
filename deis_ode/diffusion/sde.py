r"""The forward and reverse-time SDEs of a diffusion model, as torchsde modules.

Forward process (``t`` increasing, ``x_t = alpha_t x_0 + sigma_t eps`` in distribution):

    dx = f(t) x dt + g(t) dW,   f = d log alpha / dt,   g^2 = d sigma^2 / dt - 2 f sigma^2 = -2 sigma^2 d lambda / dt

(``lambda = log(alpha / sigma)``). The reverse-time family with stochasticity ``eta >= 0`` (``t`` decreasing) has the
same marginals ``p_t`` for every ``eta``:

    dx = [f x - (1 + eta^2) / 2 g^2 score(x, t)] dt + eta g dW_bar,      score = -eps / sigma.

``eta = 0`` is the probability-flow ODE, ``eta = 1`` the reverse SDE of Anderson / Song et al. With the noise
prediction ``eps`` or the data prediction ``x0 = (x - sigma eps) / alpha`` it is semi-linear, ``nu = 1 + eta^2``:

* eps split:  ``dx = (d log alpha / dt) x dt - nu sigma lambda' eps dt + eta g dW_bar``;
* x0 split:   ``dx = (d log sigma / dt - eta^2 lambda') x dt + nu alpha lambda' x0 dt + eta g dW_bar``.

Both linear parts integrate exactly (the transition is ``alpha_t / alpha_s``, resp.
``(sigma_t / sigma_s) exp(-eta^2 (lambda_t - lambda_s))``), and so does the injected noise: over a step from ``s`` to
``t`` with ``h = lambda_t - lambda_s > 0`` it is a centred Gaussian of variance

* eps split: ``eta^2 alpha_t^2 (rho_s^2 - rho_t^2) = eta^2 sigma_t^2 (e^{2h} - 1)``,
* x0 split:  ``sigma_t^2 (1 - e^{-2 eta^2 h})``.

The derivation is in ``docs/stochastic.md``. :class:`ReverseDiffusionSDE` describes the extrapolated term as a
:class:`~deis_ode.forms.DiffusionForm` (the x0 split with ``sign = nu``, the eps split with ``m`` scaled by ``nu``), so
the exponential multistep engine computes its coefficients exactly as for the ODE (see
:mod:`deis_ode.solvers.stochastic`).

torchsde needs increasing times and states of shape ``(batch, channels)``: :class:`ReverseDiffusionSDE` runs in the
solver time ``s = -t`` (pass ``ts = -t``), and its option ``shape`` lets the model see its own shape.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from ..forms import DiffusionForm
from .exponential import diffusion_form
from .schedules import NoiseSchedule, VPSchedule, as_float64

if TYPE_CHECKING:
    from .drift import DiffusionODE

__all__ = ["ForwardDiffusionSDE", "ReverseDiffusionSDE", "add_noise", "diffusion_squared"]


def diffusion_squared(schedule: NoiseSchedule, t: Tensor | float) -> Tensor:
    r"""``g(t)^2 = d sigma^2 / dt - 2 (d log alpha / dt) sigma^2 = -2 sigma^2 d lambda / dt`` in float64.

    For a :class:`~deis_ode.diffusion.VPSchedule` this is ``-2 d log alpha / dt = beta(t)``, exact at ``t = 0``;
    otherwise ``2 sigma (sigma' - sigma d log alpha / dt)``, taken as 0 where ``sigma = 0`` (EDM, flow at ``t = 0``).
    """
    t = as_float64(t)
    if isinstance(schedule, VPSchedule):
        return -2.0 * schedule.d_log_alpha(t)
    sigma = schedule.sigma(t)
    g2 = 2.0 * sigma * (schedule.d_sigma(t) - sigma * schedule.d_log_alpha(t))
    return torch.where(sigma == 0.0, torch.zeros_like(g2), g2)


def add_noise(
    schedule: NoiseSchedule,
    x0: Tensor,
    t: Tensor | float,
    noise: Tensor | None = None,
    *,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""A draw of the forward process: ``x_t = alpha_t x0 + sigma_t noise`` with ``noise ~ N(0, I)``.

    Args:
        schedule: the noise schedule.
        x0: clean data, any shape; the first dimension is the batch when ``t`` has one time per sample.
        t: a single time (number or 0-dim tensor), or a 1-D tensor of ``x0.shape[0]`` times, one per sample.
        noise: the standard normal noise (``x0``'s shape); drawn with ``generator`` (or the global generator)
            when ``None``.
        generator: a ``torch.Generator`` on ``x0``'s device, for reproducible noise.

    Returns:
        ``x_t`` in ``x0``'s dtype and device; ``alpha_t`` and ``sigma_t`` are computed in float64.
    """
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device)
    elif noise.shape != x0.shape:
        raise ValueError(f"noise has shape {tuple(noise.shape)}; expected x0's shape {tuple(x0.shape)}")
    t = as_float64(t)
    schedule.check_times(t)
    if t.dim() == 1 and x0.dim() >= 1 and t.numel() == x0.shape[0]:
        t = t.reshape(-1, *([1] * (x0.dim() - 1)))
    elif t.numel() != 1:
        raise ValueError(
            f"t must be one time or one time per sample ({x0.shape[0] if x0.dim() else 1}), got shape {tuple(t.shape)}"
        )
    else:
        t = t.reshape(())
    alpha = schedule.alpha(t).to(device=x0.device, dtype=x0.dtype)
    sigma = schedule.sigma(t).to(device=x0.device, dtype=x0.dtype)
    return alpha * x0 + sigma * noise


class ForwardDiffusionSDE(nn.Module):
    r"""The forward (noising) SDE ``dx = f(t) x dt + g(t) dW`` as a torchsde module (Itô, diagonal noise).

    ``torchsde.sdeint(sde, x0, ts, ...)`` with ``ts`` increasing in the schedule's time and ``x0`` of shape
    ``(batch, channels)`` draws paths whose marginal at ``t`` is that of :func:`add_noise`.
    """

    noise_type = "diagonal"
    sde_type = "ito"

    def __init__(self, schedule: NoiseSchedule) -> None:
        super().__init__()
        if not isinstance(schedule, NoiseSchedule):
            raise TypeError(f"schedule must be a NoiseSchedule, got {type(schedule).__name__}")
        self.schedule = schedule

    def extra_repr(self) -> str:
        return f"schedule={self.schedule!r}"

    def f(self, t: Tensor, y: Tensor) -> Tensor:
        """The drift ``(d log alpha / dt) y``."""
        return self.schedule.d_log_alpha(as_float64(t)).to(device=y.device, dtype=y.dtype) * y

    def g(self, t: Tensor, y: Tensor) -> Tensor:
        """The diagonal diffusion ``g(t)``, broadcast to ``y``'s shape."""
        g = torch.sqrt(diffusion_squared(self.schedule, t)).to(device=y.device, dtype=y.dtype)
        return g.expand_as(y)

    def add_noise(
        self, x0: Tensor, t: Tensor | float, noise: Tensor | None = None, *, generator: torch.Generator | None = None
    ) -> Tensor:
        """:func:`add_noise` with this SDE's schedule."""
        return add_noise(self.schedule, x0, t, noise, generator=generator)


class ReverseDiffusionSDE(nn.Module):
    r"""The reverse-time SDE family of a diffusion drift with stochasticity ``eta``, in the solver time ``s = -t``.

    ``dx = -[f x - (1 + eta^2) / 2 g^2 score] ds + eta g dW_s`` at ``t = -s`` (Itô, diagonal noise): ``eta = 0`` is
    the probability-flow ODE of ``drift``, ``eta = 1`` the standard reverse SDE.

    * For torchsde: ``torchsde.sdeint(sde, x_T, -t, bm=bm, method="euler")`` with ``t`` the decreasing diffusion
      times and ``x_T`` of shape ``(batch, channels)``.
    * For the stochastic exponential integrator: ``deis_ode.sdeint(sde, x_T, -t, bm=bm, method="deis2")`` (same
      call, same Brownian path; any state shape).

    Args:
        drift: the :class:`~deis_ode.diffusion.DiffusionODE` (model, schedule, prediction, split, thresholding). Its
            ``extrapolate`` decides which prediction the stochastic integrator extrapolates: ``"x0"`` (its first-order
            method is DDIM with ``eta``) or ``"eps"``.
        eta: the stochasticity, ``>= 0``.
        shape: the model's per-sample shape; states are then ``(batch, prod(shape))`` (as torchsde requires) and are
            reshaped to ``(batch, *shape)`` for the model. ``None``: the model takes the state as it is.

    The exponential integrator reads :meth:`exponential_form`, :meth:`noise_variance` and :meth:`nonlinear_part`.
    """

    noise_type = "diagonal"
    sde_type = "ito"

    def __init__(self, drift: DiffusionODE, eta: float = 1.0, *, shape: Sequence[int] | None = None) -> None:
        super().__init__()
        from .drift import DiffusionODE  # drift.py imports this module for DiffusionODE.reverse_sde

        if not isinstance(drift, DiffusionODE):
            raise TypeError(f"drift must be a DiffusionODE (VPODE, VEODE, ...), got {type(drift).__name__}")
        eta = float(eta)
        if not (math.isfinite(eta) and eta >= 0.0):
            raise ValueError(f"eta must be a finite number >= 0, got {eta}")
        self.drift = drift
        self.eta = eta
        self.shape = None if shape is None else tuple(int(n) for n in shape)

    def extra_repr(self) -> str:
        text = f"eta={self.eta!r}"
        return text + (f", shape={self.shape!r}" if self.shape is not None else "")

    @property
    def schedule(self) -> NoiseSchedule:
        return self.drift.schedule

    @staticmethod
    def solver_time(t: Tensor | float) -> Tensor:
        """The solver time ``s = -t`` of the diffusion time ``t`` (what ``ts`` holds)."""
        return -torch.as_tensor(t)

    # --- coefficients in the diffusion time t, float64 --------------------------------------------------------

    def _linear(self, t: Tensor) -> Tensor:
        """``L(t)``: ``d log alpha / dt`` (eps split) or ``d log sigma / dt - eta^2 lambda'`` (x0 split)."""
        linear = self.drift._linear(t)
        if self.drift.extrapolate == "x0" and self.eta != 0.0:
            linear = linear - self.eta**2 * self.schedule.d_half_log_snr(t)
        return linear

    def _weight(self, t: Tensor) -> Tensor:
        """``W(t) = (1 + eta^2)`` times the probability-flow weight of the drift's split."""
        return (1.0 + self.eta**2) * self.drift._weight(t)

    # --- torchsde ---------------------------------------------------------------------------------------------

    def nonlinear_part(self, s: Tensor, y: Tensor) -> Tensor:
        """``N`` (the drift's eps or x0 prediction, thresholded if the drift says so) at ``t = -s``."""
        t = -torch.as_tensor(s)
        if self.shape is None:
            return self.drift.nonlinear_part(t, y)
        out = self.drift.nonlinear_part(t, y.reshape(y.shape[0], *self.shape))
        return out.reshape(y.shape)

    def f(self, s: Tensor, y: Tensor) -> Tensor:
        """The drift in ``s``: ``-(L(t) y + W(t) N(t, y))`` at ``t = -s`` (one model call)."""
        t = -as_float64(s)
        linear = self._linear(t).to(device=y.device, dtype=y.dtype)
        weight = self._weight(t).to(device=y.device, dtype=y.dtype)
        return -(linear * y + weight * self.nonlinear_part(s, y))

    def g(self, s: Tensor, y: Tensor) -> Tensor:
        """The diagonal diffusion ``eta g(t)`` at ``t = -s``, broadcast to ``y``'s shape."""
        g = self.eta * torch.sqrt(diffusion_squared(self.schedule, -as_float64(s)))
        return g.to(device=y.device, dtype=y.dtype).expand_as(y)

    # --- what the stochastic exponential integrator reads ----------------------------------------------------

    def check_grid(self, s: Tensor) -> None:
        """``ValueError`` if the drift's split cannot be integrated over the solver times ``s`` (see
        :meth:`DiffusionODE.check_grid <deis_ode.diffusion.DiffusionODE.check_grid>`)."""
        self.drift.check_grid(-as_float64(s))

    def exponential_form(self) -> DiffusionForm:
        r"""The extrapolated term in the solver time ``s``: ``Phi(s_b, s) W ds = m(s_b) d[exp(sign lambda)]`` with

        * eps split: ``m = nu alpha``, ``c = nu sigma``, ``sign = -1`` (``Phi = alpha_b / alpha_a``);
        * x0 split: ``m = sigma exp(-eta^2 lambda)``, ``c = alpha``, ``sign = nu = 1 + eta^2``
          (``Phi = (sigma_b / sigma_a) exp(-eta^2 (lambda_b - lambda_a))``),

        built by :func:`~deis_ode.diffusion.exponential.diffusion_form`. With ``eta = 0`` both are the drift's own
        form (in ``s``), so the integrator is the ODE method.
        """
        return diffusion_form(self.schedule, self.drift.extrapolate, self.eta, solver_time=True)

    def noise_variance(self, s_a: Tensor | float, s_b: Tensor | float) -> Tensor:
        r"""The exact variance of the noise injected over a step from ``s_a`` to ``s_b > s_a`` (float64):
        ``int Phi(s_b, s)^2 eta^2 g^2 ds``, which is, with ``h = lambda_b - lambda_a``,

        * eps split: ``eta^2 alpha_b^2 rho_a^2 (1 - e^{-2h})``,
        * x0 split: ``sigma_b^2 (1 - e^{-2 eta^2 h})``.
        """
        t = -torch.stack([as_float64(s_a).reshape(()), as_float64(s_b).reshape(())])
        if self.eta == 0.0:
            return torch.zeros((), dtype=torch.float64)
        schedule = self.schedule
        lam_a, lam_b = schedule.half_log_snr(t).unbind()
        h = lam_b - lam_a
        eta2 = self.eta**2
        if self.drift.extrapolate == "x0":
            return -torch.exp(2.0 * schedule.log_sigma(t[1])) * torch.expm1(-2.0 * eta2 * h)
        return -eta2 * torch.exp(2.0 * (schedule.log_alpha(t[1]) - lam_a)) * torch.expm1(-2.0 * h)
