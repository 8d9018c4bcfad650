"""Diffusion models as semi-linear ODEs: noise schedules, prediction conversions, probability-flow drifts and an
exact Gaussian-mixture model for tests and demos."""

from .drift import VEODE, VPODE, DiffusionODE
from .mixture import GaussianMixture, GaussianMixtureEps
from .predictions import PREDICTION_TYPES, check_prediction, conversion_coefficients, to_eps, to_x0
from .schedules import LinearVPSchedule, NoiseSchedule, VESchedule, VPSchedule

__all__ = [
    "PREDICTION_TYPES",
    "DiffusionODE",
    "GaussianMixture",
    "GaussianMixtureEps",
    "LinearVPSchedule",
    "NoiseSchedule",
    "VEODE",
    "VESchedule",
    "VPODE",
    "VPSchedule",
    "check_prediction",
    "conversion_coefficients",
    "to_eps",
    "to_x0",
]
