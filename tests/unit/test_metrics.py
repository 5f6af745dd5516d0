"""One definition of the relative error, used by check, sensitivity and eval."""

from __future__ import annotations

import numpy as np
import torch

from dqdeploy.core.metrics import relative_error
from dqdeploy.eval.compare import tensor_errors
from dqdeploy.verify.check import _rel


def test_relative_error_is_per_sample():
    ref = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    out = torch.tensor([[3.0, 5.0], [1.0, 0.5]])
    assert torch.allclose(relative_error(out, ref), torch.tensor([1 / 5, 0.5]))
    assert np.isclose(relative_error(torch.ones(1, 3), torch.zeros(1, 3)).item(), np.sqrt(3) / 1e-12)  # clamped


def test_check_and_eval_measure_the_same_thing():
    gen = torch.Generator().manual_seed(0)
    ref, out = torch.randn(4, 3, 8, 8, generator=gen), torch.randn(4, 3, 8, 8, generator=gen)
    whole = _rel(out.numpy(), ref.numpy())
    assert abs(whole - float(relative_error(out.reshape(1, -1), ref.reshape(1, -1)))) < 1e-6
    per_sample = tensor_errors(ref, out)["rel_err"]
    assert torch.allclose(per_sample, relative_error(out, ref), rtol=1e-5)
