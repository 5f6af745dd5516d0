"""Image-quality evaluation on scikit-learn's digits: data, a small classifier, digits-FID, PNG grids.

The digits DDPM and classifier that these helpers use ship in ``dqdeploy/assets``; they are
trained (reproducibly) by ``python scripts/train_digits.py``.
"""

from .digits import (
    DigitsClassifier,
    classifier_accuracy,
    classifier_dir,
    digits_model_dir,
    digits_split,
    load_classifier,
    load_digits_images,
    load_digits_labels,
    save_classifier,
)
from .fid import class_histogram, classifier_features, digits_fid, feature_stats, frechet_distance, reference_stats
from .grid import save_grid

__all__ = [
    "DigitsClassifier",
    "class_histogram",
    "classifier_accuracy",
    "classifier_dir",
    "classifier_features",
    "digits_fid",
    "digits_model_dir",
    "digits_split",
    "feature_stats",
    "frechet_distance",
    "load_classifier",
    "load_digits_images",
    "load_digits_labels",
    "reference_stats",
    "save_classifier",
    "save_grid",
]
