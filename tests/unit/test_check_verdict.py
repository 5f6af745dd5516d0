"""The verdict of ``check``: sporadic rounding-tie steps pass, a defect that moves every step or one
step far beyond its tolerance fails."""

from __future__ import annotations

import pytest

from dqdeploy.core.errors import CheckFailedError
from dqdeploy.verify.check import OUTLIER_EVERY, OUTLIER_RATIO, CheckResult, StepResult


def _result(ratios: list[float]) -> CheckResult:
    steps = [StepResult(float(980 - 20 * i), 2, r * 1e-3, 1.0, 1e-3, 1e-3) for i, r in enumerate(ratios)]
    return CheckResult("ort", "ort", steps)


def test_every_step_within_tolerance_passes():
    result = _result([0.0, 0.5, 1.0] * 10)
    assert result.ok and result.outliers == [] and "every step within tolerance" in result.table()


def test_one_sporadic_step_in_ten_passes_and_is_reported():
    result = _result([0.5] * 49 + [1.02])
    assert result.ok
    assert "1 of 50 time steps out of tolerance" in result.verdict() and "1.02x" in result.verdict()
    result.raise_if_failed()


def test_more_than_one_step_in_ten_fails():
    n = 50
    result = _result([0.5] * (n - n // OUTLIER_EVERY - 1) + [1.1] * (n // OUTLIER_EVERY + 1))
    assert not result.ok
    with pytest.raises(CheckFailedError, match="6 of 50 time steps out of tolerance"):
        result.raise_if_failed()


def test_a_defect_that_moves_every_step_fails():
    """Saturating u8s8 kernels on an emulated Haswell: 50 of 50 steps at about 1.3x."""
    assert not _result([1.3] * 50).ok


def test_one_step_far_beyond_its_tolerance_fails():
    result = _result([0.5] * 49 + [OUTLIER_RATIO + 0.1])
    assert not result.ok and result.outliers[0].timestep == 0.0


def test_few_steps_allow_no_outlier():
    assert not _result([0.5, 0.5, 1.01]).ok  # fewer than OUTLIER_EVERY steps: every one within tolerance
