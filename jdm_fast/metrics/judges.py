"""Judges: independent classifiers that read the class of generated images.

Conditional samples are steered by the model's own head; whether they show the target class is
judged by classifiers the model never saw, trained on the dataset's train split. One family can
share blind spots with the head (or be fooled the same way), so there are several:

- ``cnn``: the project's feature classifier (:mod:`jdm_fast.metrics.features`), a small CNN;
  named ``"<dataset>-features"`` (the name its ``class_consistency[...]`` key always had).
- ``knn``: k-nearest neighbours (k = 5, Euclidean) on raw pixels. No learned features, no
  convolution: it says whether a sample looks like training images of its class pixel by pixel.
  NumPy only; distances are computed exactly on the integer pixel values (float64 holds them
  without rounding), so predictions do not depend on BLAS threads or summation order.
- ``svm``: an RBF-kernel SVM (one-vs-one, C = 5, gamma = "scale") on pixels in [0, 1], fitted
  with scikit-learn (``pip install 'jdm_fast[eval]'``); predictions are computed here in NumPy
  from the stored support vectors, so a cached SVM judge runs without scikit-learn.

Each judge is cached as a data-only safetensors file next to the feature classifier
(``judge_knn.safetensors``, ``judge_svm.safetensors``): arrays and a JSON metadata string, never
pickled objects. The pixel judges train on at most ``MAX_TRAIN`` images (a stratified, seeded
subset of larger train splits). Images are uint8 arrays (N, H, W, C), as in ``samples.npz``.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from jdm_fast.checkpoint import atomic_write

JUDGE_IDS = ("cnn", "knn", "svm")
SKLEARN_HINT = "pip install 'jdm_fast[eval]' (scikit-learn)"
MAX_TRAIN = 10_000
KNN_K = 5
SVM_C = 5.0
_FORMAT = "jdm_fast-judge-1"


@runtime_checkable
class Judge(Protocol):
    """A classifier of uint8 (N, H, W, C) images. ``id`` is one of :data:`JUDGE_IDS`; ``name``
    keys its results (``class_consistency[<name>]``); ``info`` holds how it was trained."""

    id: str
    name: str
    info: dict

    def predict(self, images: np.ndarray) -> np.ndarray: ...


def sklearn_available() -> bool:
    try:
        import sklearn.svm  # noqa: F401
    except ImportError:
        return False
    return True


class CNNJudge:
    """The feature classifier (:class:`~jdm_fast.metrics.features.ClassifierFeatures`) as a judge."""

    id = "cnn"

    def __init__(self, classifier):
        self.classifier = classifier
        self.name = classifier.name
        self.info = {"family": "CNN (the feature classifier)", **{k: classifier.info.get(k) for k in
                                                                  ("dataset", "seed", "steps", "train_seconds")}}

    def predict(self, images: np.ndarray) -> np.ndarray:
        return np.asarray(self.classifier.predict(images), dtype=np.int64)


def _flat(images: np.ndarray, shape: tuple, name: str) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"{name}: images must be uint8 (N, H, W, C), got {images.dtype} {images.shape}")
    if tuple(images.shape[1:]) != tuple(shape):
        raise ValueError(f"{name}: trained on images of shape {tuple(shape)}, got {tuple(images.shape[1:])}")
    return images.reshape(len(images), -1).astype(np.float64)


def _rows(images: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    """The reference images of a pixel judge as float64 rows, and their squared norms."""
    flat = _flat(images, images.shape[1:], name)
    return flat, (flat * flat).sum(1)


def _sq_distances(x: np.ndarray, ref: np.ndarray, ref_sq: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances (len(x), len(ref)) of integer-valued float64 rows: exact (every
    partial sum is an integer below 2**53), whatever order BLAS sums in."""
    return (x * x).sum(1)[:, None] + ref_sq[None, :] - 2.0 * (x @ ref.T)


@dataclass
class KNNJudge:
    """k-nearest neighbours on raw pixels; a tie in the vote goes to the tied class whose member is
    nearest (a tie in distance to the lower training index)."""

    train_images: np.ndarray  # uint8 (N, H, W, C)
    train_labels: np.ndarray  # int64 (N,)
    num_classes: int
    dataset: str
    k: int = KNN_K
    info: dict = field(default_factory=dict)
    batch_size: int = 500
    id = "knn"

    def __post_init__(self):
        self.name = f"knn{self.k}-pixels"
        self._ref, self._ref_sq = _rows(self.train_images, self.name)
        self.info = {"family": f"k-NN (k = {self.k}, Euclidean) on raw pixels", **self.info}

    def predict(self, images: np.ndarray) -> np.ndarray:
        x = _flat(images, self.train_images.shape[1:], self.name)
        out = np.empty(len(x), np.int64)
        k = min(self.k, len(self._ref))
        for i in range(0, len(x), self.batch_size):
            d = _sq_distances(x[i:i + self.batch_size], self._ref, self._ref_sq)
            nn = np.argsort(d, axis=1, kind="stable")[:, :k]  # nearest first, ties by training index
            votes = self.train_labels[nn]  # (b, k)
            counts = np.zeros((len(votes), self.num_classes), np.int64)
            np.add.at(counts, (np.arange(len(votes))[:, None], votes), 1)
            # among the classes with the most votes, the one whose first vote comes earliest (nearest)
            tied = counts[np.arange(len(votes))[:, None], votes] == counts.max(1, keepdims=True)
            out[i:i + len(votes)] = votes[np.arange(len(votes)), tied.argmax(1)]
        return out

    def arrays(self) -> dict:
        return {"train_images": self.train_images, "train_labels": self.train_labels}

    def params(self) -> dict:
        return {"k": self.k, "num_classes": self.num_classes, "dataset": self.dataset}


@dataclass
class SVMJudge:
    """An RBF SVM (one-vs-one, libsvm's voting) evaluated in NumPy from its fitted parameters."""

    support_images: np.ndarray  # uint8 (S, H, W, C), grouped by class as libsvm orders them
    n_support: np.ndarray  # int64 (K,)
    dual_coef: np.ndarray  # float64 (K - 1, S)
    intercept: np.ndarray  # float64 (K (K - 1) / 2,)
    classes: np.ndarray  # int64 (K,)
    gamma: float  # for pixels in [0, 1]
    dataset: str
    C: float = SVM_C
    info: dict = field(default_factory=dict)
    batch_size: int = 500
    id = "svm"

    def __post_init__(self):
        self.name = "svm-rbf-pixels"
        self._sv, self._sv_sq = _rows(self.support_images, self.name)
        self.info = {"family": f"RBF SVM (C = {self.C:g}, gamma = {self.gamma:.4g}) on pixels in [0, 1]", **self.info}

    def decision_function(self, images: np.ndarray) -> np.ndarray:
        """One-vs-one decision values (N, K (K - 1) / 2), pairs (0,1), (0,2), ..., (K-2,K-1): > 0
        votes for the first class of the pair (libsvm's convention)."""
        x = _flat(images, self.support_images.shape[1:], self.name)
        starts = np.concatenate([[0], np.cumsum(self.n_support)])
        K = len(self.classes)
        out = np.empty((len(x), K * (K - 1) // 2))
        for b in range(0, len(x), self.batch_size):
            d = _sq_distances(x[b:b + self.batch_size], self._sv, self._sv_sq)
            kern = np.exp(-self.gamma * np.maximum(d, 0.0) / (255.0 * 255.0))
            p = 0
            for i in range(K):
                si = slice(starts[i], starts[i + 1])
                for j in range(i + 1, K):
                    sj = slice(starts[j], starts[j + 1])
                    out[b:b + len(d), p] = (kern[:, si] @ self.dual_coef[j - 1, si] + kern[:, sj] @ self.dual_coef[i, sj]
                                            + self.intercept[p])
                    p += 1
        return out

    def predict(self, images: np.ndarray) -> np.ndarray:
        dec = self.decision_function(images)
        K = len(self.classes)
        votes = np.zeros((len(dec), K), np.int64)
        p = 0
        for i in range(K):
            for j in range(i + 1, K):
                votes[:, i] += dec[:, p] > 0
                votes[:, j] += dec[:, p] <= 0
                p += 1
        return self.classes[votes.argmax(1)]  # first of the most-voted classes, as libsvm

    def arrays(self) -> dict:
        return {"support_images": self.support_images, "n_support": self.n_support, "dual_coef": self.dual_coef,
                "intercept": self.intercept, "classes": self.classes}

    def params(self) -> dict:
        return {"gamma": self.gamma, "C": self.C, "dataset": self.dataset}


_KINDS = {"knn": KNNJudge, "svm": SVMJudge}


def _train_subset(labels: np.ndarray, max_train: int, seed: int) -> np.ndarray:
    if len(labels) <= max_train:
        return np.arange(len(labels))
    from jdm_fast.data import stratified_split

    keep, _ = stratified_split(labels, 1.0 - max_train / len(labels), seed)
    return keep


def fit_judge(kind: str, dataset: str, data_dir: str | None = None, *, max_train: int = MAX_TRAIN, seed: int = 0,
              log=print):
    """Fit the pixel judge ``kind`` ("knn" or "svm") on ``dataset``'s train split (at most
    ``max_train`` images, a stratified subset chosen by ``seed``); deterministic."""
    from jdm_fast.data import load_dataset

    if kind not in _KINDS:
        raise ValueError(f"unknown pixel judge {kind!r}; pick from {sorted(_KINDS)}")
    if kind == "svm" and not sklearn_available():
        raise ImportError(f"the svm judge needs scikit-learn to be fitted: {SKLEARN_HINT}")
    train = load_dataset(dataset, "train", data_dir)
    idx = _train_subset(train.labels, max_train, seed)
    images, labels = np.ascontiguousarray(train.images[idx]), np.ascontiguousarray(train.labels[idx])
    info = {"dataset": dataset, "train_size": int(len(idx)), "train_split_size": int(len(train)), "seed": seed}
    start = time.perf_counter()
    if kind == "knn":
        judge = KNNJudge(images, labels, train.num_classes, dataset, info=info)
    else:
        from sklearn.svm import SVC

        if len(np.unique(labels)) < 2:
            raise ValueError(f"the svm judge needs two or more classes in {dataset!r}'s train split")

        x = _flat(images, images.shape[1:], "svm judge") / 255.0
        svc = SVC(C=SVM_C, kernel="rbf", gamma="scale").fit(x, labels)
        judge = SVMJudge(images[svc.support_], svc.n_support_.astype(np.int64), np.asarray(svc.dual_coef_, np.float64),
                         np.asarray(svc.intercept_, np.float64), svc.classes_.astype(np.int64), float(svc._gamma),
                         dataset, info=info)
    judge.info["fit_seconds"] = time.perf_counter() - start
    log(f"judge {judge.name}: fitted on {len(idx)} train images in {judge.info['fit_seconds']:.1f}s")
    return judge


def save_judge(path: Path, judge) -> None:
    from safetensors.numpy import save

    meta = {"format": _FORMAT, "kind": judge.id, "params": judge.params(), "info": judge.info}
    arrays = {k: np.ascontiguousarray(v) for k, v in judge.arrays().items()}
    blob = save(arrays, metadata={"jdm_fast_judge": json.dumps(meta)})
    atomic_write(Path(path), lambda f: f.write(blob))


def load_judge(path: Path):
    """A judge from its safetensors file (arrays and JSON only: nothing in it can run code)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no judge at {path}")
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = json.loads((f.metadata() or {})["jdm_fast_judge"])
            arrays = {k: f.get_tensor(k) for k in f.keys()}
        if meta.get("format") != _FORMAT or meta.get("kind") not in _KINDS:
            raise KeyError("format")
        info = {k: v for k, v in meta["info"].items() if k != "family"}
        return _KINDS[meta["kind"]](**arrays, **meta["params"], info=info)
    except Exception as e:  # a foreign or damaged file: say what it is not
        raise RuntimeError(f"{path} is not a jdm_fast judge file ({type(e).__name__}: {e})") from e


def judge_path(folder: Path, kind: str) -> Path:
    return Path(folder) / f"judge_{kind}.safetensors"


def plan_judges(ids: list[str] | None, folder: Path, retrain: bool = False) -> tuple[list[str], dict[str, str]]:
    """Which judges can run: ``(ids, skipped)``. ``ids=None`` asks for every judge that can run
    here (a judge that cannot is listed in ``skipped`` with the reason); an explicit list must run
    in full, else ImportError says what to install. Cheap: call it before any work."""
    wanted = list(JUDGE_IDS) if ids is None else list(dict.fromkeys(ids))
    unknown = [i for i in wanted if i not in JUDGE_IDS]
    if unknown:
        raise ValueError(f"unknown judges {unknown}; pick from {list(JUDGE_IDS)}")
    skipped = {}
    if "svm" in wanted and not sklearn_available() and (retrain or not judge_path(folder, "svm").is_file()):
        if ids is not None:
            raise ImportError(f"--judges svm needs scikit-learn, which is not installed: {SKLEARN_HINT}")
        skipped["svm"] = f"scikit-learn is not installed: {SKLEARN_HINT}"
        wanted.remove("svm")
    return wanted, skipped


def get_judges(ids: list[str], folder: Path, dataset: str, data_dir: str | None = None, *, cnn=None,
               retrain: bool = False, log=print) -> list:
    """The judges ``ids`` (from :func:`plan_judges`) for ``dataset``: the cached pixel judges in
    ``folder`` (fitted and cached there when missing or ``retrain``), and ``cnn`` (a
    ``ClassifierFeatures``) wrapped as the ``cnn`` judge."""
    judges = []
    for kind in ids:
        if kind == "cnn":
            if cnn is None:
                raise ValueError("the cnn judge needs the feature classifier (cnn=...)")
            judges.append(CNNJudge(cnn))
            continue
        path = judge_path(folder, kind)
        if path.is_file() and not retrain:
            judge = load_judge(path)
            if judge.dataset != dataset:
                raise ValueError(f"{path} was fitted on {judge.dataset!r}, not {dataset!r}; "
                                 "pass --train-judges to refit it")
        else:
            judge = fit_judge(kind, dataset, data_dir, log=log)
            path.parent.mkdir(parents=True, exist_ok=True)
            save_judge(path, judge)
            log(f"judge {judge.name} cached at {path}")
        judges.append(judge)
    return judges


def class_agreement(predictions: dict[str, np.ndarray], targets: np.ndarray, num_classes: int) -> dict:
    """How often each judge reads the target, overall and per target class.

    ``predictions``: judge name -> predicted classes (N,); ``targets``: (N,) class ids >= 0.
    Returns ``{"overall": {name: fraction}, "per_class": [{"class", "count", "agree": {name: int},
    "agreement": {name: fraction or None}}], "confusion": {name: K x K counts (row: target,
    column: read as)}}``; classes without samples keep count 0 and agreement None."""
    targets = np.asarray(targets, np.int64)
    if targets.ndim != 1 or (targets < 0).any() or (targets >= num_classes).any():
        raise ValueError(f"targets must be class ids in [0, {num_classes}), got {targets}")
    counts = np.bincount(targets, minlength=num_classes)
    out = {"overall": {}, "per_class": [], "confusion": {}}
    per = {}
    for name, pred in predictions.items():
        pred = np.asarray(pred, np.int64)
        if pred.shape != targets.shape:
            raise ValueError(f"{name}: {pred.shape} predictions for {targets.shape} targets")
        hit = pred == targets
        out["overall"][name] = float(hit.mean()) if len(targets) else float("nan")
        per[name] = np.bincount(targets[hit], minlength=num_classes)
        conf = np.zeros((num_classes, num_classes), np.int64)
        np.add.at(conf, (targets, np.clip(pred, 0, num_classes - 1)), 1)
        out["confusion"][name] = conf.tolist()
    for c in range(num_classes):
        n = int(counts[c])
        out["per_class"].append({"class": c, "count": n, "agree": {k: int(v[c]) for k, v in per.items()},
                                 "agreement": {k: (float(v[c] / n) if n else None) for k, v in per.items()}})
    return out


def judge_report(judges: list, images: np.ndarray, labels: np.ndarray, num_classes: int) -> dict:
    """Each judge on real labelled images (the test split): accuracy, per-class accuracy, predict
    time, and how it was trained."""
    report = {}
    for j in judges:
        t0 = time.perf_counter()
        pred = j.predict(images)
        seconds = time.perf_counter() - t0
        agg = class_agreement({j.name: pred}, labels, num_classes)
        report[j.name] = {"id": j.id, "test_accuracy": agg["overall"][j.name],
                          "test_accuracy_per_class": [r["agreement"][j.name] for r in agg["per_class"]],
                          "predict_seconds": seconds, "num_test": int(len(labels)), **j.info}
    return report
