"""The trainer's step (jdm_fast.training.step.TrainStep) and channels-last.

TrainStep is checked against the optimisation step written out by hand (keyed joint loss,
backward, gradient clipping, AdamW, LR warm-up, EMA), channels-last against NCHW (same losses and
gradients), and the fused ops against hidden layout copies on channels-last inputs.
"""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from _compare import Copies, assert_same_losses_and_grads, one_thread, perturb_zero_params
from jdm_fast.models.joint import BatchKey
from jdm_fast.nn import GroupNormSiLU, SelfAttention2d
from jdm_fast.ops import backend
from jdm_fast.training.config import get_preset
from jdm_fast.training.loop import build_model
from jdm_fast.training.precision import Precision
from jdm_fast.training.step import TrainStep

FP32 = Precision(None, False, "fp32")


def _setup(preset="tiny", dropout=0.0, **changes):
    cfg = dataclasses.replace(get_preset(preset), augment=False, **changes)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, unet=dataclasses.replace(cfg.model.unet,
                                                                                                 dropout=dropout)))
    torch.manual_seed(0)
    model = build_model(cfg, torch.device("cpu"))
    perturb_zero_params(model)
    u = cfg.model.unet
    g = torch.Generator().manual_seed(1)
    x = torch.rand(cfg.batch_size, u.in_channels, u.image_size, u.image_size, generator=g) * 2 - 1
    y = torch.randint(0, cfg.model.head.num_classes, (cfg.batch_size,), generator=g)
    y[1] = -1  # one unlabelled example
    return cfg, model, x, y


def test_train_step_is_the_optimisation_step_written_out():
    """Two TrainSteps (warm-up LR, clipping, EMA) leave the weights and EMA of the same steps
    written by hand with plain torch.optim.AdamW."""
    cfg, model, x, y = _setup("tiny", warmup_steps=4, grad_clip=0.05, ema_decay=0.9)
    ref = copy.deepcopy(model)
    ema_ref = copy.deepcopy(model)
    trainer = TrainStep.from_config(cfg, model, FP32, compile=False)
    opt = torch.optim.AdamW(ref.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=False)
    for step in range(2):
        out = trainer(x, y, step)
        assert not out.nonfinite
        key = BatchKey(cfg.seed, step, 0, cfg.batch_size, int((y >= 0).sum()))
        loss = ref(x, y, key=key).total
        torch.testing.assert_close(out.losses.total, loss, rtol=1e-6, atol=0)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), cfg.grad_clip, foreach=False)
        for group in opt.param_groups:
            group["lr"] = cfg.lr * min(1.0, (step + 1) / cfg.warmup_steps)
        opt.step()
        opt.zero_grad()
        d = min(cfg.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, p in zip(ema_ref.parameters(), ref.parameters()):
                pe.mul_(d).add_(p, alpha=1 - d)
            for be, b in zip(ema_ref.buffers(), ref.buffers()):
                be.copy_(b)
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7, msg=name)
    for (name, p), q in zip(trainer.ema.model.named_parameters(), ema_ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7, msg=f"EMA {name}")
    assert trainer.scheduler.get_last_lr()[0] == pytest.approx(cfg.lr * 3 / 4)


def test_step_feeds_x_cls_to_the_classifier_and_draws_nothing_from_the_global_rng():
    """``trainer(x, y, step, x_cls=x_aug)`` is the keyed loss with the loader's augmented copy as the
    classifier input, and the step draws nothing from the global RNG, UNet dropout on or off
    (augmentation is the loader's keyed draws; timesteps, noise, head and UNet dropout are keyed:
    training/loop.py's determinism contract)."""
    for dropout in (0.0, 0.3):
        cfg, model, x, y = _setup("tiny", dropout=dropout)  # head dropout 0.3 (keyed masks)
        x_aug = x.flip(-1).roll(2, dims=-2)
        ref = copy.deepcopy(model)
        key = BatchKey(cfg.seed, 0, 0, cfg.batch_size, int((y >= 0).sum()))
        with torch.no_grad():
            want, plain = ref(x, y, key=key, x_cls=x_aug).total, ref(x, y, key=key).total
        trainer = TrainStep.from_config(cfg, model, FP32, compile=False)
        state = torch.get_rng_state()
        out = trainer(x, y, 0, x_cls=x_aug)
        assert torch.equal(torch.get_rng_state(), state)
        torch.testing.assert_close(out.losses.total, want, rtol=1e-6, atol=0)
        assert not torch.allclose(want, plain)
        if dropout:  # the masks are live: the same step without them computes another loss
            with torch.no_grad():
                assert not torch.allclose(ref.eval()(x, y, key=key, x_cls=x_aug).total, want)


def test_a_non_finite_step_is_flagged_and_skipped():
    cfg, model, x, y = _setup("tiny")
    trainer = TrainStep.from_config(cfg, model, FP32, compile=False)
    before = [p.detach().clone() for p in model.parameters()]
    out = trainer(x.masked_fill(torch.zeros_like(x, dtype=torch.bool).index_fill_(0, torch.tensor([0]), True),
                                float("nan")), y, 0)
    assert out.nonfinite
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))


@pytest.mark.parametrize("preset", ["tiny", "digits"])
def test_channels_last_computes_what_nchw_computes(preset):
    """The same step in channels-last and NCHW: equal loss terms and gradients (fp32, 1e-5; keyed
    UNet dropout on, its masks independent of the layout), the channels-last model keeps its feature
    maps channels-last, and every gradient reaching them is dense channels-last (jdm_fast.nn.layout:
    no mixed-layout accumulation)."""
    cfg, model, x, y = _setup(preset, dropout=0.3)
    cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    assert cl.unet.channels_last and not model.unet.channels_last
    key = BatchKey(cfg.seed, 3, 0, cfg.batch_size, int((y >= 0).sum()))
    with one_thread():
        assert_same_losses_and_grads(cl, cl(x, y, key=key), model, model(x, y, key=key))
    enc = cl.unet.encode(x, torch.zeros(x.shape[0], dtype=torch.long))
    assert all(s.is_contiguous(memory_format=torch.channels_last) for s in enc.skips[1:])
    grads = []
    for m in cl.unet.modules():
        if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3) and m.out_channels > 1:
            m.register_full_backward_hook(lambda mod, gin, gout: grads.append(gout[0]))
    cl(x, y, key=key).total.backward()
    assert len(grads) > 10
    assert all(g.is_contiguous(memory_format=torch.channels_last) for g in grads)


def test_fused_ops_make_no_layout_copies_on_channels_last_inputs():
    """GroupNorm+SiLU and the attention block, forward and backward on the Triton path (the
    interpreter here), take a channels-last feature map and give one back without copying it;
    the NCHW attention block's head merge is the copy this layout avoids (the mode sees it)."""
    torch.manual_seed(0)
    gn, attn = GroupNormSiLU(8, 64), SelfAttention2d(64, num_heads=2, num_groups=8)
    for layout in (torch.channels_last, torch.contiguous_format):
        x = torch.randn(2, 64, 8, 8).contiguous(memory_format=layout).requires_grad_()
        with backend("triton"), Copies() as seen:
            y = attn(gn(x))
            y.backward(torch.randn_like(y))
        if layout == torch.channels_last:
            assert seen.copies == []
            assert y.is_contiguous(memory_format=torch.channels_last)
            assert x.grad.is_contiguous(memory_format=torch.channels_last)
        else:
            assert seen.copies == ["aten.clone.default"]


def test_cpu_adamw_updates_channels_last_weights_in_place_without_copies():
    """make_optimizer's CPU AdamW (fused) hands channels-last conv weights, their gradients and
    moments to the kernel as contiguous views of the same memory: the same parameters and moments as
    torch's AdamW, bit for bit, over steps; no copy inside the step; layouts kept. A parameter whose
    gradient is in another layout takes torch's own path."""
    from jdm_fast.training.step import make_optimizer
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3), torch.nn.Conv2d(8, 8, 1), torch.nn.Linear(3, 5))
    ours_net = copy.deepcopy(net).to(memory_format=torch.channels_last)
    ref_net = copy.deepcopy(net).to(memory_format=torch.channels_last)
    ours, _ = make_optimizer(ours_net, "adamw", 1e-2, 0.1, torch.device("cpu"))
    ref = torch.optim.AdamW(ref_net.parameters(), lr=1e-2, weight_decay=0.1, fused=True)
    for step in range(3):
        for p_ours, p_ref in zip(ours_net.parameters(), ref_net.parameters()):
            g = torch.randn(p_ref.shape)
            if p_ref.dim() == 4 and not (step == 2 and p_ref.shape[-1] == 3):  # step 2: the 3x3 conv's in NCHW
                g = g.contiguous(memory_format=torch.channels_last)
            p_ours.grad, p_ref.grad = g.clone(), g.clone()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
            ours.step()  # the fused kernel's own copies run below the Python dispatcher: profile them
        ref.step()
        if step < 2:  # (the 0-d step counters are copied either way)
            assert not [e.name for e in prof.events() if e.name in ("aten::clone", "aten::copy_") and e.input_shapes[0]]
        for p_ours, p_ref in zip(ours_net.parameters(), ref_net.parameters()):
            assert torch.equal(p_ours, p_ref)
            assert p_ours.stride() == p_ref.stride()
            for key in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(ours.state[p_ours][key], ref.state[p_ref][key])
    assert ours_net[0].weight.is_contiguous(memory_format=torch.channels_last)


def test_keyed_loss_on_the_triton_path_traces_to_one_graph():
    """What the trainer compiles on CUDA (Triton GroupNorm and attention, channels-last, bf16
    autocast, keyed draws), here on the Triton path in the interpreter: one graph, no graph break,
    no recompilation over steps. On torch 2.11 (the H200 machine) the backend switch called
    importlib's find_spec, which Dynamo refuses: 47 graphs, 41 breaks, then a recompiled, dynamic
    graph that Inductor failed to compile (gpu_check, 2026-12-01)."""
    from torch._dynamo.utils import counters

    cfg, model, x, y = _setup("digits")
    model = model.to(memory_format=torch.channels_last)
    x, y = x[:2], y[:2]
    torch._dynamo.reset()
    counters.clear()
    try:
        with backend("triton"):
            compiled = torch.compile(model, backend="eager", fullgraph=True, dynamic=False)
            for step in range(2):
                key = BatchKey(cfg.seed, step, 0, 2, 1, torch.tensor(2 * step))
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    compiled(x, y, key=key).total.backward()
        graphs, breaks = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
    finally:
        torch._dynamo.reset()
    assert (graphs, breaks) == (1, 0)
