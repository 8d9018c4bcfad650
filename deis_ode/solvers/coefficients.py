r"""Coefficients of one exponential quadrature step, in float64.

For ``dx/dt = L(t) x + W(t) N(t, x)`` and a step from ``t_a`` to ``t_b`` that approximates ``N`` by
the polynomial through nodes ``t_{(0)}, ..., t_{(K-1)}`` in a basis variable ``u``:

    x(t_b) ~ Phi(t_b, t_a) x(t_a) + sum_j C_j N(t_{(j)}, x_{(j)})
    C_j    = \int_{t_a}^{t_b} Phi(t_b, tau) W(tau) l_j(u(tau)) dtau,

with ``l_j`` the Lagrange basis polynomials. Writing ``u = u_a + theta h`` (``h = u_b - u_a``) and
``l_j(theta) = sum_k a_{jk} theta^k``, three cases have closed forms through the phi-functions
(``\int_0^1 e^{z(1-theta)} theta^k dtheta = k! phi_{k+1}(z)``):

* constant ``L``, ``W = 1``, ``u = t``:   ``C_j = h sum_k a_{jk} k! phi_{k+1}(L h)``;
* diffusion, ``u = -lambda`` ("logrho"): ``C_j = -s h c(t_b) sum_k a_{jk} k! phi_{k+1}(s h)``;
* diffusion, eps split, ``u = rho``:     ``C_j = m(t_b) h sum_k a_{jk} / (k + 1)``;

(``m``, ``c``, ``s`` as in :class:`deis_ode.forms.DiffusionForm`); with a single node (DDIM) the
diffusion weight is ``m(t_b) (e^{s lambda(t_b)} - e^{s lambda(t_a)})`` in every basis. Every other case is integrated by
adaptive Gauss-Legendre quadrature to 1e-14 relative. The functions here are pure: float64 tensors in,
float64 (or complex128) tensors out, differentiable with respect to a constant ``L``.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor

from ..forms import DiffusionForm, ExponentialForm, LinearForm
from . import quadrature
from .phi import phi_functions, phi_functions_host

F64 = torch.float64


def lagrange_monomials(theta: Tensor) -> Tensor:
    """Monomial coefficients ``a[j, k]`` of the Lagrange basis ``l_j(x) = sum_k a[j, k] x^k`` through
    the distinct nodes ``theta`` (1-D, float64), built as products of linear factors
    ``(x - theta_i) / (theta_j - theta_i)``. Differentiable when ``theta`` requires grad."""
    if not theta.requires_grad:
        # the same products in Python floats: a few hundred flops, for which tensor operations cost far more
        return torch.tensor(_lagrange_rows(theta.tolist()), dtype=F64).reshape(theta.numel(), theta.numel())
    theta = theta.to(F64)
    n = theta.numel()
    rows = []
    for j in range(n):
        poly = torch.zeros(n, dtype=F64)
        poly[0] = 1.0
        for i in range(n):
            if i == j:
                continue
            shifted = torch.cat([torch.zeros(1, dtype=F64), poly[:-1]])
            poly = (shifted - theta[i] * poly) / (theta[j] - theta[i])
        rows.append(poly)
    return torch.stack(rows)


def _lagrange_rows(theta: list[float]) -> list[list[float]]:
    """:func:`lagrange_monomials` for nodes given as Python floats."""
    n = len(theta)
    rows = []
    for j in range(n):
        poly = [1.0] + [0.0] * (n - 1)
        for i in range(n):
            if i == j:
                continue
            d = theta[j] - theta[i]
            shifted = [0.0, *poly[:-1]]
            poly = [(s - theta[i] * p) / d for s, p in zip(shifted, poly, strict=True)]
        rows.append(poly)
    return rows


@lru_cache(maxsize=16)
def _factorial_weights(n: int) -> Tensor:
    return torch.tensor([math.factorial(k) for k in range(n)], dtype=F64)


def exponential_weights(z: Tensor, h: Tensor, theta: Tensor) -> Tensor:
    """``C_j = h \\int_0^1 exp(z (1 - s)) l_j(s) ds`` for the Lagrange basis through ``theta``.

    ``z`` may be any shape (a diagonal linear part), real or complex; the result has shape
    ``(len(theta), *z.shape)``.
    """
    return weights_from_phi(phi_functions(z, theta.numel())[1:], h, theta)


def weights_from_phi(phis: Tensor, h: Tensor | float, theta: Tensor) -> Tensor:
    """:func:`exponential_weights` from precomputed ``phi_1(z) .. phi_k(z)`` (``phis``, shape ``(k, *z.shape)``,
    ``k = len(theta)``): ``C_j = h sum_k a_{jk} k! phi_{k+1}(z)``."""
    k = theta.numel()
    a = lagrange_monomials(theta) * _factorial_weights(k)  # a[j, k] k!
    return h * torch.tensordot(a.to(phis.dtype), phis, dims=1)


def batched_weights_from_phi(phis: np.ndarray, h: np.ndarray, theta: list[list[float]]) -> np.ndarray:
    """:func:`weights_from_phi` for ``U`` steps at once, on the host in numpy: ``phis`` of shape ``(k, U, *shape)``
    (``phi_1 .. phi_k`` of each step's ``z``), step sizes ``h`` of shape ``(U,)`` and each step's ``k`` nodes
    ``theta``; returns ``(U, k, *shape)``."""
    k, u = phis.shape[:2]
    factorials = np.array([math.factorial(i) for i in range(k)], dtype=np.float64)
    a = lagrange_monomials_batched(np.array(theta, dtype=np.float64).reshape(u, k)) * factorials  # (U, j, k)
    flat = phis.reshape(k, u, -1).transpose(1, 0, 2)  # (U, k, S)
    out = np.matmul(a.astype(phis.dtype), flat) * h.reshape(u, 1, 1)
    return out.reshape(u, k, *phis.shape[2:])


def basis_values(form: ExponentialForm, basis: str, times: Tensor) -> Tensor:
    """The basis variable ``u`` at ``times`` (float64)."""
    if basis == "t":
        return times
    lam = form.half_log_snr(times)
    return torch.exp(-lam) if basis == "rho" else -lam


@lru_cache(maxsize=64)
def _legendre_matrices(n: int) -> tuple[Tensor, Tensor, Tensor]:
    x, w = np.polynomial.legendre.leggauss(n)
    p = np.polynomial.legendre.legvander(x, n - 1)  # p[q, m] = P_m(x_q)
    return torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(p)


def _legendre_antiderivative(values: Tensor, x_eval: Tensor, n: int) -> Tensor:
    """``\\int_{-1}^{x} f`` at ``x_eval`` for ``f`` given at the ``n`` Gauss-Legendre nodes
    (``values`` of shape ``(n, *shape)``), through its Legendre series."""
    _, w, p = _legendre_matrices(n)
    scale = (2.0 * torch.arange(n, dtype=F64) + 1.0) / 2.0
    proj = (p * w[:, None]).T * scale[:, None]  # (m, q)
    coef = torch.tensordot(proj.to(values.dtype), values, dims=1)  # (m, *shape)
    pe = torch.from_numpy(np.polynomial.legendre.legvander(x_eval.detach().numpy(), n))  # (e, n + 1)
    # int_{-1}^x P_0 = x + 1; int_{-1}^x P_m = (P_{m+1} - P_{m-1}) / (2m + 1) for m >= 1.
    anti = torch.empty(x_eval.numel(), n, dtype=F64)
    anti[:, 0] = pe[:, 1] + 1.0
    for m in range(1, n):
        anti[:, m] = (pe[:, m + 1] - pe[:, m - 1]) / (2 * m + 1)
    return torch.tensordot(anti.to(values.dtype), coef, dims=1), coef


def _call_scalar(fn, times: Tensor) -> Tensor:
    """Evaluate a user callable of a scalar time at each entry of ``times`` and stack."""
    return torch.stack([torch.as_tensor(fn(tq)).to(device="cpu") for tq in times.unbind()])


class LinearIntegral:
    """``\\int_tau^b L`` for ``tau`` in ``[a, b]`` for a time-dependent ``L`` without a known integral:
    ``L`` is sampled at Gauss-Legendre nodes and its Legendre series integrated exactly."""

    DEGREES = (24, 48, 96)

    def __init__(self, linear_fn, a: Tensor, b: Tensor) -> None:
        self.a, self.b = a, b
        for n in self.DEGREES:
            x, _, _ = _legendre_matrices(n)
            nodes = 0.5 * (a + b) + 0.5 * (b - a) * x
            vals = _call_scalar(linear_fn, nodes)
            vals = vals.to(torch.complex128 if vals.is_complex() else F64)
            finite = torch.isfinite(vals.detach()).reshape(n, -1).all(dim=1)
            if not bool(finite.all()):
                where = float(nodes[~finite][0])
                raise ValueError(f"the linear part L(t) is NaN or infinite at t = {where:.8g}")
            _, coef = _legendre_antiderivative(vals, torch.zeros(1, dtype=F64), n)
            tail = coef[-3:].detach().abs().max()
            if tail <= 1e-13 * coef.detach().abs().max() or coef.detach().abs().max() == 0:
                self.n, self.values = n, vals
                return
        raise RuntimeError(
            "the time-dependent linear part is not resolved by a degree-96 polynomial across one step "
            f"[{a.item():.6g}, {b.item():.6g}]: use more steps, or pass linear_integral= to SemiLinearODE"
        )

    def to_end(self, tau: Tensor) -> Tensor:
        """``\\int_tau^b L`` with shape ``(len(tau), *L.shape)``."""
        x = (2.0 * tau - (self.a + self.b)) / (self.b - self.a)
        pts = torch.cat([torch.ones(1, dtype=F64), x])
        anti, _ = _legendre_antiderivative(self.values, pts, self.n)
        half = 0.5 * (self.b - self.a)
        return half * (anti[:1] - anti[1:])


def _linear_log_transition(form: LinearForm, a: Tensor, b: Tensor):
    """A function ``tau -> log Phi(b, tau)`` (vector ``tau``) for a :class:`LinearForm`."""
    if form.constant_linear is not None:
        lin = form.constant_linear.to(device="cpu")
        lin = lin.to(torch.complex128 if lin.is_complex() else F64)
        return lambda tau: lin * (b - tau).reshape(-1, *([1] * lin.dim()))
    if form.linear_integral is not None:
        return lambda tau: _call_scalar(lambda s: form.linear_integral(b, s), tau)
    integral = LinearIntegral(form.linear_fn, a, b)
    return integral.to_end


def step_coefficients(
    form: ExponentialForm, basis: str, t_a: Tensor, t_b: Tensor, nodes: Tensor
) -> tuple[Tensor, Tensor]:
    """``(Phi(t_b, t_a), C)`` for one step; ``C`` has shape ``(len(nodes), *shape_of_L)``.

    Args:
        form: the ODE's exponential form.
        basis: the basis variable of the interpolation polynomial.
        t_a, t_b: 0-dim float64 step limits (either order).
        nodes: 1-D float64 times of the interpolation nodes (distinct).
    """
    if isinstance(form, DiffusionForm):
        return _diffusion_step(form, basis, t_a, t_b, nodes)
    return _linear_step(form, basis, t_a, t_b, nodes)


def _normalised_nodes(form: ExponentialForm, basis: str, t_a: Tensor, t_b: Tensor, nodes: Tensor):
    """``(u_a, h, theta)``: the basis variable at ``t_a``, the step in it, and the nodes in units of the step."""
    u_nodes = basis_values(form, basis, nodes)
    u_a, u_b = basis_values(form, basis, torch.stack([t_a, t_b])).unbind()
    h = u_b - u_a
    theta = (u_nodes - u_a) / h
    if not (torch.isfinite(theta).all() and torch.isfinite(h)):
        raise ValueError(
            f"basis {basis!r} is not finite on the step [{t_a.item():.6g}, {t_b.item():.6g}] with nodes "
            f"{nodes.tolist()} (the schedule reaches sigma = 0 or alpha = 0 there); use basis 't'"
        )
    return u_a, h, theta


def _diffusion_step(form: DiffusionForm, basis: str, t_a: Tensor, t_b: Tensor, nodes: Tensor):
    ends = torch.stack([t_a, t_b])
    lam_a, lam_b = form.half_log_snr(ends).unbind()
    log_m_a, log_m_b = form.log_scale(ends).unbind()
    transition = torch.exp(log_m_b - log_m_a)
    if not torch.isfinite(transition):
        raise ValueError(
            f"the transition of the step [{t_a.item():.6g}, {t_b.item():.6g}] is infinite: the eps split needs "
            "alpha > 0 on the whole grid (a flow-matching schedule starts at alpha = 0); use extrapolate='x0'"
        )
    s = form.sign
    c_b = torch.exp(form.log_cofactor(t_b))
    if nodes.numel() == 1:
        # l_0 = 1 in every basis: C_0 = m_b (e^{s lam_b} - e^{s lam_a}) = c_b (1 - e^{s (lam_a - lam_b)})
        # (the first form is free of cancellation; at an end with sigma = 0 or alpha = 0 one of the two forms
        # meets 0 * inf and the other gives the limit)
        weight = -c_b * torch.expm1(s * (lam_a - lam_b))
        if not torch.isfinite(weight):
            weight = torch.exp(log_m_b) * (torch.exp(s * lam_b) - torch.exp(s * lam_a))
        return transition, weight.reshape(1)
    if basis == "logrho" and s == -1 and lam_b == math.inf:
        # eps split ending at sigma = 0, where log rho = -inf: in w = log rho - log rho_a,
        # C_j = alpha_b int_{rho_a}^0 l_j drho = -alpha_b rho_a int_{-inf}^0 e^w l_j(w) dw,  int e^w w^k = (-1)^k k!
        w = basis_values(form, basis, nodes) + lam_a
        if not (torch.isfinite(w).all() and torch.isfinite(lam_a)):
            raise ValueError(f"basis 'logrho' is not finite at the nodes {nodes.tolist()}; use basis 't'")
        moments = torch.tensor([(-1) ** k * math.factorial(k) for k in range(nodes.numel())], dtype=F64)
        return transition, -torch.exp(log_m_b - lam_a) * (lagrange_monomials(w) @ moments)
    u_a, h, theta = _normalised_nodes(form, basis, t_a, t_b, nodes)
    if log_m_b == -math.inf:
        # x0 split ending at sigma = 0: Phi(t_b, tau) = 0 inside the step, and the limit of
        # sigma_b int d(alpha / sigma) l_j is alpha_b l_j(t_b): the x0 polynomial evaluated at the end
        return transition, c_b * lagrange_monomials(theta).sum(dim=1)
    if basis == "logrho":
        return transition, -s * c_b * exponential_weights(s * h, h, theta)
    if basis == "rho" and s == -1:
        return transition, torch.exp(log_m_b) * exponential_weights(torch.zeros((), dtype=F64), h, theta)

    def kernel(tau: Tensor) -> Tensor:
        return s * form.d_half_log_snr(tau) * torch.exp(log_m_b + s * form.half_log_snr(tau))

    return transition, _quadrature_weights(form, basis, kernel, t_a, t_b, u_a, h, theta, form.breakpoints)


def matrix_phi_functions(a: Tensor, kmax: int) -> Tensor:
    """``[phi_0(A), ..., phi_kmax(A)]`` for a square matrix ``A``, from one matrix exponential of the augmented
    block matrix ``[[A, I, 0, ..], [0, 0, I, ..], .., [0, .., 0]]`` of size ``d (kmax + 1)``, whose first block
    row is ``[e^A, phi_1(A), .., phi_kmax(A)]`` (Saad 1992; Al-Mohy & Higham 2011)."""
    d = a.shape[-1]
    size = d * (kmax + 1)
    aug = torch.zeros(size, size, dtype=a.dtype)
    aug[:d, :d] = a
    eye = torch.eye(d, dtype=a.dtype)
    for k in range(kmax):
        aug[k * d : (k + 1) * d, (k + 1) * d : (k + 2) * d] = eye
    top = torch.linalg.matrix_exp(aug)[:d]
    return torch.stack([top[:, k * d : (k + 1) * d] for k in range(kmax + 1)])


def _matrix_step(form: LinearForm, h: Tensor, theta: Tensor) -> tuple[Tensor, Tensor]:
    """Constant dense ``L``: ``Phi = e^{L h}``, ``C_j = h sum_k a_jk k! phi_{k+1}(L h)`` as matrices."""
    lin = form.constant_linear.to(device="cpu")
    lin = lin.to(torch.complex128 if lin.is_complex() else F64)
    k = theta.numel()
    phis = matrix_phi_functions(lin * h, k)
    a = (lagrange_monomials(theta) * _factorial_weights(k)).to(phis.dtype)
    return phis[0], h * torch.tensordot(a, phis[1:], dims=1)


def _linear_step(form: LinearForm, basis: str, t_a: Tensor, t_b: Tensor, nodes: Tensor):
    u_a, h, theta = _normalised_nodes(form, basis, t_a, t_b, nodes)
    if form.matrix:
        if form.weight_fn is not None:
            raise ValueError("a dense matrix linear part is supported with W = 1 only")
        return _matrix_step(form, h, theta)
    log_phi = _linear_log_transition(form, t_a, t_b)
    z = log_phi(t_a.reshape(1))[0]  # int_{t_a}^{t_b} L; equals L h for a constant L
    transition = torch.exp(z)
    if form.constant_linear is not None and form.weight_fn is None and basis == "t":
        return transition, exponential_weights(z, h, theta)

    def kernel(tau: Tensor) -> Tensor:
        k = torch.exp(log_phi(tau))
        if form.weight_fn is not None:
            w = _call_scalar(form.weight_fn, tau).to(F64)
            k = k * w.reshape(-1, *([1] * (k.dim() - 1)))
        return k

    return transition, _quadrature_weights(form, basis, kernel, t_a, t_b, u_a, h, theta)


def _quadrature_weights(
    form, basis, kernel, t_a: Tensor, t_b: Tensor, u_a: Tensor, h: Tensor, theta: Tensor, breakpoints=None
):
    """``C_j = int_{t_a}^{t_b} kernel(tau) l_j(theta(tau)) dtau`` by adaptive Gauss-Legendre quadrature."""
    a = lagrange_monomials(theta)
    powers = torch.arange(theta.numel(), dtype=F64)

    def integrand(tau: Tensor, w: Tensor) -> Tensor:
        k = kernel(tau)  # (q, *shape)
        x = (basis_values(form, basis, tau) - u_a) / h
        lj = (x[:, None] ** powers) @ a.T  # (q, j)
        weighted = (lj * w[:, None]).to(k.dtype)
        return torch.tensordot(weighted.T, k, dims=1)

    what = f"the {basis}-basis weights on [{t_a.item():.6g}, {t_b.item():.6g}]"
    return quadrature.integrate(integrand, t_a, t_b, what, breakpoints)


# --- all steps of a grid at once ------------------------------------------------------------------------------------


def lagrange_monomials_batched(theta: np.ndarray) -> np.ndarray:
    """:func:`lagrange_monomials` for ``U`` node sets at once: ``theta`` of shape ``(U, K)`` (float64) gives
    ``a[u, j, k]``, shape ``(U, K, K)``, by the same products of linear factors, vectorised over ``U``."""
    theta = np.asarray(theta, dtype=np.float64)
    u, k = theta.shape
    out = np.zeros((u, k, k))
    for j in range(k):
        poly = np.zeros((u, k))
        poly[:, 0] = 1.0
        for i in range(k):
            if i == j:
                continue
            d = (theta[:, j] - theta[:, i])[:, None]
            shifted = np.concatenate([np.zeros((u, 1)), poly[:, :-1]], axis=1)
            poly = (shifted - theta[:, i : i + 1] * poly) / d
        out[:, j] = poly
    return out


def _pieces(a: Tensor, b: Tensor, breakpoints: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """``(left, right, owner)``: the intervals ``[min(a, b), max(a, b)]`` of every step cut at the ``breakpoints``
    strictly inside, as ascending pieces, and the step each piece belongs to."""
    lo, hi = torch.minimum(a, b), torch.maximum(a, b)
    steps = torch.arange(a.numel())
    if breakpoints is None or breakpoints.numel() == 0:
        return lo, hi, steps
    knots = breakpoints.to(F64)
    first = torch.searchsorted(knots, lo, right=True)
    inside = torch.searchsorted(knots, hi, right=False) - first  # knots strictly inside each step
    inside = torch.clamp(inside, min=0)
    owner = torch.repeat_interleave(steps, inside + 1)
    offsets = torch.cumsum(inside + 1, 0) - (inside + 1)
    k = torch.arange(owner.numel()) - offsets[owner]  # the index of each piece within its step
    last = knots.numel() - 1
    left = torch.where(k == 0, lo[owner], knots[torch.clamp(first[owner] + k - 1, 0, last)])
    right = torch.where(k == inside[owner], hi[owner], knots[torch.clamp(first[owner] + k, 0, last)])
    return left, right, owner


def batched_quadrature_moments(
    form: DiffusionForm, basis: str, t_a: Tensor, t_b: Tensor, log_m_b: Tensor, u_a: Tensor, h: Tensor, kmax: int
) -> Tensor:
    r"""``M[s, k] = \int_{t_a}^{t_b} kernel_s(tau) theta_s(tau)^k dtau`` for every step ``s`` at once, ``k <= kmax``,
    with ``kernel_s(tau) = sign lambda'(tau) exp(log m(t_b) + sign lambda(tau))`` (the diffusion kernel
    ``Phi(t_b, tau) W(tau)``) and ``theta_s = (u(tau) - u_a) / h``.

    The same rule as :func:`~deis_ode.solvers.quadrature.integrate`, vectorised over the steps: Gauss-Legendre on
    the smoothstep-mapped pieces between breakpoints, node counts doubled from 8 until two successive counts agree
    to :data:`~deis_ode.solvers.quadrature.RELATIVE_TOLERANCE` on every step (only the steps not yet converged are
    recomputed; the finer value is kept).

    Raises:
        RuntimeError: a step on which 512 nodes per piece do not reach the tolerance.
    """
    s = form.sign
    steps = t_a.numel()
    result = torch.zeros(steps, kmax + 1, dtype=F64)
    active = torch.arange(steps)
    previous = None
    powers = torch.arange(kmax + 1, dtype=F64)
    for n in (8, *quadrature.NODE_COUNTS):
        left, right, owner = _pieces(t_a[active], t_b[active], form.breakpoints)
        unit, weights = quadrature._legendre_unit(n)
        width = (right - left)[:, None]
        near_left = left[:, None] + width * (unit * unit * (3.0 - 2.0 * unit))
        near_right = right[:, None] - width * ((1.0 - unit) ** 2 * (1.0 + 2.0 * unit))
        tau = torch.where(unit < 0.5, near_left, near_right)  # (pieces, n)
        w = weights * width * (6.0 * unit * (1.0 - unit))
        flat = tau.reshape(-1)
        lam = form.half_log_snr(flat).reshape(tau.shape)
        kernel = s * form.d_half_log_snr(flat).reshape(tau.shape) * torch.exp(log_m_b[active][owner][:, None] + s * lam)
        if basis == "t":
            # theta = (tau - t_a) / h from the node's offset inside its piece: no cancellation between times that are
            # large compared with the step (t near 999 with steps of 1e-3 would lose 6 digits)
            start = t_a[active][owner][:, None]
            offset = torch.where(
                unit < 0.5,
                (left[:, None] - start) + width * (unit * unit * (3.0 - 2.0 * unit)),
                (right[:, None] - start) - width * ((1.0 - unit) ** 2 * (1.0 + 2.0 * unit)),
            )
            theta = offset / h[active][owner][:, None]
        else:
            u = basis_values(form, basis, flat).reshape(tau.shape)
            theta = (u - u_a[active][owner][:, None]) / h[active][owner][:, None]
        per_piece = torch.einsum("pq,pqk->pk", w * kernel, theta[..., None] ** powers)
        value = torch.zeros(active.numel(), kmax + 1, dtype=F64).index_add_(0, owner, per_piece)
        value = value * torch.where(t_b[active] > t_a[active], 1.0, -1.0)[:, None]
        if previous is not None:
            scale = value.abs().amax(dim=1)
            done = ((value - previous).abs().amax(dim=1) <= quadrature.RELATIVE_TOLERANCE * scale) | (scale == 0)
            result[active[done]] = value[done]
            active, value = active[~done], value[~done]
            if active.numel() == 0:
                return result
        previous = value
    i = int(active[0])
    raise RuntimeError(
        f"Gauss-Legendre quadrature of the {basis}-basis weights on [{t_a[i].item():.6g}, {t_b[i].item():.6g}] did not "
        f"reach relative accuracy {quadrature.RELATIVE_TOLERANCE} with {quadrature.NODE_COUNTS[-1]} nodes; the "
        "integrand varies too fast across one step: use more steps"
    )


def batched_diffusion_coefficients(
    form: DiffusionForm, basis: str, times: Tensor, specs: list[tuple[int, int, tuple[int, ...]]]
) -> list[tuple[float, list[float]] | None]:
    r"""``(Phi, [C_0, ..])`` of every update ``(source, target, nodes)`` of a diffusion plan on the float64 grid
    ``times``, all steps at once: the schedule is evaluated once per grid point, and each step's moments
    ``M_k = \int kernel theta^k`` (closed forms in the bases that have them, :func:`batched_quadrature_moments`
    otherwise) serve every update over that step through ``C_j = sum_k a_{jk} M_k``. ``M_0`` is always the closed form
    ``-c(t_b) expm1(sign (lambda_a - lambda_b))`` (the DDIM weight).

    Entries are ``None`` for updates whose step touches an end where ``sigma = 0`` or ``alpha = 0`` (an infinite
    ``lambda`` or logarithm): :func:`step_coefficients` treats those limits one step at a time.
    """
    if not specs:
        return []
    times = times.to(F64)
    s = form.sign
    lam = form.half_log_snr(times)
    log_m = form.log_scale(times)
    log_c = form.log_cofactor(times)
    u = basis_values(form, basis, times)
    target_of = {source: target for source, target, _ in specs}  # every update from a grid point takes one step
    sources = sorted(target_of)
    index = {n: i for i, n in enumerate(sources)}
    a_idx = torch.tensor(sources, dtype=torch.long)
    b_idx = torch.tensor([target_of[n] for n in sources], dtype=torch.long)
    lam_a, lam_b, log_m_a, log_m_b, log_c_b = lam[a_idx], lam[b_idx], log_m[a_idx], log_m[b_idx], log_c[b_idx]
    u_a, u_b = u[a_idx], u[b_idx]
    finite = torch.stack([lam_a, lam_b, log_m_a, log_m_b, log_c_b, u_a, u_b]).isfinite().all(dim=0)
    h = torch.where(finite, u_b - u_a, 1.0)
    transition = torch.exp(log_m_b - log_m_a)
    kmax = max(len(nodes) for _, _, nodes in specs) - 1
    moments = torch.zeros(len(sources), kmax + 1, dtype=F64)
    c_b = torch.exp(log_c_b)
    moments[:, 0] = -c_b * torch.expm1(s * (lam_a - lam_b))
    need = torch.zeros(len(sources), dtype=torch.bool)
    for source, _, nodes in specs:
        if len(nodes) > 1:
            need[index[source]] = True
    need &= finite
    if kmax > 0 and bool(need.any()):
        k = torch.arange(1, kmax + 1, dtype=F64)
        factorials = torch.tensor([math.factorial(int(i)) for i in k.tolist()], dtype=F64)
        if basis == "logrho":
            z = (s * h).numpy()
            phis = torch.from_numpy(phi_functions_host(z, kmax + 1))[2:].T  # phi_2 .. phi_{kmax+1}: (steps, kmax)
            moments[:, 1:] = (-s * c_b * h)[:, None] * factorials * phis
        elif basis == "rho" and s == -1:
            moments[:, 1:] = (torch.exp(log_m_b) * h)[:, None] / (k + 1.0)
        else:
            sel = torch.nonzero(need).reshape(-1)
            quad = batched_quadrature_moments(
                form, basis, times[a_idx[sel]], times[b_idx[sel]], log_m_b[sel], u_a[sel], h[sel], kmax
            )
            moments[sel, 1:] = quad[:, 1:]
    out: list[tuple[float, list[float]] | None] = [None] * len(specs)
    transitions = transition.tolist()
    finite_list = finite.tolist()
    by_size: dict[int, list[int]] = {}
    for i, (source, _, nodes) in enumerate(specs):
        if finite_list[index[source]]:
            by_size.setdefault(len(nodes), []).append(i)
    u_np, h_np, moments_np = u.numpy(), h.numpy(), moments.numpy()
    for size, members in by_size.items():
        rows = np.array([index[specs[i][0]] for i in members])
        nodes = np.array([specs[i][2] for i in members])
        theta = (u_np[nodes] - u_np[a_idx.numpy()[rows]][:, None]) / h_np[rows][:, None]
        weights = np.einsum("ujk,uk->uj", lagrange_monomials_batched(theta), moments_np[rows, :size])
        good = np.isfinite(weights).all(axis=1) & np.isfinite(transition.numpy()[rows])
        for i, row, w, ok in zip(members, rows.tolist(), weights.tolist(), good.tolist(), strict=True):
            out[i] = (transitions[row], w) if ok else None  # None: the single-step formula, which names the problem
    return out
