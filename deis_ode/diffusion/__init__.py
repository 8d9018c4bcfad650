"""Diffusion models as semi-linear ODEs: noise schedules, prediction conversions, probability-flow drifts, time grids,
thresholding, classifier-free guidance and an exact Gaussian-mixture model for tests and demos."""

from .drift import VEODE, VPODE, DiffusionODE
from .grids import SPACINGS, diffusers_timesteps, timesteps
from .guidance import ClassifierFreeGuidance
from .mixture import GaussianMixture, GaussianMixtureEps
from .optimize import OptimizeInfo, optimize_timesteps
from .predictions import PREDICTION_TYPES, check_prediction, conversion_coefficients, to_eps, to_x0
from .schedules import (
    CosineVPSchedule,
    DiscreteVPSchedule,
    EDMSchedule,
    FlowSchedule,
    LinearVPSchedule,
    NoiseSchedule,
    VESchedule,
    VPSchedule,
)
from .sde import ForwardDiffusionSDE, ReverseDiffusionSDE, add_noise, diffusion_squared
from .thresholding import THRESHOLDING_TYPES, dynamic_threshold, static_threshold, threshold

__all__ = [
    "PREDICTION_TYPES",
    "SPACINGS",
    "THRESHOLDING_TYPES",
    "ClassifierFreeGuidance",
    "CosineVPSchedule",
    "DiffusionODE",
    "DiscreteVPSchedule",
    "EDMSchedule",
    "FlowSchedule",
    "ForwardDiffusionSDE",
    "GaussianMixture",
    "GaussianMixtureEps",
    "LinearVPSchedule",
    "NoiseSchedule",
    "OptimizeInfo",
    "ReverseDiffusionSDE",
    "VEODE",
    "VESchedule",
    "VPODE",
    "VPSchedule",
    "add_noise",
    "check_prediction",
    "conversion_coefficients",
    "diffusion_squared",
    "optimize_timesteps",
    "diffusers_timesteps",
    "dynamic_threshold",
    "static_threshold",
    "threshold",
    "timesteps",
    "to_eps",
    "to_x0",
]
