"""How the joint model steers its own reverse process towards a class.

Representation-optimized sampling (:func:`representation_eps`, PAPER.md "Conditional sampling
with optimized representations"): at each reverse step encode x_t, keeping the middle output h and
every skip tensor (together z); move z to LOWER the head's cross-entropy for the target class,
``z <- z - alpha * step(dCE/dz)``; decode the moved z into eps_hat for the usual DDIM/ancestral step.
What the head sees (``head_input``):

- ``"x0"`` (default): the head fed as it was trained. The default models train the head on the
  CLEAN image at t = 0 (``classifier_input="x0"``), so the head reads the model's own prediction
  of the clean image: ``eps_hat = decode(z)``, ``x0_hat = (x_t - sqrt(1 - abar_t) eps_hat) /
  sqrt(abar_t)`` (clamped to [-1, 1] with a straight-through gradient), ``logits =
  head(features(encode(x0_hat, t=0)))``. The gradient flows through the decoder and the t = 0
  encoder pass back to z.
- ``"xt"``: PAPER.md literally: the head on the pooled features of x_t's own representations z.
  With a head trained at t = 0 only these features are off its training distribution, so this does
  not steer (kept to show the difference). A head also trained on x_t (``classifier_input`` "xt"
  or "both", ``JointConfig.noise_aware_head``) reads them as trained, but its gradient with
  respect to z is one value per channel (the head reads spatial means), so representation steps
  move only channel means and steer weakly (README); such a head is for classifier guidance.

Head views (:class:`HeadViews`): the head was trained on AUGMENTED clean images (digits: random
2-pixel shifts), so "as it was trained" means the expectation over that augmentation. With
``count = V > 1`` the loss is the cross-entropy averaged over V augmented copies of x0_hat (drawn
from the views' generator; ``augment`` is the training augmentation, LoadedModel.augment); a
gradient that must survive the shifts moves strokes rather than single pixels, so fewer of the
changes fool the head alone. A model trained without augmentation has one view: ``augment=None``
ignores ``count``.

The step (``normalize=True``, default) is ``alpha * rms(z) * g / rms(g)`` per example (RMS over
all representation tensors together), so ``alpha`` is a dimensionless fraction of the
representations' size and its scale does not depend on the model or t; ``inner_steps`` repeats
the gradient step (recomputing the gradient) before decoding: several small steps steer better than
one large one: a large single step finds adversarial textures that fool the head but not an
independent classifier. Defaults (SampleSettings): alpha 0.02, 5 inner steps. ``t_min``
(fraction of T) leaves the steps below it unsteered (default 0: steer every step). ``normalize=False`` is the paper's
raw ``alpha * g`` (alpha order 1e2..1e3 in the authors' runs, CE summed over the batch).

The authors' variant (``authors=True``) reproduces their two flaws on the literal variant: the
update's sign is ``+alpha`` (away from the target) and the head receives the raw timestep as an
extra feature (:class:`AuthorsTimeHead`) on x_t's representations.

Classifier guidance (:func:`guidance_eps`), pixel space: ``g = grad_{x_t} log p(y | .)`` with
``head_input="x0"`` (default) the head reading ``x0_hat(x_t)`` through the whole UNet and a t = 0
encoder pass, or with ``"xt"`` the head on x_t's own features at t: classic classifier guidance
(Dhariwal & Nichol) when the head was also trained on x_t (``noise_aware_head``; the digits
preset), one encoder pass forward and backward per step. Folded into eps for DDIM (``eps - s sqrt(1 -
abar_t) g``, Dhariwal & Nichol) or added to the ancestral posterior mean (``s sigma_t^2 g``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from jdm_fast.data.augment import AugmentConfig, apply_augment
from jdm_fast.diffusion import ReverseConfig, extract
from jdm_fast.models.joint import JointDiffusion
from jdm_fast.models.unet import Encoded

HEAD_INPUTS = ("x0", "xt")


class AuthorsTimeHead(nn.Module):
    """The authors' head: our head with the raw timestep t appended as feature F+1.

    Their head was trained only at t = 0, so that column was always 0: its BatchNorm running
    mean and variance are 0 (up to the decayed initial variance), and at sampling time it feeds
    ``t / sqrt(bn_eps)`` (~316 t) times its Linear weights into the hidden layer. We reproduce it on
    a head trained without the column: the column's weights get nn.Linear's default init for
    ``F + 1`` inputs (seeded); the column's constant contribution at t = 0 is already in the bias.
    """

    def __init__(self, head: nn.Module, seed: int = 0):
        super().__init__()
        self.head = head
        lin = head.net[2]
        g = torch.Generator().manual_seed(seed)
        bound = 1.0 / math.sqrt(head.in_features + 1)
        self.register_buffer("w_t", (torch.rand(lin.out_features, generator=g, dtype=torch.float32) * 2 - 1) * bound)
        self.bn_eps = head.net[1].eps

    def forward(self, features: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        net = self.head.net
        h = net[2](net[1](net[0](features.float())))
        h = h + (t.float() / math.sqrt(self.bn_eps))[:, None] * self.w_t.to(h.device)
        for m in net[3:]:
            h = m(h)
        return h


def _check_labels(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Target labels as int64, checked once when an eps function is built (one host sync)."""
    if y.ndim != 1:
        raise ValueError(f"labels must have shape (N,), got {tuple(y.shape)}")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got values in [{int(y.min())}, {int(y.max())}]")
    return y.long()


def _check_batch(y: torch.Tensor, x: torch.Tensor) -> None:
    if y.shape[0] != x.shape[0]:
        raise ValueError(f"labels must have shape ({x.shape[0]},), got {tuple(y.shape)}")


def _check_head_input(head_input: str) -> None:
    if head_input not in HEAD_INPUTS:
        raise ValueError(f"head_input must be one of {HEAD_INPUTS}, got {head_input!r}")


def _x0_hat(model: JointDiffusion, x: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """The model's clean-image prediction in float32 (:meth:`GaussianDiffusion.predict_x0_from_eps`,
    the x_0 the sampler's own step computes), clamped to [-1, 1] with a straight-through gradient
    (the clamp's value, the identity's gradient) so saturated pixels still pass gradient."""
    x0 = model.diffusion.predict_x0_from_eps(x.float(), t, eps.float())
    return x0 + (x0.clamp(-1.0, 1.0) - x0).detach()


def _check_views(views: int) -> None:
    if not isinstance(views, int) or views < 1:
        raise ValueError(f"head views must be an int >= 1, got {views!r}")


def head_log_probs(model: JointDiffusion, x0: torch.Tensor, augment: AugmentConfig | None = None, views: int = 1,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """The head's log-softmax at t = 0 for images ``x0`` (N, C, H, W): (N, K) when ``views == 1`` or
    ``augment`` is None, else (views, N, K), one row block per augmented copy (differentiable in x0)."""
    _check_views(views)
    if augment is None or views == 1:
        return F.log_softmax(model.classify(x0).float(), dim=1)
    xa = apply_augment(x0.repeat(views, *(1,) * (x0.ndim - 1)), augment, generator)
    return F.log_softmax(model.classify(xa).float(), dim=1).view(views, x0.shape[0], -1)


def _target_log_prob(logp: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """sum over examples of log p(y | x0), averaged over views when ``logp`` has a view axis."""
    if logp.ndim == 2:
        return logp.gather(1, y[:, None]).sum()
    return logp.gather(2, y[None, :, None].expand(logp.shape[0], -1, 1)).sum() / logp.shape[0]


@dataclass(frozen=True)
class HeadViews:
    """What the head reads while steering on x0_hat: ``count`` copies under ``augment`` (the head's
    training augmentation, ``LoadedModel.augment``), drawn from ``generator``; ``augment=None``
    (a model trained without augmentation) is one unaugmented view whatever ``count``."""

    augment: AugmentConfig | None = None
    count: int = 1
    generator: torch.Generator | None = None

    def __post_init__(self) -> None:
        _check_views(self.count)

    def log_probs(self, model: JointDiffusion, x0: torch.Tensor) -> torch.Tensor:
        """:func:`head_log_probs` of ``x0`` under these views."""
        return head_log_probs(model, x0, self.augment, self.count, self.generator)


def unconditional_eps(model: JointDiffusion):
    def eps_fn(x: torch.Tensor, t: torch.Tensor, t_value: int):
        with torch.no_grad():
            return model.unet(x, t), None
    return eps_fn


def _per_example_rms(ts: list[torch.Tensor]) -> torch.Tensor:
    sq = sum(v.float().pow(2).flatten(1).sum(dim=1) for v in ts)
    n = sum(v[0].numel() for v in ts)
    return (sq / n).sqrt()


def representation_eps(model: JointDiffusion, y: torch.Tensor, alpha: float, *, head_input: str = "x0",
                       authors: bool = False, authors_head: AuthorsTimeHead | None = None, normalize: bool = True,
                       inner_steps: int = 1, t_min: float = 0.0, views: HeadViews = HeadViews()):
    """eps from representations moved towards class ``y`` (see module doc)."""
    if alpha < 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}")
    if inner_steps < 1:
        raise ValueError(f"inner_steps must be >= 1, got {inner_steps}")
    _check_head_input(head_input)
    if authors:
        head_input = "xt"
        if authors_head is None:
            authors_head = AuthorsTimeHead(model.head)
    sign = 1.0 if authors else -1.0

    def loss_of(x, t, yy, zs, emb):
        if head_input == "xt":
            feats = model.unet.features(Encoded(zs[0], zs[1:], emb))
            logits = authors_head(feats, t) if authors else model.head(feats)
            return F.cross_entropy(logits.float(), yy, reduction="sum")
        x0 = _x0_hat(model, x, t, model.unet.decode(zs[0], zs[1:], emb))
        return -_target_log_prob(views.log_probs(model, x0), yy)

    yy = _check_labels(y, model.config.head.num_classes)

    def eps_fn(x: torch.Tensor, t: torch.Tensor, t_value: int):
        _check_batch(yy, x)
        with torch.no_grad():
            enc = model.unet.encode(x, t)
        zs = [enc.h.detach()] + [s.detach() for s in enc.skips]
        if alpha > 0 and t_value >= t_min * model.diffusion.num_timesteps:
            scale = _per_example_rms(zs) if normalize else None
            for _ in range(inner_steps):
                with torch.enable_grad():
                    zg = [z.requires_grad_(True) for z in zs]
                    grads = torch.autograd.grad(loss_of(x, t, yy, zg, enc.emb), zg)
                with torch.no_grad():
                    if normalize:
                        f = (alpha * scale / _per_example_rms(grads).clamp(min=1e-12)).view(-1, 1, 1, 1)
                        zs = [z.detach() + sign * f.to(z.dtype) * g for z, g in zip(zs, grads)]
                    else:
                        zs = [z.detach() + sign * alpha * g for z, g in zip(zs, grads)]
        with torch.no_grad():
            return model.unet.decode(zs[0], zs[1:], enc.emb), None
    return eps_fn


def guidance_eps(model: JointDiffusion, y: torch.Tensor, scale: float, config: ReverseConfig, *,
                 head_input: str = "x0", t_min: float = 0.0, views: HeadViews = HeadViews()):
    """eps (DDIM) or eps + mean shift (ancestral) of pixel-space classifier guidance towards ``y``,
    for the reverse process ``config`` runs on ``model.diffusion``."""
    if scale < 0:
        raise ValueError(f"guidance scale must be >= 0, got {scale}")
    _check_head_input(head_input)
    diffusion = model.diffusion
    # sigma_t^2 of each ancestral step, by original timestep (Python floats: no per-step host sync)
    step_variances = config.step_variances(diffusion) if config.sampler == "ancestral" else None
    yy = _check_labels(y, model.config.head.num_classes)

    def eps_fn(x: torch.Tensor, t: torch.Tensor, t_value: int):
        _check_batch(yy, x)
        if scale == 0 or t_value < t_min * diffusion.num_timesteps:
            with torch.no_grad():
                return model.unet(x, t), None
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            enc = model.unet.encode(xg, t)
            if head_input == "xt":
                logp = F.log_softmax(model.logits(enc).float(), dim=1)
            else:
                x0 = _x0_hat(model, xg, t, model.unet.decode(*enc))
                logp = views.log_probs(model, x0)
            grad, = torch.autograd.grad(_target_log_prob(logp, yy), xg)
        with torch.no_grad():
            eps = model.unet.decode(enc.h.detach(), [s.detach() for s in enc.skips], enc.emb.detach())
            if config.sampler == "ddim":
                coef = extract(diffusion.table("sqrt_one_minus_alphas_cumprod", x.device), t, x)
                return eps - scale * coef * grad, None
            return eps, scale * step_variances[t_value] * grad
    return eps_fn
