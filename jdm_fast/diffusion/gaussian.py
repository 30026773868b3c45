"""Gaussian diffusion: the forward process q and the Gaussian posterior q(x_{t-1} | x_t, x_0).

Notation (DDPM, Ho et al. 2020), with 0-based timestep indices t in [0, T):

    alpha_t     = 1 - beta_t
    abar_t      = prod_{s <= t} alpha_s                      (alphas_cumprod)
    abar_{t-1}  = abar at the previous index, 1 for t = 0     (alphas_cumprod_prev)

    q(x_t | x_0)          = N(sqrt(abar_t) x_0, (1 - abar_t) I)
    q(x_{t-1} | x_t, x_0) = N(c1_t x_0 + c2_t x_t, btilde_t I)
        c1_t      = beta_t sqrt(abar_{t-1}) / (1 - abar_t)     (posterior_mean_coef1)
        c2_t      = (1 - abar_{t-1}) sqrt(alpha_t) / (1 - abar_t) (posterior_mean_coef2)
        btilde_t  = beta_t (1 - abar_{t-1}) / (1 - abar_t)    (posterior_variance)

``btilde_0 = 0``, so its log is clipped as in improved-diffusion: ``log(btilde_1)`` is used at
t = 0 (no noise is ever added at t = 0, the value only keeps the log finite).

Tables are float64 tensors. They are gathered per example with ``t`` (integer tensor of shape
(B,)), broadcast to the shape of ``x`` and cast to ``x.dtype`` at use. If the tables live on a
different device than ``x``, a copy on ``x.device`` is made once and cached; call ``.to(device)``
up front to avoid even that.

Arguments are checked once, by whoever computes: methods that run a fused op
(``jdm_fast.ops.noise``: ``q_sample`` on float32/float16/bfloat16 data, ``q_sample_philox``,
``q_sample_keyed``) pass their arguments to it, and it raises the clear error; the methods that
compute in PyTorch check them here. Timestep values are range-checked (clear ``ValueError``) when
``t`` is on the CPU. On accelerators the check is skipped because it would be a host-device sync
every step; an out-of-range index then still fails (``Tensor.gather`` bounds-checks, it never wraps
negative indices; the fused ops assert on the device), only with a less friendly device-side assert.
Integer timesteps of any integer dtype are taken as int64.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch

from jdm_fast.ops import noise as noise_ops

__all__ = [
    "VARIANCES",
    "GaussianDiffusion",
    "PMeanVar",
    "check_timesteps",
    "extract",
    "spaced_timesteps",
]

VARIANCES: tuple[str, ...] = ("fixed_small", "fixed_large")

_TABLES: tuple[str, ...] = (
    "betas",
    "alphas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
    "fixed_large_variance",
    "fixed_large_log_variance",
)


def _variance_tables(variance: str) -> tuple[str, str]:
    if variance == "fixed_small":
        return "posterior_variance", "posterior_log_variance_clipped"
    if variance == "fixed_large":
        return "fixed_large_variance", "fixed_large_log_variance"
    raise ValueError(f"unknown variance {variance!r}; choose one of {', '.join(VARIANCES)}")


class PMeanVar(NamedTuple):
    """Reverse-step Gaussian p(x_{t-1} | x_t) and the x_0 prediction it was built from."""

    mean: torch.Tensor
    variance: torch.Tensor  # broadcast to x_t's shape
    log_variance: torch.Tensor  # broadcast to x_t's shape
    pred_x0: torch.Tensor


def _is_compiling() -> bool:
    return torch.compiler.is_compiling()


def check_timesteps(
    t: torch.Tensor, x: torch.Tensor, num_timesteps: int, *, name: str = "t", low: int = 0
) -> torch.Tensor:
    """Validate a per-example timestep tensor for ``x`` and return it as int64.

    ``t`` must be an integer tensor of shape ``(x.shape[0],)`` on ``x.device`` with values in
    ``[low, num_timesteps)`` (values are checked on CPU tensors only, see the module docstring).
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of int64 timesteps, got {type(t).__name__}")
    if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
        raise TypeError(f"{name} must be an integer (int64) tensor of timesteps, got {t.dtype}")
    if t.ndim != 1 or t.shape[0] != x.shape[0]:
        raise ValueError(
            f"{name} must have shape (batch,) = ({x.shape[0]},) matching x, got {tuple(t.shape)}"
        )
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    if t.device.type == "cpu" and t.numel() > 0 and not _is_compiling():
        lo, hi = int(t.min()), int(t.max())
        if lo < low or hi >= num_timesteps:
            raise ValueError(
                f"{name} must lie in [{low}, {num_timesteps}), got values in [{lo}, {hi}]"
            )
    return t.long()


def _check_like(name: str, tensor: torch.Tensor, x: torch.Tensor, x_name: str = "x_t") -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.shape != x.shape:
        raise ValueError(
            f"{name} must have the shape of {x_name} {tuple(x.shape)}, got {tuple(tensor.shape)}"
        )


def _check_x(name: str, x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if x.ndim < 1:
        raise ValueError(f"{name} must have a batch dimension, got a 0-d tensor")


def _int64(t: torch.Tensor) -> torch.Tensor:
    """Integer timesteps as the int64 tensor the fused ops take. Anything else is passed on
    unchanged, for the op to reject with its own message."""
    if (isinstance(t, torch.Tensor) and t.dtype != torch.int64 and t.dtype != torch.bool
            and not (t.is_floating_point() or t.is_complex())):
        return t.long()
    return t


def _device(name: str, x: torch.Tensor) -> torch.device:
    """x's device (where the schedule tables go), or a TypeError naming x if it is no tensor."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x.device


def extract(table: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``table[t]`` per example, shaped ``(B, 1, ..., 1)`` to broadcast against ``x``, in x.dtype.

    Uses ``gather`` (bounds-checked, no negative-index wrap-around). ``t`` must already be a
    validated int64 tensor on ``x.device``.
    """
    if table.device != x.device:
        table = table.to(x.device)
    out = table.gather(0, t)
    return out.to(x.dtype).reshape(t.shape[0], *([1] * (x.ndim - 1)))


def spaced_timesteps(num_timesteps: int, steps: int) -> list[int]:
    """``steps`` evenly spaced original timesteps in ``[0, T)``, ascending, always ending at T-1.

    ``round(i * (T - 1) / (steps - 1))`` for ``i = 0 .. steps-1`` (improved-diffusion's
    ``space_timesteps(T, [steps])``); ``steps == 1`` gives ``[T - 1]`` (improved-diffusion would
    give ``[0]``, i.e. start sampling from pure noise treated as nearly clean data).
    """
    if isinstance(steps, bool) or not isinstance(steps, int):
        raise TypeError(f"steps must be an int, got {type(steps).__name__}")
    if not 1 <= steps <= num_timesteps:
        raise ValueError(
            f"steps must satisfy 1 <= steps <= num_timesteps={num_timesteps}, got {steps}"
        )
    if steps == 1:
        return [num_timesteps - 1]
    stride = (num_timesteps - 1) / (steps - 1)
    return [round(i * stride) for i in range(steps)]


class GaussianDiffusion:
    """Forward process and posterior tables for a beta schedule (eps-parameterised model).

    Args:
        betas: 1-D sequence or tensor of T values in (0, 1); stored as float64.

    Attributes:
        num_timesteps: T.
        betas, alphas, alphas_cumprod, alphas_cumprod_prev, sqrt_alphas_cumprod,
        sqrt_one_minus_alphas_cumprod, sqrt_recip_alphas_cumprod (1/sqrt(abar)),
        sqrt_recipm1_alphas_cumprod (sqrt(1/abar - 1)), posterior_variance,
        posterior_log_variance_clipped, posterior_mean_coef1, posterior_mean_coef2,
        fixed_large_variance, fixed_large_log_variance: float64 tensors of shape (T,).
    """

    def __init__(self, betas: torch.Tensor | Sequence[float]) -> None:
        b = torch.as_tensor(betas, dtype=torch.float64).detach()
        if b.ndim != 1 or b.numel() == 0:
            raise ValueError(f"betas must be a non-empty 1-D sequence, got shape {tuple(b.shape)}")
        if not bool(torch.isfinite(b).all()) or bool((b <= 0).any()) or bool((b >= 1).any()):
            raise ValueError(
                f"betas must lie in (0, 1), got min {float(b.min()):.4g} max {float(b.max()):.4g}"
            )
        device = b.device
        b = b.cpu()
        T = b.numel()
        self.num_timesteps: int = T

        alphas = 1.0 - b
        abar = torch.cumprod(alphas, dim=0)
        abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])

        post_var = b * (1.0 - abar_prev) / (1.0 - abar)
        # btilde_0 = 0: clip its log with btilde_1 (improved-diffusion). With T = 1 there is no
        # btilde_1; use beta_0 (never used to add noise: t = 0 is noiseless).
        first = post_var[1:2] if T > 1 else b[:1]
        post_logvar = torch.log(torch.cat([first, post_var[1:]]))
        # "fixed_large" (DDPM sigma^2 = beta_t), with btilde_1 at t = 0 as in improved-diffusion.
        large_var = torch.cat([first, b[1:]])

        tables = {
            "betas": b,
            "alphas": alphas,
            "alphas_cumprod": abar,
            "alphas_cumprod_prev": abar_prev,
            "sqrt_alphas_cumprod": abar.sqrt(),
            "sqrt_one_minus_alphas_cumprod": (1.0 - abar).sqrt(),
            "sqrt_recip_alphas_cumprod": abar.rsqrt(),
            "sqrt_recipm1_alphas_cumprod": (1.0 / abar - 1.0).sqrt(),
            "posterior_variance": post_var,
            "posterior_log_variance_clipped": post_logvar,
            "posterior_mean_coef1": b * abar_prev.sqrt() / (1.0 - abar),
            "posterior_mean_coef2": (1.0 - abar_prev) * alphas.sqrt() / (1.0 - abar),
            "fixed_large_variance": large_var,
            "fixed_large_log_variance": torch.log(large_var),
        }
        for name, value in tables.items():
            setattr(self, name, value.to(device))
        self._cache: dict[tuple[str, torch.device], torch.Tensor] = {}

    # ------------------------------------------------------------------ devices
    @property
    def device(self) -> torch.device:
        """Device the tables live on."""
        return self.betas.device

    def to(self, device: torch.device | str) -> "GaussianDiffusion":
        """Move every table to ``device`` in place and return ``self`` (like ``nn.Module.to``)."""
        device = torch.device(device)
        for name in _TABLES:
            setattr(self, name, getattr(self, name).to(device))
        self._cache.clear()
        return self

    def table(self, name: str, device: torch.device) -> torch.Tensor:
        """The float64 table ``name`` on ``device`` (a cached copy if it lives elsewhere)."""
        tbl = getattr(self, name)
        if tbl.device == device:
            return tbl
        key = (name, device)
        if key not in self._cache:
            self._cache[key] = tbl.to(device)
        return self._cache[key]

    def _gather(self, name: str, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return extract(self.table(name, x.device), t, x)

    def _t(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return check_timesteps(t, x, self.num_timesteps)

    # ------------------------------------------------------------------ forward process
    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Sample q(x_t | x_0): ``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise``.

        float32/float16/bfloat16 inputs of one dtype run the fused op ``jdm_fast::q_sample``
        (float32 math, output in x0's dtype; it checks the arguments); other dtypes (float64) run
        plain PyTorch.
        """
        if (isinstance(x0, torch.Tensor) and isinstance(noise, torch.Tensor) and noise.dtype == x0.dtype
                and noise_ops.fusable(x0)):
            return noise_ops.q_sample(x0, _int64(t), self.table("sqrt_alphas_cumprod", x0.device),
                                      self.table("sqrt_one_minus_alphas_cumprod", x0.device), noise)
        _check_x("x0", x0)
        _check_like("noise", noise, x0, "x0")
        t = self._t(t, x0)
        return (
            self._gather("sqrt_alphas_cumprod", t, x0) * x0
            + self._gather("sqrt_one_minus_alphas_cumprod", t, x0) * noise
        )

    def q_sample_philox(
        self, x0: torch.Tensor, t: torch.Tensor, seed: int, offset: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x_t, noise)`` with counter-based noise: ``noise.flatten()[i]`` is element
        ``offset + i`` of the Philox stream of ``seed`` (``jdm_fast.ops.philox``), the same on
        every device, so a process holding a slice of a global batch draws exactly its slice.
        The fused op checks the arguments."""
        device = _device("x0", x0)
        return noise_ops.q_sample_philox(x0, _int64(t), self.table("sqrt_alphas_cumprod", device),
                                         self.table("sqrt_one_minus_alphas_cumprod", device), seed, offset)

    def q_sample_keyed(
        self, x0: torch.Tensor, t: torch.Tensor, seed: int, first_example: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``q_sample_philox`` at offset ``first_example * per_example`` where ``first_example`` is a
        one-element int64 tensor on x0's device (the global index of the batch's first example):
        the offset is read on the device, so a training step keys its noise without a host sync
        and without recompiling per step under torch.compile. The fused op checks the arguments."""
        device = _device("x0", x0)
        return noise_ops.q_sample_keyed(x0, _int64(t), self.table("sqrt_alphas_cumprod", device),
                                        self.table("sqrt_one_minus_alphas_cumprod", device), seed, first_example)

    def predict_x0_from_eps(
        self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor
    ) -> torch.Tensor:
        """Invert q_sample: ``x_0 = x_t / sqrt(abar_t) - sqrt(1/abar_t - 1) eps``."""
        _check_x("x_t", x_t)
        _check_like("eps", eps, x_t)
        return self._predict_x0(x_t, self._t(t, x_t), eps)

    def _predict_x0(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        return (
            self._gather("sqrt_recip_alphas_cumprod", t, x_t) * x_t
            - self._gather("sqrt_recipm1_alphas_cumprod", t, x_t) * eps
        )

    def predict_eps_from_x0(
        self, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor
    ) -> torch.Tensor:
        """``eps = (x_t / sqrt(abar_t) - x_0) / sqrt(1/abar_t - 1)`` (inverse of the above)."""
        _check_x("x_t", x_t)
        _check_like("x0", x0, x_t)
        t = self._t(t, x_t)
        return (
            self._gather("sqrt_recip_alphas_cumprod", t, x_t) * x_t - x0
        ) / self._gather("sqrt_recipm1_alphas_cumprod", t, x_t)

    def q_posterior(
        self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q(x_{t-1} | x_t, x_0) = N(c1_t x_0 + c2_t x_t, btilde_t).

        Returns ``(mean, variance, log_variance_clipped)``, variance and log-variance broadcast
        (as expanded views) to x_t's shape.
        """
        _check_x("x_t", x_t)
        _check_like("x0", x0, x_t)
        t = self._t(t, x_t)
        mean = self._posterior_mean(x0, x_t, t)
        var = self._gather("posterior_variance", t, x_t).expand_as(x_t)
        logvar = self._gather("posterior_log_variance_clipped", t, x_t).expand_as(x_t)
        return mean, var, logvar

    def _posterior_mean(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return (
            self._gather("posterior_mean_coef1", t, x_t) * x0
            + self._gather("posterior_mean_coef2", t, x_t) * x_t
        )

    def p_mean_variance(
        self,
        eps: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor,
        clip_denoised: bool = True,
        variance: str = "fixed_small",
    ) -> PMeanVar:
        """Reverse step p(x_{t-1} | x_t) from an eps prediction.

        ``pred_x0 = predict_x0_from_eps(x_t, t, eps)``, clamped to [-1, 1] if ``clip_denoised``;
        ``mean = c1_t pred_x0 + c2_t x_t``; variance ``btilde_t`` ("fixed_small", clipped log)
        or ``beta_t`` ("fixed_large", with btilde_1 at t = 0).
        """
        var_name, logvar_name = _variance_tables(variance)
        _check_x("x_t", x_t)
        _check_like("eps", eps, x_t)
        t = self._t(t, x_t)
        pred_x0 = self._predict_x0(x_t, t, eps)
        if clip_denoised:
            pred_x0 = pred_x0.clamp(-1.0, 1.0)
        mean = self._posterior_mean(pred_x0, x_t, t)
        var = self._gather(var_name, t, x_t).expand_as(x_t)
        logvar = self._gather(logvar_name, t, x_t).expand_as(x_t)
        return PMeanVar(mean, var, logvar, pred_x0)

    def reverse_std(self, t: torch.Tensor, x: torch.Tensor, variance: str) -> torch.Tensor:
        """``sigma_t = exp(0.5 log sigma_t^2)`` of the reverse step, shaped (B, 1, ..., 1)."""
        _, logvar_name = _variance_tables(variance)
        t = self._t(t, x)
        return self._gather(logvar_name, t, x).mul(0.5).exp()

    # ------------------------------------------------------------------ utilities
    def sample_timesteps(
        self,
        batch: int,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """Uniform int64 timesteps in [0, T), shape (batch,). ``device`` defaults to the
        generator's device (or the CPU); it must match the generator's device type."""
        if device is None:
            device = generator.device if generator is not None else torch.device("cpu")
        return torch.randint(
            0, self.num_timesteps, (batch,), generator=generator, device=device, dtype=torch.long
        )

    def respace(self, steps: int) -> tuple["GaussianDiffusion", torch.Tensor]:
        """A diffusion over ``steps`` evenly spaced original timesteps (improved-diffusion).

        With ``S = spaced_timesteps(T, steps)``, the new betas are
        ``beta'_i = 1 - abar_{S_i} / abar_{S_{i-1}}`` (``abar_{S_{-1}} = 1``), so that
        ``abar'_i = abar_{S_i}``. Returns ``(respaced, timestep_map)`` where ``timestep_map`` is an
        int64 CPU tensor with ``timestep_map[i] = S_i``: the model must be called with the
        ORIGINAL index ``timestep_map[i]`` while the respaced tables use ``i``.
        """
        use = spaced_timesteps(self.num_timesteps, steps)
        if steps == self.num_timesteps:  # identity: keep the exact betas
            return GaussianDiffusion(self.betas), torch.arange(steps, dtype=torch.long)
        abar = self.alphas_cumprod.cpu()[use]
        prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
        respaced = GaussianDiffusion(1.0 - abar / prev).to(self.device)
        return respaced, torch.tensor(use, dtype=torch.long)

    def __repr__(self) -> str:
        return f"GaussianDiffusion(num_timesteps={self.num_timesteps}, device={self.device})"
