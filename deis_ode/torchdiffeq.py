"""torchdiffeq adapter: the ``deis1`` .. ``deis5`` methods in torchdiffeq's solver registry.

The paper's diffusion variants are registered too (options ``step_size`` and ``grid_constructor`` only; a
diffusion drift is required): ``ipndm``, ``ipndm_v`` and ``deis_rk2`` .. ``deis_rk4``
(see :class:`DiffusionVariantSolver`).

After ``import deis_ode``, ``torchdiffeq.odeint(ode, x0, t, method="deis3", options={...})`` integrates a
:class:`~deis_ode.SemiLinearODE` with the exponential multistep engine. torchdiffeq hands the solver a
wrapped ``func`` (``_PerturbFunc``, and ``_ReverseFunc`` with negated time when ``t`` decreases, as in
diffusion sampling); the adapter walks through these wrappers to the user's object and integrates it in
the user's own time, so the coefficients see the true schedule.

Options (anything else raises ``ValueError``):

* ``basis``: ``"t"`` (any ODE; the default), ``"rho"`` or ``"logrho"`` (diffusion drifts). On diffusion
  drifts ``"t"`` was measured best (``benchmarks/defaults.py``; docs/diffusion.md).
* ``warmup``: ``"lower_order"`` or ``"full_order"``; default from the ODE (``full_order`` for a generic
  :class:`~deis_ode.SemiLinearODE`, ``lower_order`` for diffusion drifts).
* ``lower_order_final``: lower the order over the last K-1 steps (default ``False``).
* ``step_size``: split every interval between consecutive requested times into the fewest equal steps of
  at most this size, so every requested time is a grid point (no interpolation; unlike torchdiffeq's
  fixed-grid solvers, which interpolate linearly between grid points).
* ``grid_constructor``: ``(func, y0, t) -> grid`` as in torchdiffeq; the requested times are merged in.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torchdiffeq._impl import misc as _td_misc
from torchdiffeq._impl.odeint import SOLVERS

from .forms import DiffusionForm
from .semilinear import SemiLinearODE
from .solvers.ipndm import build_ipndm_plan, build_ipndm_v_plan, require_eps_diffusion
from .solvers.multistep import WARMUPS, build_plan, place_plan, run_plan
from .solvers.rho_rk import TABLEAUS, build_rho_rk_plan, place_rho_rk_plan, run_rho_rk

_VALID_OPTIONS = ("basis", "warmup", "lower_order_final", "step_size", "grid_constructor")
# Always passed by torchdiffeq (tolerances and norm only matter to adaptive solvers).
_IGNORED = ("rtol", "atol", "norm")


def _is_adjoint_dynamics(f: Any) -> bool:
    return "augmented_dynamics" in getattr(f, "__qualname__", "")


def unwrap(func: Any, method: str) -> tuple[SemiLinearODE, float]:
    """The user's :class:`SemiLinearODE` behind torchdiffeq's wrappers, and the sign relating the
    solver's time to the user's (``-1`` when torchdiffeq reversed time)."""
    sign = 1.0
    f = func
    while True:
        if isinstance(f, SemiLinearODE):
            return f, sign
        if isinstance(f, _td_misc._PerturbFunc):
            f = f.base_func
        elif isinstance(f, _td_misc._ReverseFunc) and f.mul == -1.0:
            sign = -sign
            f = f.base_func
        elif isinstance(f, _td_misc._TupleFunc) and not _is_adjoint_dynamics(f.base_func):
            raise TypeError(f"method {method!r} does not support tuple states: concatenate them into one tensor")
        else:
            if _is_adjoint_dynamics(f) or _is_adjoint_dynamics(getattr(f, "base_func", None)):
                raise TypeError(
                    f"odeint_adjoint's backward pass integrates an adjoint system that is not in semi-linear form, "
                    f"so method {method!r} cannot solve it: pass adjoint_method='dopri5' (or another torchdiffeq "
                    "method) to odeint_adjoint"
                )
            raise TypeError(
                f"method {method!r} is an exponential integrator for dx/dt = L(t) x + W(t) N(t, x) and needs a "
                f"deis_ode.SemiLinearODE (or a diffusion drift) as func, which tells it L and W; got "
                f"{type(f).__name__}. Wrap your drift as SemiLinearODE(linear=..., nonlinear=...), or use a "
                "general method such as 'dopri5' or 'rk4'"
            )


def _check_grid(grid: Tensor, name: str) -> None:
    if grid.dim() != 1 or grid.numel() < 2:
        raise ValueError(f"{name} must be a 1-D tensor with at least two times, got shape {tuple(grid.shape)}")
    values = grid.detach().to(device="cpu", dtype=torch.float64).numpy()  # a handful of host checks: numpy is cheaper
    if not np.isfinite(values).all():
        raise ValueError(f"{name} contains NaN or inf: {grid.tolist()}")
    diff = np.diff(values)
    if not (diff > 0).all():
        i = int(np.flatnonzero(diff <= 0)[0])
        raise ValueError(
            f"{name} must be strictly monotone without repeated times; entries {i} and {i + 1} are "
            f"{grid[i].item():.10g} and {grid[i + 1].item():.10g}"
        )


class DEISSolver:
    """Base class of the registered ``deisK`` solvers; ``order`` is K."""

    order: int
    _deis_ode_method = True  # marks classes registered by deis_ode (registration is idempotent)

    def __init__(
        self,
        func: Any,
        y0: Tensor,
        *,
        basis: str | None = None,
        warmup: str | None = None,
        lower_order_final: bool = False,
        step_size: float | None = None,
        grid_constructor: Any = None,
        **kwargs: Any,
    ) -> None:
        self._reject_unknown_options(kwargs, _VALID_OPTIONS)
        if step_size is not None and grid_constructor is not None:
            raise ValueError("options step_size and grid_constructor are mutually exclusive")
        if step_size is not None and not (isinstance(step_size, (int, float)) and step_size > 0):
            raise ValueError(f"option step_size must be a positive number, got {step_size!r}")
        self.func = func
        self.ode, self.sign = unwrap(func, self.method)
        self.form = self.ode.exponential_form()
        self.basis = "t" if basis is None else basis
        if self.basis not in self.form.bases:
            raise ValueError(
                f"option basis must be one of {list(self.form.bases)} for {type(self.ode).__name__}, got {basis!r}"
            )
        self.warmup = self.ode.default_warmup if warmup is None else warmup
        if self.warmup not in WARMUPS:
            raise ValueError(f"option warmup must be one of {list(WARMUPS)}, got {warmup!r}")
        if not isinstance(lower_order_final, bool):
            raise ValueError(f"option lower_order_final must be a bool, got {lower_order_final!r}")
        self.lower_order_final = lower_order_final
        self.step_size = step_size
        self.grid_constructor = grid_constructor
        if y0.is_complex() is False and not (y0.is_floating_point()):
            raise TypeError(f"the initial state must be a floating point or complex tensor, got {y0.dtype}")
        self.y0 = y0
        self._check_linear_shape()

    @property
    def method(self) -> str:
        return f"deis{self.order}"

    def _reject_unknown_options(self, options: dict[str, Any], valid: tuple[str, ...]) -> None:
        """``ValueError`` naming the method and the valid options when ``options`` holds anything besides what
        torchdiffeq always passes (``rtol``, ``atol``, ``norm``)."""
        unknown = sorted(k for k in options if k not in _IGNORED)
        if unknown:
            raise ValueError(f"method {self.method!r}: unknown option(s) {unknown}; valid options are {list(valid)}")

    @classmethod
    def valid_callbacks(cls) -> set[str]:
        return {"callback_step"}

    def _check_linear_shape(self) -> None:
        lin = getattr(self.form, "constant_linear", None)
        if getattr(self.form, "matrix", False):
            if self.y0.dim() == 0 or lin.shape[-1] != self.y0.shape[-1]:
                raise ValueError(
                    f"the linear part is a {tuple(lin.shape)} matrix acting on the last dimension, which does not "
                    f"match the state's shape {tuple(self.y0.shape)}"
                )
        elif isinstance(lin, Tensor) and lin.dim() > 0:
            try:
                shape = torch.broadcast_shapes(lin.shape, self.y0.shape)
            except RuntimeError:
                shape = None
            if shape != self.y0.shape:
                raise ValueError(
                    f"the linear part has shape {tuple(lin.shape)}, which does not broadcast to the state's "
                    f"shape {tuple(self.y0.shape)}"
                )

    def _grid(self, t: Tensor) -> Tensor:
        """The integration grid in the solver's (increasing) time, in float64, containing every ``t``."""
        t64 = t.detach().to(device="cpu", dtype=torch.float64)
        _check_grid(t64, "t")
        if self.step_size is not None:
            pieces = [t64[:1]]
            for a, b in zip(t64[:-1].tolist(), t64[1:].tolist(), strict=True):
                n = max(1, math.ceil((b - a) / self.step_size - 1e-9))
                pieces.append(torch.linspace(a, b, n + 1, dtype=torch.float64)[1:])
            return torch.cat(pieces)
        if self.grid_constructor is not None:
            grid = torch.as_tensor(self.grid_constructor(self.func, self.y0, t)).detach()
            grid = grid.to(device="cpu", dtype=torch.float64)
            _check_grid(grid, "the grid from grid_constructor")
            if grid[0] != t64[0] or grid[-1] != t64[-1]:
                raise ValueError("grid_constructor must return a grid that starts at t[0] and ends at t[-1]")
            return torch.unique(torch.cat([grid, t64]))
        return t64

    def integrate(self, t: Tensor) -> Tensor:
        grid = self._grid(t)
        times = self.sign * grid  # the user's time
        if isinstance(self.form, DiffusionForm):
            lo, hi = self.form.time_range
            bad = (times < lo) | (times > hi)
            if bool(bad.any()):
                raise ValueError(f"t = {times[bad][0].item():.8g} is outside the schedule's time range [{lo}, {hi}]")
        check_grid = getattr(self.ode, "check_grid", None)  # the ODE's own conditions on a grid (diffusion drifts)
        if check_grid is not None:
            check_grid(times)
        real = self.y0.real.dtype if self.y0.is_complex() else self.y0.dtype
        t_state = times.to(device=self.y0.device, dtype=real)
        outputs = torch.searchsorted(grid, t.detach().to("cpu", torch.float64)).tolist()
        callback = getattr(self.func, "callback_step", None)
        if callback is getattr(_td_misc, "_null_callback", None):
            callback = None  # torchdiffeq's placeholder when the user's func has no callback_step
        on_step = None
        if callback is not None:
            grid_state = grid.to(device=self.y0.device, dtype=real)
            dts = grid_state[1:] - grid_state[:-1]

            def on_step(n: int, x: Tensor) -> None:
                callback(grid_state[n], x, dts[n])

        states = self._solve(times, t_state, outputs, on_step)
        return torch.stack(states)

    def _solve(self, times: Tensor, t_state: Tensor, outputs: list[int], on_step: Any) -> list[Tensor]:
        """Run the method on the grid ``times`` (the user's time, float64 on the host; ``t_state`` is the same grid
        on the state's device and real dtype) and return the states at the grid indices ``outputs``."""
        plan = build_plan(self.form, self.basis, times, self.order, self.warmup, self.lower_order_final)
        place_plan(plan, self.y0)
        return run_plan(plan, self.ode.nonlinear_part, self.y0, t_state, outputs, on_step)

    def integrate_until_event(self, t0: Tensor, event_fn: Any) -> Any:
        raise NotImplementedError(f"method {self.method!r} does not support event_fn; use a torchdiffeq method")


def _make(order: int) -> type[DEISSolver]:
    doc = f"Exponential Adams-Bashforth with {order} node(s): global order {order} (deis{order})."
    return type(f"DEIS{order}Solver", (DEISSolver,), {"order": order, "__doc__": doc})


METHODS: dict[str, type[DEISSolver]] = {f"deis{k}": _make(k) for k in range(1, 6)}

_VARIANT_OPTIONS = ("step_size", "grid_constructor")


def _eps_from_x0(x0_prediction: Any, form: DiffusionForm) -> Any:
    """``(t, x) -> eps = (x - alpha x0) / sigma`` from the x0 prediction of an x0-split drift (``form``)."""

    def eps(t: Tensor, x: Tensor) -> Tensor:
        t64 = t.to(torch.float64)
        alpha = torch.exp(form.log_cofactor(t64)).to(x.dtype)
        sigma = torch.exp(form.log_scale(t64)).to(x.dtype)
        return (x - alpha * x0_prediction(t, x)) / sigma

    return eps


class DiffusionVariantSolver(DEISSolver):
    """Base class of the paper's diffusion variants (``ipndm``, ``ipndm_v``, ``deis_rk2..4``).

    They integrate ``d(x / alpha) / d rho = eps`` and need a diffusion drift (``ValueError`` otherwise); from an
    x0-split drift they take ``eps = (x - alpha x0) / sigma``. Options: ``step_size`` and ``grid_constructor`` (as
    for ``deisK``); anything else raises ``ValueError``.
    """

    method: str  # the registered name (shadows DEISSolver.method)

    def __init__(
        self,
        func: Any,
        y0: Tensor,
        *,
        step_size: float | None = None,
        grid_constructor: Any = None,
        **kwargs: Any,
    ) -> None:
        self._reject_unknown_options(kwargs, _VARIANT_OPTIONS)
        super().__init__(func, y0, step_size=step_size, grid_constructor=grid_constructor, **kwargs)
        form = self.form
        self._nonlinear = self.ode.nonlinear_part
        if isinstance(form, DiffusionForm) and form.sign == 1:
            # An x0-split drift describes the same ODE: integrate its eps split, with eps = (x - alpha x0) / sigma.
            self.form = dataclasses.replace(form, log_scale=form.log_cofactor, log_cofactor=form.log_scale, sign=-1)
            self._nonlinear = _eps_from_x0(self.ode.nonlinear_part, form)
        require_eps_diffusion(self.form, self.method)


class IPNDMSolver(DiffusionVariantSolver):
    """iPNDM: DDIM steps with the fixed Adams-Bashforth combination of the last (up to 4) eps values, lower-order
    start (:mod:`deis_ode.solvers.ipndm`). Order 2 on grids uniform in rho, 1 evaluation per step."""

    method = "ipndm"
    order = 4
    build = staticmethod(build_ipndm_plan)

    def _solve(self, times: Tensor, t_state: Tensor, outputs: list[int], on_step: Any) -> list[Tensor]:
        plan = place_plan(self.build(self.form, times), self.y0)
        return run_plan(plan, self._nonlinear, self.y0, t_state, outputs, on_step)


class IPNDMVSolver(IPNDMSolver):
    """Variable-step iPNDM: Adams-Bashforth in rho with the coefficients of the actual steps, lower-order start;
    identical to ``deis4`` with ``basis="rho"``, ``warmup="lower_order"``. 1 evaluation per step."""

    method = "ipndm_v"
    build = staticmethod(build_ipndm_v_plan)


class RhoRKSolver(DiffusionVariantSolver):
    """rho-Runge-Kutta of order ``order`` (:mod:`deis_ode.solvers.rho_rk`): ``order`` evaluations per step."""

    def _solve(self, times: Tensor, t_state: Tensor, outputs: list[int], on_step: Any) -> list[Tensor]:
        plan = place_rho_rk_plan(build_rho_rk_plan(self.form, times, self.order), self.y0)
        stage_times = plan.stage_times.to(device=t_state.device, dtype=t_state.dtype)
        return run_rho_rk(plan, self._nonlinear, self.y0, stage_times, outputs, on_step)


def _make_rk(order: int) -> type[RhoRKSolver]:
    doc = f"rho-Runge-Kutta ({TABLEAUS[order].name}): global order {order}, {order} evaluations per step."
    attrs = {"order": order, "method": f"deis_rk{order}", "__doc__": doc}
    return type(f"DEISRK{order}Solver", (RhoRKSolver,), attrs)


METHODS.update({"ipndm": IPNDMSolver, "ipndm_v": IPNDMVSolver})
METHODS.update({f"deis_rk{k}": _make_rk(k) for k in (2, 3, 4)})


def register() -> list[str]:
    """Add the ``deis*`` methods to torchdiffeq's registry (shared by ``odeint`` and ``odeint_adjoint``).

    Idempotent: re-registering replaces only classes that deis_ode registered itself; a name taken by
    someone else is left alone (and not reported as registered). Returns the names now served by deis_ode.
    """
    ours = []
    for name, cls in METHODS.items():
        current = SOLVERS.get(name)
        if current is None or getattr(current, "_deis_ode_method", False):
            SOLVERS[name] = cls
            ours.append(name)
    return ours


# The error-controlled methods adaptive_deis2..5 (deis_ode/adaptive.py; imported last: it imports this module)
from .adaptive import METHODS as _ADAPTIVE  # noqa: E402

METHODS.update(_ADAPTIVE)
