"""The plain-PyTorch baseline of the benchmarks (benchmarks/baseline.py) computes what
JointDiffusion computes: same parameter names, same eps prediction, logits, joint loss and
gradients for identical weights and inputs; its channels-last path (the ``baseline_strong``
variant) computes what its NCHW path computes, with no copy of q, k, v; that variant builds, steps
and restores the global cuDNN setting it changes. Also: the benchmarks' eager sampler loops
(benchmarks/test_sampling.py) take the same steps as jdm_fast.diffusion's samplers."""
import copy
import sys
from pathlib import Path

import pytest
import torch

from _compare import Copies
from jdm_fast.diffusion import GaussianDiffusion, make_betas, sample_ancestral, sample_ddim
from jdm_fast.models import HeadConfig, JointConfig, JointDiffusion, UNetConfig
from jdm_fast.ops import backend

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import baseline  # noqa: E402
import sampling_ref  # noqa: E402
import train_bench  # noqa: E402

TINY = UNetConfig(image_size=8, in_channels=3, model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                  attention_resolutions=(4,), num_heads=2, dropout=0.0, num_groups=4)


def _pair(unet=TINY, **kw):
    cfg = JointConfig(unet=unet, head=HeadConfig(num_classes=5, dropout=0.0), classifier_weight=0.5, **kw)
    diffusion = GaussianDiffusion(make_betas("jdm_linear", 100))
    ours = JointDiffusion(cfg, diffusion)
    torch.manual_seed(0)
    with torch.no_grad():  # nothing zero-initialised: every layer must matter
        for p in ours.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    base = baseline.BaselineJoint(cfg, diffusion.alphas_cumprod)
    base.load_state_dict(ours.state_dict(), strict=True)
    return ours, base


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def test_state_dict_keys_match_and_load_both_ways():
    ours, base = _pair()
    assert list(ours.state_dict()) == list(base.state_dict())
    ours.load_state_dict(base.state_dict(), strict=True)


@pytest.mark.parametrize("unet", [TINY, UNetConfig(image_size=8, in_channels=1, model_channels=16, channel_mult=(1, 2),
                                                   num_res_blocks=2, attention_resolutions=(8, 4), num_heads=None,
                                                   num_head_channels=8, dropout=0.0, num_groups=8,
                                                   use_scale_shift_norm=False)],
                         ids=["scale_shift", "no_scale_shift+head_channels"])
@pytest.mark.parametrize("classifier_input", ["x0", "xt", "both"])
def test_baseline_matches_joint_diffusion(unet, classifier_input):
    """Module for module: our model with the baseline's two encoder calls (the default one call
    of twice the batch equals it up to summation order: tests/test_models.py)."""
    ours, base = _pair(unet, classifier_input=classifier_input, fuse_encoder_passes=False)
    g = torch.Generator().manual_seed(1)
    b, c, s = 6, unet.in_channels, unet.image_size
    x0 = torch.rand(b, c, s, s, generator=g) * 2 - 1
    y = torch.tensor([0, 1, 4, -1, 2, 3])  # one unlabelled example
    t = torch.tensor([0, 5, 17, 50, 98, 99])
    noise = torch.randn(b, c, s, s, generator=g)
    with backend("reference"):
        eps_ours = ours.unet(x0, t)
        logits_ours = ours.classify(x0)
        loss = ours(x0, y, t, noise)
        loss.total.backward()
    eps_base = base.unet(x0, t)
    logits_base = base.classify(x0)
    total, diffusion, cls = base(x0, y, t, noise)
    total.backward()
    assert eps_base.abs().max() > 0.1 and logits_base.abs().max() > 0.1  # non-trivial outputs
    assert _rel(eps_base, eps_ours) < 1e-5
    assert _rel(logits_base, logits_ours) < 1e-5
    for ref, got in ((loss.total, total), (loss.diffusion, diffusion), (loss.classifier, cls)):
        assert torch.isfinite(got) and abs(got.item() - ref.item()) <= 1e-5 * abs(ref.item())
    grads_ours = dict(ours.named_parameters())
    for name, p in base.named_parameters():
        assert _rel(p.grad, grads_ours[name].grad) < 1e-4, name


def test_channels_last_attention_matches_nchw_and_copies_nothing():
    """The attention block on a channels-last map: the NCHW path's output and gradients (input and
    every parameter, float32), the output channels-last, and no copy forward or backward (q, k, v
    are views of the qkv projection; merging the heads and the projection are views). The NCHW
    path's two copies (q, k, v into SDPA's layout, the head merge) show the mode sees copies."""
    torch.manual_seed(0)
    nchw = baseline.Attention(32, num_heads=2, groups=4)
    with torch.no_grad():  # nothing zero-initialised (proj_out is, by default)
        for p in nchw.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    cl = copy.deepcopy(nchw)
    x = torch.randn(3, 32, 5, 6)  # L = 30, not square
    grad_out = torch.randn(3, 32, 5, 6)
    x_ref = x.clone().requires_grad_()
    with Copies() as seen_nchw:
        y_ref = nchw(x_ref)
    y_ref.backward(grad_out)
    assert seen_nchw.copies == ["aten.clone.default"] * 2  # q, k, v into SDPA's layout; the head merge

    x_cl = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    with Copies() as forward:
        y = cl(x_cl)
    grad_cl = grad_out.contiguous(memory_format=torch.channels_last)
    with Copies() as backward:
        y.backward(grad_cl)
    assert forward.copies == [] and backward.copies == []
    assert y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()
    assert x_cl.grad.is_contiguous(memory_format=torch.channels_last)
    assert _rel(y, y_ref) < 1e-6
    assert _rel(x_cl.grad, x_ref.grad) < 1e-5
    for (name, p_ref), p in zip(nchw.named_parameters(), cl.parameters()):
        assert _rel(p.grad, p_ref.grad) < 1e-5, name


def test_channels_last_baseline_matches_nchw_loss_and_gradients():
    """The whole baseline channels-last (weights and batch, as ``baseline_strong`` runs it) gives
    the NCHW baseline's joint loss and gradients in float32."""
    _, base = _pair(classifier_input="xt")
    base_cl = copy.deepcopy(base).to(memory_format=torch.channels_last)
    g = torch.Generator().manual_seed(2)
    x0 = torch.rand(4, 3, 8, 8, generator=g) * 2 - 1
    noise = torch.randn(4, 3, 8, 8, generator=g)
    y, t = torch.tensor([0, 1, 4, 2]), torch.tensor([0, 17, 50, 99])
    ref = base(x0, y, t, noise)
    ref[0].backward()
    got = base_cl(x0.contiguous(memory_format=torch.channels_last), y, t,
                  noise.contiguous(memory_format=torch.channels_last))
    got[0].backward()
    for r, o in zip(ref, got):
        assert torch.isfinite(o) and abs(o.item() - r.item()) <= 1e-5 * abs(r.item())
    grads_ref = dict(base.named_parameters())
    for name, p in base_cl.named_parameters():
        assert _rel(p.grad, grads_ref[name].grad) < 1e-4, name


def test_baseline_strong_builds_steps_and_restores_cudnn_benchmark():
    """``baseline_strong``: the baseline model, AMP, compiled, channels-last weights and batch, the
    goal's baseline; it steps on a CPU (tiny preset; the compile left to gpu_check's rehearsal,
    which compiles it); its ``settings`` turn on cudnn.benchmark on CUDA only, and restore it
    (also after an error)."""
    assert "baseline_strong" in train_bench.VARIANTS and train_bench.GOAL_BASELINE == "baseline_strong"
    assert "baseline_amp_compile" in train_bench.VARIANTS and "engine_nchw" in train_bench.VARIANTS
    cpu = torch.device("cpu")
    before = torch.backends.cudnn.benchmark
    with train_bench.settings("baseline_strong", cpu):
        model, precision, compile = train_bench.build("baseline_strong", "tiny", cpu)
        assert isinstance(model, baseline.BaselineJoint) and compile
        assert precision.name == train_bench.choose_precision(True, cpu).name
        assert train_bench.channels_last("baseline_strong") and train_bench.channels_last_input("baseline_strong")
        step = train_bench.make_step(model, precision, False, "tiny", keyed=False, channels_last=True,
                                     channels_last_input=True)
        layouts = []
        model.unet.input_conv.register_forward_pre_hook(
            lambda m, args: layouts.append(args[0].is_contiguous(memory_format=torch.channels_last)))
        x, y = train_bench.synthetic_batch("tiny", 4, cpu)
        losses = [step(x, y) for _ in range(2)]
        assert torch.backends.cudnn.benchmark == before  # untouched on a CPU
    assert all(torch.isfinite(loss) for loss in losses) and len(layouts) >= 2 and all(layouts)
    assert model.unet.input_conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert step.trainer.channels_last and "channels-last" in step.trainer.describe()

    cuda = torch.device("cuda")  # the flag is a global setting: no GPU needed to set it
    for start in (False, True):
        torch.backends.cudnn.benchmark = start
        try:
            with train_bench.settings("baseline_strong", cuda):
                assert torch.backends.cudnn.benchmark
            assert torch.backends.cudnn.benchmark == start
            with train_bench.settings("baseline_amp_compile", cuda):
                assert torch.backends.cudnn.benchmark == start
            with pytest.raises(RuntimeError), train_bench.settings("baseline_strong", cuda):
                raise RuntimeError("a failed step")
            assert torch.backends.cudnn.benchmark == start
        finally:
            torch.backends.cudnn.benchmark = before


def _toy_model(x, t):
    return 0.3 * x + 0.01 * t.float().reshape(-1, 1, 1, 1).sin()


def test_eager_sampler_loops_match_jdm_fast():
    diffusion = GaussianDiffusion(make_betas("jdm_linear", 200))
    shape = (3, 2, 5, 5)
    x_t = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    ours = sample_ddim(_toy_model, diffusion, shape, steps=20, x_T=x_t)
    ref = sampling_ref.ddim(_toy_model, diffusion.alphas_cumprod, x_t, steps=20)
    assert _rel(ref, ours) < 1e-5
    ours = sample_ancestral(_toy_model, diffusion, shape, steps=25, x_T=x_t, generator=torch.Generator().manual_seed(3))
    ref = sampling_ref.ancestral(_toy_model, diffusion.alphas_cumprod, x_t, steps=25,
                                 generator=torch.Generator().manual_seed(3))
    assert _rel(ref, ours) < 1e-5
