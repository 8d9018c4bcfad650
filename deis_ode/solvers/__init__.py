"""Numerics: phi-functions, coefficient tables and the exponential multistep engine.

Pure float64 computations of coefficients (:mod:`.coefficients`), the stepping engine
(:mod:`.multistep`). Nothing here knows about diffusion or about torchdiffeq.
"""

from .coefficients import exponential_weights, lagrange_monomials, step_coefficients
from .multistep import Plan, build_plan, run_plan
from .phi import phi_functions

__all__ = [
    "Plan",
    "build_plan",
    "exponential_weights",
    "lagrange_monomials",
    "phi_functions",
    "run_plan",
    "step_coefficients",
]
