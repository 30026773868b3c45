"""Diffusion process: noise schedules, the Gaussian forward process/posterior, the reverse process."""

from .gaussian import (
    VARIANCES,
    GaussianDiffusion,
    PMeanVar,
    check_timesteps,
    extract,
    spaced_timesteps,
)
from .samplers import (
    SAMPLERS,
    EpsFn,
    ModelFn,
    ReverseConfig,
    ancestral_step,
    ddim_step,
    make_generator,
    reverse_process,
    sample_ancestral,
    sample_ddim,
    timestep_sequence,
)
from .schedules import SCHEDULES, make_betas

__all__ = [
    "SAMPLERS",
    "SCHEDULES",
    "VARIANCES",
    "EpsFn",
    "GaussianDiffusion",
    "ModelFn",
    "PMeanVar",
    "ReverseConfig",
    "ancestral_step",
    "check_timesteps",
    "ddim_step",
    "extract",
    "make_betas",
    "make_generator",
    "reverse_process",
    "sample_ancestral",
    "sample_ddim",
    "spaced_timesteps",
    "timestep_sequence",
]
