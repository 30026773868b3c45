"""FID and precision/recall against closed forms; the feature classifier's interface."""
import numpy as np
import pytest

from jdm_fast.metrics import (
    ClassifierFeatures,
    FeatureNet,
    FeatureNetConfig,
    fid_from_features,
    frechet_distance,
    knn_radii,
    precision_recall,
)


def test_frechet_distance_matches_closed_forms():
    rng = np.random.default_rng(0)
    d = 6
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    # Diagonal covariances: d^2 = |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2.
    a, b = rng.uniform(0.5, 2, d), rng.uniform(0.5, 2, d)
    expect = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expect, rel=1e-10)
    # Commuting full covariances S and c^2 S: d^2 = (1 - c)^2 tr(S).
    m = rng.normal(size=(d, d))
    s = m @ m.T + np.eye(d)
    assert frechet_distance(mu1, s, mu1, 4 * s) == pytest.approx(np.trace(s), rel=1e-8)
    assert frechet_distance(mu1, s, mu1, s) == pytest.approx(0.0, abs=1e-8)


def test_fid_of_a_set_with_itself_is_zero_and_grows_with_a_shift():
    f = np.random.default_rng(1).normal(size=(400, 8))
    assert abs(fid_from_features(f, f)) < 1e-8
    assert fid_from_features(f, f + 1.0) == pytest.approx(8.0, rel=1e-6)  # |shift|^2, same covariance


def test_precision_recall_of_a_set_with_itself_is_one_and_disjoint_sets_zero():
    f = np.random.default_rng(2).normal(size=(300, 5))
    assert precision_recall(f, f) == (1.0, 1.0)
    assert precision_recall(f, f + 100.0) == (0.0, 0.0)
    # Generated samples collapsed on a part of the real set: high precision, low recall.
    p, r = precision_recall(f, f[f[:, 0] > 1.0])
    assert p == 1.0 and r < 0.5


def test_precision_recall_with_precomputed_real_radii():
    rng = np.random.default_rng(3)
    real, fake = rng.normal(size=(200, 4)), rng.normal(size=(150, 4)) * 1.5
    import torch
    radii = knn_radii(torch.as_tensor(real, dtype=torch.float64), 3)
    # brute-force reference: a fake point is "precise" when it lies within the k-th-NN ball of a real point
    d_rr = np.linalg.norm(real[:, None] - real[None], axis=2)
    r_real = np.sort(d_rr, axis=1)[:, 3]
    assert np.allclose(radii.numpy(), r_real)
    want_p = float((np.linalg.norm(fake[:, None] - real[None], axis=2) <= r_real[None]).any(axis=1).mean())
    assert precision_recall(real, fake, real_radii=radii) == precision_recall(real, fake)
    assert precision_recall(real, fake, real_radii=radii)[0] == pytest.approx(want_p)
    with pytest.raises(ValueError, match=r"real_radii must have shape \(200,\)"):
        precision_recall(real, fake, real_radii=radii[:10])


def test_metrics_reject_bad_input():
    with pytest.raises(ValueError, match="feature dimensions differ"):
        precision_recall(np.zeros((10, 3)), np.zeros((10, 4)))
    with pytest.raises(ValueError, match="NaN"):
        fid_from_features(np.full((5, 2), np.nan), np.zeros((5, 2)))
    with pytest.raises(ValueError, match="mismatched statistics"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))


def test_classifier_features_shapes_and_name():
    net = FeatureNet(FeatureNetConfig(in_channels=1, num_classes=10))
    ext = ClassifierFeatures(net, "digits")
    imgs = np.random.default_rng(0).integers(0, 256, (7, 28, 28, 1), dtype=np.uint8)
    assert ext.name == "digits-features"
    assert ext.features(imgs).shape == (7, 128) and ext.features(imgs).dtype == np.float64
    assert ext.predict(imgs).shape == (7,)
    with pytest.raises(ValueError, match="uint8"):
        ext.features(imgs.astype(np.float32))


def test_inception_flag_without_torchvision_errors_clearly(tmp_path):
    import importlib.util

    if importlib.util.find_spec("torchvision") is not None:
        pytest.skip("torchvision is installed")
    from jdm_fast.metrics import InceptionFeatures

    w = tmp_path / "pt_inception.pth"
    w.write_bytes(b"x")
    with pytest.raises(ImportError, match="needs torchvision"):
        InceptionFeatures(w)
    with pytest.raises(FileNotFoundError, match="no file"):
        InceptionFeatures(tmp_path / "missing.pth")
