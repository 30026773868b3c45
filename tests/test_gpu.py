"""On a CUDA GPU (benchmarks/gpu_check runs ``pytest -m gpu``): every Triton kernel and CUDA noise
op against float64 references computed on the GPU, and finite engine training steps. Error bound
per DESIGN.md: at most 2x the error of plain PyTorch in the same precision, with a floor per
dtype; NaN never passes. Skipped on machines without CUDA (tests/conftest.py)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from jdm_fast.ops import attention, backend, group_norm_silu

pytestmark = pytest.mark.gpu
FLOOR = {torch.float32: 5e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def check(name: str, ours: torch.Tensor, torch_low: torch.Tensor, ref: torch.Tensor, dtype) -> None:
    e_ours, e_torch = rel(ours, ref), rel(torch_low, ref)
    bound = max(2 * e_torch, FLOOR[dtype])
    assert e_ours <= bound, f"{name}: error {e_ours:.3g} > bound {bound:.3g} (plain torch {e_torch:.3g})"


def _gn_eager(x, w, b, scale, shift, groups):
    y = F.group_norm(x, groups, w.to(x.dtype), b.to(x.dtype), 1e-5)
    return F.silu(y * (1 + scale[:, :, None, None]) + shift[:, :, None, None])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,groups,channels_last", [
    ((4, 64, 16, 16), 32, False),
    ((3, 96, 7, 7), 32, False),  # odd spatial size, 3 channels per group
    ((2, 256, 4, 4), 32, True),  # channels_last
    ((5, 32, 1, 1), 32, False),  # one-element groups
])
def test_group_norm_silu_triton(shape, groups, channels_last, dtype):
    torch.manual_seed(0)
    n, c = shape[:2]
    x = torch.randn(shape, device="cuda", dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(c, device="cuda"), torch.randn(c, device="cuda")
    scale, shift = (0.5 * torch.randn(n, c, device="cuda", dtype=dtype) for _ in range(2))
    dy = torch.randn(shape, device="cuda", dtype=dtype)
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, b, scale, shift)]
    with backend("triton"):
        y = group_norm_silu(leaves[0], groups, leaves[1], leaves[2], 1e-5, scale=leaves[3], shift=leaves[4])
    y.backward(dy)
    ref_leaves = [t.detach().double().requires_grad_() for t in (x, w, b, scale, shift)]
    y_ref = _gn_eager(*ref_leaves, groups)
    y_ref.backward(dy.double())
    low_leaves = [t.detach().clone().requires_grad_() for t in (x, w, b, scale, shift)]
    y_low = _gn_eager(*low_leaves, groups)
    y_low.backward(dy)
    check("y", y, y_low, y_ref, dtype)
    for name, a, lo, r in zip(("dx", "dw", "db", "dscale", "dshift"), leaves, low_leaves, ref_leaves):
        check(name, a.grad, lo.grad, r.grad, dtype)


def _attn_ref(q, k, v):
    p = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1)
    return p @ v


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(2, 4, 256, 64), (2, 3, 67, 32), (3, 2, 16, 128), (1, 1, 1, 16)],
                         ids=lambda s: "x".join(map(str, s)))
def test_attention_triton_packed_views(shape, dtype):
    """q, k, v as the strided views of ADM's packed qkv tensor, as SelfAttention2d hands them."""
    torch.manual_seed(0)
    b, h, length, d = shape
    qkv = torch.randn(b, 3, h, d, length, device="cuda", dtype=dtype)
    do = torch.randn(b, h, length, d, device="cuda", dtype=dtype)

    def views(t):
        return [t[:, i].transpose(-1, -2) for i in range(3)]

    ours_in = qkv.clone().requires_grad_()
    with backend("triton"):
        out = attention(*views(ours_in))
    out.backward(do)
    ref_in = qkv.double().requires_grad_()
    ref = _attn_ref(*views(ref_in))
    ref.backward(do.double())
    low_in = qkv.clone().requires_grad_()
    try:
        low = F.scaled_dot_product_attention(*[t.contiguous() for t in views(low_in)])
    except RuntimeError:  # torch 2.11: the fp32 efficient kernel rejects L = 1 ("not correctly aligned")
        with sdpa_kernel([SDPBackend.MATH]):
            low = F.scaled_dot_product_attention(*[t.contiguous() for t in views(low_in)])
    low.backward(do)
    check("out", out, low, ref, dtype)
    check("dqkv", ours_in.grad, low_in.grad, ref_in.grad, dtype)


# ------------------------------------------------------------------------------ CUDA noise ops
@pytest.fixture(scope="module")
def noise_ops():
    noise = pytest.importorskip("jdm_fast.ops.noise", reason="jdm_fast.ops.noise is not there yet")
    assert noise.HAS_C and noise.WITH_CUDA, ("the CUDA noise extension did not load: build it with "
                                              "`python setup.py build_ext --inplace` (benchmarks/gpu_check does)")
    return noise


@pytest.fixture(scope="module")
def tables():
    from jdm_fast.diffusion import GaussianDiffusion, make_betas
    return GaussianDiffusion(make_betas("jdm_linear", 1000)).to("cuda")


def _batch(dtype, shape=(6, 3, 33, 17)):
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(shape, device="cuda", generator=g).to(dtype)
    eps = torch.randn(shape, device="cuda", generator=g).to(dtype)
    t = torch.tensor([0, 1, 10, 500, 998, 999], device="cuda")
    return x, eps, t


def _c(table, t, x):
    return table.gather(0, t).reshape(-1, *([1] * (x.dim() - 1)))  # float64


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_q_sample_and_eps_mse_cuda(noise_ops, tables, dtype):
    x, eps, t = _batch(dtype)
    d = tables
    out = noise_ops.q_sample(x, t, d.sqrt_alphas_cumprod, d.sqrt_one_minus_alphas_cumprod, eps)
    ref = _c(d.sqrt_alphas_cumprod, t, x) * x.double() + _c(d.sqrt_one_minus_alphas_cumprod, t, x) * eps.double()
    low = (_c(d.sqrt_alphas_cumprod, t, x).to(dtype) * x + _c(d.sqrt_one_minus_alphas_cumprod, t, x).to(dtype) * eps)
    check("q_sample", out, low, ref, dtype)
    e_hat = eps.clone().requires_grad_()
    target = (0.9 * eps.float() + 0.1 * x.float())
    loss = noise_ops.eps_mse(e_hat, target)
    loss.backward()
    ref_loss = (eps.double() - target.double()).square().mean()
    assert loss.dtype == torch.float32 and abs(loss.item() - ref_loss.item()) <= 1e-5 * ref_loss.item()
    ref_grad = 2 * (eps.double() - target.double()) / eps.numel()
    check("eps_mse grad", e_hat.grad, ref_grad.to(dtype), ref_grad, dtype)


def test_q_sample_philox_cuda_matches_cpu(noise_ops, tables):
    x, _, t = _batch(torch.float32)
    d = tables
    xt, z = noise_ops.q_sample_philox(x, t, d.sqrt_alphas_cumprod, d.sqrt_one_minus_alphas_cumprod, seed=1234,
                                      offset=77)
    cpu = [a.cpu() for a in (x, t, d.sqrt_alphas_cumprod, d.sqrt_one_minus_alphas_cumprod)]
    xt_cpu, z_cpu = noise_ops.q_sample_philox(*cpu, seed=1234, offset=77)
    assert torch.isfinite(z).all() and 0.9 < z.std().item() < 1.1
    assert rel(z.cpu(), z_cpu.double()) < 1e-6
    assert rel(xt.cpu(), xt_cpu.double()) < 1e-6


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sampler_steps_cuda(noise_ops, tables, dtype):
    x, eps, t = _batch(dtype)
    d = tables
    z = torch.randn_like(x)
    with torch.no_grad():
        out = noise_ops.ancestral_step(x, eps, t, d.sqrt_recip_alphas_cumprod, d.sqrt_recipm1_alphas_cumprod,
                                       d.posterior_mean_coef1, d.posterior_mean_coef2,
                                       d.posterior_log_variance_clipped, True, noise=z)
    xd, ed = x.double(), eps.double()
    x0 = (_c(d.sqrt_recip_alphas_cumprod, t, x) * xd - _c(d.sqrt_recipm1_alphas_cumprod, t, x) * ed).clamp(-1, 1)
    sigma = (0.5 * _c(d.posterior_log_variance_clipped, t, x)).exp() * (t > 0).double().reshape(-1, 1, 1, 1)
    ref = _c(d.posterior_mean_coef1, t, x) * x0 + _c(d.posterior_mean_coef2, t, x) * xd + sigma * z.double()
    check("ancestral_step", out, ref.to(dtype), ref, dtype)

    t_prev = torch.tensor([-1, 0, 5, 400, 900, 950], device="cuda")
    with torch.no_grad():
        out = noise_ops.ddim_step(x, eps, t, t_prev, d.alphas_cumprod, eta=0.5, clip_denoised=True, noise=z)
    abar = d.alphas_cumprod
    a = _c(abar, t, x)
    ap = torch.where(t_prev >= 0, abar.gather(0, t_prev.clamp(min=0)), torch.ones_like(t, dtype=torch.float64))
    ap = ap.reshape(a.shape)
    sig = 0.5 * ((1 - ap) / (1 - a) * (1 - a / ap)).clamp(min=0).sqrt()
    x0 = (xd / a.sqrt() - (1 / a - 1).sqrt() * ed).clamp(-1, 1)
    e = (xd / a.sqrt() - x0) / (1 / a - 1).sqrt()
    ref = ap.sqrt() * x0 + (1 - ap - sig**2).clamp(min=0).sqrt() * e + sig * z.double()
    check("ddim_step", out, ref.to(dtype), ref, dtype)


# ------------------------------------------------------------------------------ the engine
def test_engine_matches_reference_ops_and_trains_finite():
    """CIFAR preset: the fused engine's joint loss equals the reference ops' in fp32, and bf16
    autocast steps with AdamW keep it finite."""
    from jdm_fast.diffusion import GaussianDiffusion, make_betas
    from jdm_fast.models import JointDiffusion
    from jdm_fast.training.config import get_preset

    cfg = get_preset("cifar10")
    torch.manual_seed(0)
    model = JointDiffusion(cfg.model, GaussianDiffusion(make_betas(cfg.schedule, cfg.num_timesteps)).to("cuda")).cuda()
    with torch.no_grad():  # zero-initialised output convs would hide the decoder's errors
        for name, p in model.named_parameters():
            if p.abs().max() == 0:
                p.normal_(0, 0.02)
    model.eval()  # no dropout: both runs see the same network
    x = torch.rand(8, 3, 32, 32, device="cuda") * 2 - 1
    y = torch.arange(8, device="cuda") % 10
    t = torch.randint(0, cfg.num_timesteps, (8,), device="cuda")
    noise = torch.randn_like(x)
    with torch.no_grad():
        with backend("reference"):
            ref = model(x, y, t, noise)
        fused = model(x, y, t, noise)
    for a, b in ((fused.total, ref.total), (fused.diffusion, ref.diffusion), (fused.classifier, ref.classifier)):
        assert torch.isfinite(a) and abs(a.item() - b.item()) <= 1e-3 * abs(b.item()) + 1e-6, (a.item(), b.item())
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    for _ in range(3):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(x, y).total
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        assert torch.isfinite(loss), loss


# ------------------------------------------------------------------------------ the trainer's step
@pytest.mark.parametrize("preset,amp", [("digits", True), ("tiny", False)])
def test_train_step_makes_no_host_sync(preset, amp):
    """The trainer's own TrainStep (keyed loss, clipping, fused AdamW through the GradScaler, LR
    schedule, EMA, non-finite flag) queues a whole step without the host waiting for the GPU:
    after warm-up steps (lazy initialisation may sync once), steps run under
    ``torch.cuda.set_sync_debug_mode("error")``, which raises at any synchronising call."""
    from jdm_fast.training.config import get_preset
    from jdm_fast.training.loop import build_model
    from jdm_fast.training.precision import choose_precision
    from jdm_fast.training.step import TrainStep

    cfg = get_preset(preset)
    torch.manual_seed(0)
    device = torch.device("cuda")
    model = build_model(cfg, device)
    trainer = TrainStep.from_config(cfg, model, choose_precision(amp, device), compile=False)
    u = cfg.model.unet
    x = torch.rand(cfg.batch_size, u.in_channels, u.image_size, u.image_size, device=device) * 2 - 1
    y = torch.arange(cfg.batch_size, device=device) % cfg.model.head.num_classes
    for step in range(2):
        trainer(x, y, step)
    torch.cuda.synchronize()
    flags = []
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in range(2, 5):
            flags.append(trainer(x, y, step).nonfinite)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert not torch.stack(flags).any()
