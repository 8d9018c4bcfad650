"""Reference solutions from scipy's ``solve_ivp`` in float64 at tight tolerances.

A reference integrates the *full* drift ``ode(t, x)`` (for a :class:`~deis_ode.SemiLinearODE`
that is ``L(t) x + W(t) N(t, x)``) as one flat real system: a batched state is flattened, and a
complex state is split into its real and imaginary parts, a real system of twice the size.
It knows nothing about the semi-linear structure, so it checks the ``deis*`` methods
independently of the way they treat ``L`` and ``W``.

Example::

    ref = reference.solve(ode, x0, torch.tensor([0.0, 0.5, 1.0]))
    ref.states[-1]        # x(1), float64 (or complex128), on the CPU
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

__all__ = ["ReferenceSolution", "solve", "IMPLICIT_METHODS", "InHalfLogSNR"]

#: scipy methods that solve linear systems with the Jacobian of the drift.
IMPLICIT_METHODS = ("Radau", "BDF", "LSODA")
_EXPLICIT_METHODS = ("RK23", "RK45", "DOP853")

Drift = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class ReferenceSolution:
    """What :func:`solve` returns.

    Attributes:
        states: the solution at each requested time, shape ``(len(t), *x0.shape)``, float64
            (complex128 for a complex state), on the CPU. ``states[0]`` is ``x0``.
        t: the requested times (float64, CPU).
        method: the scipy method used.
        rtol, atol: the tolerances it was run at.
        nfev: evaluations of the drift made by scipy (the Jacobian's are not included).
    """

    states: Tensor
    t: Tensor
    method: str
    rtol: float
    atol: float
    nfev: int


def _as_times(t: Tensor | Sequence[float]) -> Tensor:
    times = torch.as_tensor(t).detach()
    if times.is_complex() or times.dim() > 1:
        raise ValueError(f"t must be a 1-D sequence of real times, got shape {tuple(times.shape)}, {times.dtype}")
    times = times.to(device="cpu", dtype=torch.float64).reshape(-1)
    if times.numel() == 0:
        raise ValueError("t must hold at least one time")
    if not torch.isfinite(times).all():
        raise ValueError(f"t must be finite, got {times.tolist()}")
    if times.numel() > 1:
        steps = times[1:] - times[:-1]
        if not ((steps > 0).all() or (steps < 0).all()):
            raise ValueError(
                f"t must be strictly increasing or strictly decreasing (no repeated times), got {times.tolist()}"
            )
    return times


class _FlatSystem:
    """The drift as a real function of a flat float64 vector, as scipy wants it."""

    def __init__(self, ode: Drift, like: Tensor) -> None:
        self.ode = ode
        self.shape = like.shape
        self.device = like.device
        self.complex = like.is_complex()
        self.size = like.numel()

    def pack(self, x: Tensor) -> np.ndarray:
        flat = x.detach().reshape(-1)
        if self.complex:
            flat = torch.cat([flat.real, flat.imag])
        elif flat.is_complex():
            raise ValueError(
                "the drift is complex for a real state (a complex linear part?); pass a complex x0 "
                "(e.g. x0.to(torch.complex128)) to integrate it"
            )
        return flat.to(device="cpu", dtype=torch.float64).numpy()

    def unpack(self, y: Tensor) -> Tensor:
        if self.complex:
            y = torch.complex(y[: self.size], y[self.size :])
        return y.reshape(self.shape)

    def time(self, t: float) -> Tensor:
        return torch.tensor(t, dtype=torch.float64, device=self.device)

    def drift(self, t: Tensor, y: Tensor) -> Tensor:
        """The drift as a torch function of the flat real vector ``y`` (for autograd)."""
        out = self.ode(t, self.unpack(y))
        if not isinstance(out, Tensor) or out.shape != self.shape:
            shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(f"ode(t, x) returned {shape}; expected the state's shape {tuple(self.shape)}")
        flat = out.reshape(-1)
        if self.complex:
            flat = torch.cat([flat.real, flat.imag])
        elif flat.is_complex():
            self.pack(flat)  # raises the explanatory error
        return flat.to(torch.float64)

    def __call__(self, t: float, y: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            out = self.drift(self.time(t), torch.from_numpy(np.ascontiguousarray(y, dtype=np.float64)).to(self.device))
        return out.cpu().numpy()

    def jacobian(self, t: float, y: np.ndarray) -> np.ndarray:
        """The exact Jacobian of the real system, by reverse-mode autograd."""
        yt = torch.from_numpy(np.array(y, dtype=np.float64)).to(self.device)
        tt = self.time(t)
        with torch.enable_grad():
            jac = torch.autograd.functional.jacobian(lambda v: self.drift(tt, v), yt, vectorize=True)
        return jac.detach().cpu().numpy()


def _jacobian_for(system: _FlatSystem, method: str, jac: str | Callable | None, t0: float, y0: np.ndarray):
    if method not in IMPLICIT_METHODS or jac is None or jac == "fd":
        return None  # explicit methods need none; "fd": scipy's own finite differences
    if callable(jac):
        return jac
    if jac != "auto":
        raise ValueError(f"jac must be 'auto', 'fd', None or a callable (t, y) -> matrix, got {jac!r}")
    try:  # an autograd Jacobian when the drift is differentiable, else scipy's finite differences
        system.jacobian(t0, y0)
    except Exception:  # noqa: BLE001 - any failure (non-differentiable, not vmappable) means "use fd"
        return None
    return system.jacobian


def solve(
    ode: Drift,
    x0: Tensor,
    t: Tensor | Sequence[float],
    *,
    method: str = "DOP853",
    rtol: float = 1e-12,
    atol: float = 1e-12,
    jac: str | Callable | None = "auto",
) -> ReferenceSolution:
    """Integrate ``dx/dt = ode(t, x)`` from ``x0`` at ``t[0]`` with scipy, in float64.

    Args:
        ode: the drift, usually a :class:`~deis_ode.SemiLinearODE` (its ``forward`` is the full
            drift). It is called as ``ode(t, x)`` with a 0-dim float64 ``t`` and a float64 (or
            complex128) ``x`` of ``x0``'s shape, on ``x0``'s device, under ``torch.no_grad``.
        x0: the initial state, any shape (a batch is integrated as one system), real or complex.
        t: the output times, strictly increasing or strictly decreasing; ``t[0]`` is the time
            of ``x0``.
        method: a ``scipy.integrate.solve_ivp`` method: ``"DOP853"`` (default), ``"RK45"``,
            ``"RK23"``, or the implicit ``"Radau"``, ``"BDF"``, ``"LSODA"`` for stiff drifts.
        rtol, atol: scipy's tolerances.
        jac: for the implicit methods only: ``"auto"`` (default) gives scipy the exact Jacobian
            of the drift by torch autograd, falling back to scipy's finite differences when the
            drift cannot be differentiated; ``"fd"`` (or ``None``) always uses finite
            differences; a callable ``(t, y) -> matrix`` is passed through (``y`` is the flat
            real state: real and imaginary parts stacked for a complex state).

    Returns:
        a :class:`ReferenceSolution`.

    Raises:
        ValueError: for bad times, an unknown method, or a complex drift on a real state.
        RuntimeError: when scipy reports a failure (its message is included).
    """
    if method not in IMPLICIT_METHODS + _EXPLICIT_METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {IMPLICIT_METHODS + _EXPLICIT_METHODS}")
    times = _as_times(t)
    x0 = torch.as_tensor(x0).detach()
    x0 = x0.to(torch.complex128 if x0.is_complex() else torch.float64)
    system = _FlatSystem(ode, x0)
    y0 = system.pack(x0)

    if times.numel() == 1:
        return ReferenceSolution(x0.cpu()[None].clone(), times, method, rtol, atol, 0)

    t_eval = times.numpy()
    span = (float(t_eval[0]), float(t_eval[-1]))
    options = {}
    jacobian = _jacobian_for(system, method, jac, span[0], y0)
    if jacobian is not None:
        options["jac"] = jacobian
    # One solve per interval between requested times, each ending exactly on its time: the states are step
    # results at the requested tolerance, not values of the dense-output interpolant (which, on long steps, is
    # less accurate than the steps themselves).
    rows, nfev, y = [y0], 0, y0
    for a, b in zip(t_eval[:-1], t_eval[1:], strict=True):
        from scipy.integrate import solve_ivp  # imported on first use

        sol = solve_ivp(system, (float(a), float(b)), y, method=method, rtol=rtol, atol=atol, **options)
        nfev += int(sol.nfev)
        if sol.status != 0 or not sol.success:
            reached = sol.t[-1] if sol.t.size else a
            raise RuntimeError(f"scipy solve_ivp ({method}) failed near t={reached}: {sol.message}")
        y = sol.y[:, -1]
        rows.append(y)
    flat = torch.from_numpy(np.ascontiguousarray(np.stack(rows)))
    if system.complex:
        states = torch.complex(flat[:, : system.size], flat[:, system.size :])
    else:
        states = flat
    states = states.reshape(len(t_eval), *x0.shape)
    states[0] = x0.cpu()  # exactly the initial state, not scipy's copy of it
    return ReferenceSolution(states, times, method, rtol, atol, nfev)


class InHalfLogSNR:
    r"""A diffusion drift as an ODE in the half log-SNR ``lambda = log(alpha / sigma)``:

        dx / dlambda = f(t, x) / (dlambda / dt),   t = t(lambda).

    A discrete (interpolated) schedule is only piecewise smooth in ``t`` but the drift is smooth in ``lambda``, so a
    reference integrated in ``lambda`` reaches its tolerance without tracking the kinks:
    ``solve(InHalfLogSNR(drift), x, schedule.half_log_snr(t))`` gives the states at times ``t``.

    Args:
        drift: a diffusion drift (``drift.schedule`` provides ``t_of_half_log_snr`` and ``d_half_log_snr``).
    """

    def __init__(self, drift: Drift) -> None:
        self.drift = drift
        self.schedule = drift.schedule

    def __call__(self, lam: Tensor, x: Tensor) -> Tensor:
        t = self.schedule.t_of_half_log_snr(lam)
        return self.drift(t, x) / self.schedule.d_half_log_snr(t)
