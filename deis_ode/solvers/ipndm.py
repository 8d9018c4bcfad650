r"""iPNDM: the DEIS paper's improved pseudo numerical method, as plans for the multistep engine.

On the eps split of a diffusion ODE the exact flow is ``d(x / alpha) / d rho = eps``. One exponential-Euler (DDIM)
step is ``x_{n+1} = (alpha_{n+1} / alpha_n) x_n + D_n eps``, ``D_n = alpha_{n+1} (rho_{n+1} - rho_n)``; iPNDM
replaces ``eps`` by the Adams-Bashforth combination of the last ``k`` values with the *fixed* coefficients of a
uniform grid,

    k = 1: 1        k = 2: (3, -1) / 2        k = 3: (23, -16, 5) / 12        k = 4: (55, -59, 37, -9) / 24,

with ``k = min(4, n + 1)`` (a lower-order start that costs no extra evaluations). The coefficients ignore the
ratio of neighbouring steps in ``rho``, so the method is the 4-step Adams-Bashforth method in ``rho`` only on grids
uniform in ``rho``; even there the first (Euler) step leaves an ``O(h^2)`` error, so the global order is 2.

``ipndm_v`` uses the Adams-Bashforth coefficients of the actual, non-uniform steps in ``rho``: the integral over
the step of the polynomial through the last ``k`` values of ``eps`` in ``rho``. That is the 4-node exponential
Adams-Bashforth method in the ``rho`` basis with the lower-order warm-up, i.e. ``deis4`` with ``basis="rho"``,
``warmup="lower_order"``, and :func:`build_ipndm_v_plan` builds exactly that plan.

Both plans are made of the engine's :class:`~deis_ode.solvers.multistep.Update` objects and run by
:func:`~deis_ode.solvers.multistep.run_plan`.
"""

from __future__ import annotations

from fractions import Fraction

from torch import Tensor

from ..forms import DiffusionForm, ExponentialForm
from .coefficients import step_coefficients
from .multistep import Plan, Update, build_plan

#: The fixed Adams-Bashforth coefficients of iPNDM, newest value first, by number of values used.
IPNDM_COEFFICIENTS: dict[int, tuple[Fraction, ...]] = {
    1: (Fraction(1),),
    2: (Fraction(3, 2), Fraction(-1, 2)),
    3: (Fraction(23, 12), Fraction(-16, 12), Fraction(5, 12)),
    4: (Fraction(55, 24), Fraction(-59, 24), Fraction(37, 24), Fraction(-9, 24)),
}


def require_eps_diffusion(form: ExponentialForm, method: str) -> DiffusionForm:
    """``form`` if it describes a diffusion ODE with the eps split; ``ValueError`` otherwise.

    The iPNDM and rho-Runge-Kutta variants integrate ``d(x / alpha) / d rho = eps``: they need the schedule
    (``alpha``, ``rho``) and the noise prediction as the extrapolated part."""
    if not isinstance(form, DiffusionForm):
        raise ValueError(
            f"method {method!r} integrates the probability-flow ODE d(x/alpha)/d rho = eps of a diffusion model and "
            "needs a diffusion drift (deis_ode.VPODE or VEODE) with extrapolate='eps'; for a generic "
            "SemiLinearODE use deis1..deis4"
        )
    if form.sign != -1:
        raise ValueError(
            f"method {method!r} extrapolates the noise prediction eps and needs the eps split: build the drift with "
            "extrapolate='eps' (it is 'x0' here), or use deis1..deis4, which support both splits"
        )
    return form


def build_ipndm_plan(form: ExponentialForm, times: Tensor) -> Plan:
    """The iPNDM plan on the float64 grid ``times`` (strictly monotone, the schedule's time).

    Step ``n`` is ``x_{n+1} = (alpha_{n+1} / alpha_n) x_n + D_n sum_j a_{k,j} eps_{n-j}`` with the DDIM weight
    ``D_n = alpha_{n+1} (rho_{n+1} - rho_n)`` (computed as the engine's one-node weight) and the fixed
    coefficients :data:`IPNDM_COEFFICIENTS` for ``k = min(4, n + 1)``.
    """
    form = require_eps_diffusion(form, "ipndm")
    plan = Plan(order=4)
    for n in range(times.numel() - 1):
        transition, ddim = step_coefficients(form, "rho", times[n], times[n + 1], times[n : n + 1])
        k = min(4, n + 1)
        weights = [ddim[0] * float(a) for a in IPNDM_COEFFICIENTS[k]]
        plan.main.append(Update(n, n + 1, tuple(range(n, n - k, -1)), transition, weights))
    return plan


def build_ipndm_v_plan(form: ExponentialForm, times: Tensor) -> Plan:
    """The variable-step iPNDM plan: Adams-Bashforth in ``rho`` with the coefficients of the actual steps and a
    lower-order start, which is ``deis4`` in the ``rho`` basis with the lower-order warm-up."""
    form = require_eps_diffusion(form, "ipndm_v")
    return build_plan(form, "rho", times, 4, "lower_order")
