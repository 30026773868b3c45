"""--tensorboard: the events in <out>/tb/ read back with TensorBoard's own reader hold exactly what
metrics.jsonl holds (tags, steps, values as float32, the sample grids), also across a resume after a
crash; without the tensorboard package the run refuses to start and names the extra."""
import io
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from _runs import TINY_ARGS
from jdm_fast import train as cli
from jdm_fast.training import tensorboard as tb_log
from jdm_fast.training.loop import train
from test_train import tiny_config

SCALAR_TAGS = {  # metrics.jsonl key -> tag (written out here, not imported: the test's own reference)
    "loss": "loss/total", "diffusion": "loss/diffusion", "classifier": "loss/classifier",
    "train_acc": "train/accuracy", "nonfinite_steps": "train/nonfinite_steps", "img_per_s": "perf/img_per_s",
    "peak_mem_mb": "perf/peak_mem_mb", "lr": "opt/lr", "test_acc_raw": "test/accuracy_raw",
    "test_acc_ema": "test/accuracy_ema",
}


def _events(folder):
    ea = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    acc = ea.EventAccumulator(str(folder), size_guidance={ea.SCALARS: 0, ea.IMAGES: 0})
    acc.Reload()
    return acc


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_events_match_metrics(out):
    """Every scalar tag holds one event per jsonl entry that has the key (same steps, the value as
    float32), no tag holds more, and the images are the saved sample grids at the eval steps."""
    acc, entries = _events(out / "tb"), _metrics(out)
    tags = acc.Tags()
    expected_tags = {tag for key, tag in SCALAR_TAGS.items() if any(e.get(key) is not None for e in entries)}
    assert set(tags["scalars"]) == expected_tags
    for key, tag in SCALAR_TAGS.items():
        want = [(e["step"], float(np.float32(e[key]))) for e in entries if e.get(key) is not None]
        if want:
            got = [(ev.step, ev.value) for ev in acc.Scalars(tag)]
            assert got == want, tag
    grids = [(e["step"], e["samples"]) for e in entries if e.get("samples")]
    assert tags["images"] == ["samples"]
    images = acc.Images("samples")
    assert [ev.step for ev in images] == [step for step, _ in grids]
    last = {path: step for step, path in grids}  # a resumed run's final grid overwrites samples_final.png
    for ev, (step, path) in zip(images, grids):
        if last[path] != step:
            continue
        shown = np.asarray(Image.open(io.BytesIO(ev.encoded_image_string)))
        saved = np.asarray(Image.open(path))
        assert (ev.height, ev.width) == saved.shape[:2]
        # a grey grid is shown as RGB with three equal channels
        np.testing.assert_array_equal(shown, np.repeat(saved[..., None], 3, axis=2) if saved.ndim == 2 else saved)
    return entries


def test_cli_tensorboard_events_equal_metrics_jsonl(tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    rc = cli.main([*TINY_ARGS, "--steps", "6", "--log-every", "2", "--eval-every", "4", "--out", str(out),
                   "--tensorboard"])
    assert rc == 0
    assert json.loads((out / "config.json").read_text())["tensorboard"] is True
    entries = assert_events_match_metrics(out)
    assert [e["step"] for e in entries if e["kind"] == "train"] == [2, 4, 6]
    assert [e["step"] for e in entries if e["kind"] == "eval"] == [4, 6]


def test_resume_after_a_crash_hides_what_the_killed_run_logged_past_its_checkpoint(tmp_path):
    """A run checkpointed at step 3 goes on logging to step 6 (with an evaluation at 4) and dies
    without a newer checkpoint (simulated by putting the step-3 checkpoint back). Resumed with no
    evaluation at 4, metrics.jsonl drops the dead run's lines after step 3 and TensorBoard must
    show exactly the same: no test accuracy or image at step 4 (nothing logs those again)."""
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    quiet = dict(log=lambda *_: None)
    train(tiny_config(out, steps=3, save_every=3, eval_every=1000, tensorboard=True), **quiet)
    shutil.copy(out / "checkpoint.pt", tmp_path / "step3.pt")
    train(tiny_config(out, steps=6, save_every=1000, eval_every=4, resume=True, tensorboard=True), **quiet)
    assert 4 in [e["step"] for e in _metrics(out) if e["kind"] == "eval"]
    shutil.copy(tmp_path / "step3.pt", out / "checkpoint.pt")  # the dead run's last checkpoint
    (out / "checkpoint.prev.pt").unlink()
    train(tiny_config(out, steps=6, save_every=1000, eval_every=1000, resume=True, tensorboard=True), **quiet)
    assert len(list((out / "tb").glob("events.out.tfevents.*"))) == 3  # one file per process start
    entries = assert_events_match_metrics(out)
    assert [e["step"] for e in entries if e["kind"] == "eval"] == [3, 6]
    assert [e["step"] for e in entries if e["kind"] == "train"] == [2, 3, 4, 6]


def test_missing_tensorboard_fails_before_the_run_starts_and_names_the_extra(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # `import` of it now fails
    out = tmp_path / "run"
    with pytest.raises(tb_log.TensorBoardMissing, match=r"pip install 'jdm_fast\[tensorboard\]'"):
        train(tiny_config(out, tensorboard=True), log=lambda *_: None)
    assert not out.exists()  # no folder, checkpoint or metrics: nothing started
    rc = cli.main([*TINY_ARGS, "--steps", "2", "--out", str(out), "--tensorboard"])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --tensorboard needs the tensorboard package") and "jdm_fast[tensorboard]" in err
    assert not out.exists()


def test_the_trainer_does_not_import_tensorboard_without_the_flag():
    code = ("import sys, jdm_fast.train, jdm_fast.training.loop; "
            "assert 'torch.utils.tensorboard' not in sys.modules and 'tensorboard' not in sys.modules")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
