"""The joint model's classifier head over pooled UNet encoder features."""
from __future__ import annotations

import torch
from torch import nn

from jdm_fast.models.config import HeadConfig


class ClassifierHead(nn.Module):
    """Dropout(p) -> BN1d(F) -> Linear(F, F/2) -> LeakyReLU(0.01) -> Dropout(p) -> BN1d(F/2) -> Linear(F/2, K).

    ``in_features`` comes from ``UNet.feature_channels`` (never hard-coded from the image size).
    The head sees features exactly as it was trained: no timestep input. It runs in float32 even
    under autocast: its matmuls are a few MFLOP per example, while casting its weights to bf16 and
    their gradients back cost the CIFAR preset (6.9M head weights) ~50 ms of a ~2 s CPU step.
    """

    def __init__(self, in_features: int, cfg: HeadConfig):
        super().__init__()
        if in_features < 2:
            raise ValueError(f"ClassifierHead: in_features must be >= 2, got {in_features}")
        hidden = in_features // 2
        self.in_features = in_features
        self.net = nn.Sequential(
            nn.Dropout(cfg.dropout), nn.BatchNorm1d(in_features), nn.Linear(in_features, hidden),
            nn.LeakyReLU(0.01), nn.Dropout(cfg.dropout), nn.BatchNorm1d(hidden), nn.Linear(hidden, cfg.num_classes),
        )

    def forward(self, features: torch.Tensor, dropout_masks: list[torch.Tensor | None] | None = None) -> torch.Tensor:
        """Logits (B, K). ``dropout_masks``: one inverted-dropout mask (or None = keep all) per
        Dropout layer, used in place of the layer's own draw (the trainer's counter-based masks)."""
        if features.dim() != 2 or features.shape[1] != self.in_features:
            raise ValueError(f"ClassifierHead: expected (B, {self.in_features}) features, got {tuple(features.shape)}")
        h = features.float()
        with torch.autocast(h.device.type, enabled=False):
            if dropout_masks is None:
                return self.net(h)
            masks = iter(dropout_masks)
            for layer in self.net:
                if isinstance(layer, nn.Dropout):
                    mask = next(masks)
                    h = h if mask is None else h * mask
                else:
                    h = layer(h)
            return h
