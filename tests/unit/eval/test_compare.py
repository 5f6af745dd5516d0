"""Model-agnostic comparison metrics: known values on hand-made tensors, and the per-step error along
FP trajectories on a tiny real UNet."""

from __future__ import annotations

import math

import pytest
import torch

from dqdeploy.core.errors import DQDeployError
from dqdeploy.eval.compare import image_errors, psnr, ssim, step_errors, summarize_steps, tensor_errors
from dqdeploy.io.models import make_scheduler
from tests.helpers import scheduler, tiny_unet


def test_tensor_errors_known_values():
    ref = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    test = torch.tensor([[3.0, 4.5], [0.0, 1.0]])
    e = tensor_errors(ref, test)
    assert e["rel_err"][0] == pytest.approx(0.1)
    assert e["snr_db"][0] == pytest.approx(20.0)
    assert e["cosine"][1] == pytest.approx(0.0, abs=1e-7)
    assert e["rel_err"][1] == pytest.approx(math.sqrt(2))


def test_psnr_ssim_identical_and_degraded():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 1, 16, 16, generator=g) * 2 - 1
    assert ssim(x, x).tolist() == pytest.approx([1.0] * 4)
    assert torch.isinf(psnr(x, x)).all() and math.isinf(image_errors(x, x)["psnr_db"])  # identical: no error at all
    broken = x.clone()
    broken[1, 0, 0, 0] = float("nan")
    assert math.isnan(image_errors(x, broken)["psnr_db"])  # never counted as identical
    noisy = (x + 0.1 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    worse = (x + 0.5 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    assert (ssim(x, noisy) > ssim(x, worse)).all()
    # uniform error e: MSE e^2, PSNR = 10 log10(range^2 / e^2)
    assert psnr(x, x + 0.02)[0] == pytest.approx(10 * math.log10(4 / 0.02 ** 2), rel=1e-4)
    summary = image_errors(x, noisy)
    assert summary["n"] == 4 and 0 < summary["ssim"] < 1 and summary["psnr_db"] > 15


def test_shape_mismatch_is_a_typed_error():
    with pytest.raises(DQDeployError, match="one shape"):
        tensor_errors(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(DQDeployError, match="SSIM"):
        ssim(torch.zeros(2, 3), torch.zeros(2, 3))


class _Perturbed(torch.nn.Module):
    """The FP UNet with its output scaled by (1 + eps) at time steps below ``t_max``."""

    def __init__(self, unet, eps: float, t_max: float) -> None:
        super().__init__()
        self.denoiser, self.eps, self.t_max, self.config = unet, eps, t_max, unet.config

    def forward(self, sample, timestep, return_dict=False, **kw):
        out = self.denoiser(sample, timestep, return_dict=False, **kw)[0]
        return (out * (1 + self.eps) if float(timestep) < self.t_max else out,)


def test_step_errors_localise_a_perturbation_in_time():
    unet = tiny_unet()
    sched = make_scheduler("ddim", dict(scheduler().config))
    noise = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    per_step = step_errors(unet, _Perturbed(unet, 0.05, t_max=500), sched, noise, 6)
    assert [s["step"] for s in per_step] == list(range(6))
    for s in per_step:
        if s["t"] < 500:
            assert s["rel_err"] == pytest.approx(0.05, rel=1e-4) and s["cosine"] == pytest.approx(1.0, abs=1e-6)
        else:
            assert s["rel_err"] < 1e-6
    summary = summarize_steps(per_step)
    assert summary["worst_t"] < 500 and summary["worst_rel_err"] == pytest.approx(0.05, rel=1e-4)
