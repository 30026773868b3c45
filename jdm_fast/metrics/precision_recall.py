"""Improved precision and recall (Kynkäänniemi et al. 2019) in a feature space.

Each set's manifold is the union of balls around its points with radius the distance to the
point's k-th nearest neighbour within the set (k = 3 by default). Precision is the fraction of
generated points inside the real manifold; recall the fraction of real points inside the
generated manifold.
"""
from __future__ import annotations

import numpy as np
import torch


def _as_tensor(name: str, f: np.ndarray) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(f), dtype=torch.float64)
    if t.ndim != 2:
        raise ValueError(f"{name} must be (N, D) features, got shape {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} contains NaN or inf")
    return t


def knn_radii(features: torch.Tensor, k: int, chunk: int = 1024) -> torch.Tensor:
    """Distance of every point to its k-th nearest other point of the same set, (N,)."""
    if not 1 <= k < features.shape[0]:
        raise ValueError(f"k must be in [1, N) = [1, {features.shape[0]}), got {k}")
    out = []
    for i in range(0, features.shape[0], chunk):
        d = torch.cdist(features[i:i + chunk], features)
        out.append(d.kthvalue(k + 1, dim=1).values)  # the 1st smallest is the point itself (0)
    return torch.cat(out)


def _coverage(query: torch.Tensor, support: torch.Tensor, radii: torch.Tensor, chunk: int = 1024) -> float:
    """Fraction of ``query`` points within radius of at least one ``support`` point."""
    inside = []
    for i in range(0, query.shape[0], chunk):
        d = torch.cdist(query[i:i + chunk], support)
        inside.append((d <= radii[None, :]).any(dim=1))
    return torch.cat(inside).double().mean().item()


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3,
                     real_radii: torch.Tensor | None = None) -> tuple[float, float]:
    """``(precision, recall)`` of generated features ``fake`` against ``real`` (both (N, D)).

    ``real_radii``: ``knn_radii`` of the real set for this ``k``, when several generated sets are
    compared with one real set (an N_real x N_real distance pass each time otherwise)."""
    r, f = _as_tensor("real features", real), _as_tensor("generated features", fake)
    if r.shape[1] != f.shape[1]:
        raise ValueError(f"feature dimensions differ: real {r.shape[1]} vs generated {f.shape[1]}")
    if real_radii is None:
        real_radii = knn_radii(r, k)
    elif real_radii.shape != (r.shape[0],):
        raise ValueError(f"real_radii must have shape ({r.shape[0]},), got {tuple(real_radii.shape)}")
    precision = _coverage(f, r, real_radii)
    recall = _coverage(r, f, knn_radii(f, k))
    return precision, recall
