"""The trainer and its CLI: smoke run, resume, checkpoints, bad input."""
import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from jdm_fast import train as cli
from jdm_fast.data import infinite_batches
from jdm_fast.models.config import HeadConfig, UNetConfig
from jdm_fast.models.joint import JointConfig, JointDiffusion
from jdm_fast.training import precision as prec
from jdm_fast.checkpoint import load_checkpoint, save_checkpoint
from jdm_fast.training.config import TrainConfig
from jdm_fast.training.loop import NonFiniteLossError, keep_labels, train

TINY_MODEL = JointConfig(
    unet=UNetConfig(image_size=28, in_channels=1, model_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                    attention_resolutions=(), num_heads=1, dropout=0.1, num_groups=4),
    head=HeadConfig(num_classes=10, dropout=0.3), classifier_weight=0.01)


def tiny_config(out, **kw) -> TrainConfig:
    base = dict(preset="test", dataset="digits", model=TINY_MODEL, num_timesteps=50, out=str(out), steps=6,
                batch_size=16, lr=1e-3, warmup_steps=2, grad_clip=1.0, ema_decay=0.9, eval_every=4,
                save_every=3, log_every=2, sample_steps=2, num_samples=4, seed=3, device="cpu")
    base.update(kw)
    return TrainConfig(**base)


def test_cli_smoke_run_writes_config_metrics_checkpoint_png(tmp_path, capsys):
    out = tmp_path / "run"
    rc = cli.main(["--steps", "4", "--batch-size", "16", "--log-every", "2", "--eval-every", "2",
                   "--save-every", "2", "--num-samples", "4", "--sample-steps", "2", "--out", str(out), "--amp"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "precision" in printed and "final (step 4): test accuracy raw" in printed
    config = json.loads((out / "config.json").read_text())
    assert config["preset"] == "digits" and config["steps"] == 4 and config["model"]["unet"]["image_size"] == 28
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_lines = [e for e in lines if e["kind"] == "train"]
    assert [e["step"] for e in train_lines] == [2, 4]
    assert all(np.isfinite(e["loss"]) and e["img_per_s"] > 0 and 0 <= e["train_acc"] <= 1 for e in train_lines)
    evals = [e for e in lines if e["kind"] == "eval"]
    assert [e["step"] for e in evals] == [2, 4] and all(0 <= e["test_acc_ema"] <= 1 for e in evals)
    state = load_checkpoint(out / "checkpoint.pt")
    assert state["step"] == 4 and {"model", "ema", "optimizer", "scaler", "rng", "scheduler"} <= state.keys()
    grid = Image.open(out / "samples_final.png")
    assert grid.size == (2 + 2 * 30, 2 + 2 * 30)  # 4 samples of 28x28 in a 2x2 grid, 2-pixel padding
    weights = load_file(str(out / "model_ema.safetensors"))
    assert weights.keys() == state["ema"].keys()


def _weights(out):
    return load_checkpoint(out / "checkpoint.pt")


def test_resume_continues_the_run_exactly(tmp_path):
    full = tmp_path / "full"
    train(tiny_config(full, steps=6), log=lambda *_: None)
    part = tmp_path / "part"
    train(tiny_config(part, steps=3, save_every=3), log=lambda *_: None)
    assert _weights(part)["step"] == 3
    train(tiny_config(part, steps=6, resume=True), log=lambda *_: None)
    a, b = _weights(full), _weights(part)
    assert b["step"] == 6
    for key in a["model"]:
        torch.testing.assert_close(b["model"][key], a["model"][key], rtol=1e-6, atol=1e-7, msg=key)
        torch.testing.assert_close(b["ema"][key], a["ema"][key], rtol=1e-6, atol=1e-7, msg=key)


@pytest.mark.parametrize("augment", [True, False])
def test_the_classifier_trains_on_the_loaders_augmented_copy(tmp_path, monkeypatch, augment):
    """Each step's loss gets the loader's clean batch as x0 (the diffusion term) and its keyed
    augmented copy as x_cls (the classifier input); --no-augment passes no copy."""
    seen = []
    original = JointDiffusion.forward

    def spy(self, x0, y, t=None, noise=None, key=None, x_cls=None):
        if key is not None:
            seen.append((key.step, x0.clone(), None if x_cls is None else x_cls.clone()))
        return original(self, x0, y, t, noise, key, x_cls)

    monkeypatch.setattr(JointDiffusion, "forward", spy)
    train(tiny_config(tmp_path / "run", steps=3, eval_every=10, augment=augment), log=lambda *_: None)
    assert [step for step, _, _ in seen] == [0, 1, 2]
    loader = infinite_batches("digits", 16, seed=3, augment=augment, keep_clean=True)
    for (_, x0, x_cls), (x, _, x_aug) in zip(seen, loader):
        assert torch.equal(x0, x)
        if augment:
            assert torch.equal(x_cls, x_aug) and not torch.equal(x_cls, x0)
        else:
            assert x_cls is None and x_aug is None


def test_existing_run_is_never_overwritten_and_resume_needs_a_checkpoint(tmp_path):
    out = tmp_path / "run"
    train(tiny_config(out, steps=2, eval_every=10), log=lambda *_: None)
    before = (out / "checkpoint.pt").read_bytes()
    with pytest.raises(FileExistsError, match="--resume"):
        train(tiny_config(out, steps=2), log=lambda *_: None)
    assert (out / "checkpoint.pt").read_bytes() == before
    with pytest.raises(FileNotFoundError, match="no checkpoint to resume"):
        train(tiny_config(tmp_path / "empty", resume=True), log=lambda *_: None)
    other = dataclasses.replace(TINY_MODEL, unet=dataclasses.replace(TINY_MODEL.unet, model_channels=16))
    with pytest.raises(ValueError, match=r"configuration differs .* in \['model'\]"):
        train(tiny_config(out, steps=4, resume=True, model=other), log=lambda *_: None)
    with pytest.raises(ValueError, match=r"in \['seed', 'batch_size'\]"):
        train(tiny_config(out, steps=4, resume=True, seed=4, batch_size=8), log=lambda *_: None)


def _poison(monkeypatch, bad_steps):
    """Make the loss NaN at the given (0-based) steps of the trainer."""
    original = JointDiffusion.forward

    def poisoned(self, x0, y, t=None, noise=None, key=None, **kwargs):
        losses = original(self, x0, y, t, noise, key, **kwargs)
        if key is None or key.step not in bad_steps:
            return losses
        bad = losses.diffusion * float("nan")
        return losses._replace(total=losses.total + bad, diffusion=bad)

    monkeypatch.setattr(JointDiffusion, "forward", poisoned)


def test_a_non_finite_step_is_reported_and_skipped(tmp_path, monkeypatch):
    ref = tmp_path / "ref"
    train(tiny_config(ref, steps=2, eval_every=10), log=lambda *_: None)
    _poison(monkeypatch, {1})  # the 2nd step
    out = tmp_path / "run"
    messages = []
    train(tiny_config(out, steps=2, eval_every=10), log=messages.append)
    assert any("non-finite loss at step(s) 2: skipped" in m for m in messages), messages
    a, b = load_checkpoint(ref / "checkpoint.pt"), load_checkpoint(out / "checkpoint.pt")
    assert b["step"] == 2
    for key, w in b["model"].items():
        assert torch.isfinite(w.float()).all(), key
    # step 2 was skipped: the weights differ from the clean run's
    assert any(not torch.equal(a["model"][k], b["model"][k]) for k in a["model"] if a["model"][k].is_floating_point())
    line = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()][0]
    assert line["nonfinite_steps"] == 1 and np.isfinite(line["loss"])


def test_fp16_steps_with_non_finite_loss_are_skipped_by_the_grad_scaler(tmp_path, monkeypatch):
    from jdm_fast.training import loop

    monkeypatch.setattr(loop, "choose_precision", lambda amp, device: prec.Precision(
        torch.float16, True, "fp16 autocast + GradScaler (test)"))
    monkeypatch.setattr(loop, "_probe_cpu_amp", lambda model, x, y, precision, log: precision)
    _poison(monkeypatch, {0})
    out = tmp_path / "run"
    messages = []
    train(tiny_config(out, steps=2, eval_every=10, amp=True), log=messages.append)
    assert any("non-finite loss at step(s) 1: the fp16 GradScaler skipped them" in m for m in messages), messages
    state = load_checkpoint(out / "checkpoint.pt")
    assert state["scaler"]["scale"] < 2.0**16  # the scaler backed off after the skipped step
    assert all(torch.isfinite(w.float()).all() for w in state["model"].values())


def test_a_run_that_keeps_producing_non_finite_losses_stops(tmp_path, monkeypatch):
    _poison(monkeypatch, set(range(100)))
    out = tmp_path / "run"
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss in the last 4 consecutive steps \(up to step 4"):
        train(tiny_config(out, max_nonfinite=4, log_every=2, save_every=3), log=lambda *_: None)
    state = load_checkpoint(out / "checkpoint.pt")  # saved at step 3, before the stop: every step skipped
    assert state["step"] == 3 and all(torch.isfinite(w.float()).all() for w in state["model"].values())


def test_cli_reports_a_non_finite_run(tmp_path, monkeypatch, capsys):
    _poison(monkeypatch, set(range(100)))
    rc = cli.main(["--preset", "tiny", "--device", "cpu", "--steps", "4", "--log-every", "1", "--max-nonfinite", "2",
                   "--out", str(tmp_path / "run")])
    assert rc == 1
    err = capsys.readouterr().err
    assert "non-finite loss in the last 2 consecutive steps (up to step 2" in err and "--max-nonfinite 2" in err


def test_checkpoint_write_is_atomic_and_corruption_is_named(tmp_path):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"model": {"w": torch.ones(3)}, "step": 1})

    class Boom(Exception):
        pass

    def failing(obj, f):
        f.write(b"partial")
        raise Boom

    orig = torch.save
    try:
        torch.save = failing
        with pytest.raises(Boom):
            save_checkpoint(path, {"model": {}, "step": 2})
    finally:
        torch.save = orig
    assert load_checkpoint(path)["step"] == 1  # the old checkpoint survived the failed write
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temp file left behind
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(RuntimeError, match="checkpoint.pt is truncated or corrupt"):
        load_checkpoint(path)


def test_keep_labels_is_stratified():
    labels = np.repeat(np.arange(10), 40)
    kept = keep_labels(labels, 0.25, seed=0)
    for c in range(10):
        mine = kept[labels == c]
        assert (mine == c).sum() == 10 and (mine == -1).sum() == 30
    assert np.array_equal(kept, keep_labels(labels, 0.25, seed=0))


def test_amp_on_a_cpu_without_native_bf16_runs_fp32(monkeypatch):
    monkeypatch.setattr(prec, "cpu_has_native_bf16", lambda: False)
    p = prec.choose_precision(True, torch.device("cpu"))
    assert p.dtype is None and "no native bf16" in p.reason
    monkeypatch.setattr(prec, "cpu_has_native_bf16", lambda: True)
    assert prec.choose_precision(True, torch.device("cpu")).dtype == torch.bfloat16
    assert prec.choose_precision(False, torch.device("cpu")).dtype is None


@pytest.mark.parametrize("argv,match", [
    (["--preset", "imagenet"], "unknown preset 'imagenet'"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--labelled-fraction", "1.5"], "--labelled-fraction"),
    (["--classifier-weight", "nan"], "--classifier-weight (lambda) must be a finite number"),
    (["--lr", "inf"], "--lr must be a finite number"),
    (["--num-timesteps", "0"], "--num-timesteps must be >= 1"),
    (["--seed", str(2**70)], "--seed must be in [0, 2^63)"),
    (["--device", "tpu9"], "--device must be auto, cpu, cuda or cuda:N"),
])
def test_cli_rejects_bad_options(argv, match, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    assert match in capsys.readouterr().err


def test_cli_missing_data_dir_and_wrong_image_size(tmp_path, capsys):
    assert cli.main(["--preset", "cifar10", "--out", str(tmp_path / "a")]) == 2
    assert "--data-dir" in capsys.readouterr().err
    assert cli.main(["--preset", "cifar10", "--data-dir", str(tmp_path / "nowhere"), "--out", str(tmp_path / "b")]) == 2
    assert "nowhere" in capsys.readouterr().err
    assert cli.main(["--preset", "cifar10", "--dataset", "digits", "--out", str(tmp_path / "c")]) == 2
    assert "28x28x1 images but preset 'cifar10' expects 32x32x3" in capsys.readouterr().err


@pytest.mark.slow
def test_default_preset_learns_to_classify_real_digits(tmp_path):
    """The default preset, shortened to 150 steps (1/4 of its schedule), already classifies the
    1,000 held-out real MNIST digits far above chance (10%) and its diffusion loss falls."""
    from jdm_fast.training.config import get_preset

    cfg = dataclasses.replace(get_preset("digits"), out=str(tmp_path / "run"), steps=150, eval_every=1000,
                              save_every=150, num_samples=4, sample_steps=10, device="cpu", amp=False)
    final = train(cfg, log=lambda *_: None)
    assert final["test_acc_ema"] >= 0.85, final
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    diffusion = [e["diffusion"] for e in lines if e["kind"] == "train"]
    assert diffusion[-1] < 0.25 * diffusion[0], diffusion
