"""Preemption never loses work, one run owns a run folder, nothing is written twice or wrongly
(issue 16, items 2-4), through the real CLI in subprocesses on the tiny preset."""
from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from jdm_fast.training.loop import _RunLock

from _runs import env, final_state, run, train_cmd


def _wait_for_progress(out: Path, proc: subprocess.Popen, min_lines: int, timeout: float = 240) -> None:
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        if metrics.exists() and len(metrics.read_text().splitlines()) >= min_lines:
            return
        time.sleep(0.05)
    raise TimeoutError("the run made no progress")


ARGS = ["--steps", "300", "--save-every", "1000"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("uninterrupted")
    run(train_cmd(*ARGS, "--out", str(out)))
    return final_state(out)


@pytest.mark.parametrize("signum,status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_checkpoints_the_step_and_resume_matches_an_uninterrupted_run(tmp_path, uninterrupted, signum,
                                                                              status):
    """Stopped mid-run (no regular checkpoint yet), the run writes the step it finished, says where
    in one line, exits 128 + signal; --resume then ends with the uninterrupted run's weights."""
    args = ARGS
    out = tmp_path / "stopped"
    proc = subprocess.Popen(train_cmd(*args, "--out", str(out)), env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _wait_for_progress(out, proc, min_lines=3)  # a few log ticks (every 2 steps) in
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=240)
    assert proc.returncode == status, stderr[-3000:]
    line = [ln for ln in stderr.splitlines() if "stopped by" in ln]
    assert len(line) == 1 and f"{signal.Signals(signum).name} after step" in line[0], stderr[-2000:]
    step = int(line[0].split("after step ")[1].split(":")[0])
    assert 0 < step < 300 and final_state(out)["step"] == step
    run(train_cmd(*args, "--out", str(out), "--resume"))
    a, b = uninterrupted, final_state(out)
    for key in ("model", "ema"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), (key, name)


def test_a_second_run_on_a_locked_folder_is_refused_and_a_stale_lock_is_taken_over(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    notes = []
    with _RunLock(out, notes.append):
        proc = subprocess.run(train_cmd("--steps", "4", "--out", str(out)), env=env(), capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 2
        assert "is in use by another run (pid" in proc.stderr, proc.stderr[-2000:]
        assert not (out / "checkpoint.pt").exists()
    (out / ".lock").write_text("pid 999999 on elsewhere\n")  # left by a process that died
    proc = run(train_cmd("--steps", "4", "--out", str(out)))
    assert "took over the lock of a run that is no longer running (pid 999999 on elsewhere)" in proc.stdout
    assert (out / ".lock").read_text() == ""  # released at the end


def test_a_fresh_run_never_appends_to_an_earlier_runs_metrics(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text(json.dumps({"kind": "train", "step": 999, "loss": 1.0}) + "\n")
    run(train_cmd("--steps", "4", "--out", str(out)))
    steps = [json.loads(ln)["step"] for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert 999 not in steps and steps == sorted(steps)
    kept = list(out.glob("metrics.before-*.jsonl"))
    assert len(kept) == 1 and "999" in kept[0].read_text()  # the earlier lines are kept, apart


def test_resume_with_fewer_steps_than_done_changes_no_file(tmp_path):
    out = tmp_path / "run"
    run(train_cmd("--steps", "6", "--save-every", "3", "--out", str(out)))
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    proc = run(train_cmd("--steps", "3", "--out", str(out), "--resume"))
    assert "nothing to do" in proc.stdout and "no file was changed" in proc.stdout
    after = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert after == before


def test_non_finite_weights_are_never_checkpointed(tmp_path):
    """--lr 1e38: losses stay finite for a step while the weights become inf; the run stops without
    writing them, and names no checkpoint as good when there is none."""
    out = tmp_path / "run"
    proc = subprocess.run(train_cmd("--steps", "6", "--save-every", "2", "--lr", "1e38", "--warmup-steps", "0",
                                    "--out", str(out)), env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "weights became non-finite" in proc.stderr and "Last good checkpoint: none" in proc.stderr, proc.stderr
    assert not (out / "checkpoint.pt").exists()
