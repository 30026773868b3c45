"""The three training objectives (issue 19): joint, diffusion-only and classifier-only, each
checked against what it must compute, built from the same weights and the same draws."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from jdm_fast.diffusion import GaussianDiffusion, make_betas
from jdm_fast.models.config import HeadConfig, UNetConfig
from jdm_fast.models.joint import JointConfig, JointDiffusion
from jdm_fast.training.precision import Precision
from jdm_fast.training.step import TrainStep

MODEL = JointConfig(
    unet=UNetConfig(image_size=16, in_channels=1, model_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                    attention_resolutions=(8,), num_heads=2, dropout=0.0, num_groups=4),
    head=HeadConfig(num_classes=4, dropout=0.0), classifier_weight=0.05)
T = 40


def build(objective: str, seed: int = 0) -> JointDiffusion:
    torch.manual_seed(seed)
    model = JointDiffusion(dataclasses.replace(MODEL, objective=objective),
                           GaussianDiffusion(make_betas("jdm_linear", T)))
    for p in model.parameters():  # zero-initialised layers too, so every term depends on every weight
        torch.nn.init.normal_(p, std=0.2)
    return model


def batch(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(6, 1, 16, 16, generator=g) * 2 - 1
    x_cls = torch.rand(6, 1, 16, 16, generator=g) * 2 - 1
    y = torch.tensor([0, 1, 2, 3, -1, 1])  # one unlabelled example
    t = torch.randint(0, T, (6,), generator=g)
    noise = torch.randn(6, 1, 16, 16, generator=g)
    return x, x_cls, y, t, noise


def reference_terms(joint: JointDiffusion, x, x_cls, y, t, noise):
    """The eps-MSE of the UNet at (x_t, t) and the mean CE over labelled examples of the head on
    x_cls at t = 0, from the network's forward and the closed-form noising (the schedule from
    make_betas in float64), not from JointDiffusion.forward."""
    was = joint.training
    joint.eval()
    with torch.no_grad():
        betas = torch.as_tensor(make_betas("jdm_linear", T), dtype=torch.float64)
        ab = torch.cumprod(1 - betas, 0)[t].view(-1, 1, 1, 1)
        x_t = (ab.sqrt() * x.double() + (1 - ab).sqrt() * noise.double()).float()
        mse = (joint.unet(x_t, t).double() - noise.double()).square().mean()
        logits = joint.classify(x_cls).double()
    joint.train(was)
    keep = y >= 0
    ce = F.cross_entropy(logits[keep], y[keep])
    return mse, ce


def test_joint_loss_is_the_weighted_sum_of_its_two_terms():
    joint = build("joint").eval()
    x, x_cls, y, t, noise = batch()
    out = joint(x, y, t=t, noise=noise, x_cls=x_cls)
    mse, ce = reference_terms(joint, x, x_cls, y, t, noise)
    assert out.diffusion.item() == pytest.approx(mse.item(), rel=1e-5)
    assert out.classifier.item() == pytest.approx(ce.item(), rel=1e-5)
    assert out.total.item() == pytest.approx(mse.item() + MODEL.classifier_weight * ce.item(), rel=1e-5)


def test_diffusion_objective_has_no_head_and_trains_the_eps_mse_alone():
    joint, diff = build("joint"), build("diffusion")
    assert diff.head is None and not any(k.startswith("head.") for k in diff.state_dict())
    assert diff.state_dict().keys() == {k for k in joint.state_dict() if not k.startswith("head.")}
    diff.load_state_dict({k: v for k, v in joint.state_dict().items() if not k.startswith("head.")})
    diff.eval()
    x, x_cls, y, t, noise = batch()
    out = diff(x, y, t=t, noise=noise, x_cls=x_cls)
    mse, _ = reference_terms(joint, x, x_cls, y, t, noise)
    assert out.total.item() == pytest.approx(mse.item(), rel=1e-5)
    assert out.diffusion.item() == out.total.item() and out.classifier.item() == 0 and int(out.labelled) == 0
    out.total.backward()
    grads = {n: p.grad for n, p in diff.named_parameters()}
    assert all(g is not None for n, g in grads.items()), [n for n, g in grads.items() if g is None]
    with pytest.raises(RuntimeError, match="objective diffusion"):
        diff.classify(x)


def test_classifier_objective_has_no_decoder_and_trains_the_ce_alone():
    joint, cls = build("joint"), build("classifier")
    assert not cls.unet.has_decoder
    decoder = ("unet.up.", "unet.out_norm.", "unet.out_conv.")
    assert cls.state_dict().keys() == {k for k in joint.state_dict() if not k.startswith(decoder)}
    assert sum(p.numel() for p in cls.parameters()) < 0.6 * sum(p.numel() for p in joint.parameters())
    cls.load_state_dict({k: v for k, v in joint.state_dict().items() if not k.startswith(decoder)})
    cls.eval()
    x, x_cls, y, t, noise = batch()
    out = cls(x, y, x_cls=x_cls)
    _, ce = reference_terms(joint, x, x_cls, y, t, noise)
    assert out.total.item() == pytest.approx(ce.item(), rel=1e-5)  # weight 1, not lambda
    assert out.diffusion.item() == 0 and int(out.labelled) == 5
    # Without x_cls the classifier reads x0 itself, at t = 0.
    plain = cls(x, y)
    _, ce_x = reference_terms(joint, x, x, y, t, noise)
    assert plain.total.item() == pytest.approx(ce_x.item(), rel=1e-5)
    with pytest.raises(RuntimeError, match="without a decoder"):
        cls.unet(x, t)
    with pytest.raises(ValueError, match="noises nothing"):
        cls(x, y, t=t)


def test_objectives_in_the_trainer_step_touch_only_their_parameters():
    """One TrainStep (keyed draws, AdamW, EMA) per objective moves every parameter the model has;
    the joint model's include the decoder and the head, diffusion-only's no head, classifier-only's
    no decoder (neither is built)."""
    x, x_cls, y, _, _ = batch()
    moved = {}
    for objective in ("joint", "diffusion", "classifier"):
        model = build(objective).train()
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        step = TrainStep(model, precision=Precision(None, False, "test"), lr=1e-2, seed=0,
                         ema_decay=0.9, global_batch=6)
        res = step(x, y, 0, x_cls=x_cls)
        assert not bool(res.nonfinite)
        moved[objective] = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
        assert moved[objective] == set(before), set(before) - moved[objective]  # every parameter it has trains
    assert any(n.startswith("unet.up.") for n in moved["joint"]) and any(n.startswith("head.") for n in moved["joint"])
    assert not any(n.startswith("head.") for n in moved["diffusion"])
    assert not any(n.startswith(("unet.up.", "unet.out_")) for n in moved["classifier"])


def test_objective_is_validated():
    with pytest.raises(ValueError, match="--objective must be one of"):
        dataclasses.replace(MODEL, objective="gan")
    with pytest.raises(ValueError, match="needs --classifier-input x0"):
        dataclasses.replace(MODEL, objective="classifier", classifier_input="xt")
