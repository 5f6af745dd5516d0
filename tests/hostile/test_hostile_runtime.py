"""The ONNX Runtime UNet boundary: non-finite, absurd, empty or mistyped inputs raise a typed error
naming the input and the fix (the quantized graph would otherwise return finite noise)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dqdeploy.core.errors import RuntimeInputError
from dqdeploy.runtimes import load_runtime

pytestmark = pytest.mark.hostile("runtime", "refused")


@pytest.fixture(scope="module")
def unet(export_dir):
    return load_runtime(export_dir, "ort")


def _x(value=None, batch=2):
    x = torch.randn(batch, 1, 8, 8)
    if value is not None:
        x[0, 0, 0, 0] = value
    return x


CASES = {
    "NaN sample": (lambda: (_x(float("nan")), 500), "NaN/Inf"),
    "Inf sample": (lambda: (_x(float("inf")), 500), "NaN/Inf"),
    "huge sample (1e30)": (lambda: (_x(1e30), 500), "magnitude"),
    "NaN timestep": (lambda: (_x(), float("nan")), "NaN/Inf"),
    "Inf timestep tensor": (lambda: (_x(), torch.tensor([1.0, float("inf")])), "NaN/Inf"),
    "empty batch": (lambda: (_x(batch=0), 500), "empty batch"),
    "integer sample": (lambda: (torch.zeros(2, 1, 8, 8, dtype=torch.int64), 500), "floating-point"),
    "boolean timestep": (lambda: (_x(), torch.tensor([True, False])), "dtype"),
    "3-D sample": (lambda: (torch.randn(1, 8, 8), 500), "4-D"),
    "wrong channel count": (lambda: (torch.randn(2, 3, 8, 8), 500), "channels"),
    "wrong resolution": (lambda: (torch.randn(2, 1, 16, 16), 500), "height"),
    "timestep of another batch": (lambda: (_x(), torch.tensor([1.0, 2.0, 3.0])), "timestep"),
    "string sample": (lambda: ("latents", 500), "expected a torch.Tensor"),
    "NaN in a numpy sample": (lambda: (np.full((1, 1, 8, 8), np.nan, np.float32), 500), "NaN/Inf"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_inputs_raise_a_typed_error(case, unet):
    make, needle = CASES[case]
    sample, timestep = make()
    with pytest.raises(RuntimeInputError, match=needle) as err:
        unet(sample, timestep)
    assert "fix:" in str(err.value) or "expected" in str(err.value)


def test_encoder_hidden_states_for_an_unconditional_graph(unet):
    with pytest.raises(RuntimeInputError, match="unconditional"):
        unet(_x(), 500, encoder_hidden_states=torch.randn(2, 5, 24))


@pytest.mark.hostile("runtime", "accepted")
def test_the_finite_check_can_be_switched_off_for_speed(export_dir):
    fast = load_runtime(export_dir, "ort", check_values=False)
    out = fast(_x(1e30), 500).sample  # no check: the caller asked for none
    assert out.shape == (2, 1, 8, 8)
    ok = fast(_x(), 500).sample
    assert torch.isfinite(ok).all()
