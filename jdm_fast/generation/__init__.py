"""Conditional generation with the joint model's own classifier: representation-optimized
sampling (PAPER.md), pixel-space classifier guidance, and visual counterfactual explanations."""
from jdm_fast.diffusion import SAMPLERS, ReverseConfig, reverse_process, timestep_sequence

from .loading import LoadedModel, load_joint_model
from .samplers import (
    DEFAULT_SAMPLER,
    MODES,
    STEERS,
    Counterfactuals,
    SampleSettings,
    balanced_labels,
    check_class,
    counterfactuals,
    default_head_input,
    generate,
    guides,
    head_probabilities,
    sampler_for,
    target_confidence,
)
from .steering import (
    HEAD_INPUTS,
    AuthorsTimeHead,
    HeadViews,
    guidance_eps,
    head_log_probs,
    representation_eps,
    unconditional_eps,
)

__all__ = [
    "DEFAULT_SAMPLER",
    "head_log_probs",
    "sampler_for",
    "HEAD_INPUTS",
    "MODES",
    "SAMPLERS",
    "STEERS",
    "ReverseConfig",
    "AuthorsTimeHead",
    "Counterfactuals",
    "HeadViews",
    "LoadedModel",
    "SampleSettings",
    "balanced_labels",
    "check_class",
    "counterfactuals",
    "default_head_input",
    "generate",
    "guidance_eps",
    "guides",
    "head_probabilities",
    "load_joint_model",
    "representation_eps",
    "reverse_process",
    "target_confidence",
    "timestep_sequence",
    "unconditional_eps",
]
