"""JointDiffusion: one UNet that denoises and classifies, and the joint loss that trains it.

``L = mean(|eps - eps_hat(x_t, t)|^2) + lambda * CE(head(features(encode(x_cls, t=0))), y)``

``JointConfig.objective`` picks what is trained (the paper's baselines, same architecture):
``"joint"`` (the above), ``"diffusion"`` (the UNet alone on the eps-MSE: no head is built, a
standalone DDPM) or ``"classifier"`` (encoder + head alone on the CE of the clean input at t = 0,
weight 1: the decoder is not built, nothing is noised and no eps is predicted).

The diffusion term trains on the clean ``x0``. The classifier sees ``x_cls`` at t = 0 through the
encoder (default, ``classifier_input="x0"``): the caller's augmented copy of ``x0`` (the trainer
passes the loader's keyed augmentation, jdm_fast.data), or ``x0`` itself when none is given; the
model draws no augmentation itself. Or it sees the noisy x_t of the diffusion pass (``"xt"``, no
extra pass, no augmentation). Or both (``"both"``): the classifier term is the CE on ``x_cls`` at
t = 0 plus the CE on x_t's own features at t (the same head; a noise-aware head, what steering
with ``head_input="xt"`` reads), and the reported accuracy is the t = 0 pass's. Examples whose label is -1 (semi-supervised) add only the diffusion
term. Multi-label data uses BCE-with-logits; rows with any negative entry are unlabelled.

Given a :class:`BatchKey` (what the trainer passes), every random draw of the loss is a pure
function of ``(seed, step, global example index)``: timesteps, noise and the UNet's dropout masks
(``unet.DropoutKey``) come from counter-based Philox streams, head-dropout masks are drawn for the
whole global batch and sliced, and the loss terms are scaled so that data-parallel gradient
averaging reproduces the single-process gradient. A run then does not depend on how many
processes ran it.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from jdm_fast.models.config import HeadConfig, UNetConfig
from jdm_fast.models.head import ClassifierHead
from jdm_fast.models.unet import DropoutKey, UNet
from jdm_fast.ops import noise as noise_ops
from jdm_fast.ops.philox import counter_timesteps  # noqa: F401 - the NumPy reference of the keyed timesteps

CLASSIFIER_INPUTS = ("x0", "xt", "both")
OBJECTIVES = ("joint", "diffusion", "classifier")


@dataclass(frozen=True)
class JointConfig:
    unet: UNetConfig
    head: HeadConfig
    classifier_weight: float = 1e-3  # lambda
    classifier_input: str = "x0"  # CLASSIFIER_INPUTS; "both": the head's CE on x0 (t = 0) plus on x_t (at t)
    # classifier_input "x0" / "both": encode x_t and the classifier's clean x0 in one call of twice the batch
    # (False: two encoder calls; same results up to floating-point summation order)
    fuse_encoder_passes: bool = True
    objective: str = "joint"  # OBJECTIVES: joint | diffusion (no head) | classifier (no decoder)

    def __post_init__(self) -> None:
        if isinstance(self.unet, dict):
            object.__setattr__(self, "unet", UNetConfig(**self.unet))
        if isinstance(self.head, dict):
            object.__setattr__(self, "head", HeadConfig(**self.head))
        if self.classifier_input not in CLASSIFIER_INPUTS:
            raise ValueError(f"JointConfig: classifier_input must be one of {CLASSIFIER_INPUTS}, "
                             f"got {self.classifier_input!r}")
        if not math.isfinite(self.classifier_weight) or self.classifier_weight < 0:
            raise ValueError(f"--classifier-weight (lambda) must be a finite number >= 0, got {self.classifier_weight}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"--objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.objective == "classifier" and self.classifier_input != "x0":
            raise ValueError("--objective classifier trains the classifier on clean images at t = 0 only: it needs "
                             f"--classifier-input x0, got {self.classifier_input!r}")

    @property
    def generates(self) -> bool:
        """Whether the model predicts noise (has a decoder): objectives joint and diffusion."""
        return self.objective != "classifier"

    @property
    def classifies(self) -> bool:
        """Whether the model has a classifier head: objectives joint and classifier."""
        return self.objective != "diffusion"

    @property
    def noise_aware_head(self) -> bool:
        """Whether the head was trained on noisy x_t's features (classifier_input "xt" or "both"), so
        it can read x_t at any t (classifier guidance on x_t, ``sample --mode guided``)."""
        return self.classifies and self.classifier_input in ("xt", "both")


def with_objective(cfg: JointConfig, objective: str) -> JointConfig:
    """``cfg`` training ``objective``; a classifier-only model reads clean images only, so a
    ``"both"`` classifier input becomes ``"x0"`` there (an explicit ``"xt"`` is still refused)."""
    both = objective == "classifier" and cfg.classifier_input == "both"
    return dataclasses.replace(cfg, objective=objective, classifier_input="x0" if both else cfg.classifier_input)


# Philox counter word 2 tags keep the counter-based streams of the loss apart from each other and
# from the Gaussian noise stream (which uses word 2 = 0); see jdm_fast.ops.philox.
_DROPOUT_TAG = 0x44524F50  # "DROP"; head Dropout layer k uses tag _DROPOUT_TAG + k


class BatchKey(NamedTuple):
    """Where a process's batch sits in training, so that its randomness and loss scale depend only
    on the global batch. With interleaved sharding (jdm_fast.data.loaders) the local examples are
    the contiguous global indices ``first .. first + B_local - 1``, ``first = step * global_size + start``.

    ``first`` is that index as a one-element int64 tensor on the batch's device (the trainer's
    ``TrainStep`` makes it): the draws read it on the device, so nothing in the step depends on the
    step number as a Python value (no host sync, no recompilation per step under torch.compile).
    Left ``None``, the loss makes it itself from ``step``."""

    seed: int
    step: int
    start: int  # index, within the step's global batch, of this process's first example
    global_size: int  # examples in the global batch (all processes)
    labelled: torch.Tensor | int  # labelled examples in the global batch (all processes)
    first: torch.Tensor | None = None  # step * global_size + start, int64 on the device

    def first_example(self, device: torch.device) -> torch.Tensor:
        if self.first is not None:
            return self.first
        return torch.full((), self.step * self.global_size + self.start, dtype=torch.int64, device=device)


class JointLoss(NamedTuple):
    total: torch.Tensor  # scalar, what backward() runs on
    diffusion: torch.Tensor  # scalar eps-MSE
    classifier: torch.Tensor  # scalar CE/BCE over labelled examples (0 when none); with a BatchKey, scaled
    #                           so that its mean over the processes is the global batch's mean
    correct: torch.Tensor  # number of labelled examples classified right (no host sync)
    labelled: torch.Tensor  # number of labelled examples
    # objective "diffusion": classifier, correct and labelled are 0; "classifier": diffusion is 0


def _keys(dkey: tuple | None, *streams: int) -> DropoutKey | None:
    """The UNet's dropout key for passes ``streams`` (0: diffusion on x_t, 1: classifier on x0) of a
    keyed batch ``dkey`` = (first example tensor, seed, local batch), or None (unkeyed: torch's RNG)."""
    return None if dkey is None else DropoutKey(dkey[0], dkey[1], dkey[2], streams)


class JointDiffusion(nn.Module):
    """UNet + classifier head + the diffusion process they are trained on.

    ``diffusion`` is any object with ``num_timesteps`` and ``q_sample(x0, t, noise)``
    (``jdm_fast.diffusion.GaussianDiffusion``). Augmentation of the classifier input is the
    caller's: ``forward(..., x_cls=augmented x0)``. Objective ``"diffusion"``: ``head`` is None;
    ``"classifier"``: the UNet has no decoder (``unet.has_decoder`` False).
    """

    def __init__(self, cfg: JointConfig, diffusion):
        super().__init__()
        self.config = cfg
        self.diffusion = diffusion
        self.unet = UNet(cfg.unet, decoder=cfg.generates)
        self.head = ClassifierHead(self.unet.feature_channels, cfg.head) if cfg.classifies else None

    def logits(self, enc) -> torch.Tensor:
        if self.head is None:
            raise RuntimeError("this model was trained with --objective diffusion: it has no classifier head")
        return self.head(self.unet.features(enc))

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits of clean images x in [-1, 1] (encoder at t = 0). Call ``eval()`` first for inference."""
        t = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        return self.logits(self.unet.encode(x, t))

    def labelled_mask(self, y: torch.Tensor) -> torch.Tensor:
        """(B,) bool: which examples carry a label (class id >= 0; multi-label: no negative entry)."""
        return (y >= 0).all(dim=1) if self.config.head.multi_label else y >= 0

    def classifier_loss(self, logits: torch.Tensor, y: torch.Tensor, labelled_total: torch.Tensor | int | None = None,
                        scale: float = 1.0) -> tuple[torch.Tensor, ...]:
        """``scale * sum(loss of labelled examples) / labelled_total`` (default: their number, i.e.
        the mean; 0 when there are none), and (correct, labelled) counts."""
        logits = logits.float()
        if self.config.head.multi_label:
            if y.shape != logits.shape:
                raise ValueError(f"multi-label targets must have shape {tuple(logits.shape)}, got {tuple(y.shape)}")
            per = F.binary_cross_entropy_with_logits(logits, y.clamp_min(0).float(), reduction="none").mean(dim=1)
            hit = ((logits > 0) == (y > 0.5)).all(dim=1)
        else:
            if y.shape != logits.shape[:1]:
                raise ValueError(f"labels must have shape ({logits.shape[0]},), got {tuple(y.shape)}")
            per = F.cross_entropy(logits, y.clamp_min(0), reduction="none")
            hit = logits.argmax(dim=1) == y
        mask = self.labelled_mask(y)
        correct = (hit & mask).sum()
        labelled = mask.sum()
        total = labelled if labelled_total is None else labelled_total
        total = total.clamp_min(1) if isinstance(total, torch.Tensor) else max(1, int(total))
        loss = (per * mask).sum() / total
        return (loss * scale if scale != 1.0 else loss), correct, labelled

    def _head_dropout_masks(self, seed: int, first: torch.Tensor, b: int) -> list[torch.Tensor | None]:
        """Inverted-dropout masks of the head's Dropout layers for global examples
        ``first .. first + b - 1``: element (g, j) of layer k is kept when the counter-based uniform
        of row g, column j, tag ``_DROPOUT_TAG + k`` is >= p, so each global example gets the same
        mask whichever process holds it, and a resumed run redraws them exactly."""
        masks: list[torch.Tensor | None] = []
        if self.head is None:
            return masks
        width = self.head.in_features
        k = 0
        for layer in self.head.net:
            if isinstance(layer, nn.Linear):
                width = layer.out_features
            if not isinstance(layer, nn.Dropout):
                continue
            if layer.p == 0:
                masks.append(None)
            else:
                u = noise_ops.counter_uniform(first, seed, _DROPOUT_TAG + k, b, width)
                masks.append((u >= layer.p).float() / (1.0 - layer.p))
            k += 1
        return masks

    def forward(self, x0: torch.Tensor, y: torch.Tensor, t: torch.Tensor | None = None,
                noise: torch.Tensor | None = None, key: BatchKey | None = None,
                x_cls: torch.Tensor | None = None) -> JointLoss:
        """Joint loss of a batch: x0 in [-1, 1] (B, C, H, W), y class ids (B,) or multi-hot (B, K); -1 = unlabelled.

        ``x_cls`` (``classifier_input`` "x0" or "both"): what the classifier encodes at t = 0 instead of
        ``x0``, shaped like ``x0``: its augmented copy (jdm_fast.data's ``keep_clean`` batches). The
        diffusion term always trains on ``x0``.

        Without ``key``, ``t`` and ``noise`` are drawn from the global RNG unless given, and the
        classifier term is the mean over the batch's labelled examples. With ``key`` (the trainer),
        local example i is global example ``g = key.step * key.global_size + key.start + i``: its
        timestep is ``counter_timesteps(seed, g)``, its noise elements ``g * C*H*W ...`` of the
        Philox stream of ``seed``, and the classifier term is
        ``(global_size / B) * sum(local losses) / key.labelled`` (the diffusion term stays the local
        mean): averaged over equal shards, as DDP averages gradients, both give the global means.
        """
        if y.shape[0] != x0.shape[0]:
            raise ValueError(f"x0 and y batch sizes differ: {x0.shape[0]} vs {y.shape[0]}")
        if x_cls is not None:
            if self.config.classifier_input == "xt":
                raise ValueError(f"x_cls was given but classifier_input is {self.config.classifier_input!r}: the "
                                 "classifier reads the diffusion pass's x_t; pass x_cls only with 'x0' or 'both'")
            if x_cls.shape != x0.shape:
                raise ValueError(f"x_cls must have x0's shape {tuple(x0.shape)}, got {tuple(x_cls.shape)}")
        b = x0.shape[0]
        labelled_total, scale, masks = None, 1.0, None
        objective = self.config.objective
        if objective == "classifier":
            return self._classifier_only(x0 if x_cls is None else x_cls, y, t, noise, key)
        if key is not None:
            if t is not None or noise is not None:
                raise ValueError("pass either key or explicit t/noise, not both")
            first, masks, labelled_total, scale = self._keyed(key, b, x0.device)
            # Drawn on the device from (seed, global example index): no host sync, one graph.
            t = noise_ops.counter_timesteps(first, key.seed, b, self.diffusion.num_timesteps)
            x_t, noise = self.diffusion.q_sample_keyed(x0, t, key.seed, first)
        else:
            if t is None:
                t = torch.randint(0, self.diffusion.num_timesteps, (b,), device=x0.device)
            if noise is None:
                noise = torch.randn_like(x0)
            x_t = self.diffusion.q_sample(x0, t, noise)
        zeros = torch.zeros(b, dtype=torch.long, device=x0.device)
        dkey = None if key is None else (first, key.seed, b)  # keyed UNet dropout (see unet.DropoutKey)
        if objective == "diffusion":
            enc = self.unet.encode(x_t, t, _keys(dkey, 0))
        elif self.config.classifier_input == "xt":
            enc = cls_enc = self.unet.encode(x_t, t, _keys(dkey, 0))
        else:
            x_cls = x0 if x_cls is None else x_cls
            if self.config.fuse_encoder_passes:
                # One encoder call on [x_t ; x_cls] at [t ; 0]: every layer is per-example (GroupNorm,
                # attention, timestep FiLM, keyed dropout), so the halves are the two passes' results,
                # computed with twice the batch per kernel and one graph instead of two under torch.compile.
                both = self.unet.encode(torch.cat([x_t, x_cls.to(x_t.dtype)]), torch.cat([t, zeros]),
                                        _keys(dkey, 0, 1))
                enc, cls_enc = both.split(b)
            else:
                enc = self.unet.encode(x_t, t, _keys(dkey, 0))
                cls_enc = self.unet.encode(x_cls, zeros, _keys(dkey, 1))
        eps_hat = self.unet.decode(*enc, _keys(dkey, 0))
        eps_hat = eps_hat.contiguous()  # a channels-last model's output: the noise is NCHW (a few channels)
        if noise_ops.fusable(eps_hat) and noise.dtype in (eps_hat.dtype, torch.float32):
            diffusion_loss = noise_ops.eps_mse(eps_hat, noise)  # fused, float32 accumulation
        else:
            diffusion_loss = F.mse_loss(eps_hat.float(), noise.float())
        if objective == "diffusion":
            zero = torch.zeros((), dtype=torch.long, device=x0.device)
            return JointLoss(diffusion_loss, diffusion_loss, torch.zeros_like(diffusion_loss), zero, zero)
        both = self.config.classifier_input == "both"
        feats = self.unet.features(cls_enc)
        if both:
            # One head call on [x0 features ; x_t features] (its BatchNorm's batch statistics and
            # running averages cover both, as at evaluation), the same dropout masks for both halves.
            feats = torch.cat([feats, self.unet.features(enc)])
            masks = None if masks is None else [None if m is None else torch.cat([m, m]) for m in masks]
        logits = self.head(feats, masks)
        cls_loss, correct, labelled = self.classifier_loss(logits[:b], y, labelled_total, scale)
        if both:  # + the CE of the head on x_t's features at t
            cls_loss = cls_loss + self.classifier_loss(logits[b:], y, labelled_total, scale)[0]
        total = diffusion_loss + self.config.classifier_weight * cls_loss
        return JointLoss(total, diffusion_loss, cls_loss, correct, labelled)

    def _keyed(self, key: BatchKey, b: int, device: torch.device) -> tuple:
        """``(first, masks, labelled_total, scale)`` of a keyed batch of ``b`` local examples: the first
        global example index on the device, the head's dropout masks (training only, else None), and
        the classifier term's denominator and scale (see ``forward``)."""
        if not (0 <= key.start and key.start + b <= key.global_size):
            raise ValueError(f"key: local examples {key.start}..{key.start + b - 1} do not fit in a global "
                             f"batch of {key.global_size}")
        first = key.first_example(device)
        masks = self._head_dropout_masks(key.seed, first, b) if self.training else None
        return first, masks, key.labelled, key.global_size / b

    def _classifier_only(self, x_cls: torch.Tensor, y: torch.Tensor, t, noise, key: BatchKey | None) -> JointLoss:
        """Objective "classifier": CE (weight 1) of the encoder + head on ``x_cls`` at t = 0, with the
        joint loss's keyed head dropout and loss scaling; nothing is noised."""
        if t is not None or noise is not None:
            raise ValueError("objective 'classifier' noises nothing: do not pass t or noise")
        b = x_cls.shape[0]
        labelled_total, scale, masks, dkey = None, 1.0, None, None
        if key is not None:
            first, masks, labelled_total, scale = self._keyed(key, b, x_cls.device)
            dkey = (first, key.seed, b)
        zeros = torch.zeros(b, dtype=torch.long, device=x_cls.device)
        logits = self.head(self.unet.features(self.unet.encode(x_cls, zeros, _keys(dkey, 1))), masks)
        cls_loss, correct, labelled = self.classifier_loss(logits, y, labelled_total, scale)
        return JointLoss(cls_loss, torch.zeros_like(cls_loss), cls_loss, correct, labelled)
