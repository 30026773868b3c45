"""NVIDIA DALI input pipelines of the ``"dali"`` loader backend.

One pipeline runs one epoch of one shard. It never chooses samples or random numbers itself: a
Python source (``fn.external_source``) feeds it, batch by batch, what the shared loader contract
decides, so DALI yields the same samples per batch as the ``"tensor"`` and ``"torch"`` backends:

* the indices of a batch come from ``epoch_permutation`` and ``shard_ranges`` (loaders.py);
* its flips, crop offsets and colour jitter are the keyed draws of its examples' positions in the
  epoch order, ``keyed_augment_params`` with the key ``augment_seed(seed, epoch)`` (augment.py),
  computed on the CPU, and reach DALI as per-sample argument inputs of ``fn.flip`` / ``fn.slice``
  and of the jitter arithmetic. Hence every batch is a pure function of ``(seed, epoch,
  positions)``: reproducible, and ``skip_batches=k`` gives exactly batches ``k, k+1, ...`` of the
  uninterrupted epoch. The counter-based draws are bit-identical on the CPU and on CUDA, so these
  are the very parameters the ``"tensor"`` and ``"torch"`` backends draw on any device.

With augmentation on, the pipeline can output the clean image next to the augmented one
(``keep_clean``): both branches start from the same decoded uint8 image.

Arrays go in as uint8 HWC batches gathered on the host (moved to the GPU inside the pipeline when
the loader's device is CUDA). Image folders go in as file paths: ``fn.io.file.read`` reads them
and ``fn.decoders.image`` decodes them (``device="mixed"``, i.e. nvJPEG/nvImageCodec on the GPU,
on CUDA; ``"cpu"`` otherwise), then ``fn.resize`` + ``fn.crop`` bring them to the dataset's size.
Without a CUDA device the pipeline runs in DALI's CPU-only mode (``device_id=None``).

Output: float32 NHWC in [-1, 1] (``uint8 / 127.5 - 1``, as the other backends), clean and/or
augmented, and int64 labels.
"""
from __future__ import annotations

import collections
import functools
import importlib
import os
import sys
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from .augment import AugmentConfig, keyed_augment_params
from .datasets import DatasetError, ImageDataset, _read_image
from .seeds import augment_seed

__all__ = ["DALI_PACKAGE", "DaliEpochs", "dali_unavailable_reason"]

DALI_PACKAGE = "nvidia-dali-cuda130"


@functools.lru_cache(maxsize=1)
def dali_unavailable_reason() -> str | None:
    """``None`` when NVIDIA DALI can be imported here, else a sentence saying why not."""
    if not sys.platform.startswith("linux"):
        return f"NVIDIA DALI has no build for {sys.platform} (Linux only)"
    try:
        importlib.import_module("nvidia.dali")
    except ImportError as e:
        return f"NVIDIA DALI is not installed ({e}); pip install {DALI_PACKAGE}"
    except Exception as e:  # a broken install (missing CUDA libraries...) is not usable either
        return f"NVIDIA DALI failed to import ({type(e).__name__}: {e})"
    return None


class DaliEpochs:
    """Builds and runs the DALI pipeline of one epoch of one shard at a time.

    ``augment_config`` None: the pipeline outputs the clean images; else the augmented ones, and
    with ``keep_clean`` the clean ones too.
    """

    def __init__(
        self,
        dataset: ImageDataset,
        *,
        batch_size: int,
        seed: int,
        augment_config: AugmentConfig | None,
        device: torch.device,
        keep_clean: bool = False,
        num_threads: int | None = None,
    ) -> None:
        reason = dali_unavailable_reason()
        if reason is not None:
            raise ImportError(f"the 'dali' loader backend needs NVIDIA DALI: {reason}")
        self.dataset, self.batch_size = dataset, batch_size
        self.seed, self.cfg, self.device = seed, augment_config, device
        self.outputs_clean = augment_config is None or keep_clean
        self.num_threads = num_threads or max(1, min(4, os.cpu_count() or 1))
        _, self.height, self.width, self.channels = dataset.images.shape
        # Paths as uint8 arrays: the form fn.io.file.read takes (one encoded string per sample).
        self._paths = (
            [np.frombuffer(os.fsencode(f), np.uint8) for f in dataset.files]
            if dataset.files is not None else None
        )

    @property
    def reads_files(self) -> bool:
        """True when the pipeline reads and decodes the dataset's image files itself."""
        return self._paths is not None

    # -----------------------------------------------------------------------------------------
    # the per-batch inputs

    def _batch_inputs(self, epoch: int, first: int, idx: np.ndarray) -> tuple:
        """The external-source inputs of the batch of samples ``idx``, which sit at positions
        ``first .. first + len(idx) - 1`` of the epoch's order."""
        data = [self._paths[i] for i in idx] if self._paths is not None \
            else self.dataset.images[idx]
        inputs = [data, self.dataset.labels[idx]]
        cfg = self.cfg
        if cfg is not None:
            first_example = torch.tensor(first, dtype=torch.int64)
            p = keyed_augment_params(cfg, first_example, len(idx), augment_seed(self.seed, epoch))
            if p.flip is not None:
                inputs.append(p.flip.numpy().astype(np.int32))
            if p.offsets is not None:
                anchor = p.offsets - cfg.pad if cfg.padding_mode == "constant" else p.offsets
                inputs.append(anchor.numpy().astype(np.int32))
            if p.shift is not None:
                inputs += [p.shift.numpy(), p.scale.numpy()]
        return tuple(inputs)

    # -----------------------------------------------------------------------------------------
    # the graph

    def _build(self, source):
        from nvidia.dali import Pipeline, fn, types
        from nvidia.dali import math as dmath

        cuda = self.device.type == "cuda"
        cfg = self.cfg
        n_params = 0 if cfg is None else (
            int(cfg.flip) + int(cfg.pad > 0) + 2 * int(cfg.brightness > 0 or cfg.contrast > 0)
        )
        pipe = Pipeline(
            batch_size=self.batch_size, num_threads=self.num_threads,
            device_id=self.device.index if cuda else None,  # None: DALI's CPU-only mode
            seed=self.seed % (2**31 - 1), prefetch_queue_depth=2,
        )
        with pipe:
            layouts = ["" if self.reads_files else "HWC", ""] + [""] * n_params
            data, labels, *params = fn.external_source(
                source=source, num_outputs=2 + n_params, batch=True, layout=layouts
            )
            if self.reads_files:
                encoded = fn.io.file.read(data)
                images = fn.decoders.image(
                    encoded, device="mixed" if cuda else "cpu",
                    output_type=types.GRAY if self.channels == 1 else types.RGB,
                )
                images = fn.resize(images, resize_shorter=min(self.height, self.width))
                images = fn.crop(images, crop=(self.height, self.width))  # centred
            else:
                images = data.gpu() if cuda else data
            outputs = [labels]
            if self.outputs_clean:
                outputs.append(fn.cast(images, dtype=types.FLOAT) / 127.5 - 1.0)
            if cfg is not None:
                if cfg.flip:
                    images = fn.flip(images, horizontal=params.pop(0), vertical=0)
                if cfg.pad > 0:
                    images = self._translate(fn, types, images, params.pop(0))
                x = fn.cast(images, dtype=types.FLOAT) / 127.5 - 1.0
                if params:  # colour jitter: (x - mean) * scale + mean + shift, clamped
                    shift, scale = params
                    mean = fn.reductions.mean(x)
                    x = dmath.clamp((x - mean) * scale + mean + shift, -1.0, 1.0)
                outputs.append(x)
            pipe.set_outputs(*outputs)
        pipe.build()
        return pipe

    def _translate(self, fn, types, images, anchor):
        """Pad by ``cfg.pad`` and crop ``H x W`` at the per-sample ``anchor`` (dy, dx)."""
        cfg, h, w = self.cfg, self.height, self.width
        shape = types.Constant(np.array([h, w], np.int32))
        if cfg.padding_mode == "constant":  # anchor already shifted by -pad; 0 is -1.0 later
            return fn.slice(images, anchor, shape, axes=[0, 1],
                            out_of_bounds_policy="pad", fill_values=0)
        padded = images
        for axis, size in ((0, h), (1, w)):
            padded = self._pad_axis(fn, padded, axis, size, cfg.pad, cfg.padding_mode)
        return fn.slice(padded, anchor, shape, axes=[0, 1])

    @staticmethod
    def _pad_axis(fn, x, axis: int, size: int, pad: int, mode: str):
        """Reflect (``x[pad..1] x x[-2..-pad-1]``) or replicate padding along one HWC axis."""
        def part(start: int, stop: int):
            return fn.slice(x, start=[start], end=[stop], axes=[axis])

        if mode == "reflect":
            flip = dict(horizontal=int(axis == 1), vertical=int(axis == 0))
            lo = fn.flip(part(1, pad + 1), **flip)
            hi = fn.flip(part(size - 1 - pad, size - 1), **flip)
        else:  # replicate
            first, last = part(0, 1), part(size - 1, size)
            lo = fn.cat(*[first] * pad, axis=axis) if pad > 1 else first
            hi = fn.cat(*[last] * pad, axis=axis) if pad > 1 else last
        return fn.cat(lo, x, hi, axis=axis)

    # -----------------------------------------------------------------------------------------
    # running an epoch

    def iterate(
        self, epoch: int, plan: Sequence[tuple[int, np.ndarray]]
    ) -> Iterator[tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None]]:
        """Run the batches ``plan`` = [(position of the first sample in the epoch's order, sample
        indices), ...] of ``epoch``.

        Yields ``(x, y, x_aug)``: float32 NHWC clean images (None when the pipeline does not
        output them), int64 labels, float32 NHWC augmented images (None without augmentation),
        on the loader's device.
        """
        if not plan:
            return
        in_flight: collections.deque = collections.deque()  # indices fed but not yet returned

        def source():
            for first, idx in plan:
                in_flight.append(idx)
                yield self._batch_inputs(epoch, first, idx)

        pipe = self._build(source)
        try:
            while True:
                try:
                    y, *images = pipe.run()
                except StopIteration:
                    return
                except RuntimeError as e:
                    raise self._pipeline_error(e, in_flight) from e
                in_flight.popleft()
                images = [self._to_torch(t) for t in images]
                x = images.pop(0) if self.outputs_clean else None
                x_aug = images.pop(0) if self.cfg is not None else None
                yield x, torch.from_numpy(np.array(y.as_tensor())), x_aug
        finally:
            del pipe  # an abandoned epoch drops its pipeline (and what it prefetched)

    def _to_torch(self, tensor_list) -> torch.Tensor:
        t = tensor_list.as_tensor()
        if self.device.type != "cuda":
            return torch.from_numpy(np.array(t))  # a copy: DALI reuses its output buffers
        from nvidia.dali.plugin.pytorch import feed_ndarray

        out = torch.empty(t.shape(), dtype=torch.float32, device=self.device)
        # Copies on torch's current stream, ordered after DALI's work: no host sync here.
        feed_ndarray(t, out, cuda_stream=torch.cuda.current_stream(self.device))
        return out

    def _pipeline_error(self, error: RuntimeError, in_flight: collections.deque) -> Exception:
        """Name the file DALI failed on: re-read the files of the batches in flight with PIL."""
        if self._paths is None:
            return error
        files = [self.dataset.files[i] for idx in in_flight for i in idx]
        mode = "L" if self.channels == 1 else "RGB"
        for f in files:
            try:
                _read_image(f, mode)
            except DatasetError as bad:
                return DatasetError(f"{bad} (DALI: {_first_line(error)})")
        shown = ", ".join(files[:8]) + (", ..." if len(files) > 8 else "")
        return DatasetError(f"DALI failed on one of the files {shown}: {_first_line(error)}")


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
