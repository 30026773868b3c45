"""jdm_fast: a fast training engine for Joint Diffusion Models (one UNet that generates and
classifies). Importing the package imports nothing heavy; the layers live in its subpackages
(README's Layout)."""
from __future__ import annotations


def load_model(path, *, ema: bool = True, device="cpu"):
    """The trained JointDiffusion at ``path``, in eval mode with frozen parameters, on ``device``.

    ``path``: a training checkpoint (``checkpoint.pt``; ``ema`` picks the EMA or the raw weights) or
    a safetensors export of the trainer (``model.safetensors`` / ``model_ema.safetensors``, which
    hold one set of weights and the run's config). Anything else raises an error naming the file
    and what is accepted. (``jdm_fast.generation.load_joint_model`` also returns the step, dataset
    and the head's training augmentation.)"""
    from jdm_fast.generation.loading import load_joint_model

    return load_joint_model(path, ema=ema, device=device).model
