"""The operating system refusing a write (issue 16, item 5): a full disk, no permission or a
read-only file system ends the run with one line naming the path and the reason (and, for a full
disk, the bytes needed and free); the checkpoints already on disk stay intact, no temp file is
left, and a run whose folder cannot hold its checkpoints does not start.

The failures are injected at the system-call boundary (the write, mkdir, open, free-space query):
this machine runs the tests as root on a roomy disk, where chmod and a full disk cannot be made."""
from __future__ import annotations

import builtins
import errno
import os
from pathlib import Path

import pytest
import torch

from _runs import TINY_ARGS
from jdm_fast import train as train_cli
from jdm_fast import checkpoint as ck
from jdm_fast.training import loop
from jdm_fast.checkpoint import (CHECKPOINT_NAME, PREVIOUS_NAME, StorageError, load_checkpoint,
                                 save_checkpoint)


def _state(v: float) -> dict:
    return {"model": {"w": torch.full((256, 256), v)}, "step": int(v)}


def _full_disk_after(monkeypatch, ok_writes: int, partial: int = 4096) -> list[int]:
    """Let ``ok_writes`` checkpoint writes through, then every later one writes ``partial`` bytes and
    fails as a full disk does."""
    real, calls = ck._torch_save, []

    def torch_save(state, f):
        calls.append(1)
        if len(calls) <= ok_writes:
            return real(state, f)
        f.write(b"\0" * partial)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ck, "_torch_save", torch_save)
    return calls


def test_full_disk_mid_checkpoint_keeps_both_checkpoints(tmp_path, monkeypatch):
    path = tmp_path / CHECKPOINT_NAME
    save_checkpoint(path, _state(1.0))
    save_checkpoint(path, _state(2.0))
    _full_disk_after(monkeypatch, ok_writes=0)
    with pytest.raises(StorageError) as info:
        save_checkpoint(path, _state(3.0))
    msg = str(info.value)
    assert "\n" not in msg and info.value.errno == errno.ENOSPC
    assert msg.startswith("no space left on the device writing") and str(path) in msg
    assert "needs about 0.3 MB" in msg and "MB free" in msg  # 256 x 256 float32 = 262,144 bytes
    assert load_checkpoint(path)["step"] == 2 and load_checkpoint(tmp_path / PREVIOUS_NAME)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([CHECKPOINT_NAME, PREVIOUS_NAME])  # no temp file left


@pytest.mark.parametrize(("code", "start"), [(errno.EACCES, "permission denied"), (errno.EROFS, "read-only file system")])
def test_refused_checkpoint_write_is_named(tmp_path, monkeypatch, code, start):
    def mkstemp(*_a, **_k):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(ck.tempfile, "mkstemp", mkstemp)
    with pytest.raises(StorageError, match=f"^{start} creating a temp file for {tmp_path / CHECKPOINT_NAME}"):
        save_checkpoint(tmp_path / CHECKPOINT_NAME, _state(1.0))


def _train(out: Path, capsys, *extra: str) -> tuple[int, str]:
    rc = train_cli.main([*TINY_ARGS, "--steps", "4", "--save-every", "2", "--out", str(out), *extra])
    return rc, capsys.readouterr().err


def _one_error_line(err: str) -> str:
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


def test_train_full_disk_ends_in_one_line_with_the_last_checkpoint_intact(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    calls = _full_disk_after(monkeypatch, ok_writes=1)  # the step-2 checkpoint lands, step 4's does not
    rc, err = _train(out, capsys)
    line = _one_error_line(err)
    assert rc == 1 and len(calls) == 2
    assert line.startswith(f"error: no space left on the device writing {out / CHECKPOINT_NAME} (needs about ")
    assert load_checkpoint(out / CHECKPOINT_NAME)["step"] == 2
    assert not list(out.glob(".*.tmp")) and not (out / "model.safetensors").exists()


def test_train_refuses_to_start_without_room_for_its_checkpoints(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    monkeypatch.setattr(loop, "free_bytes", lambda _p: 100_000)  # the tiny model's checkpoint alone is ~0.2 MB
    rc, err = _train(out, capsys)
    line = _one_error_line(err)
    assert rc == 1 and line.startswith(f"error: not enough free space for the run in {out}: it needs about ")
    assert "0.1 MB are free" in line
    assert not (out / CHECKPOINT_NAME).exists() and not (out / "metrics.jsonl").exists()  # no step was taken


def test_free_space_estimate_covers_what_the_run_writes(tmp_path, monkeypatch, capsys):
    """The estimate is at least what a run actually writes: 3 checkpoints (rotation) + 2 exports."""
    out = tmp_path / "run"
    assert _train(out, capsys)[0] == 0
    written = 3 * (out / CHECKPOINT_NAME).stat().st_size + sum((out / f).stat().st_size for f in
                                                               ("model.safetensors", "model_ema.safetensors"))
    model = loop.build_model(train_cli.resolve_config(train_cli.parser().parse_args(TINY_ARGS)), torch.device("cpu"))
    monkeypatch.setattr(loop, "free_bytes", lambda _p: written * 0.98)
    with pytest.raises(StorageError):
        loop._check_free_space(tmp_path / "other", model, [])
    monkeypatch.setattr(loop, "free_bytes", lambda _p: written * 1.2)
    loop._check_free_space(tmp_path / "other", model, [])  # 20% over the measured bytes: enough


def test_train_out_without_permission(tmp_path, monkeypatch, capsys):
    out = tmp_path / "locked" / "run"
    real_mkdir = Path.mkdir

    def mkdir(self, *a, **k):
        if self == out:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return real_mkdir(self, *a, **k)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    rc, err = _train(out, capsys)
    assert rc == 1
    assert _one_error_line(err) == (f"error: permission denied creating the run folder {out}: make the folder "
                                    "writable for this user, or choose another --out")


def test_train_out_on_read_only_file_system(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    out.mkdir()

    def open_(file, *a, **k):
        if str(file).endswith(".lock"):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(file))
        return builtins.open(file, *a, **k)

    monkeypatch.setattr(loop, "open", open_, raising=False)
    rc, err = _train(out, capsys)
    assert rc == 1
    assert _one_error_line(err) == (f"error: read-only file system creating {out / '.lock'}: choose an --out on "
                                    "a writable file system")
    assert list(out.iterdir()) == []
