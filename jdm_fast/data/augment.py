"""Batched, device-agnostic augmentations of float NCHW images in [-1, 1].

Two ways to draw the random parameters, both for the whole batch at once (no Python loop over
samples, no host-device synchronisation):

* from an explicit ``torch.Generator`` living on the same device as the batch (``None`` uses the
  global RNG of that device): ``random_flip``, ``random_translate``, ``color_jitter``,
  ``apply_augment(x, cfg, generator)``, ``sample_augment_params``;
* keyed per example (what the loaders, and so training, use): :func:`keyed_augment_params` draws
  the parameters of the examples at positions ``p .. p + n - 1`` of an epoch's global order from
  the Philox counter op ``counter_uniform`` (``jdm_fast.ops.philox`` documents the stream), so an
  example's augmentation does not depend on the batch, shard, process count or device it is drawn
  in; ``apply_augment(x, cfg, params=...)`` applies them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from jdm_fast.ops import noise as noise_ops

from .datasets import DATASET_INFO
from .seeds import AUG_TAG

__all__ = [
    "AugmentConfig",
    "AugmentParams",
    "PADDING_MODES",
    "apply_augment",
    "color_jitter",
    "default_augment",
    "keyed_augment_params",
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
    x: torch.Tensor,
    cfg: AugmentConfig,
    generator: torch.Generator | None = None,
    *,
    params: AugmentParams | None = None,
) -> torch.Tensor:
    """Apply the augmentations ``cfg`` enables (flip -> translate -> colour jitter).

    The parameters are ``params`` when given (e.g. :func:`keyed_augment_params`; they must hold
    every augmentation ``cfg`` enables, one row per sample, on ``x``'s device), else drawn from
    ``generator`` in a fixed order (:func:`sample_augment_params`).
    """
    _check_batch(x, generator)
    if cfg.pad > 0:
        check_reflect_pad(cfg.pad, cfg.padding_mode, *x.shape[2:])
    if params is None:
        params = sample_augment_params(cfg, x.shape[0], generator, x.device, x.dtype)
    else:
        if generator is not None:
            raise ValueError("apply_augment: pass either generator or params, not both")
        _check_params(params, cfg, x)
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


def _check_params(params: AugmentParams, cfg: AugmentConfig, x: torch.Tensor) -> None:
    wanted = {"flip": cfg.flip, "offsets": cfg.pad > 0, "shift": cfg.brightness > 0 or cfg.contrast > 0,
              "scale": cfg.brightness > 0 or cfg.contrast > 0}
    for name, needed in wanted.items():
        value = getattr(params, name)
        if not needed:
            continue
        if value is None:
            raise ValueError(f"apply_augment: params.{name} is None but the AugmentConfig enables it")
        if value.shape[0] != x.shape[0] or value.device != x.device:
            raise ValueError(f"apply_augment: params.{name} has {value.shape[0]} rows on {value.device}, "
                             f"x has {x.shape[0]} samples on {x.device}")


# Columns of the keyed draws of one example (fixed, whatever the config enables, so turning one
# augmentation on or off leaves the others' draws unchanged).
_KEYED_COLUMNS = ("flip", "dy", "dx", "brightness", "contrast")
KEYED_WIDTH = len(_KEYED_COLUMNS)


def keyed_augment_params(
    cfg: AugmentConfig,
    first_example: torch.Tensor,
    n: int,
    seed: int,
    dtype: torch.dtype = torch.float32,
) -> AugmentParams:
    """The augmentation parameters of examples ``first_example .. first_example + n - 1``.

    ``first_example`` is an int64 one-element tensor on the device the parameters are wanted on
    (read there: no host sync); ``seed`` is the epoch's key (``seeds.augment_seed(seed, epoch)``,
    in [0, 2^63)). Row ``i`` takes the uniforms ``u = counter_uniform(first_example, seed, AUG_TAG,
    n, 5)[i]`` (float32 in [0, 1), multiples of 2^-24; ``jdm_fast.ops.philox.counter_uniform`` is the
    NumPy reference) and turns them into::

        flip     = u[0] < 0.5
        dy, dx   = (int(u[1] * 2^24) * (2*pad + 1)) >> 24,  likewise u[2]    (exact integers, [0, 2*pad])
        shift    = 2 * brightness * (2*u[3] - 1)                              (``dtype``)
        scale    = 1 + contrast * (2*u[4] - 1)

    The draws are bit-identical on every device (counter-based Philox), so every loader backend
    and any number of processes augment an example the same way.
    """
    u = noise_ops.counter_uniform(first_example, seed, AUG_TAG, n, KEYED_WIDTH)
    flip = offsets = shift = scale = None
    if cfg.flip:
        flip = u[:, 0] < 0.5
    if cfg.pad > 0:
        k = (u[:, 1:3] * 2.0**24).to(torch.int64)  # the 24-bit integers behind the uniforms, exactly
        offsets = (k * (2 * cfg.pad + 1)) >> 24
    if cfg.brightness > 0 or cfg.contrast > 0:
        v = (u[:, 3:5] * 2 - 1).to(dtype)  # exact in float32: uniform in [-1, 1)
        shift, scale = 2 * cfg.brightness * v[:, 0], 1 + cfg.contrast * v[:, 1]
    return AugmentParams(flip, offsets, shift, scale)


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
