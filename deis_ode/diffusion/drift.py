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
from .exponential import EXTRAPOLATE_TYPES, diffusion_form
from .predictions import check_prediction, conversion_coefficients
from .schedules import NoiseSchedule, VESchedule, VPSchedule, as_float64
from .thresholding import check_thresholding, threshold

__all__ = ["DiffusionODE", "VEODE", "VPODE"]

Model = Callable[[Tensor, Tensor], Tensor]


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
        thresholding: ``None`` (default), ``"dynamic"`` or ``"static"``: the model's data prediction ``x0`` is
            thresholded (see :mod:`deis_ode.diffusion.thresholding`; the first dimension of ``x`` is the batch)
            before it becomes ``N``: ``N`` is the thresholded ``x0`` (extrapolate ``"x0"``) or the noise
            ``(x - alpha x0) / sigma`` recomputed from it (extrapolate ``"eps"``). This changes the ODE: ``forward``
            and every solver see the thresholded drift.
        dynamic_thresholding_ratio: the quantile of ``|x0|`` per sample used by ``"dynamic"`` (diffusers' name).
        sample_max_value: the largest threshold: ``"static"`` clamps ``x0`` to ``[-sample_max_value,
            sample_max_value]``; ``"dynamic"`` clamps its quantile to ``[1, sample_max_value]``.

    ``forward(t, x)`` is the full drift, so any torchdiffeq method integrates this object; the ``deis*`` methods
    use :meth:`exponential_form`. ``L`` and ``W`` are computed in float64 and returned in ``t``'s dtype.
    """

    #: Diffusion sampling counts model calls: the lower-order warm-up costs none.
    default_warmup: str = "lower_order"
    #: The schedules this drift accepts (subclasses narrow it).
    schedule_type: type = NoiseSchedule

    def __init__(
        self,
        model: Model,
        schedule: NoiseSchedule,
        prediction: str = "eps",
        extrapolate: str = "x0",
        *,
        thresholding: str | None = None,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
    ) -> None:
        if not callable(model):
            raise TypeError(f"model must be a callable (x, t) -> output, got {type(model).__name__}")
        if not isinstance(schedule, self.schedule_type):
            raise TypeError(
                f"{type(self).__name__} needs a {self.schedule_type.__name__}, got {type(schedule).__name__}"
            )
        check_prediction(prediction)
        if extrapolate not in EXTRAPOLATE_TYPES:
            raise ValueError(f"extrapolate must be one of {EXTRAPOLATE_TYPES}, got {extrapolate!r}")
        check_thresholding(thresholding, dynamic_thresholding_ratio, sample_max_value)
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
        self.thresholding = thresholding
        self.dynamic_thresholding_ratio = float(dynamic_thresholding_ratio)
        self.sample_max_value = float(sample_max_value)
        self._memo: dict[tuple, object] = {}  # per-grid results of check_grid and output_conversion

    def extra_repr(self) -> str:
        text = f"schedule={self.schedule!r}, prediction={self.prediction!r}, extrapolate={self.extrapolate!r}"
        if self.thresholding is not None:
            text += f", thresholding={self.thresholding!r}"
            if self.thresholding == "dynamic":
                text += f", dynamic_thresholding_ratio={self.dynamic_thresholding_ratio!r}"
            text += f", sample_max_value={self.sample_max_value!r}"
        return text

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
        """``W(t) = -sigma d lambda / dt = sigma' - sigma d log alpha / dt`` (eps split) or
        ``alpha d lambda / dt = alpha' - alpha d log sigma / dt`` (x0 split); the second forms stay finite where
        ``sigma`` (eps split) or ``alpha`` (x0 split) vanishes."""
        t = torch.as_tensor(t)
        schedule = self.schedule
        if self.extrapolate == "eps":
            out = schedule.d_sigma(t) - schedule.sigma(t) * schedule.d_log_alpha(t)
        else:
            out = schedule.d_alpha(t) - schedule.alpha(t) * schedule.d_log_sigma(t)
        return out.to(_float_dtype(t))

    def _linear_integral(self, t: Tensor, s: Tensor) -> Tensor:
        r"""``\int_s^t L = log m(t) - log m(s)``."""
        t, s = torch.as_tensor(t), torch.as_tensor(s)
        return (self._log_scale(t) - self._log_scale(s)).to(_float_dtype(t))

    def _nonlinear(self, t: Tensor, x: Tensor) -> Tensor:
        """``N(t, x)``: the model's output converted to the extrapolated prediction (eps or x0), through the
        thresholded data prediction when ``thresholding`` is set."""
        return self.predict(t, x, self.extrapolate)

    def model_output(self, t: Tensor, x: Tensor) -> Tensor:
        """``model(x, t)``, ``t`` as a 0-dim tensor of ``x``'s dtype on its device; checked to have ``x``'s shape."""
        t = torch.as_tensor(t)
        if t.numel() != 1:
            raise ValueError(f"t must be a single time, got shape {tuple(t.shape)}")
        if t.dim() != 0 or t.dtype != x.dtype or t.device != x.device:
            t = t.reshape(()).to(device=x.device, dtype=x.dtype)
        output = self.model(x, t)
        if not isinstance(output, Tensor) or output.shape != x.shape:
            shape = tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__
            raise ValueError(f"model(x, t) returned {shape}; expected a tensor of the state's shape {tuple(x.shape)}")
        return output

    def predict(self, t: Tensor, x: Tensor, target: str) -> Tensor:
        """The model's prediction of type ``target`` (``"eps"`` or ``"x0"``) at ``(t, x)``, thresholded as
        configured."""
        output = self.model_output(t, x)
        t = torch.as_tensor(t)
        if self.thresholding is None:
            return self._convert(t, x, output, self.prediction, target)
        x0 = self._convert(t, x, output, self.prediction, "x0")
        x0 = threshold(x0, self.thresholding, self.dynamic_thresholding_ratio, self.sample_max_value)
        return self._convert(t, x, x0, "x0", target)

    def output_conversion(self, times: Tensor, target: str | None = None) -> tuple[Tensor, Tensor] | None:
        r"""Float64 ``(c, r)`` at each of ``times`` with ``N(t, x) = c(t) (y + r(t) x)``, ``y`` the model's output
        (:meth:`model_output`) and ``N`` the prediction of type ``target`` (default: the extrapolated one); or
        ``None`` when ``N`` is not affine in ``y`` (thresholding) or the conversion is not finite at one of the times
        (e.g. eps from x0 where ``sigma = 0``).

        The solvers fold ``c`` into their coefficients and store ``y + r x``: one tensor operation per evaluation
        (none when the model predicts ``target`` itself), instead of the conversion's two plus its schedule
        arithmetic."""
        if self.thresholding is not None:
            return None
        target = self.extrapolate if target is None else target
        times = as_float64(times).detach().reshape(-1).cpu()
        key = ("output_conversion", self.prediction, target, times.numpy().tobytes())
        if key in self._memo:
            return self._memo[key]
        return self._remember(key, self._output_conversion(times, target))

    def _output_conversion(self, times: Tensor, target: str) -> tuple[Tensor, Tensor] | None:
        if self.prediction == target:
            return torch.ones_like(times), torch.zeros_like(times)
        schedule = self.schedule
        d_alpha = d_sigma = None
        if self.prediction == "flow":
            d_alpha, d_sigma = schedule.d_alpha(times), schedule.d_sigma(times)
        c_x, c_out = conversion_coefficients(
            self.prediction, target, schedule.alpha(times), schedule.sigma(times), d_alpha, d_sigma
        )
        c_x, c_out = torch.broadcast_tensors(c_x, c_out)
        ratio = c_x / torch.where(c_out == 0, 1.0, c_out)
        if not bool((torch.isfinite(c_out) & torch.isfinite(ratio) & (c_out != 0)).all()):
            return None
        return c_out, ratio

    def _convert(self, t: Tensor, x: Tensor, output: Tensor, source: str, target: str) -> Tensor:
        """``output``, a prediction of type ``source`` at ``(t, x)``, as a prediction of type ``target``."""
        if source == target:
            return output
        t64 = as_float64(t).reshape(())
        schedule = self.schedule
        log_alpha, log_sigma = schedule.log_alpha(t64), schedule.log_sigma(t64)
        alpha, sigma = torch.exp(log_alpha), torch.exp(log_sigma)
        d_alpha = d_sigma = None
        if source == "flow":  # the schedule's own derivatives stay finite where alpha or sigma is 0
            d_alpha, d_sigma = schedule.d_alpha(t64), schedule.d_sigma(t64)
        c_x, c_out = conversion_coefficients(source, target, alpha, sigma, d_alpha, d_sigma)
        c_out = c_out.to(device=x.device, dtype=x.dtype)
        if source == "score" and target == "eps":  # eps = -sigma score: no x term
            return c_out * output
        return c_x.to(device=x.device, dtype=x.dtype) * x + c_out * output

    def check_grid(self, times: Tensor) -> None:
        """Raise ``ValueError`` if this split cannot be integrated over the grid ``times`` (float64, user times).

        Every time must lie in the schedule's :attr:`~deis_ode.diffusion.NoiseSchedule.time_range`, and the eps
        split needs ``alpha > 0`` at every grid time: its transition ``alpha_t / alpha_s`` and its clock
        ``rho = sigma / alpha`` are singular where ``alpha = 0`` (pure noise, e.g. ``t = 1`` of a
        :class:`~deis_ode.diffusion.FlowSchedule`). The x0 split has no such restriction.
        """
        times = as_float64(times).detach().reshape(-1).cpu()
        key = ("check_grid", self.extrapolate, times.numpy().tobytes())
        if key in self._memo:  # the same grid as a recent solve: nothing new to check
            return
        self.schedule.check_times(times)
        if self.extrapolate == "eps":
            zero = torch.isneginf(self.schedule.log_alpha(times))
            if bool(zero.any()):
                t_bad = float(times[zero][0])
                raise ValueError(
                    f"extrapolate='eps' needs alpha > 0 at every grid time, but alpha = 0 at t = {t_bad!r} for "
                    f"{self.schedule!r}; use extrapolate='x0', whose transition sigma_t / sigma_s stays finite "
                    "where alpha = 0"
                )
        self._remember(key, True)

    def _remember(self, key: tuple, value: object) -> object:
        """Keep ``value`` for ``key`` (a few recent grids: repeated solves on one grid skip the schedule's
        arithmetic); the schedule is immutable, and the key holds everything else the value depends on."""
        if len(self._memo) >= 8:
            self._memo.pop(next(iter(self._memo)))
        self._memo[key] = value
        return value

    # --- what the deis* methods read --------------------------------------------------------------------------

    def exponential_form(self) -> DiffusionForm:
        r"""``Phi(t, tau) W(tau) dtau = m(t) d[exp(sign lambda(tau))]``: ``m = alpha``, ``c = sigma``, ``sign = -1``
        for the eps split; ``m = sigma``, ``c = alpha``, ``sign = +1`` for the x0 split
        (:func:`~deis_ode.diffusion.exponential.diffusion_form`)."""
        key = ("exponential_form", self.schedule, self.extrapolate)
        if key not in self._memo:
            self._remember(key, diffusion_form(self.schedule, self.extrapolate))
        return self._memo[key]

    # --- stochastic sampling (see deis_ode.diffusion.sde) -----------------------------------------------------

    def forward_sde(self):
        """The forward (noising) SDE of the schedule as a torchsde module
        (:class:`~deis_ode.diffusion.sde.ForwardDiffusionSDE`)."""
        from .sde import ForwardDiffusionSDE

        return ForwardDiffusionSDE(self.schedule)

    def reverse_sde(self, eta: float = 1.0, *, shape=None):
        """The reverse-time SDE with stochasticity ``eta`` (0: this probability-flow ODE, 1: the reverse SDE) in the
        solver time ``s = -t``, a torchsde module: :class:`~deis_ode.diffusion.sde.ReverseDiffusionSDE`."""
        from .sde import ReverseDiffusionSDE

        return ReverseDiffusionSDE(self, eta, shape=shape)


class VPODE(DiffusionODE):
    """:class:`DiffusionODE` for a variance-preserving schedule (``alpha^2 + sigma^2 = 1``).

    Raises:
        TypeError: if ``schedule`` is not a :class:`~deis_ode.diffusion.VPSchedule` (e.g. ``VPSchedule.linear()``).
    """

    schedule_type = VPSchedule


class VEODE(DiffusionODE):
    """:class:`DiffusionODE` for a variance-exploding schedule (``alpha = 1``).

    Raises:
        TypeError: if ``schedule`` is not a :class:`~deis_ode.diffusion.VESchedule`.
    """

    schedule_type = VESchedule


def _float_dtype(t: Tensor) -> torch.dtype:
    """``t``'s dtype if it is floating point, else float64 (an integer time)."""
    return t.dtype if t.is_floating_point() else torch.float64
