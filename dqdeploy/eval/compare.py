"""Model-agnostic quality metrics of a quantized (or exported) denoiser against its full-precision
model -- nothing here needs a classifier or a particular dataset:

* ``tensor_errors(ref, test)``: per-sample relative error ``|test - ref| / |ref|``, SNR in dB and
  cosine similarity of two batches of tensors.
* ``step_errors(...)``: the denoiser output error at every sampling step *along real FP
  trajectories*: the FP model drives the sampler and the quantized model sees exactly the FP model's
  input at every step (under classifier-free guidance both halves), so errors do not compound and
  the numbers localise the loss in time. Cheap and low-noise: a screen before FID runs.
* ``psnr``/``ssim``: end-of-trajectory image error of quantized vs FP samples from the same noise.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from ..core.errors import DQDeployError
from ..core.metrics import StepErrors, flat_pair, summarize_steps, tensor_errors
from ..core.sampling import Cond, observe_denoise, output_of

__all__ = ["tensor_errors", "step_errors", "summarize_steps", "psnr", "ssim", "image_errors"]


@torch.no_grad()
def step_errors(
    fp_denoiser: Any,
    test_denoiser: Any,
    scheduler: Any,
    noise: torch.Tensor,
    steps: int,
    *,
    cond: torch.Tensor | Cond | None = None,
    uncond: torch.Tensor | Cond | None = None,
    guidance: float = 1.0,
) -> list[dict[str, float]]:
    """Denoiser output error of ``test_denoiser`` vs ``fp_denoiser`` at every step of FP trajectories from
    ``noise``: one dict per step with ``step``, ``t`` and the batch means of ``rel_err``, ``snr_db``, ``cosine``."""
    errors = StepErrors()

    def compare(step: int, t: float, inputs: dict[str, Any], ref: torch.Tensor) -> None:
        errors.add(step, t, ref, output_of(test_denoiser, inputs))

    observe_denoise(fp_denoiser, scheduler, noise, steps, compare, cond=cond, uncond=uncond, guidance=guidance)
    return errors.per_step()


def psnr(ref: torch.Tensor, test: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Per-image PSNR in dB of ``test`` vs ``ref`` ([N, C, H, W], values spanning ``data_range``); infinite for
    an image equal to its reference."""
    r, q = flat_pair(ref, test)
    mse = ((q - r) ** 2).mean(dim=1)
    return (10.0 * torch.log10(data_range ** 2 / mse)).float()


def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x ** 2) / (2 * sigma ** 2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(ref: torch.Tensor, test: torch.Tensor, data_range: float = 2.0, window: int = 11,
         sigma: float = 1.5) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004: Gaussian window, K1 0.01, K2 0.03, valid positions only,
    mean over channels) of ``test`` vs ``ref`` [N, C, H, W]. The window shrinks to the image size
    (odd) for small images."""
    if ref.shape != test.shape or ref.ndim != 4:
        raise DQDeployError(f"SSIM needs two image batches [N, C, H, W] of one shape, found "
                            f"{tuple(ref.shape)} and {tuple(test.shape)}")
    n, c, h, w = ref.shape
    size = min(window, h, w)
    size -= 1 - size % 2
    sigma = sigma * size / window if size < window else sigma
    k = _gaussian_window(size, sigma).to(torch.float64).expand(c, 1, size, size)
    x, y = ref.detach().double(), test.detach().double()

    def blur(z: torch.Tensor) -> torch.Tensor:
        return F.conv2d(z, k, groups=c)

    mx, my = blur(x), blur(y)
    sxx, syy, sxy = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (sxx + syy + c2))
    return s.mean(dim=(1, 2, 3)).float()


def image_errors(ref: torch.Tensor, test: torch.Tensor, data_range: float = 2.0) -> dict[str, float]:
    """Mean PSNR / SSIM / relative error of quantized vs FP samples (same noise, same order); the PSNR is the mean
    over the images that differ (infinite where none does), NaN where an image holds NaN."""
    p = psnr(ref, test, data_range)
    finite = p[torch.isfinite(p)]
    mean_psnr = math.nan if bool(p.isnan().any()) else float(finite.mean()) if finite.numel() else math.inf
    return {"psnr_db": mean_psnr,
            "ssim": float(ssim(ref, test, data_range).mean()),
            "rel_err": float(tensor_errors(ref, test)["rel_err"].mean()), "n": int(ref.shape[0])}
