"""Images as uint8 arrays <-> float tensors in [-1, 1], and image grids for sample previews."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def from_uint8(images: np.ndarray | torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
    """(N, H, W, C) uint8 images (NumPy or torch) -> float32 (N, C, H, W) in [-1, 1]
    (``uint8 / 127.5 - 1``, exact at 0 and 255) on ``device`` (default: where they are)."""
    t = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.asarray(images))
    if t.dtype != torch.uint8 or t.ndim != 4:
        raise ValueError(f"images must be uint8 (N, H, W, C), got {t.dtype} with shape {tuple(t.shape)}")
    if device is not None:
        t = t.to(device)
    return t.permute(0, 3, 1, 2).to(torch.float32).div_(127.5).sub_(1.0)  # .to(float32) made a new tensor


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> (N, H, W, C) uint8 (values outside [-1, 1] saturate, as in any image writer)."""
    x = ((x.detach().float().cpu() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def save_grid(x: torch.Tensor, path: Path, nrow: int | None = None, pad: int = 2) -> Path:
    """Save a batch (N, C, H, W) in [-1, 1] as one PNG grid; returns the path."""
    imgs = to_uint8(x)
    n, h, w, c = imgs.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    ncol = math.ceil(n / nrow)
    grid = np.zeros((ncol * (h + pad) + pad, nrow * (w + pad) + pad, c), np.uint8)
    for i, img in enumerate(imgs):
        r, q = divmod(i, nrow)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = img
    Image.fromarray(grid[..., 0] if c == 1 else grid).save(path)
    return Path(path)
