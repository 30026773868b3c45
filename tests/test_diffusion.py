"""Tests for jdm_fast.diffusion: schedules, forward process, posterior, respacing, samplers.

Every check compares against an independent float64 reference: closed-form schedule formulas,
direct Gaussian conditioning, or a data distribution N(mu, s^2 I) whose optimal eps predictor is
known in closed form, so the samplers' output distribution is known.
"""

from __future__ import annotations

import math

import pytest
import torch

from jdm_fast.diffusion import (
    SCHEDULES,
    GaussianDiffusion,
    ReverseConfig,
    ancestral_step,
    ddim_step,
    make_betas,
    make_generator,
    reverse_process,
    sample_ancestral,
    sample_ddim,
    spaced_timesteps,
    timestep_sequence,
)

F64 = torch.float64


def _ref_alphas_cumprod(betas: torch.Tensor) -> list[float]:
    """abar_t = prod_{s<=t}(1 - beta_s), accumulated in Python floats."""
    out, acc = [], 1.0
    for b in betas.tolist():
        acc *= 1.0 - b
        out.append(acc)
    return out


# ============================================================================ schedules
@pytest.mark.parametrize("name,start,end", [("jdm_linear", 1e-3, 0.02), ("linear", 1e-4, 0.02)])
@pytest.mark.parametrize("T", [1000, 500])
def test_linear_schedules_endpoints_and_constant_steps(name, start, end, T):
    betas = make_betas(name, T)
    assert betas.dtype == F64 and betas.shape == (T,)
    k = 1000.0 / T
    assert betas[0].item() == pytest.approx(start * k, rel=1e-12)
    assert betas[-1].item() == pytest.approx(end * k, rel=1e-12)
    diffs = betas[1:] - betas[:-1]
    expected = (end - start) * k / (T - 1)
    assert torch.allclose(diffs, torch.full_like(diffs, expected), rtol=1e-9, atol=0)


@pytest.mark.parametrize("T", [1000, 50])
def test_cosine_alphas_cumprod_closed_form(T):
    s = 0.008

    def f(u: float) -> float:
        return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

    betas = make_betas("cosine", T)
    abar = _ref_alphas_cumprod(betas)
    unclipped = [1 - f((i + 1) / T) / f(i / T) <= 0.999 for i in range(T)]
    n_ok = unclipped.index(False) if False in unclipped else T
    assert n_ok == T - 1  # only the last beta (f(1) = 0) is clipped
    for i in range(n_ok):  # index i is the paper's step t = i + 1
        assert abar[i] == pytest.approx(f((i + 1) / T) / f(0.0), rel=1e-9, abs=1e-15)
    assert betas[-1].item() == 0.999


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("T", [1000, 100, 21])
def test_alphas_cumprod_strictly_decreasing_in_unit_interval(name, T):
    d = GaussianDiffusion(make_betas(name, T))
    abar = d.alphas_cumprod
    assert abar.dtype == F64 and d.num_timesteps == T
    assert bool((abar > 0).all()) and bool((abar < 1).all())
    assert bool((abar[1:] < abar[:-1]).all())


def test_make_betas_bad_inputs():
    with pytest.raises(ValueError, match="unknown schedule 'quad'.*jdm_linear, linear, cosine"):
        make_betas("quad", 1000)
    with pytest.raises(ValueError, match="num_timesteps must be >= 1"):
        make_betas("cosine", 0)
    with pytest.raises(TypeError, match="num_timesteps must be an int"):
        make_betas("linear", 1000.0)
    with pytest.raises(ValueError, match=r"num_timesteps=20 is too small.*num_timesteps >= 21"):
        make_betas("linear", 20)
    with pytest.raises(ValueError, match=r"'jdm_linear': num_timesteps=1 is too small"):
        make_betas("jdm_linear", 1)
    assert float(make_betas("linear", 21).max()) < 1.0
    assert make_betas("cosine", 1).shape == (1,)
    with pytest.raises(ValueError, match=r"betas must lie in \(0, 1\)"):
        GaussianDiffusion([0.1, 1.0])


# ============================================================================ forward process
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_q_sample_closed_form_per_example(dtype):
    T = 1000
    d = GaussianDiffusion(make_betas("jdm_linear", T))
    abar = _ref_alphas_cumprod(make_betas("jdm_linear", T))
    g = make_generator(0)
    t = torch.tensor([0, 1, 17, 500, 998, 999])
    x0 = torch.randn(6, 3, 4, 4, generator=g, dtype=F64)
    noise = torch.randn(6, 3, 4, 4, generator=g, dtype=F64)
    out = d.q_sample(x0.to(dtype), t, noise.to(dtype))
    assert out.dtype == dtype
    ref = torch.stack(
        [math.sqrt(abar[ti]) * x0[i] + math.sqrt(1 - abar[ti]) * noise[i] for i, ti in
         enumerate(t.tolist())]
    )
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    assert (out.to(F64) - ref).abs().max() / ref.abs().max() < tol


@pytest.mark.parametrize("t_value", [50, 700])
def test_q_sample_statistics(t_value):
    d = GaussianDiffusion(make_betas("linear", 1000))
    abar = _ref_alphas_cumprod(make_betas("linear", 1000))[t_value]
    n = 100_000
    x0 = torch.tensor([[-1.0, -0.3, 0.4, 0.9]], dtype=F64).expand(n, 4)
    noise = torch.randn(n, 4, generator=make_generator(1), dtype=F64)
    x_t = d.q_sample(x0, torch.full((n,), t_value), noise)
    mean_err = (x_t.mean(0) - math.sqrt(abar) * x0[0]).abs().max().item()
    var_err = (x_t.var(0) - (1 - abar)).abs().max().item()
    assert mean_err < 4.5 * math.sqrt((1 - abar) / n)
    assert var_err < 4.5 * (1 - abar) * math.sqrt(2 / n)


def test_predict_x0_from_eps_inverts_q_sample():
    d = GaussianDiffusion(make_betas("cosine", 1000))
    g = make_generator(2)
    t = torch.tensor([0, 3, 400, 990])
    x0 = torch.randn(4, 2, 5, generator=g, dtype=F64)
    eps = torch.randn(4, 2, 5, generator=g, dtype=F64)
    x_t = d.q_sample(x0, t, eps)
    assert torch.allclose(d.predict_x0_from_eps(x_t, t, eps), x0, rtol=0, atol=1e-9)
    assert torch.allclose(d.predict_eps_from_x0(x_t, t, x0), eps, rtol=0, atol=1e-9)


@pytest.mark.parametrize("schedule,T", [("jdm_linear", 1000), ("cosine", 100), ("linear", 500)])
def test_posterior_matches_gaussian_conditioning(schedule, T):
    """q(x_{t-1} | x_t, x_0) by conditioning the joint Gaussian of (x_{t-1}, x_t) given x_0,
    built from q(x_{t-1} | x_0) = N(sqrt(abar') x0, 1 - abar') and
    q(x_t | x_{t-1}) = N(sqrt(alpha) x_{t-1}, beta)."""
    betas = make_betas(schedule, T)
    abar = _ref_alphas_cumprod(betas)
    d = GaussianDiffusion(betas)
    g = make_generator(3)
    ts = [1, 2, T // 3, T - 1]
    x0 = torch.randn(len(ts), 3, generator=g, dtype=F64)
    x_t = torch.randn(len(ts), 3, generator=g, dtype=F64)
    mean, var, logvar = d.q_posterior(x0, x_t, torch.tensor(ts))
    for i, t in enumerate(ts):
        beta, abar_prev = betas[t].item(), abar[t - 1]
        m1, c11 = math.sqrt(abar_prev) * x0[i], 1 - abar_prev  # x_{t-1} | x0
        m2 = math.sqrt(1 - beta) * m1  # x_t | x0
        c12 = math.sqrt(1 - beta) * c11
        c22 = (1 - beta) * c11 + beta
        ref_mean = m1 + c12 / c22 * (x_t[i] - m2)
        ref_var = c11 - c12 * c12 / c22
        assert torch.allclose(mean[i], ref_mean, rtol=1e-10, atol=1e-12)
        assert var[i].sub(ref_var).abs().max().item() < 1e-12 * max(1.0, 1 / ref_var)
        assert logvar[i].sub(math.log(ref_var)).abs().max().item() < 1e-9
    # t = 0: x_{-1} is x_0 itself, a delta; the log-variance is clipped to log(var at t = 1).
    mean0, var0, logvar0 = d.q_posterior(x0[:1], x_t[:1], torch.tensor([0]))
    assert torch.allclose(mean0, x0[:1], rtol=0, atol=1e-12)
    assert var0.abs().max().item() == 0.0
    assert torch.isfinite(logvar0).all()


def test_p_mean_variance_variances_and_clipping():
    betas = make_betas("linear", 100)
    d = GaussianDiffusion(betas)
    t = torch.tensor([0, 1, 50, 99])
    x_t = torch.randn(4, 6, generator=make_generator(4), dtype=F64) * 3
    eps = torch.randn(4, 6, generator=make_generator(5), dtype=F64)
    small = d.p_mean_variance(eps, x_t, t, clip_denoised=False, variance="fixed_small")
    large = d.p_mean_variance(eps, x_t, t, clip_denoised=False, variance="fixed_large")
    assert torch.equal(small.mean, large.mean)
    ref_large = [d.posterior_variance[1].item()] + [betas[i].item() for i in (1, 50, 99)]
    assert torch.allclose(large.variance[:, 0], torch.tensor(ref_large, dtype=F64), rtol=1e-12)
    assert torch.allclose(large.log_variance, large.variance.log(), rtol=1e-12)
    assert torch.allclose(small.variance[1:, 0], d.posterior_variance[t[1:]], rtol=0, atol=0)
    clipped = d.p_mean_variance(eps, x_t, t, clip_denoised=True)
    assert clipped.pred_x0.abs().max() <= 1.0 and small.pred_x0.abs().max() > 1.0
    ref_mean = d.q_posterior(small.pred_x0.clamp(-1, 1), x_t, t)[0]
    assert torch.allclose(clipped.mean, ref_mean, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="unknown variance 'learned'"):
        d.p_mean_variance(eps, x_t, t, variance="learned")


def test_float32_inputs_use_float64_tables_cast_at_use():
    d = GaussianDiffusion(make_betas("cosine", 1000))
    for name in ("betas", "alphas_cumprod", "posterior_variance"):
        assert getattr(d, name).dtype == F64
    x = torch.randn(3, 2)
    out = d.p_mean_variance(torch.randn(3, 2), x, torch.tensor([0, 5, 999]))
    assert out.mean.dtype == out.variance.dtype == torch.float32
    assert out.variance.shape == x.shape


def test_timestep_validation():
    """float64 data runs in PyTorch: GaussianDiffusion checks the arguments itself."""
    d = GaussianDiffusion(make_betas("linear", 1000))
    x = torch.zeros(2, 3, dtype=F64)
    with pytest.raises(ValueError, match=r"t must lie in \[0, 1000\), got values in \[0, 1000\]"):
        d.q_sample(x, torch.tensor([0, 1000]), x)
    with pytest.raises(ValueError, match=r"t must lie in \[0, 1000\), got values in \[-1, 3\]"):
        d.q_sample(x, torch.tensor([-1, 3]), x)
    with pytest.raises(TypeError, match="t must be an integer"):
        d.q_sample(x, torch.tensor([0.0, 1.0]), x)
    with pytest.raises(ValueError, match=r"t must have shape \(batch,\) = \(2,\)"):
        d.q_sample(x, torch.tensor([0, 1, 2]), x)
    with pytest.raises(ValueError, match="noise must have the shape of x0"):
        d.q_sample(x, torch.tensor([0, 1]), torch.zeros(2, 4, dtype=F64))


def test_fused_methods_leave_the_checks_to_the_op():
    """float32 data runs the fused ops, which check the arguments (C++, or the Python mirror): the
    errors still name the argument and what it must be. Integer timesteps of any dtype are int64."""
    d = GaussianDiffusion(make_betas("linear", 1000))
    x = torch.zeros(2, 3)
    for bad in ([0, 1000], [-1, 3]):
        with pytest.raises(ValueError, match=r"\bt\b.*\[0, 1000\)"):
            d.q_sample(x, torch.tensor(bad), x)
        with pytest.raises(ValueError, match=r"\bt\b.*\[0, 1000\)"):
            d.q_sample_philox(x, torch.tensor(bad), seed=0)
        with pytest.raises(ValueError, match=r"\bt\b.*\[0, 1000\)"):
            d.q_sample_keyed(x, torch.tensor(bad), 0, torch.tensor(0))
    with pytest.raises(TypeError, match="t must be an int64 tensor"):
        d.q_sample(x, torch.tensor([0.0, 1.0]), x)
    with pytest.raises(ValueError, match=r"t must have shape \(batch,\) = \(2,\)"):
        d.q_sample(x, torch.tensor([0, 1, 2]), x)
    with pytest.raises(ValueError, match="noise must have the shape of x0"):
        d.q_sample(x, torch.tensor([0, 1]), torch.zeros(2, 4))
    with pytest.raises(TypeError, match="x0 must be float32, float16 or bfloat16"):
        d.q_sample_philox(x.to(F64), torch.tensor([0, 1]), seed=0)
    with pytest.raises(TypeError, match="x0 must be a torch.Tensor"):
        d.q_sample_keyed([[0.0]], torch.tensor([0]), 0, torch.tensor(0))
    with pytest.raises(ValueError, match="first_example must be >= 0"):
        d.q_sample_keyed(x, torch.tensor([0, 1]), 0, torch.tensor(-1))
    t32, t64 = torch.tensor([0, 999], dtype=torch.int32), torch.tensor([0, 999])
    z = torch.randn(2, 3, generator=make_generator(0))
    assert torch.equal(d.q_sample(z, t32, z), d.q_sample(z, t64, z))
    assert torch.equal(d.q_sample_philox(z, t32, 1, 5)[0], d.q_sample_philox(z, t64, 1, 5)[0])


def test_sample_timesteps_uniform_and_seeded():
    d = GaussianDiffusion(make_betas("linear", 100)).respace(10)[0]
    t = d.sample_timesteps(50_000, make_generator(6))
    assert t.dtype == torch.int64 and t.shape == (50_000,)
    counts = torch.bincount(t, minlength=10)
    assert counts.numel() == 10 and t.min() == 0
    assert (counts - 5000).abs().max() < 4.5 * math.sqrt(5000 * 0.9)
    assert torch.equal(t, d.sample_timesteps(50_000, make_generator(6)))


# ============================================================================ respacing
@pytest.mark.parametrize("schedule,T,steps", [("jdm_linear", 1000, 50), ("cosine", 1000, 7),
                                              ("linear", 500, 499), ("cosine", 100, 1)])
def test_respace_keeps_alphas_cumprod_at_mapped_timesteps(schedule, T, steps):
    d = GaussianDiffusion(make_betas(schedule, T))
    r, tmap = d.respace(steps)
    assert r.num_timesteps == steps and tmap.dtype == torch.int64 and tmap.shape == (steps,)
    assert tmap[-1].item() == T - 1 and bool((tmap[1:] > tmap[:-1]).all())
    if steps > 1:
        assert tmap[0].item() == 0
        expected = [round(i * (T - 1) / (steps - 1)) for i in range(steps)]
        assert tmap.tolist() == expected
    abar = _ref_alphas_cumprod(make_betas(schedule, T))
    ref = torch.tensor([abar[i] for i in tmap.tolist()], dtype=F64)
    # 1 - beta' cancels catastrophically where abar is tiny: absolute error ~1e-16 there.
    assert torch.allclose(r.alphas_cumprod, ref, rtol=1e-10, atol=1e-14)


def test_respace_full_steps_is_identity():
    d = GaussianDiffusion(make_betas("jdm_linear", 200))
    r, tmap = d.respace(200)
    assert torch.equal(tmap, torch.arange(200))
    assert torch.equal(r.betas, d.betas) and torch.equal(r.posterior_variance, d.posterior_variance)


# ============================================================================ samplers
class GaussianData:
    """Data x0 ~ N(mu, s^2 I). Its optimal eps predictor, in closed form:
    eps_hat(x_t, t) = sqrt(1 - a) (x_t - sqrt(a) mu) / (a s^2 + 1 - a), a = abar_t."""

    def __init__(self, schedule: str, T: int, mu: torch.Tensor, s: float) -> None:
        a = torch.tensor(_ref_alphas_cumprod(make_betas(schedule, T)), dtype=F64)
        self.k1 = (1 - a).sqrt() / (a * s * s + 1 - a)  # coefficient of x_t
        self.k2 = self.k1 * a.sqrt()  # coefficient of mu
        self.mu, self.s = mu, s
        self.seen_t: list[torch.Tensor] = []
        self.grad_enabled: list[bool] = []

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.seen_t.append(t.clone())
        self.grad_enabled.append(torch.is_grad_enabled())
        k1 = self.k1[t].to(x_t.dtype)[:, None]
        k2 = self.k2[t].to(x_t.dtype)[:, None]
        return k1 * x_t - k2 * self.mu.to(x_t.dtype)


MU = torch.linspace(-0.6, 0.6, 8, dtype=F64)
N_SAMPLES = 4096


# Step counts keep the exact-score sampler's own discretisation bias on the std below 1% (it is
# O(1/steps): e.g. DDIM with 50 steps under-disperses N(mu, 0.25) by 3-6%, which is the method,
# not a bug). 50-step DDIM(eta=1) is checked exactly against respaced ancestral further below.
@pytest.mark.parametrize(
    "sampler,schedule,T,kwargs",
    [
        pytest.param("ancestral", "cosine", 1000, {}, id="ancestral-full-T1000-fixed_small"),
        pytest.param("ancestral", "jdm_linear", 100, {"variance": "fixed_large"},
                     id="ancestral-full-T100-fixed_large"),
        pytest.param("ancestral", "cosine", 1000, {"steps": 250, "variance": "fixed_large"},
                     id="ancestral-respaced-250of1000"),
        pytest.param("ddim", "cosine", 1000, {"steps": 250, "eta": 0.0}, id="ddim-eta0-250of1000"),
        pytest.param("ddim", "cosine", 1000, {"steps": 500, "eta": 1.0}, id="ddim-eta1-500of1000"),
    ],
)
def test_sampler_recovers_gaussian_data_with_exact_eps(sampler, schedule, T, kwargs):
    s = 0.5
    model = GaussianData(schedule, T, MU, s)
    d = GaussianDiffusion(make_betas(schedule, T))
    fn = sample_ancestral if sampler == "ancestral" else sample_ddim
    x = fn(model, d, (N_SAMPLES, 8), generator=make_generator(7), clip_denoised=False, **kwargs)
    assert x.dtype == torch.float32 and x.shape == (N_SAMPLES, 8)
    x = x.to(F64)
    mean = x.mean(0)
    assert (mean - MU).abs().max().item() < 4.5 * s / math.sqrt(N_SAMPLES)
    pooled_std = (x - mean).pow(2).mean().sqrt().item()  # 8 * 4096 values
    stat_tol = 4.5 / math.sqrt(2 * 8 * N_SAMPLES)
    assert abs(pooled_std / s - 1) < stat_tol + 0.01
    per_dim_std = x.std(0) / s
    assert (per_dim_std - 1).abs().max().item() < 4.5 / math.sqrt(2 * N_SAMPLES) + 0.01


def test_ddim_eta0_recovers_delta_distribution():
    mu = torch.linspace(-0.9, 0.9, 8, dtype=F64)
    model = GaussianData("linear", 1000, mu, 1e-6)
    d = GaussianDiffusion(make_betas("linear", 1000))
    x = sample_ddim(model, d, (256, 8), steps=50, eta=0.0, generator=make_generator(8),
                    dtype=F64, clip_denoised=False)
    assert (x - mu).abs().max().item() < 1e-4


def test_ddim_eta1_equals_respaced_ancestral():
    """DDIM with eta = 1 is the DDPM ancestral sampler on the same timesteps (fixed_small)."""
    model = GaussianData("jdm_linear", 1000, MU, 0.5)
    d = GaussianDiffusion(make_betas("jdm_linear", 1000))
    kw = dict(generator=None, dtype=F64, clip_denoised=False)
    a = sample_ddim(model, d, (64, 8), steps=50, eta=1.0, **{**kw, "generator": make_generator(9)})
    b = sample_ancestral(model, d, (64, 8), steps=50, variance="fixed_small",
                         **{**kw, "generator": make_generator(9)})
    assert torch.allclose(a, b, rtol=0, atol=1e-9)


def test_ancestral_step_matches_formula_and_skips_noise_at_t0():
    betas = make_betas("linear", 100)
    abar = _ref_alphas_cumprod(betas)
    d = GaussianDiffusion(betas)
    g = make_generator(10)
    t = torch.tensor([0, 5, 0, 99])
    x_t = torch.randn(4, 3, generator=g, dtype=F64)
    eps = torch.randn(4, 3, generator=g, dtype=F64)
    noise = torch.randn(4, 3, generator=g, dtype=F64) * 10
    out = ancestral_step(d, eps, x_t, t, noise, clip_denoised=False, variance="fixed_small")
    for i, ti in enumerate(t.tolist()):
        a, a_prev, beta = abar[ti], (abar[ti - 1] if ti > 0 else 1.0), betas[ti].item()
        x0 = (x_t[i] - math.sqrt(1 - a) * eps[i]) / math.sqrt(a)
        c1 = beta * math.sqrt(a_prev) / (1 - a)
        c2 = (1 - a_prev) * math.sqrt(1 - beta) / (1 - a)
        mean = c1 * x0 + c2 * x_t[i]
        ref = mean + (math.sqrt(beta * (1 - a_prev) / (1 - a)) * noise[i] if ti > 0 else 0)
        assert torch.allclose(out[i], ref, rtol=0, atol=1e-9)


def test_ddim_step_matches_formula():
    abar_list = _ref_alphas_cumprod(make_betas("cosine", 1000))
    abar = torch.tensor(abar_list, dtype=F64)
    g = make_generator(11)
    t, t_prev = torch.tensor([999, 500, 20]), torch.tensor([979, 100, -1])
    x_t = torch.randn(3, 4, generator=g, dtype=F64)
    eps = torch.randn(3, 4, generator=g, dtype=F64)
    noise = torch.randn(3, 4, generator=g, dtype=F64)
    eta = 0.7
    out = ddim_step(abar, eps, x_t, t, t_prev, eta=eta, noise=noise, clip_denoised=False)
    for i in range(3):
        a = abar_list[t[i]]
        ap = abar_list[t_prev[i]] if t_prev[i] >= 0 else 1.0
        x0 = (x_t[i] - math.sqrt(1 - a) * eps[i]) / math.sqrt(a)
        sigma = eta * math.sqrt((1 - ap) / (1 - a) * (1 - a / ap))
        ref = math.sqrt(ap) * x0 + math.sqrt(1 - ap - sigma**2) * eps[i] + sigma * noise[i]
        assert torch.allclose(out[i], ref, rtol=0, atol=1e-9)
    # The final step (t_prev = -1) returns the x0 prediction.
    assert torch.allclose(out[2], (x_t[2] - math.sqrt(1 - abar_list[20]) * eps[2])
                          / math.sqrt(abar_list[20]), rtol=0, atol=1e-9)


def test_step_functions_are_differentiable():
    d = GaussianDiffusion(make_betas("jdm_linear", 50))
    g = make_generator(12)
    x_t = torch.randn(2, 3, generator=g, dtype=F64, requires_grad=True)
    eps = torch.randn(2, 3, generator=g, dtype=F64, requires_grad=True)
    noise = torch.randn(2, 3, generator=g, dtype=F64)
    t, t_prev = torch.tensor([10, 0]), torch.tensor([3, -1])
    assert torch.autograd.gradcheck(
        lambda e, x: ancestral_step(d, e, x, t, noise, clip_denoised=False), (eps, x_t))
    assert torch.autograd.gradcheck(
        lambda e, x: ddim_step(d, e, x, t, t_prev, eta=0.5, noise=noise, clip_denoised=False), (eps, x_t))


@pytest.mark.parametrize("sampler,kwargs,expected", [
    ("ancestral", {"steps": 5}, [99, 74, 50, 25, 0]),
    ("ancestral", {}, list(range(99, -1, -1))),
    ("ddim", {"steps": 4}, [99, 66, 33, 0]),
])
def test_samplers_call_model_with_original_timesteps_without_grad(sampler, kwargs, expected):
    model = GaussianData("linear", 100, MU, 0.5)
    d = GaussianDiffusion(make_betas("linear", 100))
    fn = sample_ancestral if sampler == "ancestral" else sample_ddim
    fn(model, d, (3, 8), generator=make_generator(13), **kwargs)
    assert [int(t[0]) for t in model.seen_t] == expected
    assert all(t.dtype == torch.int64 and t.shape == (3,) for t in model.seen_t)
    assert not any(model.grad_enabled)


@pytest.mark.parametrize("sampler,kwargs", [
    ("ancestral", {"steps": 10}),
    ("ancestral", {"variance": "fixed_large"}),
    ("ddim", {"steps": 10, "eta": 1.0}),
    ("ddim", {"steps": 10, "eta": 0.0}),
])
def test_same_seed_bit_identical_different_seed_differs(sampler, kwargs):
    model = GaussianData("cosine", 50, MU, 0.5)
    d = GaussianDiffusion(make_betas("cosine", 50))
    fn = sample_ancestral if sampler == "ancestral" else sample_ddim

    def run(seed):
        return fn(model, d, (16, 8), generator=make_generator(seed), clip_denoised=False, **kwargs)

    a, b, c = run(14), run(14), run(15)
    assert torch.equal(a, b)
    assert (a - c).abs().min() > 0  # every element differs


def test_ddim_eta0_is_deterministic_given_x_T():
    model = GaussianData("cosine", 50, MU, 0.5)
    d = GaussianDiffusion(make_betas("cosine", 50))
    x_T = torch.randn(4, 8, generator=make_generator(16))
    a = sample_ddim(model, d, (4, 8), steps=10, x_T=x_T, generator=make_generator(1))
    b = sample_ddim(model, d, (4, 8), steps=10, x_T=x_T, generator=make_generator(2))
    assert torch.equal(a, b)


@pytest.mark.parametrize("sampler,steps,t_start,expected", [
    ("ddim", 10, 0.5, [49, 37, 24, 12, 0]),
    ("ancestral", 10, 0.5, [49, 37, 24, 12, 0]),
    ("ancestral", None, 0.03, [2, 1, 0]),
    ("ddim", 4, 1.0, [99, 66, 33, 0]),
])
def test_reverse_process_from_t_start_sees_original_timesteps(sampler, steps, t_start, expected):
    model = GaussianData("linear", 100, MU, 0.5)
    d = GaussianDiffusion(make_betas("linear", 100))
    config = ReverseConfig(sampler, steps=steps, t_start=t_start)
    assert config.timesteps(100) == timestep_sequence(100, steps, t_start) == expected[::-1]

    def eps_fn(x, t, t_value):
        assert int(t[0]) == t_value
        return model(x, t), None

    x = torch.randn(3, 8, generator=make_generator(1))
    reverse_process(eps_fn, d, x, config, generator=make_generator(2))
    assert [int(t[0]) for t in model.seen_t] == expected


def test_partial_ancestral_run_respaces_the_chain_up_to_its_start():
    d = GaussianDiffusion(make_betas("cosine", 1000))
    seq, chain = ReverseConfig("ancestral", steps=20, t_start=0.3).plan(d)
    assert seq == spaced_timesteps(300, 6)  # round(20 * 0.3) steps below timestep 299
    abar = _ref_alphas_cumprod(make_betas("cosine", 1000))
    ref = torch.tensor([abar[i] for i in seq], dtype=F64)
    assert chain.num_timesteps == 6 and torch.allclose(chain.alphas_cumprod, ref, rtol=1e-10, atol=1e-14)
    assert ReverseConfig("ddim", steps=20, t_start=0.3).plan(d) == (seq, d)  # DDIM: original tables
    full_seq, full = ReverseConfig("ancestral").plan(d)
    assert full_seq == list(range(1000)) and full is d  # the full chain is the diffusion itself


def test_ddim_eta1_equals_ancestral_from_a_partial_start():
    model = GaussianData("jdm_linear", 1000, MU, 0.5)
    d = GaussianDiffusion(make_betas("jdm_linear", 1000))
    x = torch.randn(64, 8, generator=make_generator(3), dtype=F64)
    kw = dict(steps=20, t_start=0.4, clip_denoised=False)
    a = reverse_process(lambda x, t, _: (model(x, t), None), d, x, ReverseConfig("ddim", eta=1.0, **kw),
                        generator=make_generator(9))
    b = reverse_process(lambda x, t, _: (model(x, t), None), d, x, ReverseConfig("ancestral", **kw),
                        generator=make_generator(9))
    assert torch.allclose(a, b, rtol=0, atol=1e-9)


@pytest.mark.parametrize("kwargs,error,match", [
    ({"sampler": "euler"}, ValueError, "sampler must be one of"),
    ({"t_start": 0.0}, ValueError, r"t_start must lie in \(0, 1\]"),
    ({"t_start": 1.5}, ValueError, r"t_start must lie in \(0, 1\]"),
    ({"eta": 1.5}, ValueError, r"eta must lie in \[0, 1\]"),
    ({"variance": "learned"}, ValueError, "unknown variance"),
    ({"steps": 2.5}, TypeError, "steps must be an int"),
])
def test_reverse_config_rejects_bad_values(kwargs, error, match):
    with pytest.raises(error, match=match):
        ReverseConfig(**kwargs)


def test_sampler_bad_inputs():
    model = GaussianData("linear", 100, MU, 0.5)
    d = GaussianDiffusion(make_betas("linear", 100))
    for fn in (sample_ancestral, sample_ddim):
        with pytest.raises(ValueError, match=r"1 <= steps <= num_timesteps=100, got 0"):
            fn(model, d, (2, 8), steps=0)
        with pytest.raises(ValueError, match=r"1 <= steps <= num_timesteps=100, got 101"):
            fn(model, d, (2, 8), steps=101)
        with pytest.raises(ValueError, match=r"x_T must have shape \(2, 8\)"):
            fn(model, d, (2, 8), steps=2, x_T=torch.zeros(3, 8))
        with pytest.raises(ValueError, match=r"model_fn must return eps_hat of shape \(2, 8\)"):
            fn(lambda x, t: x[:, :4], d, (2, 8), steps=2)
    with pytest.raises(ValueError, match=r"eta must lie in \[0, 1\]"):
        sample_ddim(model, d, (2, 8), eta=-0.1)
    with pytest.raises(ValueError, match="unknown variance"):
        sample_ancestral(model, d, (2, 8), variance="learned")
    x = torch.zeros(2, 8, dtype=F64)
    with pytest.raises(ValueError, match=r"t_prev must lie in \[-1, 100\)"):
        ddim_step(d, x, x, torch.tensor([5, 5]), torch.tensor([-2, 0]))
    with pytest.raises(ValueError, match="t_prev must be smaller than t"):
        ddim_step(d, x, x, torch.tensor([5, 5]), torch.tensor([5, 0]))
    with pytest.raises(ValueError, match="steps must satisfy"):
        spaced_timesteps(100, 0)
    with pytest.raises(ValueError, match=r"1 <= steps <= num_timesteps=100, got 101"):
        timestep_sequence(100, 101)
