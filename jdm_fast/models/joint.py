"""JointDiffusion: one UNet that denoises and classifies, and the joint loss that trains it.

``L = mean(|eps - eps_hat(x_t, t)|^2) + lambda * CE(head(features(encode(aug(x0), t=0))), y)``

The classifier sees the clean image at t = 0 through a second encoder pass (default,
``classifier_input="x0"``), with augmentation on the classifier input only; or the noisy x_t of
the diffusion pass (``"xt"``, no extra pass). Examples whose label is -1 (semi-supervised) add
only the diffusion term. Multi-label data uses BCE-with-logits; rows with any negative entry are
unlabelled.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from jdm_fast.models.config import HeadConfig, UNetConfig
from jdm_fast.models.head import ClassifierHead
from jdm_fast.models.unet import UNet

CLASSIFIER_INPUTS = ("x0", "xt")


@dataclass(frozen=True)
class JointConfig:
    unet: UNetConfig
    head: HeadConfig
    classifier_weight: float = 1e-3  # lambda
    classifier_input: str = "x0"

    def __post_init__(self) -> None:
        if isinstance(self.unet, dict):
            object.__setattr__(self, "unet", UNetConfig(**self.unet))
        if isinstance(self.head, dict):
            object.__setattr__(self, "head", HeadConfig(**self.head))
        if self.classifier_input not in CLASSIFIER_INPUTS:
            raise ValueError(f"JointConfig: classifier_input must be one of {CLASSIFIER_INPUTS}, "
                             f"got {self.classifier_input!r}")
        if self.classifier_weight < 0:
            raise ValueError(f"JointConfig: classifier_weight (lambda) must be >= 0, got {self.classifier_weight}")


class JointLoss(NamedTuple):
    total: torch.Tensor  # scalar, what backward() runs on
    diffusion: torch.Tensor  # scalar eps-MSE
    classifier: torch.Tensor  # scalar CE/BCE over labelled examples (0 when none)
    correct: torch.Tensor  # number of labelled examples classified right (no host sync)
    labelled: torch.Tensor  # number of labelled examples


class JointDiffusion(nn.Module):
    """UNet + classifier head + the diffusion process they are trained on.

    ``diffusion`` is any object with ``num_timesteps`` and ``q_sample(x0, t, noise)``
    (``jdm_fast.diffusion.GaussianDiffusion``); ``augment`` maps a clean batch to an augmented one
    and is applied to the classifier input only.
    """

    def __init__(self, cfg: JointConfig, diffusion, augment: Callable[[torch.Tensor], torch.Tensor] | None = None):
        super().__init__()
        self.config = cfg
        self.diffusion = diffusion
        self.augment = augment
        self.unet = UNet(cfg.unet)
        self.head = ClassifierHead(self.unet.feature_channels, cfg.head)

    def logits(self, enc) -> torch.Tensor:
        return self.head(self.unet.features(enc))

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits of clean images x in [-1, 1] (encoder at t = 0). Call ``eval()`` first for inference."""
        t = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        return self.logits(self.unet.encode(x, t))

    def classifier_loss(self, logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Mean loss over labelled examples, and (correct, labelled) counts."""
        logits = logits.float()
        if self.config.head.multi_label:
            if y.shape != logits.shape:
                raise ValueError(f"multi-label targets must have shape {tuple(logits.shape)}, got {tuple(y.shape)}")
            mask = (y >= 0).all(dim=1)
            per = F.binary_cross_entropy_with_logits(logits, y.clamp_min(0).float(), reduction="none").mean(dim=1)
            correct = (((logits > 0) == (y > 0.5)).all(dim=1) & mask).sum()
        else:
            if y.shape != logits.shape[:1]:
                raise ValueError(f"labels must have shape ({logits.shape[0]},), got {tuple(y.shape)}")
            mask = y >= 0
            per = F.cross_entropy(logits, y.clamp_min(0), reduction="none")
            correct = ((logits.argmax(dim=1) == y) & mask).sum()
        labelled = mask.sum()
        loss = (per * mask).sum() / labelled.clamp_min(1)
        return loss, correct, labelled

    def forward(self, x0: torch.Tensor, y: torch.Tensor, t: torch.Tensor | None = None,
                noise: torch.Tensor | None = None) -> JointLoss:
        """Joint loss of a batch: x0 in [-1, 1] (B, C, H, W), y class ids (B,) or multi-hot (B, K); -1 = unlabelled."""
        if y.shape[0] != x0.shape[0]:
            raise ValueError(f"x0 and y batch sizes differ: {x0.shape[0]} vs {y.shape[0]}")
        b = x0.shape[0]
        if t is None:
            t = torch.randint(0, self.diffusion.num_timesteps, (b,), device=x0.device)
        if noise is None:
            noise = torch.randn_like(x0)
        x_t = self.diffusion.q_sample(x0, t, noise)
        enc = self.unet.encode(x_t, t)
        eps_hat = self.unet.decode(*enc)
        diffusion_loss = F.mse_loss(eps_hat.float(), noise.float())
        if self.config.classifier_input == "xt":
            logits = self.logits(enc)
        else:
            x_cls = self.augment(x0) if (self.augment is not None and self.training) else x0
            logits = self.classify(x_cls)
        cls_loss, correct, labelled = self.classifier_loss(logits, y)
        total = diffusion_loss + self.config.classifier_weight * cls_loss
        return JointLoss(total, diffusion_loss, cls_loss, correct, labelled)
