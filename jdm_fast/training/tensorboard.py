"""``--tensorboard``: the run's metrics.jsonl entries as TensorBoard scalars and images in ``<out>/tb/``.

Every entry the loop records goes through :meth:`TensorBoardLog.write` as well, with the training
step as global_step, so the TensorBoard curves are the jsonl's numbers (stored as float32, as
TensorBoard scalars are). A train tick gives loss/total, loss/diffusion, loss/classifier,
train/accuracy (absent when the tick saw no labelled example), train/nonfinite_steps,
perf/img_per_s, perf/peak_mem_mb and opt/lr; an evaluation gives test/accuracy_raw,
test/accuracy_ema and the sample grid it saved (image ``samples``, read back from its PNG). Events
are flushed at every entry.

Resume: every process start writes a new events file. It begins with a purge marker at step
``start_step + 1`` (SummaryWriter's ``purge_step``), so TensorBoard hides what a killed run logged
after the checkpoint it resumes from, as the loop drops those lines from metrics.jsonl; a fresh
run (start_step 0) likewise hides the events of an earlier run in the same folder that never wrote
a checkpoint.

tensorboard is an optional dependency (``pip install 'jdm_fast[tensorboard]'``);
torch.utils.tensorboard is imported only when the flag is on.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

INSTALL_HINT = "--tensorboard needs the tensorboard package: pip install 'jdm_fast[tensorboard]' (or pip install tensorboard)"

# metrics.jsonl key -> TensorBoard tag
SCALAR_TAGS = {
    "loss": "loss/total",
    "diffusion": "loss/diffusion",
    "classifier": "loss/classifier",
    "train_acc": "train/accuracy",
    "nonfinite_steps": "train/nonfinite_steps",
    "img_per_s": "perf/img_per_s",
    "peak_mem_mb": "perf/peak_mem_mb",
    "lr": "opt/lr",
    "test_acc_raw": "test/accuracy_raw",
    "test_acc_ema": "test/accuracy_ema",
}
IMAGE_TAG = "samples"


class TensorBoardMissing(ImportError):
    """--tensorboard was asked for but tensorboard (or torch.utils.tensorboard) cannot be imported."""


def _summary_writer_class():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise TensorBoardMissing(f"{INSTALL_HINT} ({e})") from e
    return SummaryWriter


def require_tensorboard() -> None:
    """Raise :class:`TensorBoardMissing` now (before a run starts) when the writer cannot be built."""
    _summary_writer_class()


class TensorBoardLog:
    """A SummaryWriter on ``folder`` fed with metrics.jsonl entries; a context manager that closes it."""

    def __init__(self, folder: Path, start_step: int = 0):
        self.folder = Path(folder)
        self.writer = _summary_writer_class()(log_dir=str(self.folder), purge_step=start_step + 1)

    def write(self, entry: dict) -> None:
        step = int(entry["step"])
        for key, tag in SCALAR_TAGS.items():
            value = entry.get(key)
            if value is not None:
                self.writer.add_scalar(tag, float(value), global_step=step)
        if entry.get("samples"):
            with Image.open(entry["samples"]) as img:
                grid = np.asarray(img)  # uint8: (H, W) grey or (H, W, C) colour, as save_grid wrote it
            self.writer.add_image(IMAGE_TAG, grid, global_step=step, dataformats="HW" if grid.ndim == 2 else "HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()

    def __enter__(self) -> TensorBoardLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
