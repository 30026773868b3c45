"""Exact resume: a run killed with SIGKILL and restarted with --resume ends with the weights of an
uninterrupted run (augmentation and dropout on); with UNet dropout off, an augmented run resumes
exactly without the saved RNG states (augmentation is keyed per example, not drawn from them); a
damaged latest checkpoint falls back to the previous one."""
import dataclasses
import os
import random
import signal
import subprocess
import time

import pytest
import torch

from jdm_fast.checkpoint import (CheckpointError, PREVIOUS_NAME, load_checkpoint, load_latest, rng_state,
                                 save_checkpoint)
from jdm_fast.training.loop import train

from _runs import env, final_state, max_rel_diff, run, train_cmd
from test_train import TINY_MODEL, tiny_config

STEPS = 14
ARGS = ["--steps", str(STEPS), "--save-every", "1", "--labelled-fraction", "0.5"]  # augment + dropout: preset on


def _assert_same_run(a: dict, b: dict) -> None:
    assert a["step"] == b["step"] == STEPS
    for part in ("model", "ema"):
        diff = max_rel_diff(a[part], b[part])
        print(f"resumed vs uninterrupted {part}: worst tensor max-relative difference {diff:.1e}")
        assert diff <= 1e-6, (part, diff)
    for x, y in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        torch.testing.assert_close(y["exp_avg_sq"], x["exp_avg_sq"], rtol=1e-6, atol=0)


def test_sigkill_at_a_random_moment_then_resume_matches_an_uninterrupted_run(tmp_path):
    ref = tmp_path / "ref"
    run(train_cmd(*ARGS, "--out", str(ref)))
    out = tmp_path / "killed"
    proc = subprocess.Popen(train_cmd(*ARGS, "--out", str(out)), env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not (out / "checkpoint.pt").exists():  # the first checkpoint (step 1)
            assert proc.poll() is None, f"the run ended before its first checkpoint: {proc.stderr.read()}"
            assert time.monotonic() < deadline, "no checkpoint within 240 s"
            time.sleep(0.05)
        time.sleep(random.uniform(0.3, 2.0))  # a few more steps, then anywhere (mid-step, mid-write, ...)
        assert proc.poll() is None, "the run finished before it could be killed: make it longer"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    killed_at = final_state(out)["step"] if (out / "checkpoint.pt").exists() else None
    resumed = run(train_cmd(*ARGS, "--out", str(out), "--resume"))
    assert "resumed from" in resumed.stdout, resumed.stdout
    resumed_line = next(line for line in resumed.stdout.splitlines() if "resumed from" in line)
    print(f"killed with the latest checkpoint at step {killed_at}; {resumed_line}")
    assert not list(out.glob(".*.tmp"))  # a temp file of an interrupted write is cleaned up
    _assert_same_run(final_state(ref), final_state(out))
    steps = [line for line in (out / "metrics.jsonl").read_text().splitlines() if '"kind": "train"' in line]
    assert len(steps) == STEPS // 2  # what the killed run logged past its checkpoint was dropped


def test_augmented_resume_is_exact_without_the_saved_rng_states(tmp_path):
    """Augmentation on, UNet dropout off: an interrupted run whose checkpoint holds someone else's
    RNG states (seed 12345) still resumes to the uninterrupted run's weights, because nothing it
    draws comes from the global RNG (the loader's augmentation is keyed by (seed, epoch, position);
    timesteps, noise and head dropout by (seed, step, example)). Until issue 17 the model drew the
    augmentation from the global RNG, and this resume would have diverged."""
    no_unet_dropout = dataclasses.replace(TINY_MODEL, unet=dataclasses.replace(TINY_MODEL.unet, dropout=0.0))
    kw = dict(model=no_unet_dropout, augment=True, eval_every=100)
    full = tmp_path / "full"
    train(tiny_config(full, steps=6, save_every=6, **kw), log=lambda *_: None)
    part = tmp_path / "part"
    train(tiny_config(part, steps=3, save_every=3, **kw), log=lambda *_: None)
    state = load_checkpoint(part / "checkpoint.pt")
    with torch.random.fork_rng():
        torch.manual_seed(12345)
        state["rng"] = [rng_state(torch.device("cpu"))]
    save_checkpoint(part / "checkpoint.pt", state)
    train(tiny_config(part, steps=6, save_every=6, resume=True, **kw), log=lambda *_: None)
    a, b = load_checkpoint(full / "checkpoint.pt"), load_checkpoint(part / "checkpoint.pt")
    assert b["step"] == 6
    for part_name in ("model", "ema"):
        assert max_rel_diff(a[part_name], b[part_name]) <= 1e-6


def _flip_middle_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_corrupt_latest_checkpoint_falls_back_to_the_previous_one(tmp_path):
    full = tmp_path / "full"
    train(tiny_config(full, steps=6, save_every=2, eval_every=100), log=lambda *_: None)
    part = tmp_path / "part"
    train(tiny_config(part, steps=4, save_every=2, eval_every=100), log=lambda *_: None)
    assert load_checkpoint(part / PREVIOUS_NAME)["step"] == 2 and load_checkpoint(part / "checkpoint.pt")["step"] == 4
    _flip_middle_byte(part / "checkpoint.pt")  # silent for torch.load; the CRC-32 check catches it
    with pytest.raises(CheckpointError, match=r"checkpoint\.pt is truncated or corrupt.*CRC-32"):
        load_checkpoint(part / "checkpoint.pt")
    messages = []
    train(tiny_config(part, steps=6, save_every=2, eval_every=100, resume=True), log=messages.append)
    assert any("checkpoint.pt is truncated or corrupt" in m and "falling back" in m and PREVIOUS_NAME in m
               for m in messages), messages
    assert any("resumed from" in m and PREVIOUS_NAME in m and "at step 2" in m for m in messages), messages
    a, b = load_checkpoint(full / "checkpoint.pt"), load_checkpoint(part / "checkpoint.pt")
    assert b["step"] == 6
    for part_name in ("model", "ema"):
        assert max_rel_diff(a[part_name], b[part_name]) <= 1e-6


def test_rotation_keeps_the_previous_checkpoint_and_both_bad_is_an_error(tmp_path):
    path = tmp_path / "checkpoint.pt"
    for step in (1, 2, 3):
        save_checkpoint(path, {"model": {"w": torch.full((10_000,), float(step))}, "step": step})
    assert load_checkpoint(path)["step"] == 3 and load_checkpoint(tmp_path / PREVIOUS_NAME)["step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["checkpoint.pt", PREVIOUS_NAME])
    path.write_bytes(path.read_bytes()[:200])  # truncated
    state, used = load_latest(tmp_path, log=lambda *_: None)
    assert state["step"] == 2 and used.name == PREVIOUS_NAME
    _flip_middle_byte(tmp_path / PREVIOUS_NAME)
    with pytest.raises(CheckpointError, match=r"no usable checkpoint: .*checkpoint\.pt.*checkpoint\.prev\.pt"):
        load_latest(tmp_path, log=lambda *_: None)
