r"""A drop-in diffusers scheduler: :class:`DEISMultistepScheduler`, a thin front end over the DEIS engine.

It has diffusers' scheduler contract (config, ``set_timesteps``, ``step``, ``add_noise``, ``save_pretrained`` /
``from_pretrained`` / ``from_config``) and, with its default configuration, takes the same steps as diffusers' own
``DEISMultistepScheduler``: the same timesteps, noise levels, warm-up and final lower-order steps, and the same
update, to float32 round-off. Needs the ``diffusers`` extra (``pip install deis_ode[diffusers]``).

How a step is computed
----------------------
Sampling runs over ``n + 1`` noise levels ``sigma_0 > ... > sigma_n`` (``self.sigmas``: diffusers' ``sigma``, i.e.
our ``rho = sigma / alpha`` for a VP model, the noise level itself for a flow model). Step ``i`` goes from level
``i`` to ``i + 1`` with the exponential Adams-Bashforth update of the eps split

    x_{i+1} = (alpha_{i+1} / alpha_i) x_i + sum_{j<k} C_{i,j} eps_{i-j},
    C_{i,j} = alpha_{i+1} int_{rho_i}^{rho_{i+1}} l_j(log rho) d rho,

with ``l_j`` the Lagrange basis through the last ``k`` nodes in the basis variable ``log rho`` (``solver_type``
``"logrho"``, diffusers' only one). The update depends only on ``(alpha, sigma)`` at the grid points, so the
scheduler describes the grid as a :class:`~deis_ode.forms.DiffusionForm` whose *time is the step index*
``i = 0, 1, ..., n`` (callables that look ``log alpha_i``, ``log sigma_i`` and ``lambda_i`` up in a table) and
builds the coefficients of every step with :func:`~deis_ode.solvers.multistep.build_plan`: the closed forms of the
engine, in float64, exact (also at ``sigma = 0``). For a prediction other than ``epsilon`` (or with thresholding) the
conversion ``eps_i = c_x x_i + c_y y_i`` of the step's own output ``y_i`` is folded into the coefficients, in float64,
which keeps the step accurate where ``alpha_i`` is tiny. ``step`` then only picks the step's
:class:`~deis_ode.solvers.multistep.Update` and applies it as one linear combination with Python-float coefficients
(:func:`~deis_ode.solvers.multistep.apply_update`): no numpy, no host-device synchronisation, no scalar tensor
arithmetic.

The order of step ``i`` follows diffusers: ``k = min(solver_order, lower_order_nums + 1)``, and with
``lower_order_final`` (only when there are fewer than 15 timesteps) at most ``n - i``. The table holds the order each
step takes when sampling starts at step 0; the lower orders of a warm-up that starts mid-schedule are computed by
:meth:`DEISMultistepScheduler.set_begin_index` (or, after a poked ``lower_order_nums``, on first use). A step that
ends at ``sigma = 0`` is first order when ``lower_order_final`` is set, as in diffusers' DPM-Solver.

Improvements over diffusers 0.42 (opt-in unless stated)
-------------------------------------------------------
* The step index is found from the timestep's *position* in ``self.timesteps``: repeated timesteps (rounding
  makes the first two equal, e.g. ``squaredcos_cap_v2`` with Karras or exponential sigmas) no longer crash
  (always on; equal to diffusers wherever diffusers runs).
* ``final_sigmas_type="zero"``: end at ``sigma = 0`` (noise-free; flow models end exactly on the data);
  ``"sigma_min"``: end at the smallest training noise level with ``n + 1`` *distinct* levels, so no step is the
  zero-length step that diffusers makes with Karras, exponential, beta and flow sigmas (a wasted model call).
* ``set_timesteps(sigmas=...)`` / ``set_timesteps(timesteps=...)``: custom grids (flow pipelines such as FLUX
  pass ``sigmas``), including a flow grid that starts at ``sigma = 1`` (``alpha = 0``).
* ``solver_order=4`` (diffusers silently uses order 3 for it).
* ``basis="rho"`` (polynomial in ``rho``) and ``basis="t"`` (polynomial in the model's training time, Gauss-Legendre
  quadrature over the monotone interpolation of the training schedule).
"""

from __future__ import annotations

import dataclasses
import math
import operator
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

try:
    from diffusers.configuration_utils import ConfigMixin, register_to_config
    from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin, SchedulerOutput
except ImportError as _error:  # pragma: no cover - exercised without the extra
    raise ImportError(
        "deis_ode.DEISMultistepScheduler needs diffusers; install it with: pip install deis_ode[diffusers]"
    ) from _error

from .diffusion.grids import diffusers_timesteps, sigma_ramp
from .diffusion.schedules import DiscreteVPSchedule
from .diffusion.thresholding import dynamic_threshold
from .forms import DiffusionForm
from .solvers.coefficients import step_coefficients
from .solvers.multistep import Update, apply_update, build_plan, place_plan

__all__ = ["DEISMultistepScheduler"]

F64 = torch.float64
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction", "flow_prediction")
SPACINGS = ("linspace", "leading", "trailing")
FINAL_SIGMAS_TYPES = (None, "sigma_min", "zero")
BASES = ("logrho", "rho", "t")


# --- training schedule and sampling grids (numpy, float64 unless noted; run once per set_timesteps) -----------------


def _cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> Tensor:
    """The capped cosine betas of improved DDPM, as diffusers' ``squaredcos_cap_v2`` (float32)."""

    def level(u: float) -> float:
        return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

    n = num_train_timesteps
    return torch.tensor([min(1 - level((i + 1) / n) / level(i / n), max_beta) for i in range(n)], dtype=torch.float32)


def _training_betas(config) -> Tensor:
    """The float32 betas of the configuration, computed as diffusers computes them."""
    if config.trained_betas is not None:
        return torch.tensor(config.trained_betas, dtype=torch.float32)
    n = config.num_train_timesteps
    if config.beta_schedule == "linear":
        return torch.linspace(config.beta_start, config.beta_end, n, dtype=torch.float32)
    if config.beta_schedule == "scaled_linear":
        return torch.linspace(config.beta_start**0.5, config.beta_end**0.5, n, dtype=torch.float32) ** 2
    return _cosine_betas(n)


def _training_time(levels: np.ndarray, log_train: np.ndarray) -> np.ndarray:
    """The fractional training timestep of each noise level: linear interpolation of the index in ``log level``
    between the two neighbouring training levels (``log_train`` increasing), clipped to the training range."""
    log_levels = np.log(np.maximum(levels, 1e-10))
    low = np.clip(np.searchsorted(log_train, log_levels, side="right") - 1, 0, log_train.shape[0] - 2)
    below, above = log_train[low], log_train[low + 1]
    w = np.clip((below - log_levels) / (below - above), 0, 1)
    return (1 - w) * low + w * (low + 1)


def _spaced_timesteps(spacing: str, n: int, big_n: int, offset: int) -> np.ndarray:
    """diffusers' ``n`` training timesteps of ``spacing`` (float64), also for ``n >= num_train_timesteps``, where
    rounding repeats timesteps (``"linspace"``, ``"trailing"``; each repeat becomes a zero-length step, see
    :class:`DEISMultistepScheduler`) and ``"leading"`` would put every timestep at ``steps_offset``."""
    if n < big_n:
        return diffusers_timesteps(spacing, n, big_n, offset).numpy()
    if spacing == "linspace":
        return np.round(np.linspace(0, big_n - 1, n + 1))[:0:-1].copy()
    if spacing == "trailing":
        return np.round(np.arange(big_n, 0, -(big_n / n))[:n]) - 1
    raise ValueError(
        f"timestep_spacing 'leading' needs num_inference_steps < num_train_timesteps = {big_n}, got {n}: its "
        f"stride floor({big_n} / ({n} + 1)) = 0 puts every timestep at steps_offset"
    )


def _shift(levels: np.ndarray, shift: float) -> np.ndarray:
    """The flow time shift ``s -> shift s / (1 + (shift - 1) s)``."""
    return shift * levels / (1 + (shift - 1) * levels)


class DEISMultistepScheduler(SchedulerMixin, ConfigMixin):
    r"""DEIS (Zhang and Chen 2022) for diffusers pipelines, step-for-step equal to diffusers' ``DEISMultistepScheduler``
    with the default configuration, computed by :mod:`deis_ode`'s engine (see the module docstring).

    ``pipe.scheduler = DEISMultistepScheduler.from_config(pipe.scheduler.config)`` swaps it into a pipeline. All
    parameters of diffusers' scheduler are accepted with their meaning there; the state that pipelines read and poke
    (``timesteps``, ``sigmas``, ``model_outputs``, ``lower_order_nums``, ``step_index``, ``begin_index``, ``config``)
    has diffusers' meaning. ``model_outputs`` holds the noise predictions ``eps`` of the last ``solver_order`` steps.

    Args (beyond diffusers' ones, whose documentation applies; ``algorithm_type`` is always ``"deis"`` and
    ``solver_type`` always ``"logrho"``, the other names diffusers maps to them are accepted):
        solver_order: 1 to 4; diffusers' 1 to 3 are equal to it, ``4`` is the cubic (the DEIS paper's tAB3).
        final_sigmas_type: where the last step ends. ``None`` (default): as diffusers' DEIS (the smallest training
            noise level; with Karras, exponential, beta and flow sigmas the last level repeated, a zero-length last
            step); ``"sigma_min"``: the smallest training noise level, every step of nonzero length; ``"zero"``:
            ``sigma = 0`` (with ``lower_order_final``, that last step is first order). A configuration saved by
            another diffusers scheduler carries its own value (DPM-Solver and Euler save ``"zero"``), which is kept;
            pass ``final_sigmas_type=None`` to ``from_config`` for diffusers' DEIS grid.
        basis: the variable in which the noise prediction is interpolated: ``"logrho"`` (default, diffusers'),
            ``"rho"``, or ``"t"``, the model's training time (only on grids of the training schedule's noise levels:
            not with flow sigmas, custom sigmas outside the training range, or ``final_sigmas_type="zero"``).
        check_finite: raise ``FloatingPointError`` naming the step, timestep and noise level when a model output
            holds a NaN or an infinity. Off by default (diffusers' behaviour: the NaN propagates into the sample);
            the check reads one boolean back from the device per step.

    Where diffusers' DEIS accepts an input and then computes garbage, this one differs, on purpose:

    * ``set_timesteps`` with ``num_inference_steps >= num_train_timesteps`` and ``"linspace"`` or ``"trailing"``
      spacing: rounding repeats some timesteps (diffusers then divides by zero and returns NaN). Each repeated
      timestep is a zero-length step that leaves the sample unchanged, and the following steps' polynomials use
      only distinct noise levels. ``"leading"`` spacing makes every timestep equal there and raises ``ValueError``.
    * ``set_begin_index`` with a negative index raises ``ValueError`` (diffusers indexes from the end and applies
      the last step's coefficients to the first step).
    * ``step`` with a ``model_output`` whose shape differs from ``sample``'s raises ``ValueError`` naming both
      (diffusers broadcasts silently).
    * ``set_timesteps`` with fewer than one step raises ``ValueError`` (diffusers makes an empty schedule).
    """

    _compatibles = [e.name for e in KarrasDiffusionSchedulers]
    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: np.ndarray | list[float] | None = None,
        solver_order: int = 2,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
        algorithm_type: str = "deis",
        solver_type: str = "logrho",
        lower_order_final: bool = True,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        use_flow_sigmas: bool = False,
        flow_shift: float = 1.0,
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
        use_dynamic_shifting: bool = False,
        time_shift_type: str = "exponential",
        final_sigmas_type: str | None = None,
        basis: str = "logrho",
        check_finite: bool = False,
    ) -> None:
        if sum([use_beta_sigmas, use_exponential_sigmas, use_karras_sigmas]) > 1:
            raise ValueError(
                "only one of use_beta_sigmas, use_exponential_sigmas and use_karras_sigmas can be set, got "
                f"{use_beta_sigmas=}, {use_exponential_sigmas=}, {use_karras_sigmas=}"
            )
        if trained_betas is None and beta_schedule not in BETA_SCHEDULES:
            raise NotImplementedError(f"beta_schedule {beta_schedule!r} is not one of {BETA_SCHEDULES}")
        if algorithm_type != "deis":
            if algorithm_type not in ("dpmsolver", "dpmsolver++"):
                raise NotImplementedError(f"algorithm_type {algorithm_type!r} is not implemented; use 'deis'")
            self.register_to_config(algorithm_type="deis")
        if solver_type != "logrho":
            if solver_type not in ("midpoint", "heun", "bh1", "bh2"):
                raise NotImplementedError(f"solver_type {solver_type!r} is not implemented; use 'logrho'")
            self.register_to_config(solver_type="logrho")
        if isinstance(solver_order, bool) or not isinstance(solver_order, int) or solver_order not in (1, 2, 3, 4):
            raise ValueError(f"solver_order must be 1, 2, 3 or 4, got {solver_order!r}")
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
        if timestep_spacing not in SPACINGS:
            raise ValueError(f"timestep_spacing must be one of {SPACINGS}, got {timestep_spacing!r}")
        if final_sigmas_type not in FINAL_SIGMAS_TYPES:
            raise ValueError(f"final_sigmas_type must be one of {FINAL_SIGMAS_TYPES}, got {final_sigmas_type!r}")
        if basis not in BASES:
            raise ValueError(f"basis must be one of {BASES}, got {basis!r}")
        if time_shift_type != "exponential":
            raise NotImplementedError(f"time_shift_type {time_shift_type!r} is not implemented; use 'exponential'")

        self.betas = _training_betas(self.config)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self.alpha_t = torch.sqrt(self.alphas_cumprod)
        self.sigma_t = torch.sqrt(1 - self.alphas_cumprod)
        self.lambda_t = torch.log(self.alpha_t) - torch.log(self.sigma_t)
        self.sigmas = ((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5
        self.init_noise_sigma = 1.0

        self.num_inference_steps = None
        self.timesteps = torch.from_numpy(np.arange(num_train_timesteps - 1, -1, -1, dtype=np.float32))
        self.model_outputs = [None] * solver_order
        self.lower_order_nums = 0
        self._step_index = None
        self._begin_index = None
        self._training_schedule = None
        self._prepared = None

    # --- state -------------------------------------------------------------------------------------------------------

    @property
    def step_index(self) -> int | None:
        """The index of the current step in ``timesteps``; advanced by one by every :meth:`step`."""
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        """The index of the first step, set by pipelines that start mid-schedule (:meth:`set_begin_index`)."""
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Start the next :meth:`step` at ``timesteps[begin_index]`` (image-to-image pipelines call this).

        Raises:
            TypeError: ``begin_index`` is not an integer.
            ValueError: ``begin_index`` is negative, or (after :meth:`set_timesteps`) larger than the number of
                steps. ``begin_index == num_inference_steps`` is allowed: no step is left, as pipelines set it for
                ``strength = 0``.
        """
        try:
            begin_index = operator.index(begin_index)
        except TypeError:
            raise TypeError(f"begin_index must be an integer index into timesteps, got {begin_index!r}") from None
        if begin_index < 0:
            raise ValueError(
                f"begin_index must be >= 0 (an index into timesteps counted from the first step), got {begin_index}"
            )
        if self.num_inference_steps is not None and begin_index > len(self._order_cap):
            raise ValueError(
                f"begin_index must be at most the number of steps, {len(self._order_cap)}, got {begin_index}"
            )
        self._begin_index = begin_index
        if self.num_inference_steps is not None and 0 <= begin_index < len(self._order_cap):
            # the warm-up after a start mid-schedule uses lower orders: compute them now, not during step
            for j in range(self.config.solver_order - 1):
                if begin_index + j < len(self._order_cap):
                    self._update(min(self._order_cap[begin_index + j], j + 1), begin_index + j)

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    # --- the sampling grid -------------------------------------------------------------------------------------------

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        mu: float | None = None,
        sigmas: Sequence[float] | np.ndarray | Tensor | None = None,
        timesteps: Sequence[float] | np.ndarray | Tensor | None = None,
    ) -> None:
        """Set the sampling grid and compute the coefficients of every step.

        Args:
            num_inference_steps: the number of steps; may be omitted with ``sigmas`` or ``timesteps``.
            device: where ``timesteps`` go (``sigmas`` stay on the CPU, as in diffusers).
            mu: with ``use_dynamic_shifting``, the flow shift of this grid is ``exp(mu)`` (diffusers writes it into
                ``config.flow_shift``; this scheduler leaves the configuration unchanged).
            sigmas: a custom decreasing grid of ``n`` noise levels (diffusers' ``sigma``: ``rho = sigma / alpha`` for a
                VP model; for ``use_flow_sigmas`` the unshifted flow noise levels in ``(0, 1]``, shifted here as
                diffusers' flow-matching schedulers do). The final level is appended by ``final_sigmas_type``.
            timesteps: custom decreasing training timesteps (the noise levels are the training schedule's, linearly
                interpolated; for flow sigmas ``timesteps / num_train_timesteps``, shifted). With ``sigmas`` too,
                they are only what the model is given.
        """
        config = self.config
        if mu is not None:
            if not config.use_dynamic_shifting:
                raise ValueError("mu is only used with use_dynamic_shifting=True")
            shift = float(np.exp(mu))
        else:
            shift = float(config.flow_shift)
        if sigmas is not None or timesteps is not None:
            given = sigmas if sigmas is not None else timesteps
            count = len(given)
            if sigmas is not None and timesteps is not None and len(timesteps) != count:
                raise ValueError(f"sigmas and timesteps must have the same length, got {count} and {len(timesteps)}")
            if num_inference_steps is not None and num_inference_steps != count:
                raise ValueError(f"num_inference_steps = {num_inference_steps} does not match the {count} given values")
            model_times, levels = self._custom_grid(sigmas, timesteps, shift)
        else:
            if num_inference_steps is None:
                raise ValueError("set_timesteps needs num_inference_steps, sigmas or timesteps")
            try:
                n = operator.index(num_inference_steps)
            except TypeError:
                # diffusers' np.linspace raises this TypeError too (a float such as 2.7 is not floored)
                raise TypeError(
                    f"num_inference_steps must be an integer, got {num_inference_steps!r} "
                    f"({type(num_inference_steps).__name__})"
                ) from None
            if n < 1:
                raise ValueError(f"num_inference_steps must be >= 1, got {n}")
            model_times, levels = self._standard_grid(n, shift)

        self.sigmas = torch.from_numpy(levels.astype(np.float32))
        self.timesteps = torch.from_numpy(model_times).to(device=device)
        self.num_inference_steps = len(model_times)
        self.model_outputs = [None] * config.solver_order
        self.lower_order_nums = 0
        self._step_index = None
        self._begin_index = None
        self._timestep_values = model_times.tolist()
        self._prepare_steps()

    def _train_levels(self) -> np.ndarray:
        """The training noise levels ``rho_t = sqrt((1 - abar_t) / abar_t)``, float32 as diffusers has them."""
        return (((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5).numpy()

    def _standard_grid(self, n: int, shift: float) -> tuple[np.ndarray, np.ndarray]:
        """diffusers' DEIS grid for ``n`` steps (timesteps, ``n + 1`` noise levels), with ``final_sigmas_type``."""
        config = self.config
        final = config.final_sigmas_type
        big_n = config.num_train_timesteps
        train = self._train_levels()
        log_train = np.log(train)
        lo, hi = float(train[0]), float(train[-1])
        ramp = None
        if config.use_karras_sigmas:
            ramp = "karras"
        elif config.use_exponential_sigmas:
            ramp = "exponential"
        elif config.use_beta_sigmas:
            ramp = "beta"
        if ramp is not None:
            levels = sigma_ramp(ramp, lo, hi, n + 1 if final == "sigma_min" else n)
            times = _training_time(levels[:n], log_train)
            times = np.round(times) if config.use_karras_sigmas else times
            if final is None:
                levels = np.concatenate([levels, levels[-1:]])
            elif final == "zero":
                levels = np.concatenate([levels, [0.0]])
            return times.astype(np.int64), levels
        if config.use_flow_sigmas:
            unshifted = 1.0 - np.linspace(1, 1 / big_n, n + 1)
            levels = np.flip(_shift(unshifted, shift))[:-1].copy()
            times = levels * big_n
            end = {None: levels[-1], "sigma_min": _shift(np.array(1 / big_n), shift), "zero": 0.0}[final]
            return times.astype(np.int64), np.concatenate([levels, [end]])
        spaced = _spaced_timesteps(config.timestep_spacing, n, big_n, config.steps_offset)
        levels = np.interp(spaced, np.arange(len(train)), train)
        end = 0.0 if final == "zero" else lo
        return spaced.astype(np.int64), np.concatenate([levels, [end]])

    def _custom_grid(self, sigmas, timesteps, shift: float) -> tuple[np.ndarray, np.ndarray]:
        """A grid from custom ``sigmas`` and/or ``timesteps`` (see :meth:`set_timesteps`)."""
        config = self.config
        big_n = config.num_train_timesteps
        final = config.final_sigmas_type
        if timesteps is not None:
            timesteps = np.asarray(torch.as_tensor(timesteps).cpu(), dtype=np.float64).reshape(-1)
        if sigmas is not None:
            sigmas = np.asarray(torch.as_tensor(sigmas).cpu(), dtype=np.float64).reshape(-1)
        given = sigmas if sigmas is not None else timesteps
        if given.size == 0 or not np.all(np.isfinite(given)):
            raise ValueError("custom sigmas / timesteps must be a non-empty sequence of finite numbers")
        if config.use_flow_sigmas:
            unshifted = sigmas if sigmas is not None else timesteps / big_n
            if not np.all((unshifted > 0) & (unshifted <= 1)):
                raise ValueError("custom flow sigmas must lie in (0, 1]")
            levels = _shift(unshifted, shift)
            model_times = levels * big_n if timesteps is None else timesteps
            smallest = float(_shift(np.array(1 / big_n), shift))
        else:
            train = self._train_levels()
            if sigmas is None:
                if not np.all((timesteps >= 0) & (timesteps <= big_n - 1)):
                    raise ValueError(f"custom timesteps must lie in [0, {big_n - 1}]")
                levels = np.interp(timesteps, np.arange(len(train)), train)
                model_times = timesteps
            else:
                if not np.all(sigmas > 0):
                    raise ValueError("custom sigmas must be positive (the final level is set by final_sigmas_type)")
                levels = sigmas
                model_times = _training_time(sigmas, np.log(train)) if timesteps is None else timesteps
            smallest = float(train[0])
        end = 0.0 if final == "zero" else smallest
        if final is None and levels[-1] <= end:
            end = levels[-1]  # diffusers' rule: never above the last level; a repeated level makes a zero-length step
        levels = np.concatenate([levels, [end]])
        if not np.all(np.diff(levels[:-1]) < 0) or levels[-1] > levels[-2]:
            raise ValueError(
                f"the noise levels must decrease strictly, and the final level {levels[-1]:.6g} (final_sigmas_type="
                f"{final!r}) must not lie above the last given one; got {levels[:-1].tolist()}"
            )
        integral = np.all(model_times == np.round(model_times))
        return model_times.astype(np.int64 if integral else np.float32), levels

    # --- coefficients ------------------------------------------------------------------------------------------------

    def _alpha_sigma(self, levels: Tensor) -> tuple[Tensor, Tensor]:
        """float64 ``(log alpha, log sigma)`` of the noise levels ``self.sigmas``."""
        if self.config.use_flow_sigmas:
            return torch.log1p(-levels), torch.log(levels)
        log_alpha = -0.5 * torch.log1p(levels * levels)
        return log_alpha, torch.log(levels) + log_alpha

    def _prepare_steps(self) -> None:
        """Build the update of every step at the order diffusers' rule gives it when sampling starts at step 0, with
        the step's model-output conversion folded in. Other orders (a start mid-schedule, or a poked
        ``lower_order_nums``) are added by :meth:`set_begin_index` or, failing that, on first use."""
        config = self.config
        order = config.solver_order
        levels = self.sigmas.to(F64)
        n = levels.numel() - 1
        key = (
            levels.numpy().tobytes(),
            tuple(self._timestep_values),
            order,
            config.basis,
            config.prediction_type,
            config.thresholding,
            config.lower_order_final,
            config.use_flow_sigmas,
        )
        if self._prepared is not None and self._prepared[0] == key:
            self._updates = [list(row) for row in self._prepared[1]]
            return
        log_alpha, log_sigma = self._alpha_sigma(levels)
        alpha, sigma = torch.exp(log_alpha), torch.exp(log_sigma)
        # a grid may start where alpha = 0 (flow sigma 1): that node cannot enter an eps polynomial in rho or log rho
        first = 1 if n > 0 and alpha[0] == 0 else 0
        if first and config.prediction_type == "epsilon":
            raise ValueError(
                "the grid starts at alpha = 0 (flow sigma 1), where a noise prediction does not determine the data: "
                "use prediction_type 'sample', 'v_prediction' or 'flow_prediction', or start below sigma = 1"
            )
        self._conversions = self._conversion_table(alpha, sigma, levels)
        # a repeated last level (diffusers' rule for Karras/exponential/beta/flow sigmas) is an identity step
        self._moving = moving = n - 1 if n > 0 and levels[n] == levels[n - 1] else n
        # a timestep repeated by rounding (num_inference_steps >= num_train_timesteps) repeats its level: a
        # zero-length step that leaves the sample unchanged; any other level that does not decrease is an error
        values = self._timestep_values
        self._repeats = repeats = {
            i for i in range(moving) if levels[i + 1] == levels[i] and i + 1 < n and values[i + 1] == values[i]
        }
        rising = torch.nonzero(levels[1 : moving + 1] >= levels[:moving]).flatten().tolist()
        flat = [i for i in rising if i not in repeats]
        if flat:
            i = flat[0]
            raise ValueError(
                f"the noise levels must decrease strictly, but levels {i} and {i + 1} are {float(levels[i])!r} and "
                f"{float(levels[i + 1])!r} (timesteps {self._timestep_values[i : i + 2]}); is num_train_timesteps "
                "the length of trained_betas, and num_inference_steps below it?"
            )
        self._form_basis_times = form, basis, times = self._form(log_alpha, log_sigma, levels)
        lower_final = config.lower_order_final and n < 15
        self._order_cap = [max(1, min(order, i + 1 - first, n - i if lower_final else order)) for i in range(n)]
        distinct = 0  # how many of the levels up to i are distinct, counted back from i: the nodes a step may use
        for i in range(n):
            distinct = 1 if i - 1 in repeats else distinct + 1
            self._order_cap[i] = min(self._order_cap[i], distinct)
        if n > 0 and levels[n] == 0 and config.lower_order_final:
            # the step to sigma = 0 is first order (x_n = the data prediction), as diffusers' DPM-Solver does there:
            # a polynomial in log rho extrapolated to log rho = -inf loses accuracy
            self._order_cap[n - 1] = 1
        self._updates = [[None] * n for _ in range(order)]
        if not repeats:  # else step by step below: the engine's plan assumes distinct levels
            plan = place_plan(build_plan(form, basis, times[first : moving + 1], order), torch.zeros(()))
            for update in plan.main:
                i, k = update.source + first, len(update.nodes)
                if k == self._order_cap[i]:
                    self._updates[k - 1][i] = self._folded(i, update.transition, update.weights, k)
        for i in range(first, n):
            self._update(self._order_cap[i], i)
        if first:
            # x_1 = (sigma_1 / sigma_0) x_0 + alpha_1 x0_0: the one-node x0-split step, exact at alpha_0 = 0
            x0_form = dataclasses.replace(form, log_scale=form.log_cofactor, log_cofactor=form.log_scale, sign=1)
            transition, weights = step_coefficients(x0_form, "logrho", times[0], times[1], times[:1])
            transition, weight = transition.item(), weights[0].item()
            if not config.thresholding:
                p, q = self._conversions[0][:2]
                transition, weight = transition + weight * p, weight * q
            for k in range(order):
                self._updates[k][0] = Update(0, 1, (0,), transition, [weight])
        self._prepared = (key, [list(row) for row in self._updates])

    def _update(self, k: int, i: int) -> Update:
        """The update of step ``i`` with ``k`` nodes (computed and stored on first use)."""
        update = self._updates[k - 1][i]
        if update is None:
            if i >= self._moving or i in self._repeats:
                update = Update(i, i + 1, (), 1.0, [])
            else:
                form, basis, times = self._form_basis_times
                nodes = times[list(range(i, i - k, -1))]
                transition, weights = step_coefficients(form, basis, times[i], times[i + 1], nodes)
                update = self._folded(i, transition.item(), [w.item() for w in weights], k)
            self._updates[k - 1][i] = update
        return update

    def _folded(self, i: int, transition: float, weights: list[float], k: int) -> Update:
        """The update of step ``i`` acting on the step's own model output (or, with thresholding, on its thresholded
        data prediction) instead of ``eps_i``: with ``eps_i = c_x x_i + c_y y_i`` the term ``C_0 eps_i`` becomes
        ``C_0 c_x x_i + C_0 c_y y_i``. Folding in float64 keeps the update accurate where ``alpha_i`` is tiny and
        ``x_i / alpha_i`` and ``eps_i / alpha_i`` nearly cancel."""
        weights, nodes = list(weights), tuple(range(i, i - k, -1))
        if self.config.thresholding:
            c_x, c_y = self._conversions[i][4:]
        elif self.config.prediction_type != "epsilon":
            c_x, c_y = self._conversions[i][2:4]
        else:
            return Update(i, i + 1, nodes, transition, weights)
        transition, weights[0] = transition + weights[0] * c_x, weights[0] * c_y
        return Update(i, i + 1, nodes, transition, weights)

    def _form(self, log_alpha: Tensor, log_sigma: Tensor, levels: Tensor) -> tuple[DiffusionForm, str, Tensor]:
        """The eps-split form of the grid, its basis and the grid's times in that form."""
        basis = self.config.basis
        n = levels.numel() - 1
        if basis != "t":
            lam = log_alpha - log_sigma

            def lookup(table: Tensor):
                return lambda i: table[i.long()]

            def no_derivative(i: Tensor) -> Tensor:
                raise NotImplementedError("the step-index form has no derivative; it is only evaluated at grid points")

            form = DiffusionForm(
                log_scale=lookup(log_alpha),
                log_cofactor=lookup(log_sigma),
                sign=-1,
                half_log_snr=lookup(lam),
                d_half_log_snr=no_derivative,
                time_range=(0.0, float(n)),
            )
            return form, basis, torch.arange(n + 1, dtype=F64)
        if self.config.use_flow_sigmas:
            raise ValueError("basis 't' needs the VP training schedule; with flow sigmas use 'logrho' or 'rho'")
        schedule = self._schedule()
        knots = schedule.half_log_snr(torch.tensor([float(schedule.time_range[1]), 0.0], dtype=F64))
        lam = log_alpha - log_sigma
        tolerance = 1e-6 * (1.0 + knots.abs())
        if not bool(((lam >= knots[0] - tolerance[0]) & (lam <= knots[1] + tolerance[1])).all()):
            raise ValueError(
                "basis 't' interpolates in the model's training time: every noise level must lie in the training "
                f"range [{float(self._train_levels()[0]):.6g}, {float(self._train_levels()[-1]):.6g}] (not with "
                "final_sigmas_type='zero' or custom sigmas outside it); use basis 'logrho' or 'rho'"
            )
        times = schedule.t_of_half_log_snr(torch.clamp(lam, min=float(knots[0]), max=float(knots[1])))
        form = DiffusionForm(
            log_scale=schedule.log_alpha,
            log_cofactor=schedule.log_sigma,
            sign=-1,
            half_log_snr=schedule.half_log_snr,
            d_half_log_snr=schedule.d_half_log_snr,
            time_range=schedule.time_range,
            t_of_half_log_snr=schedule.t_of_half_log_snr,
            breakpoints=schedule.breakpoints,
        )
        return form, "t", times

    def _schedule(self) -> DiscreteVPSchedule:
        """The training schedule over training time, monotonely interpolated (for ``basis="t"``)."""
        if self._training_schedule is None:
            self._training_schedule = DiscreteVPSchedule(self.alphas_cumprod.to(F64))
        return self._training_schedule

    def _conversion_table(self, alpha: Tensor, sigma: Tensor, levels: Tensor) -> list[tuple[float, ...]]:
        """Per step ``(p, q, c_x, c_out, 1 / sigma, -alpha / sigma)``: ``x0 = p x + q output``,
        ``eps = c_x x + c_out output`` and ``eps = x / sigma - (alpha / sigma) x0``."""
        kind = self.config.prediction_type
        rows = []
        for i in range(levels.numel() - 1):
            a, s, level = float(alpha[i]), float(sigma[i]), float(levels[i])
            if kind == "epsilon":
                p, q = (1.0 / a, -s / a) if a > 0 else (math.inf, -math.inf)
            elif kind == "sample":
                p, q = 0.0, 1.0
            elif kind == "v_prediction":
                p, q = a, -s
            else:
                p, q = 1.0, -level
            c_x, c_out = (0.0, 1.0) if kind == "epsilon" else ((1.0 - a * p) / s, -a * q / s)
            rows.append((p, q, c_x, c_out, 1.0 / s, -a / s))
        return rows

    def _sigma_to_alpha_sigma_t(self, sigma: Tensor) -> tuple[Tensor, Tensor]:
        """``(alpha, sigma)`` of diffusers' noise level ``sigma`` (``rho`` for VP, the level itself for flow)."""
        if self.config.use_flow_sigmas:
            return 1 - sigma, sigma
        alpha_t = 1 / ((sigma**2 + 1) ** 0.5)
        return alpha_t, sigma * alpha_t

    # --- stepping ----------------------------------------------------------------------------------------------------

    def index_for_timestep(self, timestep: int | Tensor, schedule_timesteps: Tensor | None = None) -> int:
        """The index of ``timestep`` in the schedule: its first occurrence (diffusers takes the second when a value
        repeats, which skips the first step and crashes at the last), or the last index if absent."""
        if schedule_timesteps is None:
            values = self._timestep_values
        else:
            values = schedule_timesteps.tolist()
        value = timestep.item() if isinstance(timestep, Tensor) else timestep
        for i, v in enumerate(values):
            if v == value:
                return i
        return len(values) - 1

    def _init_step_index(self, timestep: int | Tensor) -> None:
        if self._begin_index is not None:
            self._step_index = self._begin_index
            return
        schedule = self.timesteps
        if (
            isinstance(timestep, Tensor)
            and timestep.numel() == 1
            and timestep.device == schedule.device
            and schedule.dim() == 1
            and schedule.numel() > 0
            and timestep.untyped_storage().data_ptr() == schedule.untyped_storage().data_ptr()
        ):
            # an element of self.timesteps (how pipelines iterate): its position, without reading the device
            offset = timestep.storage_offset() - schedule.storage_offset()
            if offset % schedule.stride(0) == 0 and 0 <= offset // schedule.stride(0) < schedule.numel():
                self._step_index = offset // schedule.stride(0)
                return
        self._step_index = self.index_for_timestep(timestep)

    def convert_model_output(self, model_output: Tensor, *args, sample: Tensor | None = None, **kwargs) -> Tensor:
        """The noise prediction ``eps`` at the current step from the model's output (after thresholding of the data
        prediction when ``thresholding`` is set)."""
        if sample is None:
            if len(args) < 2:
                raise ValueError("missing `sample` as a required keyword argument")
            sample = args[1]
        return self._eps(model_output, sample, self._step_index)

    def _x0(self, model_output: Tensor, sample: Tensor, i: int) -> Tensor:
        p, q = self._conversions[i][:2]
        x0 = model_output if p == 0.0 and q == 1.0 else torch.mul(sample, p).add_(model_output, alpha=q)
        if self.config.thresholding:
            limit = self.config.sample_max_value
            if limit < 1:
                # diffusers clamps the quantile to [1, limit], which torch.clamp resolves to limit when limit < 1:
                # every sample is clipped to [-limit, limit] and divided by limit, whatever its quantile
                dtype = x0.dtype
                wide = x0 if dtype in (torch.float32, torch.float64) else x0.float()
                return (torch.clamp(wide, -limit, limit) / limit).to(dtype)
            x0 = dynamic_threshold(x0, self.config.dynamic_thresholding_ratio, limit)
        return x0

    def _eps(self, model_output: Tensor, sample: Tensor, i: int) -> Tensor:
        if self.config.thresholding:
            inv_sigma, x0_weight = self._conversions[i][4:]
            return torch.mul(sample, inv_sigma).add_(self._x0(model_output, sample, i), alpha=x0_weight)
        if self.config.prediction_type == "epsilon":
            return model_output
        c_x, c_out = self._conversions[i][2:4]
        return torch.mul(sample, c_x).add_(model_output, alpha=c_out)

    def step(
        self,
        model_output: Tensor,
        timestep: int | Tensor,
        sample: Tensor,
        return_dict: bool = True,
        generator: torch.Generator | None = None,
    ) -> SchedulerOutput | tuple:
        """One DEIS step from ``sample`` at the current noise level to the next one.

        Args:
            model_output: the model's output at ``sample`` (of type ``prediction_type``).
            timestep: the current timestep; used only to find the first step when ``begin_index`` is not set.
            sample: the current sample.
            return_dict: return a :class:`~diffusers.schedulers.scheduling_utils.SchedulerOutput`, else a tuple.
            generator: ignored (the step is deterministic); accepted because pipelines such as ``DDPMPipeline``
                pass it, which diffusers' own DEIS scheduler rejects with a ``TypeError``.

        Returns:
            The next sample (``prev_sample``), in the promoted dtype of ``sample`` and ``model_output``.
        """
        if self.num_inference_steps is None:
            raise ValueError("the number of inference steps is not set: call set_timesteps before step")
        if self._step_index is None:
            self._init_step_index(timestep)
        i = self._step_index
        if i >= len(self._order_cap):
            raise IndexError(
                f"step {i} is past the last of the {len(self._order_cap)} steps; call set_timesteps to sample again"
            )
        if model_output.shape != sample.shape:
            raise ValueError(
                f"model_output has shape {tuple(model_output.shape)} but sample has shape {tuple(sample.shape)}; "
                "they must be equal"
            )
        config = self.config
        if config.check_finite and not bool(torch.isfinite(model_output).all()):
            raise FloatingPointError(
                f"model_output at step {i} (timestep {self._timestep_values[i]}, noise level "
                f"{float(self.sigmas[i]):.6g}) holds NaN or infinite values"
            )
        if model_output.dtype != sample.dtype:
            sample = sample.to(torch.promote_types(sample.dtype, model_output.dtype))
        if config.thresholding:
            primary = self._x0(model_output, sample, i)
            inv_sigma, x0_weight = self._conversions[i][4:]
            eps = torch.mul(sample, inv_sigma).add_(primary, alpha=x0_weight)
        elif config.prediction_type == "epsilon":
            primary = eps = model_output
        else:
            primary = model_output
            c_x, c_out = self._conversions[i][2:4]
            eps = torch.mul(sample, c_x).add_(model_output, alpha=c_out)
        outputs = self.model_outputs
        for j in range(config.solver_order - 1):
            outputs[j] = outputs[j + 1]
        outputs[-1] = eps

        k = min(self._order_cap[i], self.lower_order_nums + 1)
        update = self._updates[k - 1][i] or self._update(k, i)
        # the step's own term acts on its model output (see _folded), the older ones on the stored eps
        values = {node: outputs[-1 - j] for j, node in enumerate(update.nodes)}
        if update.nodes:
            values[i] = primary
        prev_sample = apply_update(update, sample, values)

        if self.lower_order_nums < self.config.solver_order:
            self.lower_order_nums += 1
        self._step_index = i + 1
        if not return_dict:
            return (prev_sample,)
        return SchedulerOutput(prev_sample=prev_sample)

    def scale_model_input(self, sample: Tensor, *args, **kwargs) -> Tensor:
        """The model input is the sample itself."""
        return sample

    def add_noise(self, original_samples: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        """``alpha x0 + sigma noise`` at the noise levels of ``timesteps`` (found as diffusers finds them: by value
        when ``begin_index`` is unset, else at the current or the first step)."""
        levels = self.sigmas.to(device=original_samples.device, dtype=original_samples.dtype)
        if self._begin_index is None:
            schedule = self.timesteps.cpu()
            indices = [self.index_for_timestep(t, schedule) for t in timesteps.reshape(-1).cpu()]
        elif self._step_index is not None:
            indices = [self._step_index] * timesteps.shape[0]
        else:
            indices = [self._begin_index] * timesteps.shape[0]
        level = levels[indices].flatten()
        level = level.reshape(-1, *([1] * (original_samples.dim() - 1)))
        alpha_t, sigma_t = self._sigma_to_alpha_sigma_t(level)
        return alpha_t * original_samples + sigma_t * noise
