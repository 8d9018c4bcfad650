"""Gauss-Legendre quadrature in float64, adaptive in the number of nodes.

Used only where no closed form exists (a time-dependent linear part without a known integral,
a weight ``W(t)``, the ``"t"`` basis of a diffusion ODE). Integrands here are smooth inside the
interval but may have integrable power-law singularities at an end (``d rho / dt ~ t^{-1/2}`` at
``t = 0`` for VP schedules), so the nodes are mapped through the smoothstep
``tau = a + (b - a) (3 s^2 - 2 s^3)``, whose vanishing derivative at both ends turns such
endpoint behaviour into a smooth integrand.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache

import numpy as np
import torch
from torch import Tensor

#: Node counts tried in turn. Gauss-Legendre converges exponentially on these integrands, so once two
#: successive counts agree to ``RELATIVE_TOLERANCE`` the finer value is accurate far beyond that; the
#: tolerance itself sits just above the round-off floor of a few hundred float64 terms.
NODE_COUNTS = (16, 32, 64, 128, 256, 512)
RELATIVE_TOLERANCE = 1e-13


@cache
def _legendre_unit(n: int) -> tuple[Tensor, Tensor]:
    """Gauss-Legendre nodes and weights of order ``n`` mapped to ``[0, 1]``."""
    x, w = np.polynomial.legendre.leggauss(n)
    return torch.from_numpy(0.5 * (x + 1.0)), torch.from_numpy(0.5 * w)


def smoothstep_nodes(a: Tensor, b: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """Nodes ``tau_q`` in ``(a, b)`` and weights ``w_q`` with ``sum_q w_q f(tau_q) ~ int_a^b f``."""
    s, w = _legendre_unit(n)
    # measured from the nearer end, so that nodes next to an end keep full relative precision in their
    # distance to it (an integrable singularity there is sampled at tau - end ~ 1e-11)
    near_a = a + (b - a) * (s * s * (3.0 - 2.0 * s))
    near_b = b - (b - a) * ((1.0 - s) ** 2 * (1.0 + 2.0 * s))
    tau = torch.where(s < 0.5, near_a, near_b)
    return tau, w * (b - a) * (6.0 * s * (1.0 - s))


def composite_nodes(a: Tensor, b: Tensor, n: int, breakpoints: Tensor | None) -> tuple[Tensor, Tensor]:
    """:func:`smoothstep_nodes` on each piece of ``[a, b]`` cut at the ``breakpoints`` strictly inside it."""
    if breakpoints is None:
        return smoothstep_nodes(a, b, n)
    lo, hi = torch.minimum(a, b), torch.maximum(a, b)
    inside = breakpoints[(breakpoints > lo) & (breakpoints < hi)]
    if inside.numel() == 0:
        return smoothstep_nodes(a, b, n)
    cuts = torch.cat([a.reshape(1), inside if b > a else inside.flip(0), b.reshape(1)])
    pieces = [smoothstep_nodes(cuts[i], cuts[i + 1], n) for i in range(cuts.numel() - 1)]
    return torch.cat([p[0] for p in pieces]), torch.cat([p[1] for p in pieces])


def integrate(
    integrand: Callable[[Tensor, Tensor], Tensor], a: Tensor, b: Tensor, what: str, breakpoints: Tensor | None = None
) -> Tensor:
    """``int_a^b f(tau) dtau`` for a tensor-valued ``f``.

    Args:
        integrand: ``(tau, weights) -> sum_q weights[q] * f(tau[q])`` for 1-D ``tau``; leaving the
            weighted sum to the caller lets it vectorise over the nodes.
        a, b: 0-dim float64 limits (``b < a`` allowed).
        what: a description of the integral for the error message.
        breakpoints: sorted points where the integrand is only piecewise smooth; the interval is split there.

    Raises:
        RuntimeError: if no two consecutive node counts agree to ``RELATIVE_TOLERANCE``.
    """
    previous = None
    for n in NODE_COUNTS:
        tau, w = composite_nodes(a, b, n, breakpoints)
        value = integrand(tau, w)
        if previous is not None:
            scale = value.detach().abs().max()
            change = (value.detach() - previous).abs().max()
            if change <= RELATIVE_TOLERANCE * scale or scale == 0:
                return value
        previous = value.detach()
    raise RuntimeError(
        f"Gauss-Legendre quadrature of {what} did not reach relative accuracy {RELATIVE_TOLERANCE} with "
        f"{NODE_COUNTS[-1]} nodes (last change {change.item():.3e} of {scale.item():.3e}); the integrand varies "
        "too fast across one step: use more steps, or give the exact integral of the linear part"
    )
