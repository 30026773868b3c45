"""Files from users are data, never code (issue 16): every loader refuses a file that asks to run
something, names the file and what it asked for, and the payload never runs. The payloads here
are harmless: a pickled call of os.mkdir that would create a marker folder."""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from jdm_fast.checkpoint import CheckpointError, UnsafeFileError, load_checkpoint, rng_state, safe_load, \
    set_rng_state


class _Payload:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _evil_checkpoint(path: Path, marker: Path) -> Path:
    torch.save({"model": {}, "step": 1, "config": {}, "note": _Payload(marker)}, path)
    return path


def test_a_checkpoint_that_asks_for_code_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "PAYLOAD_RAN"
    path = _evil_checkpoint(tmp_path / "checkpoint.pt", marker)
    with pytest.raises(UnsafeFileError, match=r"checkpoint .*checkpoint\.pt asks to load .*mkdir"):
        load_checkpoint(path)
    assert not marker.exists()


def test_checkpoints_written_now_and_before_load_as_data(tmp_path):
    """A checkpoint's RNG states are plain data (NumPy's as lists); older checkpoints, which held
    NumPy's state as an array, still load through the allow-listed array reconstruction."""
    torch.save({"model": {"w": torch.ones(2)}, "step": 3, "rng": rng_state(), "precision": (torch.bfloat16, False, "x")},
               tmp_path / "new.pt")
    state = load_checkpoint(tmp_path / "new.pt")
    set_rng_state(state["rng"])
    a = np.random.rand()
    set_rng_state(state["rng"])
    assert np.random.rand() == a and state["precision"][0] is torch.bfloat16
    torch.save({"model": {}, "step": 1, "numpy": np.random.get_state()}, tmp_path / "old.pt")
    assert load_checkpoint(tmp_path / "old.pt")["numpy"][0] == "MT19937"


def _cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, cwd=cwd, timeout=600,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})


@pytest.mark.parametrize("cli", ["sample", "evaluate", "train"])
def test_the_clis_refuse_a_checkpoint_carrying_code(tmp_path, cli):
    marker = tmp_path / "PAYLOAD_RAN"
    run = tmp_path / "run"
    run.mkdir()
    ckpt = _evil_checkpoint(run / "checkpoint.pt", marker)
    if cli == "sample":
        proc = _cli(["jdm_fast.sample", "--checkpoint", str(ckpt), "--num", "2", "--out", str(tmp_path / "s")], tmp_path)
    elif cli == "evaluate":
        proc = _cli(["jdm_fast.evaluate", "--checkpoint", str(ckpt), "--num", "8", "--out", str(tmp_path / "e.json")],
                    tmp_path)
    else:
        proc = _cli(["jdm_fast.train", "--preset", "tiny", "--device", "cpu", "--resume", "--out", str(run)], tmp_path)
    assert proc.returncode != 0
    assert "asks to load" in proc.stderr and "mkdir" in proc.stderr, proc.stderr[-2000:]
    assert not marker.exists()


def test_a_feature_classifier_file_carrying_code_is_refused(tmp_path):
    from jdm_fast.metrics.features import load_feature_classifier

    marker = tmp_path / "PAYLOAD_RAN"
    torch.save({"state_dict": {}, "info": _Payload(marker)}, tmp_path / "feature_classifier.pt")
    with pytest.raises(UnsafeFileError, match="feature classifier .* asks to load"):
        load_feature_classifier(tmp_path / "feature_classifier.pt")
    assert not marker.exists()


def test_a_cifar_batch_carrying_code_is_refused_and_real_batches_load(tmp_path):
    from jdm_fast.data.datasets import DatasetError, load_dataset

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), b"labels": [0, 1, 2, 3],
                 b"batch_label": b"b", b"filenames": [b"x"] * 4}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
    assert len(load_dataset("cifar10", "train", str(tmp_path))) == 20
    marker = tmp_path / "PAYLOAD_RAN"
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": _Payload(marker), b"labels": [0]}, f)
    with pytest.raises(DatasetError, match=r"test_batch: the file asks to load .*mkdir"):
        load_dataset("cifar10", "test", str(tmp_path))
    assert not marker.exists()


def test_safe_load_is_what_every_loader_uses():
    """No torch.load outside safe_load (and the Inception weights, already weights_only) in the package."""
    root = Path(__file__).resolve().parents[1] / "jdm_fast"
    offenders = []
    for p in root.rglob("*.py"):
        for i, line in enumerate(p.read_text().splitlines(), 1):
            if "torch.load(" in line and "weights_only=True" not in line:
                offenders.append(f"{p.relative_to(root)}:{i}")
    assert not offenders, offenders
    assert callable(safe_load) and issubclass(UnsafeFileError, CheckpointError)


def test_op_edge_cases_get_clear_errors():
    """Inputs that returned NaN, truncated silently or crashed deep inside now name the argument."""
    from jdm_fast.diffusion import GaussianDiffusion, make_betas
    from jdm_fast.ops import attention, group_norm_silu
    from jdm_fast.ops import noise as N

    d = GaussianDiffusion(make_betas("jdm_linear", 100))
    x, t = torch.randn(2, 3, 4, 4), torch.tensor([1, 5])
    a, b = d.sqrt_alphas_cumprod, d.sqrt_one_minus_alphas_cumprod
    with pytest.raises(TypeError, match="offset must be an int, got float"):
        N.q_sample_philox(x, t, a, b, 0, 3.7)
    with pytest.raises(ValueError, match=r"offset must lie in \[0, 2\^63\)"):
        N.q_sample_philox(x, t, a, b, 0, 2**63)
    assert torch.equal(N.q_sample_philox(x, t, a, b, 0, np.int64(5))[1], N.q_sample_philox(x, t, a, b, 0, 5)[1])
    with pytest.raises(ValueError, match="eps_mse: eps_hat is empty"):
        N.eps_mse(torch.empty(0, 3), torch.empty(0, 3))
    for eps in (0.0, -1e-5, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="eps must be a finite number > 0"):
            group_norm_silu(torch.randn(2, 4, 3, 3), 2, eps=eps)
    with pytest.raises(ValueError, match="head dim D must be >= 1"):
        attention(*torch.randn(3, 1, 2, 4, 0))
    with pytest.raises(ValueError, match=r"x must have at least one channel, got shape \(2, 0, 4, 4\)"):
        group_norm_silu(torch.randn(2, 0, 4, 4), 1)


def _folder_dataset(root: Path, bits: int = 8) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(10):
        (root / str(c)).mkdir(parents=True, exist_ok=True)
        for i in range(5):
            img = rng.integers(0, 2**bits, (28, 28)).astype(np.uint16 if bits == 16 else np.uint8)
            Image.fromarray(img).save(root / str(c) / f"{i}.png")
    return root


def test_16_bit_images_are_scaled_not_clipped(tmp_path):
    """A 16-bit PNG read as 8 bits: PIL's conversion clipped 99.5% of its pixels to 255."""
    from jdm_fast.data import load_dataset

    _folder_dataset(tmp_path / "d16", bits=16)
    images = load_dataset(str(tmp_path / "d16"), "train").images
    assert images.dtype == np.uint8 and 0.3 < images.mean() / 255 < 0.7 and (images == 255).mean() < 0.01


def test_checkpoints_store_absolute_data_paths_and_sample_evaluate_take_data_dir(tmp_path):
    from jdm_fast.data import load_dataset

    _folder_dataset(tmp_path / "work" / "mydigits")
    out = tmp_path / "work" / "run"
    proc = subprocess.run([sys.executable, "-m", "jdm_fast.train", "--preset", "tiny", "--device", "cpu", "--steps", "2",
                           "--dataset", "mydigits", "--out", "run"], cwd=tmp_path / "work", capture_output=True,
                          text=True, timeout=600, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    stored = json.loads((out / "config.json").read_text())["dataset"]
    assert stored == str((tmp_path / "work" / "mydigits").resolve())
    # an older checkpoint's relative folder name is found through --data-dir (the folder itself)
    assert len(load_dataset("mydigits", "test", str(tmp_path / "work" / "mydigits"))) == 10
    for cli in ("sample", "evaluate"):
        help_text = subprocess.run([sys.executable, "-m", f"jdm_fast.{cli}", "--help"], capture_output=True, text=True,
                                   env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}).stdout
        assert "--data-dir" in help_text
