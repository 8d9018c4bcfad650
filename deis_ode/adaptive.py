"""Error-controlled DEIS in torchdiffeq: the methods ``adaptive_deis2`` .. ``adaptive_deis5``.

``torchdiffeq.odeint(ode, x0, t, method="adaptive_deis4", rtol=1e-6, atol=1e-8)`` integrates a
:class:`~deis_ode.SemiLinearODE` (or a diffusion drift) with the variable-step exponential Adams-Bashforth method of
``K`` nodes (global order ``K``) and chooses its steps to keep the estimated local error below
``atol + rtol |x|`` (:mod:`deis_ode.solvers.adaptive`; docs/method.md, *Error-controlled stepping*). As with
torchdiffeq's adaptive methods, ``t`` lists output times only; each is stepped to exactly (no interpolation).

Options (torchdiffeq's names; anything else raises ``ValueError``):

* ``first_step``: the first step (default: Hairer-Norsett-Wanner's guess from ``|x0|`` and ``|N(t0, x0)|``,
  corrected by the first step's own error estimate);
* ``max_num_steps``: attempted steps (accepted + rejected) before a ``RuntimeError`` that says how far the solve
  got (default 100000);
* ``safety`` (0.9), ``ifactor`` (5: largest growth of the step once the method extrapolates; steps with one
  node may grow up to 100x), ``dfactor`` (0.2: largest shrink);
* ``norm``: ``tensor -> scalar`` applied to the scaled error (default torchdiffeq's RMS norm);
* ``basis``: the interpolation variable (``"t"``, and for diffusion drifts ``"rho"`` / ``"logrho"``);
* ``krylov_tol``, ``krylov_max_dim``: for sparse or matrix-free linear parts only (:mod:`deis_ode.linear`), whose
  steps are two Krylov phi-products each (:mod:`deis_ode.solvers.adaptive_krylov`): the Krylov tolerance (default
  ``min(1e-10, 0.01 rtol)`` for float64 states, ``min(1e-7, 0.01 rtol)`` otherwise, so that the products' errors
  stay 100x below the error control's; a given value is used as it is) and largest dimension (default 64). The
  counters of the products are left in ``ode.krylov_stats`` (:class:`~deis_ode.linear.KrylovStats`).

``rtol`` and ``atol`` must be positive and finite (Python numbers or tensors broadcastable to the state). A float32
(or lower precision) state cannot resolve errors near its round-off: ``rtol`` below 8 units of round-off of the
state's real dtype (9.5e-7 for float32) raises ``ValueError``; use a float64 state for tighter tolerances.

After a solve, ``AdaptiveDEISSolver.last_stats`` holds its :class:`~deis_ode.solvers.adaptive.AdaptiveStats`
(accepted and rejected steps, evaluations of ``N``, the time reached): a diagnostic of the most recent solve in
this process. The callbacks ``callback_step``, ``callback_accept_step`` and ``callback_reject_step`` of the ODE
module are called as torchdiffeq's adaptive solvers call them, with the user's time.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import Tensor
from torchdiffeq._impl import misc as _td_misc
from torchdiffeq._impl.misc import _rms_norm

from .forms import OperatorForm
from .methods import DEISSolver
from .solvers.adaptive import MIN_RTOL_ULPS, AdaptiveStats, Controls, integrate_adaptive
from .solvers.adaptive_krylov import OperatorSteps, check_krylov_options, krylov_tolerance
from .solvers.grid import prepare_grid
from .solvers.krylov_multistep import MAX_DIM

_OPTIONS = (
    "first_step",
    "max_num_steps",
    "safety",
    "ifactor",
    "dfactor",
    "norm",
    "basis",
    "krylov_tol",
    "krylov_max_dim",
)


def _positive_number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"option {name} must be a positive finite number, got {value!r}")
    return float(value)


def _tolerance(name: str, value: Any, like: Tensor) -> float | Tensor:
    """A positive finite tolerance, as a float or a real tensor on the state's device."""
    if isinstance(value, Tensor):
        if value.is_complex() or not bool(torch.isfinite(value).all() and (value > 0).all()):
            raise ValueError(f"{name} must be positive and finite, got {value}")
        real = like.real.dtype if like.is_complex() else like.dtype
        if value.dim() == 0:
            return float(value)
        try:
            torch.broadcast_shapes(value.shape, like.shape)
        except RuntimeError:
            raise ValueError(
                f"{name} has shape {tuple(value.shape)}, which does not broadcast to the state's {tuple(like.shape)}"
            ) from None
        return value.to(device=like.device, dtype=real)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise ValueError(
            f"{name} must be a positive finite number (an absolute tolerance of 0 divides by zero where the "
            f"solution vanishes), got {value!r}"
        )
    return float(value)


class AdaptiveDEISSolver:
    """Base class of the registered ``adaptive_deisK`` solvers (``order`` is K)."""

    order: int
    _deis_ode_method = True  # marks classes registered by deis_ode (registration is idempotent)
    #: statistics of the most recent solve in this process (a diagnostic)
    last_stats: ClassVar[AdaptiveStats | None] = None

    def __init__(
        self,
        func: Any,
        y0: Tensor,
        rtol: float | Tensor = 1e-7,
        atol: float | Tensor = 1e-9,
        *,
        norm: Any = None,
        first_step: float | None = None,
        max_num_steps: int = 100_000,
        safety: float = 0.9,
        ifactor: float = 5.0,
        dfactor: float = 0.2,
        basis: str | None = None,
        krylov_tol: float | None = None,
        krylov_max_dim: int | None = None,
        **kwargs: Any,
    ) -> None:
        if kwargs:
            raise ValueError(
                f"method {self.method!r}: unknown option(s) {sorted(kwargs)}; valid options are {list(_OPTIONS)}"
            )
        if not isinstance(y0, Tensor) or not (y0.is_floating_point() or y0.is_complex()):
            raise TypeError(f"the initial state must be a floating point or complex tensor, got {type(y0)}")
        DEISSolver._resolve(self, func, basis)  # the same ODE, form and basis checks as deisK
        self.y0 = y0
        given = {k: v for k, v in (("krylov_tol", krylov_tol), ("krylov_max_dim", krylov_max_dim)) if v is not None}
        if isinstance(self.form, OperatorForm):
            check_krylov_options(krylov_tol, MAX_DIM if krylov_max_dim is None else krylov_max_dim)
        elif given:
            raise ValueError(
                f"method {self.method!r}: options {sorted(given)} need a sparse or operator linear part "
                "(deis_ode.linear)"
            )
        self.krylov_options = (krylov_tol, MAX_DIM if krylov_max_dim is None else krylov_max_dim)
        DEISSolver._check_linear_shape(self)  # the same shape checks as deisK (check_operator for an operator)
        rtol = _tolerance("rtol", rtol, y0)
        atol = _tolerance("atol", atol, y0)
        real = y0.real.dtype if y0.is_complex() else y0.dtype
        floor = MIN_RTOL_ULPS * torch.finfo(real).eps
        smallest = float(rtol.min()) if isinstance(rtol, Tensor) else rtol
        if smallest < floor:
            raise ValueError(
                f"rtol = {smallest:.3g} is below what a {real} state can deliver (round-off "
                f"{torch.finfo(real).eps:.2g}; rtol >= {floor:.2g} needed): use a float64 state or a larger rtol"
            )
        if first_step is not None:
            first_step = _positive_number("first_step", first_step)
        if isinstance(max_num_steps, bool) or not isinstance(max_num_steps, int) or max_num_steps < 1:
            raise ValueError(f"option max_num_steps must be a positive integer, got {max_num_steps!r}")
        safety = _positive_number("safety", safety)
        if safety > 1:
            raise ValueError(f"option safety must be in (0, 1], got {safety!r}")
        ifactor = _positive_number("ifactor", ifactor)
        if ifactor <= 1:
            raise ValueError(f"option ifactor must be > 1, got {ifactor!r}")
        dfactor = _positive_number("dfactor", dfactor)
        if dfactor >= 1:
            raise ValueError(f"option dfactor must be in (0, 1), got {dfactor!r}")
        if norm is None:
            norm = _rms_norm
        elif not callable(norm):
            raise ValueError(f"option norm must be a callable tensor -> scalar, got {type(norm).__name__}")
        self.controls = Controls(rtol, atol, norm, safety, ifactor, dfactor, first_step, max_num_steps)
        self.stats = AdaptiveStats()

    @property
    def method(self) -> str:
        return f"adaptive_deis{self.order}"

    @classmethod
    def valid_callbacks(cls) -> set[str]:
        return {"callback_step", "callback_accept_step", "callback_reject_step"}

    def _callbacks(self) -> dict[str, Any]:
        out = {}
        for name in self.valid_callbacks():
            callback = getattr(self.func, name, None)
            if callback is not None and callback is not getattr(_td_misc, "_null_callback", None):
                out[name] = callback
        return out

    def integrate(self, t: Tensor) -> Tensor:
        """The states at the output times ``t`` (the solver's increasing time)."""
        t64 = prepare_grid(t, name="t", sign=self.sign).times  # the output times, checked
        DEISSolver._user_times(self, t64)  # checked against the ODE's own conditions
        self.stats = AdaptiveStats()
        type(self).last_stats = AdaptiveDEISSolver.last_stats = self.stats
        krylov = None
        if isinstance(self.form, OperatorForm):
            if torch.is_grad_enabled() and self.y0.requires_grad:  # phiv refuses it too; say so before the first step
                raise NotImplementedError(
                    f"method {self.method!r}: gradients through the Krylov phi-products of a sparse or operator linear "
                    "part are not supported: run the solve under torch.no_grad(), or use torchdiffeq.odeint_adjoint "
                    "with a general adjoint_method"
                )
            tol, max_dim = self.krylov_options
            tol = krylov_tolerance(self.y0.dtype, self.controls.rtol, tol)
            krylov = OperatorSteps(self.form.operator, tol, max_dim)
        try:
            states = integrate_adaptive(
                self.form,
                self.basis,
                self.ode.nonlinear_part,
                self.y0,
                t64.tolist(),
                self.sign,
                self.order,
                self.controls,
                self.stats,
                self._callbacks(),
                self.ode.weight_part,
                krylov,
            )
        finally:
            if krylov is not None:  # the counters of the products, also after a failure
                self.ode.krylov_stats = krylov.stats
        return torch.stack([self.y0, *states])

    def integrate_until_event(self, t0: Tensor, event_fn: Any) -> Any:
        raise NotImplementedError(f"method {self.method!r} does not support event_fn; use a torchdiffeq method")


def _make(order: int) -> type[AdaptiveDEISSolver]:
    doc = (
        f"Error-controlled exponential Adams-Bashforth with {order} nodes (global order {order}); local error "
        f"estimated from the {order + 1}-node prediction."
    )
    return type(f"AdaptiveDEIS{order}Solver", (AdaptiveDEISSolver,), {"order": order, "__doc__": doc})


METHODS: dict[str, type[AdaptiveDEISSolver]] = {f"adaptive_deis{k}": _make(k) for k in range(2, 6)}
