r"""Krylov phi-function-vector products: ``sum_{k=0}^{p} phi_k(h A) v_k`` for a large sparse or matrix-free ``A``.

The product is the value at ``t = 1`` of the solution of the linear ODE with polynomial forcing

    u'(t) = (h A) u + sum_{k=1}^{p} t^{k-1} / (k-1)! v_k,      u(0) = v_0,

    u(t)  = phi_0(t h A) v_0 + sum_{k=1}^{p} t^k phi_k(t h A) v_k,

which is advanced in substeps ``t -> t + tau`` (Niesen & Wright 2012, "phipm"; Gaudreault, Rainwater & Tokman 2018,
"KIOPS", use the same time stepping). With ``A' = h A`` and

    w_0 = u(t),   w_j = A' w_{j-1} + sum_{l=0}^{p-j} t^l / l! v_{j+l}     (j = 1..p)

one substep is exact in the form

    u(t + tau) = sum_{j=0}^{p-1} tau^j / j! w_j + tau^p phi_p(tau A') w_p,

so that each substep needs ``p`` applications of ``A`` and ONE Krylov approximation, of ``phi_p(tau A') w_p`` (all
``p + 1`` vectors enter through the ``w_j``: one Krylov solve per step of an exponential multistep method). On the
Krylov space of ``A'`` and ``w_p`` (orthonormal basis ``Q_m``, Hessenberg ``H_m``, ``beta = ||w_p||``),

    phi_p(tau A') w_p  ~  beta Q_m phi_p(tau H_m) e_1,

with ``phi_p(tau H_m) e_1`` and ``phi_{p+1}(tau H_m) e_1`` read off one float64 matrix exponential of the
``(m + p + 1)``-square augmented matrix ``[[tau H_m, e_1, 0], [0, 0, I], [0, 0, 0]]`` (Saad 1992; Sidje 1998). The
error of a substep is estimated by the first omitted term of the Krylov expansion (Saad 1992),

    err ~ beta tau^{p+1} h_{m+1,m} |e_m^T phi_{p+1}(tau H_m) e_1|,

and a substep is accepted when ``err <= tol * tau * ref`` with ``ref = sum_k ||v_k||``: the errors of the accepted
substeps add up to at most about ``tol * ref``. The basis grows up to ``max_dim`` vectors, the error being checked
every few vectors (the dimension adapts); if even ``max_dim`` vectors do not reach the tolerance, ``tau`` shrinks,
which costs no new application of ``A`` (the basis does not depend on ``tau``).

Choices:

* Arnoldi (classical Gram-Schmidt applied twice) in general; the Lanczos recurrence (orthogonalisation against the
  last two vectors) when the operator declares ``symmetric = True``.
* Batches: a state of shape ``(..., d)`` is ``B = prod(...)`` independent vectors. They are processed together as the
  columns of one block: one application of ``A`` per Krylov vector serves the whole batch (one sparse-times-dense
  product), each column has its own basis, Hessenberg matrix and error estimate, and the substep size is shared (the
  worst column decides).
* Precision: the Krylov process always runs in float64 (complex128 for complex states or operators), whatever the
  state's dtype. It costs ``O(m d)`` memory and flops per vector, little beside the applications of ``A``, while in
  float32 the basis is orthogonal only to about 1e-7 times the growth of the Gram-Schmidt errors, so neither the
  product nor the error estimate (a product of small quantities) could be trusted near the float32 tolerance. The
  caller casts the result back to the state's dtype. (Not measured against a float32 variant: none was written.)
* Memory: the basis, ``(B, m + 1, d)``; no ``(d, d)`` matrix is formed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

#: The error estimate is checked after these many new Krylov vectors.
CHECK_EVERY = 4
#: Shrinking the substep is given up after this many rejections in one substep.
MAX_REJECTIONS = 40
_TINY = 1e-300


class KrylovError(RuntimeError):
    """The Krylov product did not reach its tolerance."""


@dataclass
class KrylovStats:
    """Counters of the Krylov products (accumulated across calls when the same object is passed again).

    Attributes:
        calls: products computed.
        substeps: accepted substeps in ``t`` (``calls`` of them at least).
        rejected: substep sizes rejected (each costs one small matrix exponential, no application of ``A``).
        matvecs: applications of ``A`` (to a block of ``B`` vectors).
        max_dim: the largest Krylov dimension used.
        dims: the Krylov dimension of each accepted substep.
        max_substeps: the most substeps one product needed.
    """

    calls: int = 0
    substeps: int = 0
    rejected: int = 0
    matvecs: int = 0
    max_dim: int = 0
    max_substeps: int = 0
    dims: list[int] = field(default_factory=list)

    @property
    def mean_dim(self) -> float:
        return sum(self.dims) / len(self.dims) if self.dims else 0.0

    def summary(self) -> str:
        return (
            f"{self.calls} products, {self.substeps} substeps (at most {self.max_substeps} per product), "
            f"Krylov dimension mean {self.mean_dim:.1f} max {self.max_dim}, {self.matvecs} operator applications, "
            f"{self.rejected} rejected substep sizes"
        )


def _work_dtype(vs: Sequence[Tensor], op: Any) -> torch.dtype:
    dtype = getattr(op, "dtype", None)
    complex_op = isinstance(dtype, torch.dtype) and dtype.is_complex
    return torch.complex128 if complex_op or any(v.is_complex() for v in vs) else torch.float64


def _phi_columns(hess: Tensor, tau: float, m: int, p: int) -> tuple[Tensor, Tensor]:
    """``phi_p(tau H) e_1`` and ``phi_{p+1}(tau H) e_1`` for the batched ``(B, m, m)`` Hessenberg ``hess``, from one
    matrix exponential of the augmented ``(m + p + 1)``-square matrix."""
    b = hess.shape[0]
    size = m + p + 1
    aug = torch.zeros(b, size, size, dtype=hess.dtype, device=hess.device)
    aug[:, :m, :m] = tau * hess
    aug[:, 0, m] = 1.0
    for k in range(p):
        aug[:, m + k, m + k + 1] = 1.0
    e = torch.linalg.matrix_exp(aug)
    # column m + k - 1 of the top block is phi_k(tau H) e_1 (k >= 1); phi_0 is the first column of exp(tau H)
    phi_p = e[:, :m, 0] if p == 0 else e[:, :m, m + p - 1]
    return phi_p, e[:, :m, m + p]


def phiv(
    op: Any,
    h: float,
    vs: Sequence[Tensor],
    *,
    tol: float = 1e-10,
    max_dim: int = 64,
    stats: KrylovStats | None = None,
    symmetric: bool | None = None,
) -> Tensor:
    r"""``sum_{k=0}^{p} phi_k(h A) v_k`` (``phi_0 = exp``) by Krylov substepping (see the module docstring).

    Args:
        op: the operator ``A`` (``shape == (d, d)``, ``A @ v`` on the last dimension; see
            :mod:`deis_ode.linear.operators`).
        h: the scalar step multiplying ``A``.
        vs: ``v_0, ..., v_p``, tensors of one shape ``(..., d)`` (a batch of independent vectors), ``p >= 0``.
        tol: relative tolerance: the error is at most about ``tol * sum_k ||v_k||`` per batch member (2-norms over
            the last dimension).
        max_dim: the largest Krylov dimension (memory ``(B, max_dim + 1, d)`` in float64).
        stats: a :class:`KrylovStats` to update. Passed again (as the multistep runner does), the dimension of its
            last substep is also a hint: the error is first checked a few vectors below it.
        symmetric: use Lanczos; default ``op.symmetric`` (``False`` when absent).

    Returns:
        the product, shape ``vs[0].shape``, in float64 (complex128 for complex inputs or operators).

    Raises:
        NotImplementedError: a vector requires grad while autograd is enabled (no gradients through the product).
        KrylovError: the substep had to shrink below ``1e-12`` (or more than ``MAX_REJECTIONS`` times): ``A`` has
            non-finite or enormous values, or ``max_dim`` is far too small.
    """
    if len(vs) == 0:
        raise ValueError("vs must hold at least v_0")
    if not (tol > 0 and math.isfinite(tol)):
        raise ValueError(f"tol must be a positive finite number, got {tol!r}")
    if isinstance(max_dim, bool) or not isinstance(max_dim, int) or max_dim < 1:
        raise ValueError(f"max_dim must be a positive int, got {max_dim!r}")
    d = op.shape[-1]
    shape = vs[0].shape
    for k, v in enumerate(vs):
        if v.shape != shape or shape[-1:] != (d,):
            raise ValueError(f"vs[{k}] has shape {tuple(v.shape)}; expected {tuple(shape)} with last dimension {d}")
    if torch.is_grad_enabled() and any(v.requires_grad for v in vs):
        raise NotImplementedError(
            "gradients through the Krylov phi-products are not supported (the basis is built in place): run the "
            "solve under torch.no_grad(), or use torchdiffeq.odeint_adjoint(..., method='deisK', "
            "adjoint_method='dopri5'), whose forward pass runs without autograd"
        )
    if symmetric is None:
        symmetric = bool(getattr(op, "symmetric", False))
    work = _work_dtype(vs, op)
    device = vs[0].device
    V = [v.reshape(-1, d).to(work) for v in vs]
    p = len(V) - 1
    nb = V[0].shape[0]
    stats = stats if stats is not None else KrylovStats()
    stats.calls += 1
    ref = sum(torch.linalg.vector_norm(v, dim=-1) for v in V)  # (B,)
    ref = torch.where(ref > 0, ref, torch.ones_like(ref))
    h = float(h)

    def apply(w: Tensor) -> Tensor:
        out = op @ w
        stats.matvecs += 1
        return h * out.to(work)

    u = V[0].clone()
    if h == 0.0:
        return u.reshape(shape)
    inv_fact = [1.0 / math.factorial(i) for i in range(p + 2)]
    basis = torch.empty(nb, max_dim + 1, d, dtype=work, device=device)  # only columns <= m are read
    hess = torch.zeros(nb, max_dim + 1, max_dim, dtype=work, device=device)
    t, tau = 0.0, 1.0
    substeps = 0
    # the first error check: a few vectors below the dimension the previous substep needed (stats as a hint)
    first_check = max(CHECK_EVERY, (stats.dims[-1] // CHECK_EVERY - 1) * CHECK_EVERY) if stats.dims else CHECK_EVERY
    while t < 1.0:
        tau = min(tau, 1.0 - t)
        w = [u]
        for j in range(1, p + 1):
            g = sum(t**i * inv_fact[i] * V[j + i] for i in range(p - j + 1))
            w.append(apply(w[-1]) + g)
        beta = torch.linalg.vector_norm(w[p], dim=-1)  # (B,)
        hess.zero_()
        basis[:, 0] = w[p] / beta.clamp_min(_TINY)[:, None]
        accepted = None
        m = 0
        while accepted is None:
            # one more Krylov vector: z = A' q_m, orthogonalised (Gram-Schmidt twice) against the basis, all of it
            # (Arnoldi) or the last two vectors (Lanczos). A breakdown (an invariant subspace) leaves
            # h_{m+1,m} ~ 0, which decouples the later vectors and makes the error estimate ~0: no special case.
            z = apply(basis[:, m]).unsqueeze(1)  # (B, 1, d)
            lo = max(0, m - 1) if symmetric else 0
            block = basis[:, lo : m + 1]  # (B, j, d)
            coef = torch.bmm(z, block.mT.conj())  # (B, 1, j) = <q_i, z>
            z = torch.baddbmm(z, coef, block, alpha=-1)
            again = torch.bmm(z, block.mT.conj())
            z = torch.baddbmm(z, again, block, alpha=-1)
            hess[:, lo : m + 1, m] = (coef + again)[:, 0]
            norm = torch.linalg.vector_norm(z[:, 0], dim=-1)
            hess[:, m + 1, m] = norm
            basis[:, m + 1] = z[:, 0] / norm.clamp_min(_TINY)[:, None]
            m += 1
            if (m < first_check or m % CHECK_EVERY) and m != max_dim:
                continue
            rejections = 0
            while True:
                phi_p, phi_next = _phi_columns(hess[:, :m, :m], tau, m, p)
                err = beta * tau ** (p + 1) * hess[:, m, m - 1].abs() * phi_next[:, m - 1].abs()
                ratio = float((err / (tol * tau * ref)).max())
                if ratio <= 1.0:
                    accepted = (phi_p, ratio)
                    break
                if m < max_dim:
                    break  # try a larger basis first
                if not math.isfinite(ratio) or rejections >= MAX_REJECTIONS or tau < 1e-12:
                    raise KrylovError(
                        f"the Krylov product did not converge: with {m} Krylov vectors the substep shrank to "
                        f"tau = {tau:.3g} at t = {t:.6g} (error ratio {ratio:.3g}); check the operator for NaN/inf "
                        "or raise max_dim"
                    )
                rejections += 1
                stats.rejected += 1
                tau *= min(0.5, max(0.05, 0.9 * ratio ** (-1.0 / (m + p))))
        phi_p, ratio = accepted
        coeffs = beta[:, None] * phi_p  # (B, m)
        new = torch.einsum("bm,bmd->bd", coeffs.to(work), basis[:, :m]) * tau**p
        for j in range(p):
            new = new + tau**j * inv_fact[j] * w[j]
        u = new
        t = 1.0 if 1.0 - (t + tau) <= 1e-13 else t + tau
        substeps += 1
        stats.substeps += 1
        stats.dims.append(m)
        stats.max_dim = max(stats.max_dim, m)
        first_check = max(CHECK_EVERY, (m // CHECK_EVERY - 1) * CHECK_EVERY)
        # the next substep: the error behaves like tau^(m + p) per unit tau
        grow = 0.9 * max(ratio, 1e-12) ** (-1.0 / (m + p)) if ratio > 0 else 5.0
        tau = tau * min(5.0, max(1.0, grow))
    stats.max_substeps = max(stats.max_substeps, substeps)
    return u.reshape(shape)
