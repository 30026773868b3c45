"""Diffusion process: noise schedules, the Gaussian forward process/posterior, samplers."""

from .gaussian import (
    VARIANCES,
    GaussianDiffusion,
    PMeanVar,
    check_timesteps,
    extract,
    spaced_timesteps,
)
from .samplers import (
    ModelFn,
    ancestral_step,
    ddim_step,
    make_generator,
    sample_ancestral,
    sample_ddim,
)
from .schedules import SCHEDULES, make_betas

__all__ = [
    "SCHEDULES",
    "VARIANCES",
    "GaussianDiffusion",
    "ModelFn",
    "PMeanVar",
    "ancestral_step",
    "check_timesteps",
    "ddim_step",
    "extract",
    "make_betas",
    "make_generator",
    "sample_ancestral",
    "sample_ddim",
    "spaced_timesteps",
]
