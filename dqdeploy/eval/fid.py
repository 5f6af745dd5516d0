"""Frechet distance between Gaussian fits of classifier features, and the digits-FID.

``frechet_distance`` is the FID formula
``|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2))``. The trace of the matrix square root is
taken as ``tr((S1^(1/2) S2 S1^(1/2))^(1/2))``, the same value, computed from symmetric
eigendecompositions: always real, and exact for singular (rank-deficient) covariances.
"""

from __future__ import annotations

import weakref

import numpy as np
import torch
from scipy import linalg

from ..core.errors import DQDeployError
from .digits import DigitsClassifier, load_classifier, load_digits_images, load_digits_labels

_REFERENCE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_CLASS_REFERENCE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_default: DigitsClassifier | None = None


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    w, v = linalg.eigh(sigma)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2) (covariances symmetric PSD)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise DQDeployError(f"Frechet distance needs means [D] and covariances [D, D] of one D; found "
                            f"{mu1.shape}, {s1.shape}, {mu2.shape}, {s2.shape}")
    if not all(np.isfinite(a).all() for a in (mu1, mu2, s1, s2)):
        raise DQDeployError("Frechet distance got non-finite statistics (NaN/inf features?)")
    s1, s2 = (s1 + s1.T) / 2, (s2 + s2.T) / 2
    r1 = _psd_sqrt(s1)
    inner = r1 @ s2 @ r1
    tr_covmean = float(np.sqrt(np.clip(linalg.eigvalsh((inner + inner.T) / 2), 0.0, None)).sum())
    diff = mu1 - mu2
    value = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)
    return max(value, 0.0)  # rounding can leave -1e-12 for identical inputs


def feature_stats(features: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``[D]`` and (unbiased) covariance ``[D, D]`` of features ``[N, D]``, float64."""
    f = (features.detach().cpu().double().numpy() if isinstance(features, torch.Tensor)
         else np.asarray(features, np.float64))
    if f.ndim != 2 or f.shape[0] < 2:
        raise DQDeployError(f"feature statistics need features [N >= 2, D], found shape {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1])


def _classifier(classifier: DigitsClassifier | None) -> DigitsClassifier:
    global _default
    if classifier is not None:
        return classifier
    if _default is None:
        _default = load_classifier()
    return _default


@torch.no_grad()
def classifier_features(images: torch.Tensor, classifier: DigitsClassifier | None = None,
                        batch_size: int = 500) -> torch.Tensor:
    """Classifier features ``[N, D]`` of digits images ``[N, 1, 16, 16]`` in [-1, 1]."""
    clf = _classifier(classifier)
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[0] == 0:
        raise DQDeployError(f"expected a non-empty image tensor [N, C, H, W], found "
                            f"{getattr(images, 'shape', type(images).__name__)}")
    was_training = clf.training
    clf.eval()
    x = images.detach().float().cpu()
    out = torch.cat([clf.features(x[i:i + batch_size]) for i in range(0, x.shape[0], batch_size)])
    clf.train(was_training)
    return out


def reference_stats(classifier: DigitsClassifier | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Feature mean and covariance of all 1797 real digits (cached per classifier)."""
    clf = _classifier(classifier)
    if clf not in _REFERENCE:
        real = load_digits_images(clf.config.image_size)
        _REFERENCE[clf] = feature_stats(classifier_features(real, clf))
    return _REFERENCE[clf]


def class_reference_stats(classifier: DigitsClassifier | None = None) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Per digit class, the feature mean and covariance of the real digits of that class (cached per classifier)."""
    clf = _classifier(classifier)
    if clf not in _CLASS_REFERENCE:
        feats = classifier_features(load_digits_images(clf.config.image_size), clf)
        labels = load_digits_labels()
        _CLASS_REFERENCE[clf] = {int(c): feature_stats(feats[labels == c]) for c in labels.unique()}
    return _CLASS_REFERENCE[clf]


def per_class_fid(features: torch.Tensor, labels: torch.Tensor, classifier: DigitsClassifier | None = None) -> float:
    """Mean over the asked-for classes of the Frechet distance between the features ``[N, D]`` of the samples asked
    for class ``c`` (``labels`` [N]) and the real digits of class ``c``: quality within each class, which a
    guidance scale's loss of diversity across classes does not hide."""
    if features.shape[0] != labels.shape[0]:
        raise DQDeployError(f"{features.shape[0]} feature rows but {labels.shape[0]} labels")
    if int(labels.bincount().max()) < 2 or int(labels.bincount()[labels.unique()].min()) < 2:
        raise DQDeployError("per-class FID needs at least two samples of every class asked for",
                            hint="sample at least 20 images (sample i asks for digit i % 10)")
    real = class_reference_stats(classifier)
    scores = [frechet_distance(*feature_stats(features[labels == c]), *real[int(c)]) for c in labels.unique()]
    return float(np.mean(scores))


def digits_fid(images: torch.Tensor, classifier: DigitsClassifier | None = None) -> float:
    """Digits-FID of ``images`` ``[N, 1, 16, 16]`` in [-1, 1] against the 1797 real digits."""
    mu, sigma = feature_stats(classifier_features(images, classifier))
    return frechet_distance(mu, sigma, *reference_stats(classifier))


@torch.no_grad()
def class_histogram(images: torch.Tensor, classifier: DigitsClassifier | None = None) -> dict[str, object]:
    """Predicted-class counts (``[10]`` list) and mean top-1 confidence of ``images``."""
    clf = _classifier(classifier)
    was_training = clf.training
    clf.eval()
    probs = clf.head(classifier_features(images, clf)).softmax(-1)
    clf.train(was_training)
    counts = torch.bincount(probs.argmax(1), minlength=clf.config.num_classes)
    return {"counts": counts.tolist(), "mean_confidence": float(probs.max(1).values.mean())}
