"""Loaders refuse weights that would make a wrong model: ``jdm_fast.load_model`` (what sample and
evaluate load through) and ``--resume`` raise one line naming the file and the first bad tensor for
a NaN or Inf, float tensors stored as integers, a tensor of another shape, or a missing or
unexpected key; the same export, intact, loads. (Before, an export with NaN weights loaded and
sampled all-zero images with exit 0, and an int32 export was cast and sampled noise.)"""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import jdm_fast
from jdm_fast.checkpoint import CheckpointError, check_weights
from jdm_fast.training.config import get_preset
from jdm_fast.training.loop import build_model, export_safetensors


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """A trainer export of the tiny preset's model (untrained weights: loading is what is tested)."""
    cfg = get_preset("tiny")
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("export") / "model_ema.safetensors"
    export_safetensors(build_model(cfg, torch.device("cpu")), path, cfg, "ema", 3)
    return path


def _variant(export, tmp_path, change):
    """The export with ``change(tensors)`` applied, its metadata kept."""
    from safetensors import safe_open
    with safe_open(str(export), "pt") as f:
        meta = f.metadata()
    tensors = load_file(str(export))
    change(tensors)
    path = tmp_path / "model_ema.safetensors"
    save_file(tensors, str(path), metadata=meta)
    return path


def _first_float(tensors, predicate=lambda k: True):
    return next(k for k, v in tensors.items() if v.is_floating_point() and v.numel() > 1 and predicate(k))


def test_an_intact_export_loads(export):
    model = jdm_fast.load_model(export)
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_a_non_finite_tensor_is_refused_naming_file_and_tensor(export, tmp_path, bad):
    key = {}

    def poison(t):
        key["name"] = _first_float(t, lambda k: "unet" in k)
        t[key["name"]] = t[key["name"]].clone().view(-1).index_fill_(0, torch.tensor([1]), bad).view_as(t[key["name"]])

    path = _variant(export, tmp_path, poison)
    with pytest.raises(CheckpointError) as e:
        jdm_fast.load_model(path)
    msg = str(e.value)
    assert str(path) in msg and repr(key["name"]) in msg and "1 non-finite" in msg and "\n" not in msg


def test_float_weights_stored_as_integers_are_refused(export, tmp_path):
    path = _variant(export, tmp_path, lambda t: t.update({k: v.to(torch.int32) for k, v in t.items()
                                                            if v.is_floating_point()}))
    with pytest.raises(CheckpointError, match=r"is torch\.int32, not floating point \(the model's is torch\.float32\)"):
        jdm_fast.load_model(path)


def test_a_config_that_does_not_match_the_tensors_is_one_line(export, tmp_path):
    def drop(t):
        t.pop(_first_float(t))

    with pytest.raises(CheckpointError, match=r"does not match the model its config describes: no tensor '") as e:
        jdm_fast.load_model(_variant(export, tmp_path, drop))
    assert "\n" not in str(e.value)

    def reshape(t):
        key = _first_float(t, lambda k: t[k].dim() == 4)
        t[key] = torch.zeros(t[key].shape[0] + 1, *t[key].shape[1:])

    with pytest.raises(CheckpointError, match=r"has shape \(\d+, .*the model's is"):
        jdm_fast.load_model(_variant(export, tmp_path, reshape))
    with pytest.raises(CheckpointError, match=r"an unexpected tensor 'extra\.weight'"):
        jdm_fast.load_model(_variant(export, tmp_path, lambda t: t.update({"extra.weight": torch.zeros(2)})))


def test_integer_buffers_stay_accepted():
    """BatchNorm's num_batches_tracked is an integer in the model too: not a float stored as int."""
    model = torch.nn.BatchNorm1d(3)
    check_weights(model.state_dict(), model.state_dict(), "bn")
    state = {**model.state_dict(), "weight": torch.tensor([1.0, float("nan"), 1.0])}
    with pytest.raises(CheckpointError, match="'weight' holds 1 non-finite"):
        check_weights(state, model.state_dict(), "bn")


def test_resume_refuses_a_checkpoint_with_non_finite_weights(tmp_path):
    """A checkpoint edited to hold a NaN (the trainer never writes one) stops --resume with one line."""
    from _runs import env, run, train_cmd
    from jdm_fast.checkpoint import load_checkpoint, save_checkpoint

    out = tmp_path / "run"
    run(train_cmd("--steps", "2", "--out", str(out)))
    ckpt = out / "checkpoint.pt"
    state = load_checkpoint(ckpt)
    key = _first_float(state["ema"])
    state["ema"][key] = torch.full_like(state["ema"][key], float("nan"))
    save_checkpoint(ckpt, state, keep_previous=False)
    proc = subprocess.run(train_cmd("--steps", "4", "--resume", "--out", str(out)), env=env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode != 0
    assert f"{ckpt} (EMA weights): {key!r} holds {state['ema'][key].numel()} non-finite" in proc.stdout + proc.stderr


def test_sample_refuses_a_nan_export_in_one_line_and_writes_nothing(export, tmp_path):
    """The CLI path of the case found by the probe (an export with NaN weights sampled all-zero
    images with exit 0): exit 2, one line naming the file and the tensor, no samples written."""
    def poison(t):
        key = _first_float(t, lambda k: "unet" in k)
        t[key] = torch.full_like(t[key], float("nan"))

    path = _variant(export, tmp_path, poison)
    out = tmp_path / "samples"
    proc = subprocess.run([sys.executable, "-m", "jdm_fast.sample", "--checkpoint", str(path), "--num", "2",
                           "--steps", "2", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1 and "non-finite" in proc.stderr
    assert not out.exists() or not any(out.iterdir())
