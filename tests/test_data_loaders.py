"""The loader contract across backends (tensor, torch, DALI's CPU-only pipelines), DALI's file
pipeline on a generated PNG/JPEG folder, the auto choice and the DALI fallback, and bad input."""
from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from jdm_fast.data import (
    AugmentConfig,
    AugmentParams,
    CleanAndAugmented,
    DatasetError,
    ImageDataset,
    apply_augment,
    build_loader,
    choose_backend,
    infinite_batches,
    load_dataset,
    sample_augment_params,
    shard_ranges,
)
from jdm_fast.data import dali_pipelines, loaders

HAVE_DALI = dali_pipelines.dali_unavailable_reason() is None
needs_dali = pytest.mark.skipif(not HAVE_DALI, reason="NVIDIA DALI is not installed here")
BACKENDS = ["tensor", "torch", pytest.param("dali", marks=needs_dali)]
CIFAR_LIKE = AugmentConfig(flip=True, pad=2, padding_mode="reflect", brightness=0.1, contrast=0.1)


@pytest.fixture(scope="module")
def indexed() -> ImageDataset:
    """53 random 6x6 RGB images whose labels are their indices."""
    n = 53
    images = np.random.default_rng(8).integers(0, 256, (n, 6, 6, 3), dtype=np.uint8)
    return ImageDataset(images, np.arange(n, dtype=np.int64), n, "indexed")


@pytest.fixture(scope="module")
def digits() -> ImageDataset:
    return load_dataset("digits", "train")


def _epoch(loader, epoch: int | None = None, skip: int = 0) -> list[tuple[torch.Tensor, ...]]:
    it = iter(loader) if epoch is None else loader.iter_epoch(epoch, skip)
    return [(x.clone(), y.clone()) for x, y in it]


def _same(a, b, atol: float = 0.0) -> bool:
    return len(a) == len(b) and all(
        torch.equal(y, v) and (torch.equal(x, u) if atol == 0 else torch.allclose(x, u, atol=atol))
        for (x, y), (u, v) in zip(a, b)
    )


def _expected(ds: ImageDataset, y: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(ds.images[y.numpy()]).permute(0, 3, 1, 2) / 127.5 - 1


# ---------------------------------------------------------------------------------------------
# the contract, for every backend


@pytest.mark.parametrize("drop_last", [True, False])
@pytest.mark.parametrize("num_shards", [1, 2])
@pytest.mark.parametrize("backend", BACKENDS)
def test_exactly_once_per_epoch(indexed, backend, num_shards, drop_last):
    shards = [
        _epoch(build_loader(indexed, 8, backend=backend, shard=(i, num_shards), seed=2,
                            drop_last=drop_last, augment=True, augment_config=CIFAR_LIKE))
        for i in range(num_shards)
    ]
    ids = [y.tolist() for batches in shards for _, y in batches]
    flat = sum(ids, [])
    assert len(flat) == len(set(flat))  # disjoint within and across shards
    steps = 53 // (8 * num_shards)
    if drop_last:
        assert len(flat) == steps * 8 * num_shards
        assert all(len(batches) == steps for batches in shards)
    else:
        assert sorted(flat) == list(range(53))  # the remainder is yielded too
        rest = 53 - steps * 8 * num_shards
        assert sum(len(batches[-1][1]) for batches in shards) == rest
    for batches in shards:
        for x, y in batches:
            assert x.dtype == torch.float32 and y.dtype == torch.int64
            assert x.shape == (len(y), 3, 6, 6) and -1 <= x.min() and x.max() <= 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_values_labels_and_layout_match_the_reader(indexed, backend):
    batches = _epoch(build_loader(indexed, 16, backend=backend, seed=1, drop_last=False, augment=False))
    for x, y in batches:
        assert torch.equal(x, _expected(indexed, y))  # exact uint8 -> [-1, 1], NCHW
    x, _ = next(iter(build_loader(indexed, 16, backend=backend, channels_last=True, augment=False)))
    assert x.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("backend", BACKENDS)
def test_digits_labels_and_range(digits, backend):
    loader = build_loader(digits, 500, backend=backend, seed=3, drop_last=False, augment=True)
    labels = []
    for x, y in loader:
        assert x.shape[1:] == (1, 28, 28) and x.dtype == torch.float32
        assert x.min() == -1 and x.max() <= 1  # black background survives the 2-pixel shifts
        labels.append(y)
    assert torch.equal(torch.cat(labels).sort().values, torch.from_numpy(np.sort(digits.labels)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_flips_really_flip(indexed, backend):
    cfg = AugmentConfig(flip=True)
    for x, y in build_loader(indexed, 16, backend=backend, augment=True, augment_config=cfg,
                             drop_last=False):
        ref = _expected(indexed, y)
        mirrored = torch.tensor([torch.equal(a, r.flip(-1)) for a, r in zip(x, ref)])
        same = torch.tensor([torch.equal(a, r) for a, r in zip(x, ref)])
        assert bool((mirrored ^ same).all())  # random images: never both
        assert 0 < int(mirrored.sum()) < len(y)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shard", [(0, 1), (1, 2)])
def test_reproducible_and_skip_batches_exact(indexed, backend, shard):
    kw = dict(backend=backend, shard=shard, seed=4, augment=True, augment_config=CIFAR_LIKE,
              drop_last=False)
    loader = build_loader(indexed, 4, epoch=3, **kw)
    full = _epoch(loader)
    assert _same(_epoch(loader), full)  # same (seed, epoch): same order and augmentation
    assert _same(_epoch(build_loader(indexed, 4, epoch=3, skip_batches=2, **kw)), full[2:])
    assert _same(_epoch(loader, epoch=3, skip=len(full) - 1), full[-1:])
    other = _epoch(loader, epoch=4)
    assert not torch.equal(torch.cat([y for _, y in other]), torch.cat([y for _, y in full]))
    partial = iter(loader)  # an abandoned epoch does not disturb the next one
    next(partial)
    assert _same(_epoch(loader), full)


@needs_dali
@pytest.mark.parametrize(
    "cfg",
    [None, AugmentConfig(flip=True, pad=2, padding_mode="constant"),
     AugmentConfig(pad=3, padding_mode="replicate"), AugmentConfig(pad=1, padding_mode="reflect"),
     CIFAR_LIKE],
    ids=["plain", "flip+constant", "replicate", "reflect", "cifar-like"],
)
def test_dali_matches_tensor_backend_on_cpu(indexed, cfg):
    """Same samples per batch and the same keyed augmentation draws (counter-based: the same on
    every device; here on the CPU, the device DALI's CPU-only mode runs on)."""
    kw = dict(seed=6, shard=(1, 2), drop_last=False, augment=cfg is not None, augment_config=cfg)
    dali = _epoch(build_loader(indexed, 8, backend="dali", **kw))
    tensor = _epoch(build_loader(indexed, 8, backend="tensor", **kw))
    jitter = cfg is not None and cfg.brightness > 0
    assert _same(dali, tensor, atol=1e-6 if jitter else 0.0)  # jitter: float rounding only


def test_sample_augment_params_are_what_apply_augment_draws():
    x = torch.rand(9, 3, 5, 5) * 2 - 1
    out = apply_augment(x, CIFAR_LIKE, torch.Generator().manual_seed(3))
    p = sample_augment_params(CIFAR_LIKE, 9, torch.Generator().manual_seed(3))
    ref = torch.where(p.flip[:, None, None, None], x.flip(-1), x)
    padded = torch.nn.functional.pad(ref, (2, 2, 2, 2), mode="reflect")
    ref = torch.stack([s[:, dy:dy + 5, dx:dx + 5] for s, (dy, dx) in zip(padded, p.offsets.tolist())])
    mean = ref.mean(dim=(1, 2, 3), keepdim=True)
    ref = ((ref - mean) * p.scale.view(-1, 1, 1, 1) + mean + p.shift.view(-1, 1, 1, 1)).clamp(-1, 1)
    assert torch.allclose(out, ref, atol=1e-6)


def _keyed_params(cfg: AugmentConfig, seed: int, epoch: int, first: int, n: int) -> AugmentParams:
    """The parameters the module docstrings promise for positions first .. first + n - 1 of epoch
    ``epoch``, computed from the NumPy Philox reference and the documented mapping."""
    from jdm_fast.data.seeds import AUG_TAG, derive_seed
    from jdm_fast.ops.philox import counter_uniform

    u = counter_uniform(derive_seed(seed, epoch, AUG_TAG), AUG_TAG, first, n, 5)
    v = (u[:, 3:5] * 2 - 1).astype(np.float32)
    return AugmentParams(
        torch.from_numpy(u[:, 0] < 0.5) if cfg.flip else None,
        torch.from_numpy((u[:, 1:3] * 2**24).astype(np.int64) * (2 * cfg.pad + 1) >> 24) if cfg.pad else None,
        torch.from_numpy(np.float32(2 * cfg.brightness) * v[:, 0]),
        torch.from_numpy(np.float32(1) + np.float32(cfg.contrast) * v[:, 1]),
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shard", [(0, 1), (1, 2)])
def test_keep_clean_yields_the_clean_batch_and_its_keyed_augmentation(indexed, backend, shard):
    """keep_clean=True: x is the un-augmented loader's batch, x_aug the augment=True loader's batch,
    and x_aug is apply_augment(x) with the keyed parameters of the examples' epoch positions
    (computed here from the NumPy Philox reference)."""
    kw = dict(backend=backend, shard=shard, seed=9, epoch=2, drop_last=False)
    both = list(build_loader(indexed, 8, augment=True, augment_config=CIFAR_LIKE, keep_clean=True, **kw))
    plain = _epoch(build_loader(indexed, 8, augment=False, **kw))
    augmented = _epoch(build_loader(indexed, 8, augment=True, augment_config=CIFAR_LIKE, **kw))
    ranges = shard_ranges(len(indexed), 8, *shard, drop_last=False)
    assert len(both) == len(plain) == len(augmented) == len(ranges)
    jitter_atol = 1e-6 if backend == "dali" else 0.0  # DALI's jitter arithmetic rounds its own way
    for batch, (x, y), (x_aug, _), (lo, hi) in zip(both, plain, augmented, ranges):
        assert isinstance(batch, CleanAndAugmented)
        assert torch.equal(batch.x, x) and torch.equal(batch.y, y) and torch.equal(batch.x_aug, x_aug)
        ref = apply_augment(x, CIFAR_LIKE, params=_keyed_params(CIFAR_LIKE, 9, 2, lo, hi - lo))
        assert torch.allclose(batch.x_aug, ref, rtol=0, atol=jitter_atol) if jitter_atol else torch.equal(batch.x_aug, ref)
        assert not torch.equal(batch.x_aug, batch.x)
    off = next(iter(build_loader(indexed, 8, augment=False, keep_clean=True, **kw)))
    assert off.x_aug is None and torch.equal(off.x, plain[0][0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_augmentation_is_a_function_of_the_example_not_of_the_batching(indexed, backend):
    """An example's augmented image is the same for 1 process x 12, 3 processes x 4 or 2 x 6 per
    step (same global order): what makes augmented training independent of the world size."""
    def images(batch_size, shards):
        out = {}
        for i in range(shards):
            for x, y, x_aug in build_loader(indexed, batch_size, backend=backend, shard=(i, shards), seed=3,
                                            epoch=1, augment=True, augment_config=CIFAR_LIKE, keep_clean=True):
                out.update({int(k): (a, b) for k, a, b in zip(y, x, x_aug)})
        return out

    single = images(12, 1)
    assert len(single) == 48
    for batch_size, shards in ((4, 3), (6, 2)):
        other = images(batch_size, shards)
        assert other.keys() == single.keys()
        for k, (x, x_aug) in other.items():
            assert torch.equal(x, single[k][0]) and torch.equal(x_aug, single[k][1]), (batch_size, shards, k)


@pytest.mark.parametrize("backend", BACKENDS)
def test_infinite_clean_and_augmented_batches_resume_exactly(indexed, backend):
    kw = dict(backend=backend, augment=True, augment_config=CIFAR_LIKE, keep_clean=True, shard=(1, 2))
    stream = infinite_batches(indexed, 8, seed=7, **kw)  # 3 steps per epoch
    reference = [next(stream) for _ in range(8)]
    resumed = infinite_batches(indexed, 8, seed=7, start_step=4, **kw)
    for got, want in zip([next(resumed) for _ in range(4)], reference[4:]):
        assert all(torch.equal(a, b) for a, b in zip(got, want))


# ---------------------------------------------------------------------------------------------
# DALI's file pipeline on a generated folder


def _write_folder(root: Path, gray: bool = False) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for c, cls in enumerate(("cat", "dog")):
        (root / cls).mkdir(parents=True)
        for i in range(5):
            shape = (4, 4) if gray else (4, 4, 3)
            img = np.kron(rng.integers(0, 256, shape, dtype=np.uint8),  # 4x4 blocks: JPEG-friendly
                          np.ones((4, 4) if gray else (4, 4, 1), np.uint8))
            ext = ".jpg" if (i + c) % 2 else ".png"
            Image.fromarray(img).save(root / cls / f"{i}{ext}", quality=95)


@needs_dali
@pytest.mark.parametrize("gray", [False, True], ids=["rgb", "gray"])
def test_dali_file_pipeline_png_and_jpeg(tmp_path, gray):
    _write_folder(tmp_path, gray)
    ds = load_dataset(str(tmp_path), "train")
    assert {Path(f).suffix for f in ds.files} == {".png", ".jpg"}
    for cfg in (None, AugmentConfig(flip=True, pad=2, padding_mode="reflect")):
        kw = dict(seed=1, drop_last=False, augment=cfg is not None, augment_config=cfg)
        loader = build_loader(ds, 3, backend="dali", **kw)
        assert loader._dali.reads_files  # decoded by DALI, not taken from ds.images
        got = _epoch(loader)
        want = _epoch(build_loader(ds, 3, backend="tensor", **kw))
        assert [y.tolist() for _, y in got] == [y.tolist() for _, y in want]  # reader's labels
        assert sorted(torch.cat([y for _, y in got]).tolist()) == sorted(ds.labels.tolist())
        for (x, _), (u, _) in zip(got, want):
            assert x.shape == u.shape == (x.shape[0], 1 if gray else 3, 16, 16)
            # PNG is lossless; JPEG decoders may round differently (here both are libjpeg-turbo)
            assert (x - u).abs().max() <= 4 / 127.5


@needs_dali
def test_dali_file_pipeline_names_a_broken_file(tmp_path):
    _write_folder(tmp_path)
    ds = load_dataset(str(tmp_path), "train")
    Path(ds.files[2]).write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")  # broken after loading
    with pytest.raises(DatasetError, match=Path(ds.files[2]).name):
        _epoch(build_loader(ds, 4, backend="dali", drop_last=False))
    Path(ds.files[2]).unlink()  # missing file
    with pytest.raises(DatasetError, match=Path(ds.files[2]).name):
        _epoch(build_loader(ds, 4, backend="dali", drop_last=False))


def test_folder_errors_through_the_loader(tmp_path):
    (tmp_path / "empty").mkdir()
    for backend in ("tensor", "dali") if HAVE_DALI else ("tensor",):
        with pytest.raises(DatasetError, match="no class subfolders"):
            build_loader(str(tmp_path / "empty"), 4, backend=backend)
    _write_folder(tmp_path / "bad")
    (tmp_path / "bad" / "cat" / "zz.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(DatasetError, match=r"zz\.png"):
        build_loader(str(tmp_path / "bad"), 4, backend="auto")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shard", [(2, 2), (0, 0), (-1, 2), (0,), "0/2", (0.0, 1), (0, 1, 2)])
def test_bad_shard_arguments(indexed, backend, shard):
    with pytest.raises(ValueError, match=r"shard must be \(index, count\)"):
        build_loader(indexed, 4, backend=backend, shard=shard)


# ---------------------------------------------------------------------------------------------
# auto and the DALI fallback


def test_auto_choice(indexed, monkeypatch):
    assert choose_backend(indexed, "cpu") == "tensor"
    assert build_loader(indexed, 4).backend == "tensor"
    cuda = torch.device("cuda", 0)
    # On CUDA: tensor when the set fits in a quarter of the free memory, else DALI.
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d=None: (4 * indexed.images.nbytes, 0))
    assert choose_backend(indexed, cuda) == "tensor"
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d=None: (indexed.images.nbytes, 0))
    monkeypatch.setattr(dali_pipelines, "dali_unavailable_reason", lambda: None)
    assert choose_backend(indexed, cuda) == "dali"
    monkeypatch.setattr(dali_pipelines, "dali_unavailable_reason",
                        lambda: "NVIDIA DALI is not installed")
    monkeypatch.setattr(loaders, "_fallback_warned", False)
    with pytest.warns(RuntimeWarning, match=r"(?s)would stream.*not installed.*torch DataLoader"):
        assert choose_backend(indexed, cuda) == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one message per process, not one per loader
        assert choose_backend(indexed, cuda) == "torch"


def test_explicit_dali_without_dali_fails_clearly(indexed, monkeypatch):
    monkeypatch.setattr(dali_pipelines, "dali_unavailable_reason",
                        lambda: "NVIDIA DALI is not installed (No module named 'nvidia')")
    with pytest.raises(ImportError, match=r"backend='dali'.*nvidia-dali-cuda130.*not installed"):
        build_loader(indexed, 4, backend="dali")


def test_everything_works_where_dali_cannot_be_imported():
    code = (
        "import sys; sys.modules['nvidia.dali'] = None\n"  # makes `import nvidia.dali` fail
        "import numpy as np\n"
        "from jdm_fast.data import ImageDataset, build_loader, dali_pipelines\n"
        "assert 'not installed' in dali_pipelines.dali_unavailable_reason()\n"
        "ds = ImageDataset(np.zeros((8, 4, 4, 1), np.uint8), np.zeros(8, np.int64), 1, 'z')\n"
        "assert len(list(build_loader(ds, 4, backend='auto', augment=False))) == 2\n"
        "try:\n"
        "    build_loader(ds, 4, backend='dali', augment=False)\n"
        "except ImportError as e:\n"
        "    print('ERR', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "ERR backend='dali' needs NVIDIA DALI (nvidia-dali-cuda130" in out.stdout
