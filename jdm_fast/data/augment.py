"""Batched, device-agnostic augmentations of float NCHW images in [-1, 1].

Every function draws its randomness from an explicit ``torch.Generator`` living on the same
device as the batch (``None`` uses the global RNG of that device), and works on the whole batch
at once: no Python loop over samples, no host-device synchronisation.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .datasets import DATASET_INFO

__all__ = [
    "AugmentConfig",
    "AugmentParams",
    "PADDING_MODES",
    "apply_augment",
    "color_jitter",
    "default_augment",
    "random_flip",
    "random_translate",
    "sample_augment_params",
]

PADDING_MODES = ("constant", "reflect", "replicate")


def _check_batch(x: torch.Tensor, generator: torch.Generator | None) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or not x.is_floating_point():
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        dtype = x.dtype if isinstance(x, torch.Tensor) else None
        raise ValueError(f"x must be a floating-point NCHW tensor, got {shape} {dtype}")
    if generator is not None:
        g = generator.device
        if g.type != x.device.type or (
            g.index is not None and x.device.index is not None and g.index != x.device.index
        ):
            raise ValueError(f"generator is on {g} but x is on {x.device}; they must match")


def check_reflect_pad(pad: int, padding_mode: str, h: int, w: int) -> None:
    """Reflect padding mirrors pixels inside the image, so it needs ``pad`` < H, W."""
    if padding_mode == "reflect" and pad >= min(h, w):
        raise ValueError(f"reflect padding needs pad < image size, got pad={pad} for {h}x{w}")


def _draw_flips(n: int, generator, device, p: float = 0.5) -> torch.Tensor:
    return torch.rand(n, generator=generator, device=device) < p


def _draw_offsets(n: int, pad: int, generator, device) -> torch.Tensor:
    return torch.randint(0, 2 * pad + 1, (n, 2), generator=generator, device=device)


def _draw_jitter(n: int, brightness: float, contrast: float, generator, device, dtype
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample additive shift and contrast scale from one (N, 2) uniform draw in [-1, 1]."""
    u = torch.rand(n, 2, generator=generator, device=device, dtype=dtype) * 2 - 1
    return 2 * brightness * u[:, 0], 1 + contrast * u[:, 1]


def random_flip(
    x: torch.Tensor, generator: torch.Generator | None = None, p: float = 0.5
) -> torch.Tensor:
    """Mirror each sample horizontally with probability ``p`` (one draw per sample)."""
    _check_batch(x, generator)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be in [0, 1], got {p}")
    return _flip_with(x, _draw_flips(x.shape[0], generator, x.device, p))


def _flip_with(x: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def random_translate(
    x: torch.Tensor,
    pad: int,
    generator: torch.Generator | None = None,
    padding_mode: str = "constant",
) -> torch.Tensor:
    """Pad by ``pad`` pixels on each side, then crop back at a random per-sample offset.

    ``padding_mode``: ``"constant"`` fills with -1 (black background, right for digits),
    ``"reflect"`` mirrors the border (natural images; needs ``pad < H, W``), ``"replicate"``
    repeats the edge pixel. Offsets (dy, dx) are uniform in ``[0, 2*pad]``, drawn as one
    ``randint`` of shape (N, 2). The crop is two ``gather`` calls on an index grid.
    """
    _check_batch(x, generator)
    if not isinstance(pad, int) or pad < 0:
        raise ValueError(f"pad must be a non-negative int, got {pad!r}")
    if padding_mode not in PADDING_MODES:
        raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")
    check_reflect_pad(pad, padding_mode, *x.shape[2:])
    if pad == 0:
        return x
    return _translate_with(x, pad, _draw_offsets(x.shape[0], pad, generator, x.device), padding_mode)


def _translate_with(
    x: torch.Tensor, pad: int, offsets: torch.Tensor, padding_mode: str
) -> torch.Tensor:
    n, c, h, w = x.shape
    if padding_mode == "constant":
        padded = F.pad(x, (pad, pad, pad, pad), mode="constant", value=-1.0)
    else:
        padded = F.pad(x, (pad, pad, pad, pad), mode=padding_mode)
    rows = offsets[:, 0:1] + torch.arange(h, device=x.device)  # (N, H) rows of padded to keep
    cols = offsets[:, 1:2] + torch.arange(w, device=x.device)  # (N, W)
    out = padded.gather(2, rows[:, None, :, None].expand(n, c, h, w + 2 * pad))
    return out.gather(3, cols[:, None, None, :].expand(n, c, h, w))


def color_jitter(
    x: torch.Tensor,
    brightness: float,
    contrast: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Per-sample brightness shift and contrast scaling, clamped to [-1, 1].

    With pixel intensities in [0, 1], brightness adds ``U(-brightness, brightness)`` (so
    ``2 * U(...)`` in the [-1, 1] range) and contrast scales the deviation from the sample's mean
    by ``U(1 - contrast, 1 + contrast)``; the same change applies to every channel. Clamping is
    fine for an augmentation: it only saturates pixels pushed out of range.
    """
    _check_batch(x, generator)
    if brightness < 0 or contrast < 0 or contrast > 1:
        raise ValueError(
            f"need brightness >= 0 and 0 <= contrast <= 1, got {brightness=}, {contrast=}"
        )
    if brightness == 0 and contrast == 0:
        return x
    shift, scale = _draw_jitter(x.shape[0], brightness, contrast, generator, x.device, x.dtype)
    return _jitter_with(x, shift, scale)


def _jitter_with(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    shift, scale = shift.view(-1, 1, 1, 1), scale.view(-1, 1, 1, 1)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return ((x - mean) * scale + mean + shift).clamp_(-1.0, 1.0)


@dataclass(frozen=True)
class AugmentConfig:
    """Which augmentations to apply, in the order flip -> translate -> colour jitter."""

    flip: bool = False
    pad: int = 0
    padding_mode: str = "constant"
    brightness: float = 0.0
    contrast: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.pad, int) or self.pad < 0:
            raise ValueError(f"AugmentConfig.pad must be a non-negative int, got {self.pad!r}")
        if self.padding_mode not in PADDING_MODES:
            raise ValueError(
                f"AugmentConfig.padding_mode must be one of {PADDING_MODES}, "
                f"got {self.padding_mode!r}"
            )
        if self.brightness < 0 or not 0 <= self.contrast <= 1:
            raise ValueError(
                "AugmentConfig needs brightness >= 0 and 0 <= contrast <= 1, "
                f"got {self.brightness}, {self.contrast}"
            )

    @property
    def enabled(self) -> bool:
        """True when at least one augmentation does something."""
        return self.flip or self.pad > 0 or self.brightness > 0 or self.contrast > 0


def apply_augment(
    x: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Apply the augmentations ``cfg`` enables, all drawing from ``generator`` in a fixed order."""
    _check_batch(x, generator)
    if cfg.pad > 0:
        check_reflect_pad(cfg.pad, cfg.padding_mode, *x.shape[2:])
    params = sample_augment_params(cfg, x.shape[0], generator, x.device, x.dtype)
    if params.flip is not None:
        x = _flip_with(x, params.flip)
    if params.offsets is not None:
        x = _translate_with(x, cfg.pad, params.offsets, cfg.padding_mode)
    if params.shift is not None:
        x = _jitter_with(x, params.shift, params.scale)
    return x


@dataclass(frozen=True)
class AugmentParams:
    """The random draws of one augmented batch (``None`` where the augmentation is off).

    Attributes:
        flip: bool (N,), mirror sample i horizontally.
        offsets: int64 (N, 2), (dy, dx) in ``[0, 2*pad]``: top-left corner of the crop taken from
            the image padded by ``pad`` on each side.
        shift, scale: float (N,), colour jitter ``(x - mean) * scale + mean + shift``.
    """

    flip: torch.Tensor | None
    offsets: torch.Tensor | None
    shift: torch.Tensor | None
    scale: torch.Tensor | None


def sample_augment_params(
    cfg: AugmentConfig,
    n: int,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> AugmentParams:
    """Draw the parameters :func:`apply_augment` uses for a batch of ``n`` samples.

    Draws exactly what ``random_flip``, ``random_translate`` and ``color_jitter`` draw (the same
    ``_draw_*`` helpers), in the same order, so ``apply_augment(x, cfg, g)`` equals applying
    ``sample_augment_params(cfg, len(x), g')`` for a generator ``g'`` in the same state. Pipelines that cannot run torch ops
    (DALI) take their flips, crop offsets and jitter from here.
    """
    if device is None:
        device = generator.device if generator is not None else torch.device("cpu")
    flip = offsets = shift = scale = None
    if cfg.flip:
        flip = _draw_flips(n, generator, device)
    if cfg.pad > 0:
        offsets = _draw_offsets(n, cfg.pad, generator, device)
    if cfg.brightness > 0 or cfg.contrast > 0:
        shift, scale = _draw_jitter(n, cfg.brightness, cfg.contrast, generator, device, dtype)
    return AugmentParams(flip, offsets, shift, scale)


def default_augment(dataset_name: str) -> AugmentConfig:
    """Default augmentation of a dataset.

    Digit-like grayscale sets (digits, mnist, fashionmnist): 2-pixel shifts with black padding, no
    flip. SVHN: 4-pixel reflect shifts and light jitter, no flip (mirrored digits change meaning).
    CIFAR and image folders: flips, 4-pixel reflect shifts, brightness/contrast jitter 0.1.
    """
    key = dataset_name.lower()
    if key in ("digits", "mnist", "fashionmnist"):
        return AugmentConfig(flip=False, pad=2, padding_mode="constant")
    flip = DATASET_INFO[key].flip_ok if key in DATASET_INFO else True
    return AugmentConfig(flip=flip, pad=4, padding_mode="reflect", brightness=0.1, contrast=0.1)
