"""Batch loaders: a device-resident tensor loader, a torch DataLoader, and NVIDIA DALI pipelines.

All backends share one definition of an epoch, so they yield the same samples in each batch:

* The epoch order is ``torch.randperm`` on a CPU ``torch.Generator`` seeded by
  ``derive_seed(seed, epoch, PERM_TAG)``: never the global RNG, the same on every device and backend.
* Sharding is interleaved: global batch ``b`` is ``order[b*B*n : (b+1)*B*n]`` and shard ``i``
  takes its ``i``-th slice of ``B`` samples, so the ``n`` shards of one step together hold what a
  single process with batch ``B*n`` would see. With ``drop_last=False`` the leftover samples
  (fewer than ``B*n``) are split as evenly as possible into one last, smaller batch per shard.
* Augmentation is keyed per example: the example at position ``p`` of epoch ``e``'s order is
  augmented with the parameters ``keyed_augment_params`` draws for row ``p`` from the Philox
  counter op with the key ``augment_seed(seed, e)`` (augment.py), on the batch's device. So an
  example's augmentation depends only on ``(seed, epoch, position)``: not on the batch size, the
  shard or the number of processes, and resuming at batch ``k`` (``skip_batches=k``) reproduces an
  uninterrupted epoch exactly. (Until issue 17 the draws came from a ``torch.Generator`` seeded
  per (seed, epoch, batch, shard): a documented change of the augmentation stream.)
* ``"tensor"``, ``"torch"`` and ``"dali"`` draw the same parameters (counter-based: the same bits
  on the CPU and on CUDA); ``"tensor"`` and ``"torch"`` yield identical batches, ``"dali"`` equal
  ones up to float rounding in the colour jitter.

Backend ``"auto"`` (see :func:`choose_backend`): ``"tensor"`` whenever the uint8 set fits the
device (always on CPU, where it is zero-copy; on CUDA when it takes at most a quarter of the free
device memory), else ``"dali"``, else, where DALI is missing, ``"torch"`` with one warning.

Batches are ``(x, y)``: float32 NCHW in [-1, 1] (``uint8 / 127.5 - 1``, exact at 0 and 255),
augmented when augmentation is on, and int64 labels, both on ``device``. With
``keep_clean=True`` they are :class:`CleanAndAugmented` ``(x, y, x_aug)``: the clean batch, the
labels, and its augmented copy (``None`` when augmentation is off): what the trainer needs, whose
diffusion term trains on the clean images and classifier on the augmented ones.
"""
from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from .augment import AugmentConfig, apply_augment, check_reflect_pad, default_augment, keyed_augment_params
from .datasets import ImageDataset, load_dataset
from .images import from_uint8
from .seeds import PERM_TAG, augment_seed, derive_seed

__all__ = [
    "BACKENDS",
    "BatchLoader",
    "CleanAndAugmented",
    "build_loader",
    "choose_backend",
    "epoch_permutation",
    "infinite_batches",
    "shard_ranges",
]

BACKENDS = ("auto", "tensor", "torch", "dali")

Batch = tuple[torch.Tensor, torch.Tensor]


class CleanAndAugmented(NamedTuple):
    """A batch with its augmented copy (``build_loader(..., keep_clean=True)``)."""

    x: torch.Tensor  # float32 (B, C, H, W) in [-1, 1]: the clean images
    y: torch.Tensor  # int64 labels
    x_aug: torch.Tensor | None  # x augmented (same layout), None when augmentation is off


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The global sample order of one epoch: int64 CPU tensor, a permutation of ``range(n)``."""
    generator = torch.Generator(device="cpu").manual_seed(derive_seed(seed, epoch, PERM_TAG))
    return torch.randperm(n, generator=generator)


def shard_ranges(
    n: int, batch_size: int, shard_index: int, num_shards: int, drop_last: bool
) -> list[tuple[int, int]]:
    """``[start, stop)`` positions in the epoch order of each batch of one shard."""
    per_step = batch_size * num_shards
    full = n // per_step
    first = shard_index * batch_size
    ranges = [(b * per_step + first, b * per_step + first + batch_size) for b in range(full)]
    rest = n - full * per_step
    if not drop_last and rest:
        base = full * per_step
        start = base + shard_index * rest // num_shards
        stop = base + (shard_index + 1) * rest // num_shards
        if stop > start:
            ranges.append((start, stop))
    return ranges


def _resolve_device(device: str | torch.device) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={str(device)!r} but CUDA is not available")
        if device.index is None:  # pin the index so generators and data agree
            device = torch.device("cuda", torch.cuda.current_device())
    return device


def _as_tensor(array: np.ndarray) -> torch.Tensor:
    array = np.ascontiguousarray(array)
    return torch.from_numpy(array) if array.flags.writeable else torch.tensor(array)


class _ArrayBatches(torch.utils.data.Dataset):
    """Map-style dataset over uint8 arrays that fetches whole batches (``__getitems__``)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> Batch:
        return torch.from_numpy(self.images[i].copy()), torch.tensor(self.labels[i])

    def __getitems__(self, indices: list[int]) -> Batch:
        idx = np.asarray(indices, dtype=np.int64)
        return torch.from_numpy(self.images[idx]), torch.from_numpy(self.labels[idx])


def _keep_batch(batch: Batch) -> Batch:
    """collate_fn: ``__getitems__`` already returns the collated batch."""
    return batch


class _EpochBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Yields the index lists of the current epoch; the loader sets ``batches`` per epoch."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class BatchLoader:
    """Iterable over the batches of one epoch of one shard; build it with :func:`build_loader`.

    ``iter(loader)`` yields epoch ``loader.epoch`` from batch ``loader.skip_batches``; change
    them with :meth:`set_epoch`, or iterate any epoch directly with :meth:`iter_epoch`.
    Consume one epoch iterator at a time (the ``"torch"`` backend reuses one DataLoader).
    The arguments are :func:`build_loader`'s, validated there (``augment_config`` None: no
    augmentation; ``shard`` is ``(index, count)``).
    """

    def __init__(
        self,
        dataset: ImageDataset,
        *,
        batch_size: int,
        backend: str,
        shard: tuple[int, int],
        seed: int,
        augment_config: AugmentConfig | None,
        drop_last: bool,
        device: torch.device,
        channels_last: bool = False,
        num_workers: int = 0,
        keep_clean: bool = False,
    ) -> None:
        self.dataset, self.batch_size, self.backend = dataset, batch_size, backend
        self.shard_index, self.num_shards = shard
        self.seed, self.augment_config, self.drop_last = seed, augment_config, drop_last
        self.device, self.channels_last, self.keep_clean = device, channels_last, keep_clean
        self.epoch, self.skip_batches = 0, 0
        self._num_batches = len(shard_ranges(len(dataset), batch_size, *shard, drop_last))
        if backend == "dali":
            from .dali_pipelines import DaliEpochs

            self._dali = DaliEpochs(dataset, batch_size=batch_size, seed=seed, augment_config=augment_config,
                                    device=device, keep_clean=keep_clean)
        elif backend == "tensor":
            # One upload of the whole uint8 set; every batch is then gathered on the device.
            self._images = _as_tensor(dataset.images).to(device)
            self._labels = _as_tensor(dataset.labels).to(device)
        else:
            self._sampler = _EpochBatchSampler()
            self._loader = torch.utils.data.DataLoader(
                _ArrayBatches(dataset.images, dataset.labels),
                batch_sampler=self._sampler,
                collate_fn=_keep_batch,
                num_workers=num_workers,
                pin_memory=device.type == "cuda",
                persistent_workers=num_workers > 0,
            )

    def __len__(self) -> int:
        """Batches per epoch for this shard."""
        return self._num_batches

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Make ``iter(self)`` yield ``epoch`` from batch ``skip_batches`` on."""
        self._check_position(epoch, skip_batches)
        self.epoch, self.skip_batches = epoch, skip_batches

    def __iter__(self) -> Iterator[Batch | CleanAndAugmented]:
        return self.iter_epoch(self.epoch, self.skip_batches)

    def iter_epoch(self, epoch: int, skip_batches: int = 0) -> Iterator[Batch | CleanAndAugmented]:
        """Batches ``skip_batches, ..., len(self) - 1`` of ``epoch`` (validated immediately)."""
        self._check_position(epoch, skip_batches)
        return self._generate(epoch, skip_batches)

    def _check_position(self, epoch: int, skip_batches: int) -> None:
        if not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be a non-negative int, got {epoch!r}")
        if not isinstance(skip_batches, int) or not 0 <= skip_batches <= len(self):
            raise ValueError(
                f"skip_batches must be an int in [0, {len(self)}] (batches per epoch), "
                f"got {skip_batches!r}"
            )

    def _generate(self, epoch: int, skip: int) -> Iterator[Batch | CleanAndAugmented]:
        order = epoch_permutation(len(self.dataset), self.seed, epoch)
        ranges = shard_ranges(
            len(self.dataset), self.batch_size, self.shard_index, self.num_shards, self.drop_last
        )[skip:]
        if self.backend == "dali":
            order_np = order.numpy()
            plan = [(lo, order_np[lo:hi]) for lo, hi in ranges]
            for x, y, x_aug in self._dali.iterate(epoch, plan):  # float32 NHWC
                yield self._output(x, y.to(self.device, non_blocking=True), x_aug, nhwc=True)
            return
        if self.backend == "tensor":
            order = order.to(self.device)  # one host-to-device copy per epoch
            raw = (
                (self._images.index_select(0, order[a:b]), self._labels.index_select(0, order[a:b]))
                for a, b in ranges
            )
        else:
            self._sampler.batches = [order[a:b].tolist() for a, b in ranges]
            raw = (
                (x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True))
                for x, y in self._loader
            )
        for (images, labels), (lo, _) in zip(raw, ranges):  # raw first: the DataLoader runs to its end
            x = from_uint8(images)  # uint8 NHWC on the device -> float32 NCHW in [-1, 1]
            yield self._output(x, labels, self._augment(x, epoch, lo), nhwc=False)

    def _augment(self, x: torch.Tensor, epoch: int, first: int) -> torch.Tensor | None:
        """``x`` (positions ``first ..`` of the epoch's order) augmented with its keyed draws."""
        cfg = self.augment_config
        if cfg is None:
            return None
        # A fill kernel, not a host-to-device copy: the draws read the position on the device.
        first_example = torch.full((), first, dtype=torch.int64, device=x.device)
        params = keyed_augment_params(cfg, first_example, x.shape[0], augment_seed(self.seed, epoch), x.dtype)
        return apply_augment(x, cfg, params=params)

    def _output(self, x: torch.Tensor | None, y: torch.Tensor, x_aug: torch.Tensor | None,
                nhwc: bool) -> Batch | CleanAndAugmented:
        x, x_aug = (self._layout(v, nhwc) if v is not None else None for v in (x, x_aug))
        if self.keep_clean:
            return CleanAndAugmented(x, y, x_aug)
        return (x if x_aug is None else x_aug), y

    def _layout(self, x: torch.Tensor, nhwc: bool) -> torch.Tensor:
        if nhwc:
            x = x.permute(0, 3, 1, 2)
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        return x.contiguous(memory_format=fmt)


def _check_dali() -> None:
    from .dali_pipelines import DALI_PACKAGE, dali_unavailable_reason

    reason = dali_unavailable_reason()
    if reason is not None:
        raise ImportError(
            f"backend='dali' needs NVIDIA DALI ({DALI_PACKAGE}, Linux only): {reason}. "
            "Install it, or use backend='tensor', 'torch' or 'auto'"
        )


_AUTO_FRACTION = 0.25  # "fits": the uint8 set takes at most this share of free device memory
_fallback_warned = False


def choose_backend(dataset: ImageDataset, device: str | torch.device) -> str:
    """What ``backend="auto"`` picks for ``dataset`` on ``device``.

    ``"tensor"`` when the uint8 set fits the device: always on CPU (the arrays are used in place,
    and measured fastest there: benchmarks/test_loaders.py), and on CUDA when it needs at most a
    quarter of the free device memory (gathering and augmenting on the device beats any host
    pipeline). Larger sets stream through ``"dali"``; where DALI is unavailable, through
    ``"torch"``, with one warning saying so.
    """
    global _fallback_warned
    device = torch.device(device)
    if device.type != "cuda":
        return "tensor"
    free, _ = torch.cuda.mem_get_info(device)
    if dataset.images.nbytes <= _AUTO_FRACTION * free:
        return "tensor"
    from .dali_pipelines import DALI_PACKAGE, dali_unavailable_reason

    reason = dali_unavailable_reason()
    if reason is None:
        return "dali"
    if not _fallback_warned:
        _fallback_warned = True
        warnings.warn(
            f"jdm_fast.data: loader backend 'auto' would stream {dataset.name!r} "
            f"({dataset.images.nbytes / 2**30:.1f} GiB, more than a quarter of the free device "
            f"memory) through NVIDIA DALI, but {reason}; falling back to the torch DataLoader "
            f"(install {DALI_PACKAGE} for the DALI pipeline)",
            RuntimeWarning, stacklevel=3,
        )
    return "torch"


def build_loader(
    dataset: ImageDataset | str,
    batch_size: int,
    backend: str = "auto",
    shard: tuple[int, int] = (0, 1),
    seed: int = 0,
    augment: bool = True,
    drop_last: bool = True,
    device: str | torch.device = "cpu",
    epoch: int = 0,
    skip_batches: int = 0,
    channels_last: bool = False,
    augment_config: AugmentConfig | None = None,
    num_workers: int = 0,
    data_dir: str | Path | None = None,
    keep_clean: bool = False,
) -> BatchLoader:
    """Build the batch loader of one shard.

    Args:
        dataset: an :class:`ImageDataset`, or a name/folder loaded with
            ``load_dataset(name, "train", data_dir)``.
        batch_size: samples per batch of this shard (per-process batch).
        backend: ``"tensor"`` (whole uint8 set on the device; gather, convert and augment there),
            ``"torch"`` (torch DataLoader, same order), ``"dali"`` (NVIDIA DALI pipeline, same
            order; image folders are read and decoded by DALI), ``"auto"`` (see
            :func:`choose_backend`).
        shard: ``(index, count)`` of this process; shards are disjoint and cover each epoch.
        seed: base seed of orders and augmentations.
        augment: apply ``augment_config`` (default: ``default_augment(dataset.name)``), with the
            per-example keyed draws of the module docstring.
        drop_last: only full batches (same count on every shard); else a last smaller batch.
        device: where batches (and, for ``"tensor"``, the dataset) live.
        epoch, skip_batches: what ``iter(loader)`` yields first (see ``set_epoch``).
        channels_last: return ``x`` in channels-last memory format.
        augment_config: explicit augmentations; only valid with ``augment=True``.
        num_workers: worker processes of the ``"torch"`` backend.
        data_dir: passed to ``load_dataset`` when ``dataset`` is a name.
        keep_clean: yield :class:`CleanAndAugmented` ``(x clean, y, x_aug)`` instead of ``(x, y)``
            (``x_aug`` None when augmentation is off, or ``augment_config`` does nothing).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "dali":
        _check_dali()
    if isinstance(dataset, (str, Path)):
        dataset = load_dataset(str(dataset), "train", data_dir)
    if not isinstance(dataset, ImageDataset):
        raise TypeError(f"dataset must be an ImageDataset or a name, got {type(dataset).__name__}")
    if len(dataset) == 0:
        raise ValueError(f"dataset {dataset.name!r} is empty")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if (
        not isinstance(shard, (tuple, list)) or len(shard) != 2
        or not all(isinstance(v, int) for v in shard) or shard[1] < 1
        or not 0 <= shard[0] < shard[1]
    ):
        raise ValueError(f"shard must be (index, count) with 0 <= index < count, got {shard!r}")
    if drop_last and batch_size * shard[1] > len(dataset):
        raise ValueError(
            f"batch_size {batch_size} x {shard[1]} shard(s) exceeds the {len(dataset)} samples of "
            f"{dataset.name!r}: with drop_last=True no full batch exists"
        )
    if not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"num_workers must be an int >= 0, got {num_workers!r}")
    if augment_config is not None and not augment:
        raise ValueError("augment_config was given but augment=False; pass augment=True")
    config = None
    if augment:
        config = augment_config if augment_config is not None else default_augment(dataset.name)
        check_reflect_pad(config.pad, config.padding_mode, *dataset.images.shape[1:3])
        config = config if config.enabled else None
    device = _resolve_device(device)
    if backend == "auto":
        backend = choose_backend(dataset, device)
    loader = BatchLoader(
        dataset, batch_size=batch_size, backend=backend, shard=(shard[0], shard[1]), seed=seed,
        augment_config=config, drop_last=drop_last, device=device, channels_last=channels_last,
        num_workers=num_workers, keep_clean=bool(keep_clean),
    )
    loader.set_epoch(epoch, skip_batches)
    return loader


def infinite_batches(
    dataset: ImageDataset | str,
    batch_size: int,
    seed: int = 0,
    start_step: int = 0,
    **loader_kwargs: object,
) -> Iterator[Batch | CleanAndAugmented]:
    """Endless full batches, epoch after epoch, starting at global step ``start_step``.

    Step ``s`` is batch ``s % len(loader)`` of epoch ``s // len(loader)``, so a run resumed at
    step ``s`` sees exactly the batches an uninterrupted run would. ``loader_kwargs`` go to
    :func:`build_loader` (``epoch``, ``skip_batches`` and ``drop_last`` are fixed here: every
    step gets a full batch).
    """
    for fixed in ("epoch", "skip_batches", "drop_last"):
        if fixed in loader_kwargs:
            raise TypeError(f"infinite_batches sets {fixed!r} itself; do not pass it")
    if not isinstance(start_step, int) or start_step < 0:
        raise ValueError(f"start_step must be a non-negative int, got {start_step!r}")
    loader = build_loader(dataset, batch_size, seed=seed, drop_last=True, **loader_kwargs)
    epoch, skip = divmod(start_step, len(loader))
    return _walk_epochs(loader, epoch, skip)


def _walk_epochs(loader: BatchLoader, epoch: int, skip: int) -> Iterator[Batch | CleanAndAugmented]:
    while True:
        yield from loader.iter_epoch(epoch, skip)
        epoch, skip = epoch + 1, 0
