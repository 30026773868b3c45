"""The reverse process of an eps-prediction model: one loop, configured as DDPM ancestral or DDIM.

:func:`reverse_process` is the only sampling loop of the package. A :class:`ReverseConfig` says
which steps it takes: ``sampler`` ("ddim", with noise ``eta``; or "ancestral", with a fixed
variance), ``steps`` (None: every timestep; else that many evenly spaced ones, the diffusion
respaced to them for the ancestral sampler) and ``t_start`` (the fraction of T the run starts at:
1 starts from pure noise x_T; below 1 from a noised image, as counterfactuals do).
``sample_ancestral`` and ``sample_ddim`` are that loop on an unconditional model; conditional
samplers (``jdm_fast.generation``) are that loop with a steered eps.

The loop asks ``eps_fn(x_t, t, t_value) -> (eps, shift)`` for each step: ``t`` holds the ORIGINAL
timestep index in [0, T) (also when sampling with fewer steps) as an int64 tensor of shape (B,) on
the device, ``t_value`` the same as a Python int (so a steering decision needs no host-device
sync); ``shift`` is None or a tensor added to the step's output (classifier guidance's mean
shift on the ancestral sampler). An unconditional model is any callable ``model_fn(x_t, t) ->
eps_hat``, run under ``torch.no_grad()``.

Per-step functions (``ancestral_step``, ``ddim_step``) are one fused op each
(``jdm_fast::ancestral_step`` / ``jdm_fast::ddim_step``) for float32/float16/bfloat16 tensors when
no gradient flows through the step (the loop runs every step under ``torch.no_grad()``), plain
differentiable PyTorch otherwise. All randomness of a run (x_T and every per-step noise) comes
from the explicit ``torch.Generator``, so the same seed on the same device gives bit-identical
samples.

The loop returns the final x_0 sample: the last step's posterior mean at t = 0, which equals the
model's x_0 prediction (clamped to [-1, 1] only if ``clip_denoised``); no other clamping.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch

from jdm_fast.ops import noise as noise_ops

from .gaussian import (
    GaussianDiffusion,
    _check_like,
    _check_x,
    _variance_tables,
    check_timesteps,
    spaced_timesteps,
)

__all__ = [
    "SAMPLERS",
    "EpsFn",
    "ModelFn",
    "ReverseConfig",
    "ancestral_step",
    "ddim_step",
    "make_generator",
    "reverse_process",
    "sample_ancestral",
    "sample_ddim",
    "timestep_sequence",
]

SAMPLERS: tuple[str, ...] = ("ddim", "ancestral")
ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
EpsFn = Callable[[torch.Tensor, torch.Tensor, int], "tuple[torch.Tensor, torch.Tensor | None]"]


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded with ``seed``."""
    return torch.Generator(device=torch.device(device)).manual_seed(int(seed))


def _per_example(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(B,) float64 coefficients -> x.dtype, shaped (B, 1, ..., 1)."""
    return v.to(x.dtype).reshape(x.shape[0], *([1] * (x.ndim - 1)))


# ---------------------------------------------------------------------- per-step functions
def ancestral_step(
    diffusion: GaussianDiffusion,
    eps: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor | None,
    *,
    clip_denoised: bool = True,
    variance: str = "fixed_small",
) -> torch.Tensor:
    """One DDPM ancestral step ``x_{t-1} = mu(x_t, eps) + 1[t > 0] sigma_t noise``.

    ``mu`` and ``log sigma_t^2`` come from :meth:`GaussianDiffusion.p_mean_variance`
    (posterior mean at the predicted x_0; sigma_t^2 = btilde_t or beta_t). The noise is masked
    per example where ``t == 0``. ``noise=None`` returns the mean (use it for the t = 0 step).
    """
    if _fused(x_t, eps, noise):
        _check_x("x_t", x_t)
        t = check_timesteps(t, x_t, diffusion.num_timesteps)
        dev = x_t.device
        return noise_ops.ancestral_step(
            x_t, eps, t, diffusion.table("sqrt_recip_alphas_cumprod", dev),
            diffusion.table("sqrt_recipm1_alphas_cumprod", dev),
            diffusion.table("posterior_mean_coef1", dev), diffusion.table("posterior_mean_coef2", dev),
            diffusion.table(_variance_tables(variance)[1], dev), clip_denoised, noise)
    out = diffusion.p_mean_variance(eps, x_t, t, clip_denoised=clip_denoised, variance=variance)
    if noise is None:
        return out.mean
    _check_like("noise", noise, x_t)
    # sigma_t * 1[t > 0], per example (B, 1, ..., 1): cheaper than exp over the full tensor.
    nonzero = _per_example((t != 0).to(torch.float64), x_t)
    return out.mean + nonzero * diffusion.reverse_std(t, x_t, variance) * noise


def _fused(x_t: torch.Tensor, eps: torch.Tensor, noise: torch.Tensor | None) -> bool:
    """The fused step applies: one supported float dtype, no gradient through the step."""
    tensors = [x for x in (x_t, eps, noise) if x is not None]
    if not all(isinstance(x, torch.Tensor) for x in tensors):
        return False
    if any(x.dtype != x_t.dtype or x.shape != x_t.shape for x in tensors):
        return False
    if torch.is_grad_enabled() and any(x.requires_grad for x in tensors):
        return False
    return noise_ops.fusable(x_t)


def _alphas_cumprod(diffusion_or_tables: GaussianDiffusion | torch.Tensor, device: torch.device):
    if isinstance(diffusion_or_tables, GaussianDiffusion):
        return diffusion_or_tables.table("alphas_cumprod", device)
    if isinstance(diffusion_or_tables, torch.Tensor):
        abar = diffusion_or_tables
        if abar.ndim != 1 or not abar.is_floating_point():
            raise ValueError(
                "diffusion_or_tables must be a GaussianDiffusion or a 1-D float tensor of "
                f"alphas_cumprod, got shape {tuple(abar.shape)} dtype {abar.dtype}"
            )
        return abar.to(device=device, dtype=torch.float64)
    raise TypeError(
        "diffusion_or_tables must be a GaussianDiffusion or an alphas_cumprod tensor, got "
        f"{type(diffusion_or_tables).__name__}"
    )


def _check_eta(eta: float) -> float:
    eta = float(eta)
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must lie in [0, 1], got {eta}")
    return eta


def ddim_step(
    diffusion_or_tables: GaussianDiffusion | torch.Tensor,
    eps: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    t_prev: torch.Tensor,
    *,
    eta: float = 0.0,
    noise: torch.Tensor | None = None,
    clip_denoised: bool = True,
) -> torch.Tensor:
    """One DDIM step (Song et al. 2021, eq. 12) from index ``t`` to ``t_prev < t``.

    With ``a = abar_t``, ``a' = abar_{t_prev}`` (``a' = 1`` where ``t_prev == -1``, the final
    step to clean data)::

        x0    = (x_t - sqrt(1 - a) eps) / sqrt(a)          (clamped to [-1, 1] if clip_denoised,
                                                            then eps = (x_t - sqrt(a) x0)/sqrt(1-a))
        sigma = eta sqrt((1 - a') / (1 - a)) sqrt(1 - a / a')
        x_prev = sqrt(a') x0 + sqrt(1 - a' - sigma^2) eps + sigma noise

    ``diffusion_or_tables`` is a GaussianDiffusion or its ``alphas_cumprod`` (float, shape (T,)).
    ``t`` and ``t_prev`` index that table (int64, shape (B,)). ``noise=None`` means zero noise
    (fine when ``eta == 0`` or on the final step, where sigma = 0).
    """
    _check_x("x_t", x_t)
    _check_like("eps", eps, x_t)
    eta = _check_eta(eta)
    abar = _alphas_cumprod(diffusion_or_tables, x_t.device)
    T = abar.numel()
    t = check_timesteps(t, x_t, T)
    t_prev = check_timesteps(t_prev, x_t, T, name="t_prev", low=-1)
    if t.device.type == "cpu" and not torch.compiler.is_compiling() and bool((t_prev >= t).any()):
        raise ValueError("t_prev must be smaller than t for every example")
    if _fused(x_t, eps, noise):
        return noise_ops.ddim_step(x_t, eps, t, t_prev, abar, eta, clip_denoised, noise)

    # Coefficients in float64 on (B,), cast to x's dtype once.
    a = abar.gather(0, t)
    a_prev = torch.where(t_prev >= 0, abar.gather(0, t_prev.clamp(min=0)), torch.ones_like(a))
    sigma = eta * ((1.0 - a_prev) / (1.0 - a) * (1.0 - a / a_prev)).clamp(min=0.0).sqrt()
    dir_coef = (1.0 - a_prev - sigma**2).clamp(min=0.0).sqrt()

    recip = _per_example(a.rsqrt(), x_t)  # 1 / sqrt(a)
    recipm1 = _per_example((1.0 / a - 1.0).sqrt(), x_t)  # sqrt(1/a - 1)
    pred_x0 = recip * x_t - recipm1 * eps
    if clip_denoised:
        pred_x0 = pred_x0.clamp(-1.0, 1.0)
        eps = (recip * x_t - pred_x0) / recipm1
    x_prev = _per_example(a_prev.sqrt(), x_t) * pred_x0 + _per_example(dir_coef, x_t) * eps
    if noise is not None:
        _check_like("noise", noise, x_t)
        x_prev = x_prev + _per_example(sigma, x_t) * noise
    return x_prev


# ---------------------------------------------------------------------- the loop
def _check_t_start(t_start: float) -> None:
    if not 0.0 < t_start <= 1.0:
        raise ValueError(f"t_start must lie in (0, 1] (a fraction of T), got {t_start}")


def _check_steps(steps: int | None) -> None:
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int)):
        raise TypeError(f"steps must be an int, got {type(steps).__name__}")


def _span(num_timesteps: int, steps: int | None, t_start: float) -> tuple[int, int]:
    """``(top, n)``: a run from fraction ``t_start`` of T covers original timesteps [0, top) in n steps."""
    _check_t_start(t_start)
    _check_steps(steps)
    top = max(1, round(t_start * num_timesteps))
    if steps is None:
        return top, top
    # steps < 1 passes through for spaced_timesteps to reject; with t_start = 1, n == steps.
    return top, steps if steps < 1 else max(1, round(steps * t_start))


def timestep_sequence(num_timesteps: int, steps: int | None = None, t_start: float = 1.0) -> list[int]:
    """Ascending original timesteps of a reverse run that starts at fraction ``t_start`` of T.

    ``steps=None`` uses every timestep up to the start (the full chain); otherwise
    ``round(steps * t_start)`` (at least 1) evenly spaced ones (:func:`spaced_timesteps`), the last
    being the start index ``round(t_start * T) - 1``. ``steps`` must not exceed T."""
    return spaced_timesteps(*_span(num_timesteps, steps, t_start))


@dataclass(frozen=True)
class ReverseConfig:
    """Which steps :func:`reverse_process` takes.

    ``sampler="ddim"`` steps from each timestep to the previous one on the ORIGINAL
    alphas_cumprod, the last step to abar = 1 (``eta = 0``: deterministic given x_T; ``eta = 1``:
    the ancestral sampler's posterior variance on the same timesteps). ``sampler="ancestral"``
    takes DDPM ancestral steps on the chain up to the start respaced to the timesteps
    (:meth:`GaussianDiffusion.respace`), with variance "fixed_small" (posterior btilde_t; the DDPM
    paper reports similar sample quality for both, and btilde_t is exact for a delta data
    distribution) or "fixed_large" (beta_t). ADM learns the variance; the JDM models do not.
    ``steps``/``t_start``: :func:`timestep_sequence`.
    """

    sampler: str = "ddim"
    steps: int | None = None
    t_start: float = 1.0
    eta: float = 0.0  # DDIM only
    variance: str = "fixed_small"  # ancestral only
    clip_denoised: bool = True

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        _check_steps(self.steps)
        _check_t_start(self.t_start)
        _check_eta(self.eta)
        _variance_tables(self.variance)

    def timesteps(self, num_timesteps: int) -> list[int]:
        """The ascending original timesteps the model sees; the run starts at the last one."""
        return timestep_sequence(num_timesteps, self.steps, self.t_start)

    def plan(
        self, diffusion: GaussianDiffusion, device: torch.device | None = None
    ) -> tuple[list[int], GaussianDiffusion]:
        """``(timesteps, tables)``: the timesteps, and the diffusion whose tables the steps index
        (DDIM: ``diffusion``, by original timestep; ancestral: the respaced chain, by step index,
        moved to ``device``)."""
        T = diffusion.num_timesteps
        top, n = _span(T, self.steps, self.t_start)
        if self.sampler == "ddim":
            return spaced_timesteps(top, n), diffusion
        if n == top == T:  # the full chain: the diffusion itself
            return list(range(T)), diffusion
        base = diffusion if top == T else GaussianDiffusion(diffusion.betas[:top])
        chain, timestep_map = base.respace(n)
        return timestep_map.tolist(), chain if device is None else chain.to(device)

    def step_variances(self, diffusion: GaussianDiffusion) -> dict[int, float]:
        """sigma^2 of each ancestral step (the chain's ``variance`` table), by original timestep."""
        timesteps, chain = self.plan(diffusion)
        return dict(zip(timesteps, getattr(chain, _variance_tables(self.variance)[0]).tolist()))


def _noise(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def _progress(it: Iterable[int], enabled: bool, total: int, desc: str) -> Iterable[int]:
    if not enabled:
        return it
    try:
        from tqdm.auto import tqdm
    except ImportError as e:  # pragma: no cover - tqdm is a dependency
        raise ImportError("progress=True needs tqdm (pip install tqdm)") from e
    return tqdm(it, total=total, desc=desc)


def reverse_process(
    eps_fn: EpsFn,
    diffusion: GaussianDiffusion,
    x: torch.Tensor,
    config: ReverseConfig,
    *,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Run from ``x`` (a sample at the start timestep ``config.timesteps(T)[-1]``; pure noise when
    ``t_start = 1``) down to x_0. Each step's noise is drawn from ``generator`` after its eps, in
    x's dtype."""
    timesteps, tables = config.plan(diffusion, x.device)
    b, dev = x.shape[0], x.device
    for k in _progress(reversed(range(len(timesteps))), progress, len(timesteps), config.sampler):
        t = torch.full((b,), timesteps[k], dtype=torch.long, device=dev)
        eps, shift = eps_fn(x, t, timesteps[k])
        with torch.no_grad():
            eps = eps.detach().to(x.dtype)
            if config.sampler == "ddim":
                t_prev = torch.full_like(t, timesteps[k - 1] if k > 0 else -1)
                noise = _noise(x, generator) if config.eta > 0 and k > 0 else None
                x = ddim_step(tables, eps, x, t, t_prev, eta=config.eta, noise=noise,
                              clip_denoised=config.clip_denoised)
            else:
                noise = _noise(x, generator) if k > 0 else None
                x = ancestral_step(tables, eps, x, torch.full_like(t, k), noise,
                                   clip_denoised=config.clip_denoised, variance=config.variance)
            if shift is not None and k > 0:
                x = x + shift.detach().to(x.dtype)
    return x


# ---------------------------------------------------------------------- unconditional sampling
def _check_shape(shape: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(shape)
    if len(shape) < 1 or not all(isinstance(s, int) and s > 0 for s in shape):
        raise ValueError(f"shape must be a non-empty tuple of positive ints, got {shape}")
    return shape


def _resolve_device(
    device: torch.device | str | None,
    generator: torch.Generator | None,
    x_T: torch.Tensor | None,
) -> torch.device:
    if device is None:
        if x_T is not None:
            device = x_T.device
        elif generator is not None:
            device = generator.device
        else:
            device = "cpu"
    device = torch.device(device)
    if generator is not None and generator.device.type != device.type:
        raise ValueError(
            f"generator is on {generator.device} but sampling runs on {device}; "
            "use make_generator(seed, device)"
        )
    return device


def _initial_noise(
    shape: tuple[int, ...],
    x_T: torch.Tensor | None,
    generator: torch.Generator | None,
    device: torch.device,
    dtype: torch.dtype,
) -> torch.Tensor:
    if x_T is None:
        return torch.randn(shape, generator=generator, device=device, dtype=dtype)
    if tuple(x_T.shape) != shape:
        raise ValueError(f"x_T must have shape {shape}, got {tuple(x_T.shape)}")
    return x_T.to(device=device, dtype=dtype)


def _model_eps(model_fn: ModelFn) -> EpsFn:
    """The loop's eps_fn for an unconditional model: eps_hat under no_grad, its shape checked."""

    def eps_fn(x: torch.Tensor, t: torch.Tensor, t_value: int):
        with torch.no_grad():
            eps = model_fn(x, t)
        if not isinstance(eps, torch.Tensor) or eps.shape != x.shape:
            got = tuple(eps.shape) if isinstance(eps, torch.Tensor) else type(eps).__name__
            raise ValueError(f"model_fn must return eps_hat of shape {tuple(x.shape)}, got {got}")
        return eps, None

    return eps_fn


def _sample(
    model_fn: ModelFn,
    diffusion: GaussianDiffusion,
    shape: Sequence[int],
    config: ReverseConfig,
    *,
    generator: torch.Generator | None,
    device: torch.device | str | None,
    dtype: torch.dtype,
    progress: bool,
    x_T: torch.Tensor | None,
) -> torch.Tensor:
    shape = _check_shape(shape)
    device = _resolve_device(device, generator, x_T)
    config.timesteps(diffusion.num_timesteps)  # bad steps fail before any noise is drawn
    x = _initial_noise(shape, x_T, generator, device, dtype)
    return reverse_process(_model_eps(model_fn), diffusion, x, config, generator=generator, progress=progress)


def sample_ancestral(
    model_fn: ModelFn,
    diffusion: GaussianDiffusion,
    shape: Sequence[int],
    *,
    steps: int | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    clip_denoised: bool = True,
    variance: str = "fixed_small",
    progress: bool = False,
    x_T: torch.Tensor | None = None,
) -> torch.Tensor:
    """DDPM ancestral sampling: x_T ~ N(0, I), then ancestral steps down to t = 0.

    Args:
        steps: None for the full T-step chain, or an int in [1, T] to sample on the respaced
            diffusion (:meth:`GaussianDiffusion.respace`); the model always sees original
            timestep indices.
        variance: "fixed_small" or "fixed_large" (:class:`ReverseConfig`).
        device: defaults to x_T's device, else the generator's, else CPU.
        x_T: optional starting noise (copied to ``device``/``dtype``); else drawn from generator.

    Returns:
        The x_0 samples, shape ``shape``, dtype ``dtype``.
    """
    config = ReverseConfig("ancestral", steps=steps, variance=variance, clip_denoised=clip_denoised)
    return _sample(model_fn, diffusion, shape, config, generator=generator, device=device, dtype=dtype,
                   progress=progress, x_T=x_T)


def sample_ddim(
    model_fn: ModelFn,
    diffusion: GaussianDiffusion,
    shape: Sequence[int],
    *,
    steps: int = 50,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    clip_denoised: bool = True,
    progress: bool = False,
    x_T: torch.Tensor | None = None,
) -> torch.Tensor:
    """DDIM sampling over ``steps`` original timesteps ``spaced_timesteps(T, steps)``
    (:class:`ReverseConfig`: ``eta = 0`` is deterministic given x_T).

    Returns:
        The x_0 samples, shape ``shape``, dtype ``dtype``.
    """
    config = ReverseConfig("ddim", steps=steps, eta=eta, clip_denoised=clip_denoised)
    return _sample(model_fn, diffusion, shape, config, generator=generator, device=device, dtype=dtype,
                   progress=progress, x_T=x_T)
