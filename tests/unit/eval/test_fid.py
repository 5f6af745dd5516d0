"""FID math against closed forms, and the digits-FID on real data vs noise."""

import numpy as np
import pytest
import torch
from scipy import linalg

from dqdeploy.core.errors import DQDeployError
from dqdeploy.eval.digits import load_classifier, load_digits_images, load_digits_labels
from dqdeploy.eval.fid import (
    class_histogram,
    classifier_features,
    digits_fid,
    feature_stats,
    frechet_distance,
    per_class_fid,
)


def test_identical_gaussians_have_zero_distance():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(40, 6))
    sigma = a.T @ a / 40
    mu = rng.normal(size=6)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-9)


def test_diagonal_closed_form():
    # |mu1-mu2|^2 = 1 + 4; traces: (1 + 4 - 2*2) + (4 + 9 - 2*6) = 2
    d = frechet_distance([0.0, 0.0], np.diag([1.0, 4.0]), [1.0, 2.0], np.diag([4.0, 9.0]))
    assert d == pytest.approx(7.0, abs=1e-10)


def test_matches_scipy_sqrtm_formula_and_is_symmetric():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(30, 5)), rng.normal(size=(30, 5)) * 2 + 1
    (m1, s1), (m2, s2) = feature_stats(a), feature_stats(b)
    ref = float(((m1 - m2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(linalg.sqrtm(s1 @ s2).real))
    assert frechet_distance(m1, s1, m2, s2) == pytest.approx(ref, rel=1e-8)
    assert frechet_distance(m2, s2, m1, s1) == pytest.approx(ref, rel=1e-8)


def test_singular_covariances_stay_finite():
    # 3 samples in 8 dimensions: rank-2 covariances
    rng = np.random.default_rng(2)
    (m1, s1), (m2, s2) = feature_stats(rng.normal(size=(3, 8))), feature_stats(rng.normal(size=(3, 8)))
    d = frechet_distance(m1, s1, m2, s2)
    assert np.isfinite(d) and d > 0
    assert frechet_distance(m1, s1, m1, s1) == pytest.approx(0.0, abs=1e-9)


def test_feature_stats_and_bad_shapes():
    f = torch.tensor([[0.0, 1.0], [2.0, 3.0], [4.0, 8.0]])
    mu, sigma = feature_stats(f)
    np.testing.assert_allclose(mu, [2.0, 4.0])
    np.testing.assert_allclose(sigma, np.cov(f.numpy().T))
    with pytest.raises(DQDeployError):
        feature_stats(torch.zeros(1, 4))
    with pytest.raises(DQDeployError):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2))


def test_digits_fid_real_is_small_noise_is_large():
    real = load_digits_images()
    perm = torch.randperm(real.shape[0], generator=torch.Generator().manual_seed(0))
    fid_real = digits_fid(real[perm[:500]])
    noise = torch.rand(500, 1, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    fid_noise = digits_fid(noise)
    blank = torch.full((500, 1, 16, 16), -1.0) + 0.01 * torch.randn(500, 1, 16, 16)
    fid_blank = digits_fid(blank)
    assert fid_real > 0
    assert fid_noise > 10 * fid_real
    assert fid_blank > 10 * fid_real
    # every real digit is in the reference set, so all of them together give (almost) zero
    assert digits_fid(real) == pytest.approx(0.0, abs=1e-6)


def test_explicit_classifier_and_histogram():
    clf = load_classifier()
    real = load_digits_images()[:300]
    assert classifier_features(real, clf).shape == (300, clf.config.feature_dim)
    hist = class_histogram(real, clf)
    assert sum(hist["counts"]) == 300 and len(hist["counts"]) == 10
    assert min(hist["counts"]) > 10  # the first 300 digits cover all classes
    assert hist["mean_confidence"] > 0.9
    with pytest.raises(DQDeployError):
        digits_fid(torch.zeros(4, 1, 8, 8), clf)


def test_per_class_fid_sees_samples_of_the_wrong_class():
    real, labels = load_digits_images(), load_digits_labels()
    feats = classifier_features(real)
    right = per_class_fid(feats, labels)
    assert right == pytest.approx(0.0, abs=1e-6)  # the real digits of each class against themselves
    wrong = per_class_fid(feats, (labels + 1) % 10)  # every sample asked for the next digit
    assert wrong > 10 * max(right, 1e-3)
    with pytest.raises(DQDeployError, match="two samples"):
        per_class_fid(feats[:10], torch.arange(10))
