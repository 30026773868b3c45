"""Datasets, augmentations and batch loaders of jdm_fast.

``load_dataset`` reads a split into host memory as an :class:`ImageDataset`; ``build_loader``
turns it into device batches ``(x float32 NCHW in [-1, 1], y int64)`` (with ``keep_clean=True``,
``CleanAndAugmented(x, y, x_aug)``), augmented per example with keyed draws
(``keyed_augment_params``); ``infinite_batches`` walks epochs for a trainer and resumes exactly at
any global step.
"""
from .augment import (
    PADDING_MODES,
    AugmentConfig,
    AugmentParams,
    apply_augment,
    color_jitter,
    default_augment,
    keyed_augment_params,
    random_flip,
    random_translate,
    sample_augment_params,
)
from .datasets import (
    DATASET_INFO,
    IMAGE_EXTENSIONS,
    DatasetError,
    DatasetInfo,
    DatasetNotFoundError,
    ImageDataset,
    dataset_defaults,
    load_dataset,
    stratified_split,
)
from .seeds import augment_seed, derive_seed
from .loaders import (
    BACKENDS,
    BatchLoader,
    CleanAndAugmented,
    build_loader,
    choose_backend,
    epoch_permutation,
    infinite_batches,
    shard_ranges,
)

__all__ = [
    "BACKENDS",
    "DATASET_INFO",
    "IMAGE_EXTENSIONS",
    "PADDING_MODES",
    "AugmentConfig",
    "AugmentParams",
    "BatchLoader",
    "CleanAndAugmented",
    "DatasetError",
    "DatasetInfo",
    "DatasetNotFoundError",
    "ImageDataset",
    "apply_augment",
    "augment_seed",
    "build_loader",
    "choose_backend",
    "color_jitter",
    "dataset_defaults",
    "default_augment",
    "derive_seed",
    "epoch_permutation",
    "infinite_batches",
    "keyed_augment_params",
    "load_dataset",
    "random_flip",
    "random_translate",
    "sample_augment_params",
    "shard_ranges",
    "stratified_split",
]
