"""Load a trained joint model from a training checkpoint for sampling and evaluation."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from jdm_fast.checkpoint import load_checkpoint
from jdm_fast.data.augment import AugmentConfig, default_augment
from jdm_fast.diffusion import GaussianDiffusion, make_betas
from jdm_fast.models.joint import JointConfig, JointDiffusion


@dataclass
class LoadedModel:
    model: JointDiffusion  # eval mode, parameters frozen
    weights: str  # "ema" or "raw"
    dataset: str
    data_dir: str | None
    step: int
    path: Path
    augment: AugmentConfig | None = None  # the head's training augmentation (None: trained without)

    @property
    def num_classes(self) -> int:
        return self.model.config.head.num_classes

    @property
    def image_shape(self) -> tuple[int, int, int]:
        u = self.model.config.unet
        return (u.in_channels, u.image_size, u.image_size)


def _strip(state: dict) -> dict:
    """Drop wrapper prefixes (torch.compile ``_orig_mod.``, DDP ``module.``) from state-dict keys."""
    out = {}
    for k, v in state.items():
        for prefix in ("_orig_mod.", "module."):
            while k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def load_joint_model(path: str | Path, *, ema: bool = True, device: str | torch.device = "cpu") -> LoadedModel:
    """The raw or EMA weights of the training checkpoint at ``path`` as an eval-mode JointDiffusion.

    Raises FileNotFoundError for a missing file and RuntimeError for one that is not a jdm_fast
    training checkpoint."""
    path = Path(path)
    state = load_checkpoint(path)
    cfg = state.get("config")
    if not isinstance(cfg, dict) or "model" not in cfg:
        raise RuntimeError(f"checkpoint {path} has no model configuration")
    which = "ema" if ema else "model"
    if which not in state:
        raise RuntimeError(f"checkpoint {path} has no {which!r} weights")
    diffusion = GaussianDiffusion(make_betas(cfg.get("schedule", "jdm_linear"), cfg.get("num_timesteps", 1000)))
    model = JointDiffusion(JointConfig(**cfg["model"]), diffusion.to(device))
    model.load_state_dict(_strip(state[which]))
    model.to(device).eval().requires_grad_(False)
    dataset = cfg.get("dataset", "digits")
    augment = default_augment(dataset) if cfg.get("augment", True) else None
    return LoadedModel(model, "ema" if ema else "raw", dataset, cfg.get("data_dir"), int(state["step"]), path,
                       augment if augment is not None and augment.enabled else None)
