"""deis_ode: DEIS exponential multistep integrators for semi-linear ODEs, in torchdiffeq.

``import deis_ode`` registers the methods ``deis1`` .. ``deis5`` in torchdiffeq, so that
``torchdiffeq.odeint(ode, x0, t, method="deis3")`` integrates a :class:`SemiLinearODE`
``dx/dt = L(t) x + W(t) N(t, x)`` with its linear part treated exactly.
"""

from . import linear
from .diffusion import (
    VEODE,
    VPODE,
    ClassifierFreeGuidance,
    DiffusionODE,
    EDMSchedule,
    FlowSchedule,
    VESchedule,
    VPSchedule,
    timesteps,
)
from .forms import DiffusionForm, LinearForm, OperatorForm
from .methods import METHODS, register
from .semilinear import SemiLinearODE
from .solvers.stochastic import sdeint

__version__ = "0.1.0"

register()

__all__ = [
    "METHODS",
    "ClassifierFreeGuidance",
    "DiffusionForm",
    "DiffusionODE",
    "EDMSchedule",
    "FlowSchedule",
    "LinearForm",
    "OperatorForm",
    "SemiLinearODE",
    "VEODE",
    "VESchedule",
    "VPODE",
    "VPSchedule",
    "linear",
    "reference",
    "register",
    "sdeint",
    "timesteps",
    "verify",
]


def __getattr__(name: str):
    # Imported on first use: the scipy reference integrator and the convergence tool (scipy.integrate), and the
    # diffusers scheduler (so that ``import deis_ode`` works without diffusers).
    if name in ("reference", "verify"):
        import importlib

        return importlib.import_module(f".{name}", __name__)
    if name == "DEISMultistepScheduler":
        from .scheduler import DEISMultistepScheduler

        return DEISMultistepScheduler
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
