"""Sample-quality metrics: Fréchet distance, improved precision/recall, feature extractors."""
from .features import (
    FEATURE_CLASSIFIER_NAME,
    ClassifierFeatures,
    FeatureNet,
    FeatureNetConfig,
    InceptionFeatures,
    get_feature_classifier,
    load_feature_classifier,
    save_feature_classifier,
    train_feature_classifier,
)
from .fid import feature_statistics, fid_from_features, frechet_distance
from .precision_recall import knn_radii, precision_recall

__all__ = [
    "FEATURE_CLASSIFIER_NAME",
    "ClassifierFeatures",
    "FeatureNet",
    "FeatureNetConfig",
    "InceptionFeatures",
    "feature_statistics",
    "fid_from_features",
    "frechet_distance",
    "get_feature_classifier",
    "knn_radii",
    "load_feature_classifier",
    "precision_recall",
    "save_feature_classifier",
    "train_feature_classifier",
]
