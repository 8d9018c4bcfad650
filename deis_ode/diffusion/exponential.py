r"""The exponential form of a diffusion model's ODE or SDE, built in one place.

For the forward process ``x_t = alpha_t x_0 + sigma_t eps`` (half log-SNR ``lambda = log(alpha / sigma)``) the
reverse-time family with stochasticity ``eta >= 0`` (``eta = 0``: the probability-flow ODE) is semi-linear in either
prediction, with ``nu = 1 + eta^2``:

* eps split:  ``Phi(t, s) = alpha_t / alpha_s``; ``Phi(t, tau) W(tau) dtau = nu alpha_t d[exp(-lambda(tau))]``;
* x0 split:   ``Phi(t, s) = (sigma_t / sigma_s) exp(-eta^2 (lambda_t - lambda_s))``;
  ``Phi(t, tau) W(tau) dtau = sigma_t e^{-eta^2 lambda_t} d[exp(nu lambda(tau))]``.

Both are a :class:`~deis_ode.forms.DiffusionForm` ``m(t) d[exp(sign lambda)]``. :func:`diffusion_form` builds it from
the schedule for the drifts (:class:`~deis_ode.diffusion.DiffusionODE`), both SDEs, the paper's eps-split variants and
the solvers, in the schedule's time or in the solver time ``s = -t`` of the reverse SDE (time reversal is handled
here and nowhere else). Every function of time, the schedule's breakpoints and its inverse ``t(lambda)`` are carried
over, and the form's ``cache_key`` names what defines it, so that solvers reuse coefficients across solves.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..forms import DiffusionForm
from .schedules import NoiseSchedule, as_float64

__all__ = ["EXTRAPOLATE_TYPES", "diffusion_form"]

EXTRAPOLATE_TYPES: tuple[str, ...] = ("eps", "x0")
"""The predictions a diffusion ODE can extrapolate (its split)."""


def diffusion_form(
    schedule: NoiseSchedule, extrapolate: str, eta: float = 0.0, *, solver_time: bool = False
) -> DiffusionForm:
    r"""The exponential form of the diffusion ODE (``eta = 0``) or reverse SDE (``eta > 0``) of ``schedule``.

    Args:
        schedule: the noise schedule.
        extrapolate: ``"eps"`` or ``"x0"``: the prediction that is the nonlinear part (the split).
        eta: the stochasticity ``>= 0`` of the reverse SDE; ``0`` is the probability-flow ODE.
        solver_time: describe the form in the solver time ``s = -t`` (increasing while ``t`` decreases), as the
            reverse SDE's torchsde convention needs; otherwise in the schedule's time ``t``.

    With ``eta = 0`` the eps split has ``m = alpha``, ``c = sigma``, ``sign = -1`` and the x0 split ``m = sigma``,
    ``c = alpha``, ``sign = +1``; with ``eta > 0`` see the module docstring.
    """
    if extrapolate not in EXTRAPOLATE_TYPES:
        raise ValueError(f"extrapolate must be one of {EXTRAPOLATE_TYPES}, got {extrapolate!r}")
    eta = float(eta)
    if not (math.isfinite(eta) and eta >= 0.0):
        raise ValueError(f"eta must be a finite number >= 0, got {eta}")
    eta2 = eta * eta
    if extrapolate == "x0":
        log_cofactor = schedule.log_alpha
        if eta2 == 0.0:  # exactly the ODE's form (and no 0 * inf where lambda is infinite)
            log_scale, sign = schedule.log_sigma, 1

        else:
            sign = 1.0 + eta2

            def log_scale(t: Tensor) -> Tensor:
                return schedule.log_sigma(t) - eta2 * schedule.half_log_snr(t)

    else:
        sign = -1
        if eta2 == 0.0:
            log_scale, log_cofactor = schedule.log_alpha, schedule.log_sigma
        else:
            log_nu = math.log1p(eta2)

            def log_scale(t: Tensor) -> Tensor:
                return schedule.log_alpha(t) + log_nu

            def log_cofactor(t: Tensor) -> Tensor:
                return schedule.log_sigma(t) + log_nu

    key = (schedule, extrapolate, eta2, solver_time)
    if not solver_time:
        return DiffusionForm(
            log_scale=log_scale,
            log_cofactor=log_cofactor,
            sign=sign,
            half_log_snr=schedule.half_log_snr,
            d_half_log_snr=schedule.d_half_log_snr,
            time_range=schedule.time_range,
            t_of_half_log_snr=schedule.t_of_half_log_snr,
            breakpoints=schedule.breakpoints,
            cache_key=key,
        )
    lo, hi = schedule.time_range
    breakpoints = schedule.breakpoints
    return DiffusionForm(
        log_scale=_reversed(log_scale),
        log_cofactor=_reversed(log_cofactor),
        sign=sign,
        half_log_snr=_reversed(schedule.half_log_snr),
        d_half_log_snr=lambda s: -schedule.d_half_log_snr(-as_float64(s)),
        time_range=(-hi, -lo),
        t_of_half_log_snr=lambda lam: -schedule.t_of_half_log_snr(lam),
        breakpoints=None if breakpoints is None else -torch.flip(breakpoints, (0,)),
        cache_key=key,
    )


def _reversed(fn):
    """``s -> fn(-s)`` in float64."""
    return lambda s: fn(-as_float64(s))
