r"""The probability-flow ODE of a diffusion model as a semi-linear ODE.

For the forward process ``x_t = alpha_t x_0 + sigma_t eps`` the probability-flow ODE is, exactly,
``d(x / alpha) / d rho = eps(x, t)`` with ``rho = sigma / alpha = exp(-lambda)``. In the schedule's time ``t`` it
has two semi-linear splits ``dx/dt = L(t) x + W(t) N(t, x)``:

* extrapolate ``"eps"`` (classic DEIS): ``L = d log alpha / dt``, ``W = alpha d rho / dt = -sigma d lambda / dt``,
  ``N = eps(x, t)``; the transition is ``Phi(t, s) = alpha_t / alpha_s``.
* extrapolate ``"x0"``: ``L = d log sigma / dt``, ``W = alpha d lambda / dt``, ``N = x0(x, t)``; the transition is
  ``Phi(t, s) = sigma_t / sigma_s``.

Both give the same drift ``alpha' x0 + sigma' eps`` (with ``x = alpha x0 + sigma eps``): they differ only in which
prediction the ``deis*`` methods extrapolate by a polynomial. Their exponential description is a
:class:`~deis_ode.forms.DiffusionForm`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..forms import DiffusionForm
from ..semilinear import SemiLinearODE
from .predictions import check_prediction, conversion_coefficients
from .schedules import NoiseSchedule, VESchedule, VPSchedule, as_float64

__all__ = ["DiffusionODE", "VEODE", "VPODE"]

Model = Callable[[Tensor, Tensor], Tensor]

EXTRAPOLATE_TYPES: tuple[str, ...] = ("eps", "x0")


class DiffusionODE(SemiLinearODE):
    r"""The probability-flow ODE of a diffusion model, ``dx/dt = L(t) x + W(t) N(t, x)``.

    Args:
        model: ``model(x, t)``; ``t`` is the schedule's time as a 0-dim tensor of the state's dtype on its device,
            and the output must have ``x``'s shape. An ``nn.Module`` is registered as a submodule.
        schedule: the :class:`~deis_ode.diffusion.NoiseSchedule` the model was trained with.
        prediction: what the model outputs: ``"eps"``, ``"x0"``, ``"v"``, ``"score"`` or ``"flow"``
            (see :mod:`deis_ode.diffusion.predictions`).
        extrapolate: which prediction is the nonlinear part ``N`` that the ``deis*`` methods extrapolate:

            * ``"eps"``: ``L = d log alpha / dt``, ``W = alpha d rho / dt``, ``N = eps`` (DEIS).
            * ``"x0"``: ``L = d log sigma / dt``, ``W = alpha d lambda / dt``, ``N = x0``.

    ``forward(t, x)`` is the full drift, so any torchdiffeq method integrates this object; the ``deis*`` methods
    use :meth:`exponential_form`. ``L`` and ``W`` are computed in float64 and returned in ``t``'s dtype.
    """

    #: Diffusion sampling counts model calls: the lower-order warm-up costs none.
    default_warmup: str = "lower_order"

    def __init__(
        self,
        model: Model,
        schedule: NoiseSchedule,
        prediction: str = "eps",
        extrapolate: str = "eps",
    ) -> None:
        if not callable(model):
            raise TypeError(f"model must be a callable (x, t) -> output, got {type(model).__name__}")
        if not isinstance(schedule, NoiseSchedule):
            raise TypeError(f"schedule must be a NoiseSchedule, got {type(schedule).__name__}")
        check_prediction(prediction)
        if extrapolate not in EXTRAPOLATE_TYPES:
            raise ValueError(f"extrapolate must be one of {EXTRAPOLATE_TYPES}, got {extrapolate!r}")
        super().__init__(
            linear=self._linear,
            nonlinear=self._nonlinear,
            weight=self._weight,
            linear_integral=self._linear_integral,
        )
        self.model = model  # registered as a submodule when it is an nn.Module
        self.schedule = schedule
        self.prediction = prediction
        self.extrapolate = extrapolate

    def extra_repr(self) -> str:
        return f"schedule={self.schedule!r}, prediction={self.prediction!r}, extrapolate={self.extrapolate!r}"

    # --- the semi-linear split --------------------------------------------------------------------------------

    def _log_scale(self, t: Tensor | float) -> Tensor:
        """``log m(t)``: ``log alpha`` (eps split) or ``log sigma`` (x0 split)."""
        return self.schedule.log_alpha(t) if self.extrapolate == "eps" else self.schedule.log_sigma(t)

    def _linear(self, t: Tensor) -> Tensor:
        """``L(t) = d log m / dt``."""
        t = torch.as_tensor(t)
        out = self.schedule.d_log_alpha(t) if self.extrapolate == "eps" else self.schedule.d_log_sigma(t)
        return out.to(_float_dtype(t))

    def _weight(self, t: Tensor) -> Tensor:
        """``W(t) = -sigma d lambda / dt`` (eps split) or ``alpha d lambda / dt`` (x0 split)."""
        t = torch.as_tensor(t)
        schedule = self.schedule
        if self.extrapolate == "eps":
            out = -schedule.sigma(t) * schedule.d_half_log_snr(t)
        else:
            out = schedule.alpha(t) * schedule.d_half_log_snr(t)
        return out.to(_float_dtype(t))

    def _linear_integral(self, t: Tensor, s: Tensor) -> Tensor:
        r"""``\int_s^t L = log m(t) - log m(s)``."""
        t, s = torch.as_tensor(t), torch.as_tensor(s)
        return (self._log_scale(t) - self._log_scale(s)).to(_float_dtype(t))

    def _nonlinear(self, t: Tensor, x: Tensor) -> Tensor:
        """``N(t, x)``: the model's output converted to the extrapolated prediction (eps or x0)."""
        t = torch.as_tensor(t)
        if t.numel() != 1:
            raise ValueError(f"t must be a single time, got shape {tuple(t.shape)}")
        output = self.model(x, t.reshape(()).to(device=x.device, dtype=x.dtype))
        if not isinstance(output, Tensor) or output.shape != x.shape:
            shape = tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__
            raise ValueError(f"model(x, t) returned {shape}; expected a tensor of the state's shape {tuple(x.shape)}")
        if self.prediction == self.extrapolate:
            return output
        t64 = as_float64(t).reshape(())
        schedule = self.schedule
        log_alpha, log_sigma = schedule.log_alpha(t64), schedule.log_sigma(t64)
        alpha, sigma = torch.exp(log_alpha), torch.exp(log_sigma)
        d_alpha = d_sigma = None
        if self.prediction == "flow":
            d_alpha = alpha * schedule.d_log_alpha(t64)
            d_sigma = sigma * schedule.d_log_sigma(t64)
        c_x, c_out = conversion_coefficients(self.prediction, self.extrapolate, alpha, sigma, d_alpha, d_sigma)
        c_out = c_out.to(device=x.device, dtype=x.dtype)
        if self.prediction == "score" and self.extrapolate == "eps":  # eps = -sigma score: no x term
            return c_out * output
        return c_x.to(device=x.device, dtype=x.dtype) * x + c_out * output

    # --- what the deis* methods read --------------------------------------------------------------------------

    def exponential_form(self) -> DiffusionForm:
        r"""``Phi(t, tau) W(tau) dtau = m(t) d[exp(sign lambda(tau))]``: ``m = alpha``, ``c = sigma``, ``sign = -1``
        for the eps split; ``m = sigma``, ``c = alpha``, ``sign = +1`` for the x0 split."""
        schedule = self.schedule
        if self.extrapolate == "eps":
            log_scale, log_cofactor, sign = schedule.log_alpha, schedule.log_sigma, -1
        else:
            log_scale, log_cofactor, sign = schedule.log_sigma, schedule.log_alpha, 1
        return DiffusionForm(
            log_scale=log_scale,
            log_cofactor=log_cofactor,
            sign=sign,
            half_log_snr=schedule.half_log_snr,
            d_half_log_snr=schedule.d_half_log_snr,
            time_range=schedule.time_range,
        )


class VPODE(DiffusionODE):
    """:class:`DiffusionODE` for a variance-preserving schedule (``alpha^2 + sigma^2 = 1``).

    Raises:
        TypeError: if ``schedule`` is not a :class:`~deis_ode.diffusion.VPSchedule`.
    """

    def __init__(self, model: Model, schedule: VPSchedule, prediction: str = "eps", extrapolate: str = "eps") -> None:
        if not isinstance(schedule, VPSchedule):
            raise TypeError(f"VPODE needs a VPSchedule (e.g. VPSchedule.linear()), got {type(schedule).__name__}")
        super().__init__(model, schedule, prediction, extrapolate)


class VEODE(DiffusionODE):
    """:class:`DiffusionODE` for a variance-exploding schedule (``alpha = 1``).

    Raises:
        TypeError: if ``schedule`` is not a :class:`~deis_ode.diffusion.VESchedule`.
    """

    def __init__(self, model: Model, schedule: VESchedule, prediction: str = "eps", extrapolate: str = "eps") -> None:
        if not isinstance(schedule, VESchedule):
            raise TypeError(f"VEODE needs a VESchedule, got {type(schedule).__name__}")
        super().__init__(model, schedule, prediction, extrapolate)


def _float_dtype(t: Tensor) -> torch.dtype:
    """``t``'s dtype if it is floating point, else float64 (an integer time)."""
    return t.dtype if t.is_floating_point() else torch.float64
