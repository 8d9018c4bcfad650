"""The semi-linear ODE ``dx/dt = L(t) x + W(t) N(t, x)``.

:class:`SemiLinearODE` is a ``torch.nn.Module`` whose ``forward(t, x)`` returns the full drift,
so every torchdiffeq method (``dopri5``, ``rk4``, ...) integrates it unchanged, while the
``deis*`` methods read its linear part and weight through :meth:`~SemiLinearODE.exponential_form`
and extrapolate only ``N``.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable

import torch
from torch import Tensor, nn

from .forms import ExponentialForm, LinearForm, OperatorForm
from .linear.operators import as_operator, is_operator

_COMPLEX_OF = {torch.float16: torch.complex32, torch.float32: torch.complex64, torch.float64: torch.complex128}

Linear = float | complex | Tensor | Callable[[Tensor], float | complex | Tensor]


def cast_like_state(value: float | complex | Tensor, x: Tensor) -> float | complex | Tensor:
    """``value`` on ``x``'s device in ``x``'s precision (complex stays complex), so that
    ``value * x`` keeps the state's dtype instead of promoting it to float64."""
    if not isinstance(value, Tensor):
        return value
    dtype = x.dtype
    if value.is_complex() and not x.is_complex():
        dtype = _COMPLEX_OF.get(x.dtype, torch.complex128)
    return value.to(device=x.device, dtype=dtype)


class SemiLinearODE(nn.Module):
    r"""``dx/dt = L(t) x + W(t) N(t, x)``.

    Args:
        linear: ``L``. A Python number, a tensor broadcastable against the state (a diagonal
            linear part, e.g. Fourier symbols; real or complex), or a callable ``t -> L(t)``
            returning either. A tensor that requires grad is differentiated through.
            Or a constant operator acting on the last dimension of the state: a torch sparse ``(d, d)``
            matrix (COO or CSR), a :class:`deis_ode.linear.DenseMatrix`, or any object with
            ``shape == (d, d)`` and ``A @ v`` (the protocol of :mod:`deis_ode.linear`); the ``deis*``
            methods then apply ``exp(h A)`` and the phi-functions by Krylov products, never forming a
            dense matrix. A dense square 2-D tensor is ambiguous (a matrix, or diagonal symbols of a 2-D
            field?) and needs ``matrix=True`` or ``matrix=False``.
        nonlinear: ``N(t, x)``, the part the ``deis*`` methods extrapolate by a polynomial.
            An ``nn.Module`` is registered as a submodule (its parameters are found by
            ``odeint_adjoint``).
        weight: optional scalar ``W(t)`` (a callable of ``t``); ``None`` means ``W = 1``.
        matrix: ``True``: ``linear`` is a constant dense ``(d, d)`` matrix acting on the last dimension of the
            state (``L x`` is ``x @ L.T``), for small coupled linear parts; the transition and the phi-functions
            are dense matrices (``O(d^3)`` once per grid). ``False``: a tensor is a diagonal, broadcast against
            the state. ``None`` (default): ``False``, except that a dense square 2-D tensor is refused.
        linear_integral: optional exact ``(t, s) -> \int_s^t L`` for a time-varying ``L``;
            without it the solver integrates ``L`` by Gauss-Legendre quadrature.

    The transition is ``Phi(t, s) = exp(\int_s^t L)``. The ``deis*`` methods integrate the
    linear part exactly, so their accuracy depends only on how well ``N`` is approximated
    by a polynomial in time, not on the stiffness of ``L``.
    """

    #: Warm-up used by the ``deis*`` methods when the user does not choose one.
    default_warmup: str = "full_order"

    def __init__(
        self,
        linear: Linear,
        nonlinear: Callable[[Tensor, Tensor], Tensor],
        weight: Callable[[Tensor], float | Tensor] | None = None,
        *,
        linear_integral: Callable[[Tensor, Tensor], Tensor] | None = None,
        matrix: bool | None = None,
    ) -> None:
        super().__init__()
        if not callable(nonlinear):
            raise TypeError(f"nonlinear must be a callable (t, x) -> N(t, x), got {type(nonlinear).__name__}")
        if weight is not None and not callable(weight):
            raise TypeError(f"weight must be a callable t -> W(t) or None, got {type(weight).__name__}")
        self.operator = None
        if is_operator(linear):
            if matrix:
                raise ValueError(
                    "matrix=True needs a dense (d, d) tensor; a sparse or operator linear part is already one"
                )
            if weight is not None:
                raise ValueError("a sparse or operator linear part is supported with W = 1 only (weight=None)")
            if linear_integral is not None:
                raise ValueError("linear_integral is only meaningful for a time-varying (callable) linear part")
            self.operator = as_operator(linear, "linear")
            linear = self.operator
        elif isinstance(linear, bool) or not (isinstance(linear, (numbers.Number, Tensor)) or callable(linear)):
            raise TypeError(
                "linear must be a number, a tensor (diagonal linear part), a torch sparse matrix or operator "
                f"(see deis_ode.linear), or a callable t -> L(t), got {type(linear).__name__}"
            )
        if (
            matrix is None
            and isinstance(linear, Tensor)
            and linear.dim() == 2
            and linear.shape[0] == linear.shape[1] > 1
        ):
            d = linear.shape[0]
            raise ValueError(
                f"linear is a dense ({d}, {d}) tensor: say what it means. A matrix acting on the last dimension "
                "of the state: pass matrix=True (dense phi-functions, small d), or a sparse matrix "
                "(linear.to_sparse()) or deis_ode.linear.DenseMatrix(linear) (Krylov products, large d). "
                "Diagonal symbols of a 2-D field, multiplied elementwise: pass matrix=False"
            )
        matrix = bool(matrix)
        if linear_integral is not None and not callable(linear):
            raise ValueError("linear_integral is only meaningful for a time-varying (callable) linear part")
        if matrix and not (isinstance(linear, Tensor) and linear.dim() == 2 and linear.shape[0] == linear.shape[1]):
            raise ValueError(
                "matrix=True needs linear to be a constant square (d, d) tensor acting on the last dimension, got "
                + (f"shape {tuple(linear.shape)}" if isinstance(linear, Tensor) else type(linear).__name__)
            )
        self.matrix = matrix
        if isinstance(linear, numbers.Number):
            linear = torch.tensor(linear, dtype=torch.complex128 if isinstance(linear, complex) else torch.float64)
        if self.operator is not None:
            self.linear = self.operator
        elif isinstance(linear, Tensor) and not isinstance(linear, nn.Parameter):
            self.register_buffer("linear", linear, persistent=False)
        else:
            self.linear = linear
        self.nonlinear = nonlinear
        self.weight = weight
        self.linear_integral = linear_integral

    def linear_part(self, t: Tensor) -> float | complex | Tensor:
        """``L(t)``."""
        if self.operator is not None:
            return self.operator
        return self.linear(t) if callable(self.linear) else self.linear

    def weight_part(self, t: Tensor) -> float | Tensor:
        """``W(t)`` (1 when no weight was given)."""
        return 1.0 if self.weight is None else self.weight(t)

    def nonlinear_part(self, t: Tensor, x: Tensor) -> Tensor:
        """``N(t, x)``, checked to have the state's shape."""
        out = self.nonlinear(t, x)
        if not isinstance(out, Tensor) or out.shape != x.shape:
            shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(
                f"nonlinear(t, x) returned {shape}; expected a tensor of the state's shape {tuple(x.shape)}"
            )
        return out

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        """The full drift ``L(t) x + W(t) N(t, x)`` (what dopri5, rk4, ... integrate)."""
        if self.operator is not None:
            drift = self.operator @ x
        else:
            linear = cast_like_state(self.linear_part(t), x)
            drift = x @ linear.T if self.matrix else linear * x
        return drift + cast_like_state(self.weight_part(t), x) * self.nonlinear_part(t, x)

    def exponential_form(self) -> ExponentialForm:
        """The description of ``L`` and ``W`` that the ``deis*`` methods integrate exactly."""
        if self.operator is not None:
            return OperatorForm(self.operator)
        if callable(self.linear):
            return LinearForm(None, self.linear, self.linear_integral, self.weight)
        return LinearForm(self.linear, None, None, self.weight, matrix=self.matrix)
