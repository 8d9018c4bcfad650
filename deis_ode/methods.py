"""The methods in torchdiffeq's solver registry: ``deis1`` .. ``deis5`` (and, from :mod:`deis_ode.adaptive`,
``adaptive_deis2`` .. ``adaptive_deis5``). This module is the front end that adapts torchdiffeq's solver contract to
the engine (:mod:`deis_ode.solvers`); it is not named after the package it adapts, so that ``import torchdiffeq``
inside the package always means torchdiffeq.

The paper's diffusion variants are registered too (options ``step_size``, ``grid_constructor``, ``callback`` and
``progress``; a diffusion drift is required): ``ipndm``, ``ipndm_v`` and ``deis_rk2`` .. ``deis_rk4``
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
* ``callback``, ``progress``: a per-step callback and a tqdm progress bar (see :class:`DEISSolver`).
* ``krylov_tol``, ``krylov_max_dim``: for sparse or operator linear parts only (:mod:`deis_ode.linear`; run by
  :mod:`deis_ode.solvers.krylov_multistep`, and by the adaptive methods): the Krylov tolerance and largest
  dimension.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor
from torchdiffeq._impl import misc as _td_misc
from torchdiffeq._impl.odeint import SOLVERS

from .diffusion.exponential import diffusion_form
from .forms import DiffusionForm, LinearForm, OperatorForm
from .linear import KrylovStats, check_operator
from .semilinear import SemiLinearODE
from .solvers.grid import prepare_grid
from .solvers.ipndm import build_ipndm_plan, build_ipndm_v_plan, require_eps_diffusion
from .solvers.krylov_multistep import build_operator_plan, run_operator_plan
from .solvers.multistep import WARMUPS, build_plan, place_plan, run_plan
from .solvers.rho_rk import TABLEAUS, build_rho_rk_plan, place_rho_rk_plan, run_rho_rk

_KRYLOV_OPTIONS = ("krylov_tol", "krylov_max_dim")  # sparse or operator linear parts only (deis_ode.linear)
_VALID_OPTIONS = (
    "basis",
    "warmup",
    "lower_order_final",
    "step_size",
    "grid_constructor",
    "callback",
    "progress",
    *_KRYLOV_OPTIONS,
)
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


def _make_progress(total: int, desc: str):
    try:
        from tqdm.auto import tqdm
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("option progress=True needs tqdm: pip install tqdm") from error
    return tqdm(total=total, desc=desc)


class DEISSolver:
    """Base class of the registered ``deisK`` solvers; ``order`` is K.

    A solve is: one grid preparation (:func:`~deis_ode.solvers.grid.prepare_grid`), one plan of float64 coefficients
    (:func:`~deis_ode.solvers.multistep.build_plan`, cached per grid and form), its placement on the state's device and
    dtype, and one loop (:func:`~deis_ode.solvers.multistep.run_plan`).
    """

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
        callback: Any = None,
        progress: bool = False,
        **kwargs: Any,
    ) -> None:
        self.krylov = {k[7:]: kwargs.pop(k) for k in _KRYLOV_OPTIONS if k in kwargs}  # tol, max_dim
        self._reject_unknown_options(kwargs, _VALID_OPTIONS)
        self._resolve(func, basis)
        self.warmup = self.ode.default_warmup if warmup is None else warmup
        if self.warmup not in WARMUPS:
            raise ValueError(f"option warmup must be one of {list(WARMUPS)}, got {warmup!r}")
        if not isinstance(lower_order_final, bool):
            raise ValueError(f"option lower_order_final must be a bool, got {lower_order_final!r}")
        if callback is not None and not callable(callback):
            raise ValueError(f"option callback must be a callable (step, t, x) -> None, got {callback!r}")
        if not isinstance(progress, bool):
            raise ValueError(f"option progress must be a bool, got {progress!r}")
        self.lower_order_final = lower_order_final
        self.step_size = step_size
        self.grid_constructor = grid_constructor
        self.callback = callback
        self.progress = progress
        if not (y0.is_complex() or y0.is_floating_point()):
            raise TypeError(f"the initial state must be a floating point or complex tensor, got {y0.dtype}")
        self.y0 = y0
        self._check_linear_shape()

    def _resolve(self, func: Any, basis: str | None) -> None:
        """``func``, ``ode`` (the user's object behind torchdiffeq's wrappers), ``sign`` (its time direction), ``form``
        and the checked ``basis`` (default ``"t"``)."""
        self.func = func
        self.ode, self.sign = unwrap(func, self.method)
        self.form = self.ode.exponential_form()
        self.basis = "t" if basis is None else basis
        if self.basis not in self.form.bases:
            raise ValueError(
                f"option basis must be one of {list(self.form.bases)} for {type(self.ode).__name__}, got {basis!r}"
            )

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
        """The linear part and weight against the state: a constant ``L`` must broadcast to it (or be a matrix on its
        last dimension); a callable ``L(t)`` is evaluated once at a time of the schedule's range and checked the
        same way; ``W(t)`` must be a scalar."""
        form = self.form
        if isinstance(form, OperatorForm):
            check_operator(form.operator, self.y0)
            return
        if getattr(self, "krylov", None):
            raise ValueError(f"options {sorted(self.krylov)} need a sparse or operator linear part (deis_ode.linear)")
        if not isinstance(form, LinearForm):
            return
        lin = form.constant_linear
        what = "the linear part"
        if lin is None:
            t0 = torch.zeros((), dtype=torch.float64)
            lin = torch.as_tensor(form.linear_fn(t0))
            what = "the linear part L(t) (evaluated at t = 0)"
            if form.weight_fn is not None:
                w = torch.as_tensor(form.weight_fn(t0))
                if w.numel() != 1:
                    raise ValueError(
                        f"the weight W(t) must be a scalar (one number per time), got shape {tuple(w.shape)} at t = 0; "
                        "fold a vector weight into N"
                    )
        elif form.weight_fn is not None:
            w = torch.as_tensor(form.weight_fn(torch.zeros((), dtype=torch.float64)))
            if w.numel() != 1:
                raise ValueError(
                    f"the weight W(t) must be a scalar (one number per time), got shape {tuple(w.shape)} at t = 0; "
                    "fold a vector weight into N"
                )
        if form.matrix:
            if self.y0.dim() == 0 or lin.shape[-1] != self.y0.shape[-1]:
                raise ValueError(
                    f"the linear part is a {tuple(lin.shape)} matrix acting on the last dimension, which does not "
                    f"match the state's shape {tuple(self.y0.shape)}"
                )
        elif lin.dim() > 0:
            try:
                shape = torch.broadcast_shapes(lin.shape, self.y0.shape)
            except RuntimeError:
                shape = None
            if shape != self.y0.shape:
                raise ValueError(
                    f"{what} has shape {tuple(lin.shape)}, which does not broadcast to the state's shape "
                    f"{tuple(self.y0.shape)}: give a scalar, a diagonal broadcastable to the state, or "
                    "SemiLinearODE(..., matrix=True) for a (d, d) matrix acting on the last dimension"
                )

    def integrate(self, t: Tensor) -> Tensor:
        constructor = None
        if self.grid_constructor is not None:

            def constructor() -> Tensor:
                return self.grid_constructor(self.func, self.y0, t)

        grid = prepare_grid(t, step_size=self.step_size, grid_constructor=constructor, name="t", sign=self.sign)
        times = self._user_times(grid.times)
        real = self.y0.real.dtype if self.y0.is_complex() else self.y0.dtype
        t_state = times.to(device=self.y0.device, dtype=real)
        on_step = self._on_step(grid.times, t_state)
        # with grad mode off the loop writes each requested state straight into the result (no copy at the end)
        out = None if torch.is_grad_enabled() else self.y0.new_empty((len(grid.outputs), *self.y0.shape))
        try:
            states = self._solve(times, t_state, grid.outputs, on_step, out)
        finally:
            if self._bar is not None:
                self._bar.close()
        return out if out is not None else torch.stack(states)

    def _user_times(self, solver_times: Tensor) -> Tensor:
        """The grid in the user's time (torchdiffeq negates a decreasing ``t``), checked against the ODE's own
        conditions (a diffusion drift's time range and split)."""
        times = self.sign * solver_times
        check_grid = getattr(self.ode, "check_grid", None)
        if check_grid is not None:
            check_grid(times)
        elif isinstance(self.form, DiffusionForm):
            lo, hi = self.form.time_range
            bad = (times < lo) | (times > hi)
            if bool(bad.any()):
                raise ValueError(f"t = {times[bad][0].item():.8g} is outside the schedule's time range [{lo}, {hi}]")
        return times

    def _on_step(self, grid: Tensor, t_state: Tensor) -> Any:
        """``on_step(n, x_n)`` for the loop: torchdiffeq's ``callback_step`` (solver time, state, step), the option
        ``callback(n, t_n, x_n)`` (the user's time) and the progress bar; ``None`` when there is none of them, so an
        unobserved loop pays nothing."""
        callback_step = getattr(self.func, "callback_step", None)
        if callback_step is getattr(_td_misc, "_null_callback", None):
            callback_step = None  # torchdiffeq's placeholder when the user's func has no callback_step
        self._bar = _make_progress(grid.numel() - 1, self.method) if self.progress else None
        hooks = []
        if callback_step is not None:
            grid_state = grid.to(device=t_state.device, dtype=t_state.dtype)
            dts = grid_state[1:] - grid_state[:-1]
            hooks.append(lambda n, x: callback_step(grid_state[n], x, dts[n]))
        self._x0_callback = None
        if self.callback is not None:
            user = self.callback
            if hasattr(self.ode, "predict"):
                # a diffusion drift: called after the model's evaluation at step n, with its x0 prediction
                self._x0_callback = user
                if isinstance(self, RhoRKSolver):  # (its evaluations are at stage times: no x0 per grid point)
                    hooks.append(lambda n, x: user(n, t_state[n], x, None))
            else:
                hooks.append(lambda n, x: user(n, t_state[n], x))
        if self._bar is not None:
            bar = self._bar
            hooks.append(lambda n, x: bar.update(1))
        if not hooks:
            return None
        if len(hooks) == 1:
            return hooks[0]

        def on_step(n: int, x: Tensor) -> None:
            for hook in hooks:
                hook(n, x)

        return on_step

    def _nonlinear(self, times: Tensor) -> tuple[Any, np.ndarray | None, list[float] | None, str | None]:
        """``(nonlinear, node_scale, shift, kind)`` for the loop: a diffusion drift without thresholding hands the
        loop its model (called as ``model(x, t)``; the loop checks the output's shape) and the affine conversion of its
        output to ``N`` (folded into the coefficients, see
        :meth:`~deis_ode.diffusion.DiffusionODE.output_conversion`); any other ODE its ``nonlinear_part``. ``kind``
        is the prediction that ``nonlinear`` returns (for the callback's data prediction), ``None`` outside
        diffusion."""
        conversion = getattr(self.ode, "output_conversion", None)
        if conversion is not None:
            folded = conversion(times[:-1])  # N is evaluated at every grid point but the last
            if folded is not None:
                scale, shift = folded
                node_scale = np.append(scale.numpy(), 1.0)
                if bool((scale == 1.0).all()):
                    node_scale = None
                shift_list = None if bool((shift == 0.0).all()) else shift.tolist()
                model = self.ode.model

                def output(t: Tensor, x: Tensor) -> Tensor:
                    return model(x, t)  # t: a 0-dim tensor of the state's dtype on its device, as the drift documents

                return output, node_scale, shift_list, self.ode.prediction
        return self.ode.nonlinear_part, None, None, self.ode_kind()

    def _solve(
        self, times: Tensor, t_state: Tensor, outputs: list[int], on_step: Any, out: Tensor | None = None
    ) -> list[Tensor]:
        """Run the method on the grid ``times`` (the user's time, float64 on the host; ``t_state`` is the same grid
        on the state's device and real dtype) and return the states at the grid indices ``outputs`` (written into the
        rows of ``out`` when it is given)."""
        if isinstance(self.form, OperatorForm):  # sparse / matrix-free A: Krylov products (solvers/krylov_multistep)
            plan = build_operator_plan(times, self.order, self.warmup, self.lower_order_final)
            self.ode.krylov_stats = stats = KrylovStats()
            op, nonlinear = self.form.operator, self.ode.nonlinear_part
            states = run_operator_plan(
                plan, op, nonlinear, self.y0, t_state, outputs, on_step, stats=stats, **self.krylov
            )
            if out is not None:
                for row, state in zip(out.unbind(0), states, strict=True):
                    row.copy_(state)
            return states
        nonlinear, node_scale, shift, kind = self._nonlinear(times)
        grid, nonlinear = self._reporting(t_state, nonlinear, kind)
        plan = build_plan(self.form, self.basis, times, self.order, self.warmup, self.lower_order_final, node_scale)
        placed = place_plan(plan, self.y0)
        return run_plan(placed, nonlinear, self.y0, grid, outputs, on_step, shift=shift, out=out)

    def ode_kind(self) -> str | None:
        """The prediction that ``nonlinear_part`` returns (a diffusion drift's split), or ``None``."""
        return getattr(self.ode, "extrapolate", None)

    def _reporting(self, t_state: Tensor, nonlinear: Any, kind: str | None) -> tuple[list[Tensor], Any]:
        """The grid as a list of 0-dim tensors (what the loop hands ``nonlinear``) and ``nonlinear``, wrapped, for a
        diffusion drift with a ``callback``, to call ``callback(n, t_n, x_n, x0_n)`` after the first evaluation at
        each grid point ``n``, ``x0_n`` the data prediction converted from the output of kind ``kind``."""
        grid = list(t_state.unbind(0))
        callback = getattr(self, "_x0_callback", None)
        if callback is None:
            return grid, nonlinear
        index = {id(t): n for n, t in enumerate(grid)}
        seen: set[int] = set()
        ode = self.ode

        def reporting(t: Tensor, x: Tensor) -> Tensor:
            value = nonlinear(t, x)
            n = index.get(id(t))
            if n is not None and n not in seen:
                seen.add(n)
                callback(n, t, x, ode._convert(t, x, value, kind, "x0"))
            return value

        return grid, reporting

    def integrate_until_event(self, t0: Tensor, event_fn: Any) -> Any:
        raise NotImplementedError(f"method {self.method!r} does not support event_fn; use a torchdiffeq method")


def _make(order: int) -> type[DEISSolver]:
    doc = f"Exponential Adams-Bashforth with {order} node(s): global order {order} (deis{order})."
    return type(f"DEIS{order}Solver", (DEISSolver,), {"order": order, "__doc__": doc})


METHODS: dict[str, type[DEISSolver]] = {f"deis{k}": _make(k) for k in range(1, 6)}

_VARIANT_OPTIONS = ("step_size", "grid_constructor", "callback", "progress")


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
        callback: Any = None,
        progress: bool = False,
        **kwargs: Any,
    ) -> None:
        self._reject_unknown_options(kwargs, _VARIANT_OPTIONS)
        super().__init__(
            func,
            y0,
            step_size=step_size,
            grid_constructor=grid_constructor,
            callback=callback,
            progress=progress,
            **kwargs,
        )
        self._eps = self.ode.nonlinear_part
        if isinstance(self.form, DiffusionForm) and self.form.sign == 1:
            # An x0-split drift describes the same ODE: integrate its eps split (the model's eps prediction).
            ode = self.ode
            self.form = diffusion_form(ode.schedule, "eps")

            def eps(t: Tensor, x: Tensor) -> Tensor:
                return ode.predict(t, x, "eps")

            self._eps = eps
        require_eps_diffusion(self.form, self.method)


class IPNDMSolver(DiffusionVariantSolver):
    """iPNDM: DDIM steps with the fixed Adams-Bashforth combination of the last (up to 4) eps values, lower-order
    start (:mod:`deis_ode.solvers.ipndm`). Order 2 on grids uniform in rho, 1 evaluation per step."""

    method = "ipndm"
    order = 4
    build = staticmethod(build_ipndm_plan)

    def _solve(
        self, times: Tensor, t_state: Tensor, outputs: list[int], on_step: Any, out: Tensor | None = None
    ) -> list[Tensor]:
        plan = place_plan(self.build(self.form, times), self.y0)
        grid, eps = self._reporting(t_state, self._eps, "eps")
        return run_plan(plan, eps, self.y0, grid, outputs, on_step, out=out)


class IPNDMVSolver(IPNDMSolver):
    """Variable-step iPNDM: Adams-Bashforth in rho with the coefficients of the actual steps, lower-order start;
    identical to ``deis4`` with ``basis="rho"``, ``warmup="lower_order"``. 1 evaluation per step."""

    method = "ipndm_v"
    build = staticmethod(build_ipndm_v_plan)


class RhoRKSolver(DiffusionVariantSolver):
    """rho-Runge-Kutta of order ``order`` (:mod:`deis_ode.solvers.rho_rk`): ``order`` evaluations per step."""

    def _solve(
        self, times: Tensor, t_state: Tensor, outputs: list[int], on_step: Any, out: Tensor | None = None
    ) -> list[Tensor]:
        plan = place_rho_rk_plan(build_rho_rk_plan(self.form, times, self.order), self.y0)
        stage_times = plan.stage_times.to(device=t_state.device, dtype=t_state.dtype)
        states = run_rho_rk(plan, self._eps, self.y0, stage_times, outputs, on_step)
        if out is not None:
            for row, state in zip(out.unbind(0), states, strict=True):
                row.copy_(state)
        return states


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
