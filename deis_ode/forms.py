"""Exponential forms: what an ODE tells the solver about its linear part and its weight.

An ODE object describes *what* is integrated; the solver decides *how*. The bridge is one of
two plain descriptions, built by :meth:`deis_ode.SemiLinearODE.exponential_form`. Neither
contains numerics: they only name functions of time.

For ``dx/dt = L(t) x + W(t) N(t, x)`` with transition ``Phi(t, s) = exp(int_s^t L)``, one
exponential multistep step needs

    Phi(t_{n+1}, t_n)                                   (applied to x_n)
    C_{n,j} = int_{t_n}^{t_{n+1}} Phi(t_{n+1}, tau) W(tau) l_j(u(tau)) dtau   (applied to N_{n-j})

where ``l_j`` are Lagrange basis polynomials in a basis variable ``u``.

* :class:`LinearForm` is the general description: ``L`` constant (a scalar or a diagonal
  tensor, real or complex) or a callable of ``t``, an optional integral of ``L`` and an
  optional scalar weight. Its only basis is ``u = t``.
* :class:`OperatorForm`: a constant linear operator ``A`` acting on the last dimension of the state (a sparse
  matrix or a matrix-free object, :mod:`deis_ode.linear`) and ``W = 1``; the transition and the weights are
  applied to vectors by Krylov phi-function products instead of being formed.
* :class:`DiffusionForm` describes a diffusion probability-flow ODE, whose kernel factorises
  as ``Phi(t, tau) W(tau) dtau = m(t) d[exp(sign * lambda(tau))]`` with ``lambda`` the half
  log-SNR ``log(alpha / sigma)``. The eps split has ``m = alpha``, ``sign = -1`` (the clock
  is ``rho = sigma / alpha``); the x0 split has ``m = sigma``, ``sign = +1`` (the clock is
  ``1 / rho``). Its bases are ``"t"``, ``"rho"`` (``u = exp(-lambda)``) and ``"logrho"``
  (``u = -lambda``).

All callables take and return float64 tensors and are vectorised over their arguments.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass

from torch import Tensor

TimeFn = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class LinearForm:
    """``dx/dt = L(t) x + W(t) N(t, x)`` in general.

    Attributes:
        constant_linear: ``L`` when it does not depend on time (a 0-dim or diagonal tensor,
            real or complex, on its own device; it may require grad), else ``None``.
        linear_fn: ``t -> L(t)`` when ``L`` depends on time, else ``None``.
        linear_integral: ``(t, s) -> int_s^t L``, exact, when the user gave it; the solver
            integrates ``linear_fn`` by Gauss-Legendre quadrature otherwise.
        weight_fn: ``t -> W(t)`` (a scalar), or ``None`` for ``W = 1``.
        matrix: ``constant_linear`` is a dense ``(d, d)`` matrix acting on the last dimension of the state
            (``L x`` means ``x @ L.T``) instead of a diagonal.
    """

    constant_linear: Tensor | None
    linear_fn: TimeFn | None = None
    linear_integral: Callable[[Tensor, Tensor], Tensor] | None = None
    weight_fn: TimeFn | None = None
    matrix: bool = False

    bases = ("t",)


@dataclass(frozen=True)
class OperatorForm:
    """``dx/dt = A x + N(t, x)`` with a constant operator ``A`` on the last dimension of the state.

    Attributes:
        operator: ``A``, following the protocol of :mod:`deis_ode.linear.operators` (``shape == (d, d)``,
            ``A @ v`` on the last dimension).
    """

    operator: object

    bases = ("t",)


@dataclass(frozen=True)
class DiffusionForm:
    """A diffusion probability-flow ODE in exponential form.

    ``Phi(t, s) = m(t) / m(s)`` and ``Phi(t, tau) W(tau) dtau = m(t) d[exp(sign * lambda(tau))]``.

    Attributes:
        log_scale: ``t -> log m(t)``: ``log alpha`` (eps split) or ``log sigma`` (x0 split).
        log_cofactor: ``t -> log c(t)`` with ``c = m * exp(sign * lambda)``: ``log sigma``
            (eps split) or ``log alpha`` (x0 split).
        sign: ``-1`` for the eps split, ``+1`` for the x0 split (the x0 split of the reverse SDE with
            stochasticity ``eta`` has ``1 + eta^2``, see :mod:`deis_ode.diffusion.sde`).
        half_log_snr: ``t -> lambda(t) = log(alpha / sigma)``.
        d_half_log_snr: ``t -> d lambda / dt``.
        time_range: the closed interval of times on which the schedule is defined.
        t_of_half_log_snr: ``lambda -> t``, the exact inverse of ``half_log_snr``, or ``None`` when unknown.
            Only methods that evaluate ``N`` between grid points (the rho-Runge-Kutta variants) need it.
        breakpoints: sorted times where the schedule is only piecewise smooth (the knots of an interpolated
            discrete schedule), or ``None``; quadratures over ``t`` are split there.
        cache_key: a hashable value that identifies these functions (the same key means the same coefficients on the
            same grid), or ``None``: the solvers then recompute the coefficients at every solve.
    """

    log_scale: TimeFn
    log_cofactor: TimeFn
    sign: float
    half_log_snr: TimeFn
    d_half_log_snr: TimeFn
    time_range: tuple[float, float]
    t_of_half_log_snr: TimeFn | None = None
    breakpoints: Tensor | None = None
    cache_key: Hashable | None = None

    bases = ("t", "rho", "logrho")


ExponentialForm = LinearForm | OperatorForm | DiffusionForm
