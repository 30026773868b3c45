"""``python -m jdm_fast.convert guided-diffusion``: state dicts of the authors' JDM code and of OpenAI's
guided-diffusion convert into jdm_fast models whose noise prediction and logits are the original
code's (fixtures: tests/fixtures/guided_diffusion/README.md), and what cannot be converted
exactly is refused, naming the flag.

Relative error is max|ours - theirs| / max|theirs|, fp32 (theirs computed once by the original
code, fp32, eval mode)."""
from __future__ import annotations

import pytest
import torch
from _guided_fixtures import FIXTURES, manifest, outputs, state_dict
from safetensors.torch import load_file, save_file

import jdm_fast
from jdm_fast.convert.__main__ import main
from jdm_fast.convert.guided_diffusion import SCHEDULE_MAP
from jdm_fast.diffusion import make_betas

TOL = 1e-5
JDM, GD = "jdm_cifar_head", "gd_sigma_neworder"


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape and torch.isfinite(a).all()
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def convert(src, out, *flags) -> None:
    assert main(["guided-diffusion", str(src), *map(str, flags), "--out", str(out)]) == 0


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Each fixture's state dict as their training saves it (torch.save of a flat dict), once."""
    folder = tmp_path_factory.mktemp("their_state_dicts")
    paths = {}
    for name in (JDM, GD):
        paths[name] = folder / f"model{name}.pt"
        torch.save(state_dict(name), paths[name])
    return paths


def eps_and_logits(model, io):
    with torch.no_grad():
        eps = model.unet(io["x"], io["t"])
        logits = model.classify(io["x"]) if model.head is not None else None
    return eps, logits


@pytest.mark.parametrize("name", [JDM, GD])
def test_converted_model_reproduces_the_original(name, saved, tmp_path, capsys):
    m, io = manifest(name), outputs(name)
    convert(saved[name], tmp_path, *m["convert_args"])
    printed = capsys.readouterr().out
    for path in (tmp_path / "checkpoint.pt", tmp_path / "model.safetensors"):
        model = jdm_fast.load_model(path)
        eps, logits = eps_and_logits(model, io)
        assert rel(eps, io["eps"]) <= TOL, (path.name, rel(eps, io["eps"]))
        # the schedule their script built for this model is the converted model's
        assert torch.allclose(model.diffusion.betas, io["betas"], rtol=0, atol=1e-15)
        if "logits" in io:  # their classify(x): t = 0
            assert rel(logits, io["logits"]) <= TOL, (path.name, rel(logits, io["logits"]))
            assert model.config.objective == "joint"
        else:
            assert model.head is None and model.config.objective == "diffusion"
    assert (tmp_path / "config.json").is_file()
    if name == JDM:
        assert "timestep input folded into fc_1's bias at t = 0" in printed
        assert "'jdm_linear'" in printed and "legacy order" in printed
    else:
        assert "dropped its 3 variance channels" in printed and "'cosine'" in printed
    with pytest.raises(SystemExit, match="--overwrite"):
        convert(saved[name], tmp_path, *m["convert_args"])


def test_module_prefix_their_flag_spelling_and_safetensors_input(tmp_path, capsys):
    """DDP's ``module.`` prefix is stripped; their ``--num_channels 32 --learn_sigma True`` flags
    work (``--class_cond True`` too when CKPT has no label_emb); a safetensors CKPT named ema_*
    gives model_ema.safetensors."""
    state = {f"module.{k}": v for k, v in state_dict(GD).items()}
    src = tmp_path / "ema_0.9999_000000.safetensors"
    save_file(state, str(src))
    flags = ["--image_size", "32", "--num_channels", "32", "--num_res_blocks", "2", "--channel_mult", "1,2,2",
             "--attention_resolutions", "16,8", "--num_head_channels", "16", "--use_scale_shift_norm", "False",
             "--learn_sigma", "True", "--use_new_attention_order", "True", "--noise_schedule", "cosine",
             "--class_cond", "True"]  # (a class_cond model without label_emb: the authors' kind)
    convert(src, tmp_path / "out", *flags)
    assert f"'_orig_mod.' stripped from {len(state)} keys" in capsys.readouterr().out
    assert not (tmp_path / "out" / "model.safetensors").exists()
    io = outputs(GD)
    for path in ("checkpoint.pt", "model_ema.safetensors"):
        eps, _ = eps_and_logits(jdm_fast.load_model(tmp_path / "out" / path), io)
        assert rel(eps, io["eps"]) <= TOL


def test_the_attention_order_matters(saved, tmp_path):
    """The fixtures exercise the qkv layouts: the wrong order gives a different model (so a wrong
    permutation, or none, fails the tests above). Legacy order: rows (head, q/k/v, d)."""
    io = outputs(GD)
    flags = [f for f in manifest(GD)["convert_args"] if f != "--use-new-attention-order"]
    convert(saved[GD], tmp_path, *flags)  # read as legacy order
    eps, _ = eps_and_logits(jdm_fast.load_model(tmp_path / "checkpoint.pt"), io)
    assert rel(eps, io["eps"]) > 1e-2


def test_a_joint_model_converts_without_its_head(saved, tmp_path):
    io = outputs(JDM)
    convert(saved[JDM], tmp_path, *manifest(JDM)["convert_args"], "--train-with-classifier", "False")
    model = jdm_fast.load_model(tmp_path / "checkpoint.pt")
    assert model.head is None
    eps, _ = eps_and_logits(model, io)
    assert rel(eps, io["eps"]) <= TOL


@pytest.mark.parametrize("source, name, steps", [
    ("jdm", "linear", 1000), ("jdm", "linear", 500), ("jdm", "linear", 50), ("jdm", "cosine", 1000),
    ("gd", "linear", 1000), ("gd", "linear", 4000), ("gd", "cosine", 1000), ("gd", "cosine", 4000)])
def test_noise_schedules_map_onto_ours(source, name, steps):
    theirs = load_file(str(FIXTURES / "schedules.safetensors"))[f"{source}/{name}/{steps}"]
    ours = make_betas(SCHEDULE_MAP[({"gd": "guided-diffusion"}.get(source, source), name)], steps)
    assert (ours - theirs).abs().max() <= 1e-15


# ---------------------------------------------------------------------------- refusals
def _refused(src, tmp_path, flags, match):
    with pytest.raises(SystemExit, match=match):
        convert(src, tmp_path / "out", *flags)
    assert not (tmp_path / "out" / "checkpoint.pt").exists()


@pytest.mark.parametrize("flags, match", [
    (["--resblock-updown"], "--resblock-updown True"),
    (["--num-channels", "64"], r"time_embed\.0\.weight has shape \(128, 32\).*check --num-channels"),
    (["--in-channels", "1"], r"input_blocks\.0\.0\.weight .*check --in-channels"),
    (["--no-learn-sigma"], r"out\.2\.weight has shape \(6, 32, 3, 3\).*check --learn-sigma"),
    (["--use-scale-shift-norm"], r"emb_layers\.1\.weight .*check --use-scale-shift-norm"),
    (["--num-res-blocks", "3"], r"missing \d+ key\(s\): input_blocks\..*--num-res-blocks"),
    (["--attention-resolutions", "8"], r"unexpected \d+ key\(s\): input_blocks\.\d\.1\..*--attention-resolutions"),
    (["--channel-mult", "2,2,2"], r"--channel-mult 2,2,2: .*channel_mult\[0\] = 1"),
    (["--num-heads-upsample", "2", "--num-head-channels", "-1"], "--num-heads-upsample 2"),
    (["--predict-xstart", "True"], "--predict-xstart"),
    (["--rescale-timesteps", "--diffusion-steps", "4000"], "--rescale-timesteps"),
    (["--train-with-classifier", "True"], r"--train-with-classifier True, but CKPT has no clasifier"),
    (["--source", "jdm", "--noise-schedule", "linear", "--diffusion-steps", "5"], "--diffusion-steps 5"),
    (["--dataset", "nosuch"], r"--dataset nosuch: not one of .*cifar10.* and not an existing image folder"),
])
def test_flags_that_do_not_match_or_cannot_convert_are_refused_by_name(flags, match, saved, tmp_path):
    _refused(saved[GD], tmp_path, manifest(GD)["convert_args"] + flags, match)


def test_missing_unexpected_and_foreign_keys_are_named(tmp_path):
    state = state_dict(GD)
    flags = manifest(GD)["convert_args"]
    missing = dict(state)
    del missing["middle_block.1.qkv.weight"]
    torch.save(missing, tmp_path / "missing.pt")
    _refused(tmp_path / "missing.pt", tmp_path, flags, r"missing 1 key\(s\): middle_block\.1\.qkv\.weight")
    extra = dict(state, **{"input_blocks.1.0.extra.weight": torch.ones(3)})
    torch.save(extra, tmp_path / "extra.pt")
    _refused(tmp_path / "extra.pt", tmp_path, flags, r"unexpected 1 key\(s\): input_blocks\.1\.0\.extra\.weight")
    cond = dict(state, **{"label_emb.weight": torch.ones(1000, 128)})
    torch.save(cond, tmp_path / "cond.pt")
    _refused(tmp_path / "cond.pt", tmp_path, flags, r"--class-cond: .*label_emb")
    torch.save({"model": state}, tmp_path / "nested.pt")
    _refused(tmp_path / "nested.pt", tmp_path, flags, "holds a dict of dict, not a state dict")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    _refused(tmp_path / "junk.pt", tmp_path, flags, "neither a torch.save state dict nor a safetensors file")


def test_head_mismatches_are_refused_by_name(saved, tmp_path):
    flags = manifest(JDM)["convert_args"]
    _refused(saved[JDM], tmp_path, flags + ["--num-classes", "7"], r"--num-classes 7, but clasifier\.fc_2\.weight has 10")
    _refused(saved[JDM], tmp_path, flags + ["--source", "guided-diffusion"], "has the authors' classifier head")
    state = state_dict(JDM)
    state["clasifier.bn_1.weight"] = state["clasifier.bn_1.weight"][:-32]
    torch.save(state, tmp_path / "narrow.pt")
    _refused(tmp_path / "narrow.pt", tmp_path, flags, r"clasifier\.bn_1\.weight has shape \(897,\).*--num-res-blocks")


def test_their_attention_resolutions_become_our_pixel_sizes():
    """Theirs: ds = image_size // res, attention where a level's downsampling factor is in it. At
    28x28 their default "16,8" gives ds 1 and 3: attention at 28x28 only (3 is no level)."""
    from argparse import Namespace

    from jdm_fast.convert.guided_diffusion import attention_sizes, channel_mult

    assert attention_sizes(Namespace(image_size=32, attention_resolutions="16,8"), 4) == ((16, 8), [])
    assert attention_sizes(Namespace(image_size=28, attention_resolutions="16,8"), 3) == ((28,), [8])
    assert attention_sizes(Namespace(image_size=64, attention_resolutions="32,16,8"), 4) == ((32, 16, 8), [])
    assert channel_mult(Namespace(image_size=28, channel_mult="")) == (1, 2, 2)
