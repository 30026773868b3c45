"""Conditional generation with the joint model's own classifier: representation-optimized
sampling (PAPER.md), pixel-space classifier guidance, and visual counterfactual explanations."""
from .loading import LoadedModel, load_joint_model
from .process import SAMPLERS, respaced, reverse_process, timestep_sequence
from .samplers import (
    MODES,
    Counterfactuals,
    SampleSettings,
    balanced_labels,
    check_class,
    counterfactuals,
    generate,
    head_probabilities,
)
from .steering import HEAD_INPUTS, AuthorsTimeHead, predicted_x0, guidance_eps, representation_eps, unconditional_eps

__all__ = [
    "HEAD_INPUTS",
    "predicted_x0",
    "MODES",
    "SAMPLERS",
    "AuthorsTimeHead",
    "Counterfactuals",
    "LoadedModel",
    "SampleSettings",
    "balanced_labels",
    "check_class",
    "counterfactuals",
    "generate",
    "guidance_eps",
    "head_probabilities",
    "load_joint_model",
    "representation_eps",
    "respaced",
    "reverse_process",
    "timestep_sequence",
    "unconditional_eps",
]
