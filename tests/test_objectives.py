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


def test_the_digits_presets_noise_aware_head_and_the_classifier_only_objective():
    from jdm_fast import train as cli
    from jdm_fast.models.joint import with_objective
    from jdm_fast.training.config import get_preset

    digits = get_preset("digits").model
    assert digits.classifier_input == "both" and digits.noise_aware_head
    assert not MODEL.noise_aware_head  # x0
    assert not dataclasses.replace(MODEL, classifier_input="both", objective="diffusion").noise_aware_head  # no head
    assert with_objective(digits, "classifier").classifier_input == "x0"  # reads clean images only
    assert with_objective(digits, "diffusion").classifier_input == "both"
    with pytest.raises(ValueError, match="needs --classifier-input x0"):
        with_objective(dataclasses.replace(MODEL, classifier_input="xt"), "classifier")
    resolve = lambda *argv: cli.resolve_config(cli.parser().parse_args(list(argv))).model  # noqa: E731
    assert resolve("--objective", "classifier").classifier_input == "x0"
    assert resolve("--classifier-input", "x0").classifier_input == "x0"
    with pytest.raises(ValueError, match="needs --classifier-input x0"):
        resolve("--objective", "classifier", "--classifier-input", "both")


# --- through the CLIs -------------------------------------------------------------------------

TINY = ["--preset", "tiny", "--device", "cpu", "--steps", "4", "--batch-size", "16", "--log-every", "2",
        "--eval-every", "4", "--save-every", "4", "--num-samples", "4", "--sample-steps", "2"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny run per objective through ``python -m jdm_fast.train``'s main."""
    from jdm_fast import train as cli

    root = tmp_path_factory.mktemp("objectives")
    for objective in ("joint", "diffusion", "classifier"):
        assert cli.main([*TINY, "--objective", objective, "--out", str(root / objective)]) == 0
    return root


def test_each_objective_trains_saves_and_says_which_it_is(trained):
    import json

    from jdm_fast import load_model
    from jdm_fast.checkpoint import load_checkpoint

    for objective in ("joint", "diffusion", "classifier"):
        out = trained / objective
        assert load_checkpoint(out / "checkpoint.pt")["config"]["model"]["objective"] == objective
        assert json.loads((out / "config.json").read_text())["model"]["objective"] == objective
        evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        evals = [e for e in evals if e["kind"] == "eval"]
        assert evals and all(e["objective"] == objective for e in evals)
        assert all(("test_acc_ema" in e) == (objective != "diffusion") for e in evals)
        assert all(("samples" in e) == (objective != "classifier") for e in evals)
        assert (out / "samples_final.png").exists() == (objective != "classifier")
        model = load_model(out / "model_ema.safetensors")
        assert model.config.objective == objective
        assert (model.head is None) == (objective == "diffusion") and model.unet.has_decoder == (objective != "classifier")


def test_sample_and_evaluate_refuse_what_a_model_cannot_do(trained, capsys):
    import json

    from jdm_fast import evaluate, sample

    ckpt = lambda objective: str(trained / objective / "checkpoint.pt")  # noqa: E731
    assert sample.main(["--checkpoint", ckpt("classifier"), "--num", "2", "--steps", "2"]) == 2
    assert "--objective classifier (no decoder: it makes no samples)" in capsys.readouterr().err
    assert sample.main(["--checkpoint", ckpt("diffusion"), "--mode", "cond", "--num", "2", "--steps", "2"]) == 2
    assert "--objective diffusion (no classifier head)" in capsys.readouterr().err
    assert sample.main(["--checkpoint", ckpt("diffusion"), "--num", "2", "--steps", "2",
                        "--out", str(trained / "s")]) == 0
    assert json.loads((trained / "s" / "sample_summary.json").read_text())["objective"] == "diffusion"
    common = ["--num", "8", "--cond-num", "6", "--steps", "2", "--k", "2",
              "--feature-classifier", str(trained / "fc.pt")]
    res = evaluate.run(evaluate.parser().parse_args(["--checkpoint", ckpt("diffusion"), *common]), log=lambda *_: None)
    assert res["objective"] == "diffusion" and "test_accuracy_ema" not in res
    assert "uncond" in res and "cond" not in res
    res = evaluate.run(evaluate.parser().parse_args(["--checkpoint", ckpt("classifier"), *common]), log=lambda *_: None)
    assert 0 <= res["test_accuracy_ema"] <= 1 and "uncond" not in res and "cond" not in res
    res = evaluate.run(evaluate.parser().parse_args(["--checkpoint", ckpt("joint"), *common]), log=lambda *_: None)
    assert res["uncond"]["num"] == 8 and res["cond"]["num"] == 6 and "test_accuracy_raw" in res
    with pytest.raises(ValueError, match="no decoder"):
        evaluate.run(evaluate.parser().parse_args(["--checkpoint", ckpt("classifier"), *common,
                                                   "--samples", str(trained / "s" / "samples.npz")]))


def test_compare_quick_trains_every_objective_and_fills_every_cell(tmp_path):
    """``python -m jdm_fast.experiments compare --quick``: every run of the plan trains and is
    evaluated, the table has a value in every cell the objective defines, and a second invocation
    redoes nothing."""
    import json

    from jdm_fast.experiments.__main__ import main

    out = tmp_path / "cmp"
    lines: list[str] = []
    assert main(["compare", "--quick", "--preset", "tiny", "--device", "cpu", "--out", str(out)]) == 0
    data = json.loads((out / "compare.json").read_text())
    runs = {(r["objective"], r["labelled_fraction"]) for r in data["runs"]}
    assert runs == {("diffusion", 1.0), ("joint", 1.0), ("classifier", 1.0), ("joint", 0.1), ("classifier", 0.1)}
    defined = {"joint": {"test_acc_ema", "fid", "precision", "recall", "cond_consistency"},
               "classifier": {"test_acc_ema"}, "diffusion": {"fid", "precision", "recall"}}
    for row in data["summary"]:
        have = {k for k in ("test_acc_ema", "fid", "precision", "recall", "cond_consistency") if k in row}
        assert have == defined[row["objective"]], row
    for r in data["runs"]:  # every judge's agreement with the targets, the feature classifier's in the table
        if r["objective"] == "joint":
            assert {"digits-features", "knn5-pixels"} <= r["cond_consistency_by_judge"].keys()
            assert r["cond_consistency"] == r["cond_consistency_by_judge"]["digits-features"]
            assert r["cond_mode"] == "cond"  # the tiny preset's head reads clean images only
    table = (out / "compare.md").read_text()
    assert table.count("\n| joint |") == 2 and table.count("\n| classifier |") == 2 and "| diffusion | unused |" in table
    # each run trained what its name says (the trainer's own config.json)
    for r in data["runs"]:
        name = f"{r['objective']}_f{r['labelled_fraction']:g}_s{r['seed']}"
        config = json.loads((out / "runs" / name / "config.json").read_text())
        assert (config["model"]["objective"], config["labelled_fraction"], config["seed"]) == \
            (r["objective"], r["labelled_fraction"], r["seed"])
    before = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("result.json")}
    import jdm_fast.experiments.compare as compare

    assert compare.run(compare_args(out), log=lines.append) == 0
    assert all("not redone" in line for line in lines[:5])
    assert before == {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("result.json")}


def compare_args(out):
    import argparse

    from jdm_fast.experiments import compare

    p = argparse.ArgumentParser()
    compare.add_arguments(p)
    return p.parse_args(["--quick", "--preset", "tiny", "--device", "cpu", "--out", str(out)])
