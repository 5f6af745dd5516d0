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
from ..core.metrics import relative_error
from ..core.sampling import Cond, denoise


def _flat_pair(ref: torch.Tensor, test: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if ref.shape != test.shape or ref.ndim < 1 or ref.shape[0] == 0:
        raise DQDeployError(f"comparison needs two non-empty batches of one shape, found {tuple(ref.shape)} "
                            f"and {tuple(test.shape)}")
    n = ref.shape[0]
    return ref.detach().double().reshape(n, -1), test.detach().double().reshape(n, -1)


def tensor_errors(ref: torch.Tensor, test: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-sample ``rel_err``, ``snr_db`` and ``cosine`` of ``test`` against ``ref`` ([N, ...] each)."""
    r, q = _flat_pair(ref, test)
    err, norm = (q - r).norm(dim=1), r.norm(dim=1).clamp_min(1e-30)
    rel = relative_error(q, r, eps=1e-30)
    snr = 20.0 * torch.log10(norm / err.clamp_min(1e-30))
    cos = F.cosine_similarity(r, q, dim=1, eps=1e-30)
    return {"rel_err": rel.float(), "snr_db": snr.float(), "cosine": cos.float()}


def _summary(values: dict[str, list[torch.Tensor]]) -> dict[str, float]:
    return {k: float(torch.cat(v).mean()) for k, v in values.items()}


class _PairedDenoiser:
    """Drop-in denoiser that returns the FP output and compares the quantized output on the same input."""

    def __init__(self, fp: Any, test: Any) -> None:
        self.fp, self.test, self.config = fp, test, fp.config
        self.denoiser = fp  # the model kind (dqdeploy.core.denoisers.spec_of) is the FP model's
        self.step = 0
        self.per_step: dict[int, dict[str, list[torch.Tensor]]] = {}

    def __call__(self, return_dict: bool = False, **inputs: Any):
        ref = self.fp(**inputs, return_dict=False)[0]
        test = self.test(**inputs, return_dict=False)[0]
        bucket = self.per_step.setdefault(self.step, {"rel_err": [], "snr_db": [], "cosine": []})
        for k, v in tensor_errors(ref, test).items():
            bucket[k].append(v)
        return (ref,)


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
    paired = _PairedDenoiser(fp_denoiser, test_denoiser)
    times: list[float] = []

    def on_step(i: int, t: torch.Tensor, _x: torch.Tensor) -> None:
        paired.step = i
        times.append(float(t))

    denoise(paired, scheduler, noise, steps, cond=cond, uncond=uncond, guidance=guidance, callback=on_step)
    return [{"step": i, "t": times[i], **_summary(paired.per_step[i])} for i in sorted(paired.per_step)]


def summarize_steps(per_step: list[dict[str, float]]) -> dict[str, float]:
    """Mean over steps of each metric, and the worst step (largest relative error)."""
    if not per_step:
        raise DQDeployError("no per-step errors to summarise (zero sampling steps?)")
    keys = ("rel_err", "snr_db", "cosine")
    out = {f"mean_{k}": sum(s[k] for s in per_step) / len(per_step) for k in keys}
    worst = max(per_step, key=lambda s: s["rel_err"])
    return out | {"worst_step": worst["step"], "worst_t": worst["t"], "worst_rel_err": worst["rel_err"]}


def psnr(ref: torch.Tensor, test: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Per-image PSNR in dB of ``test`` vs ``ref`` ([N, C, H, W], values spanning ``data_range``)."""
    r, q = _flat_pair(ref, test)
    mse = ((q - r) ** 2).mean(dim=1).clamp_min(1e-20)
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
    """Mean PSNR / SSIM / relative error of quantized vs FP samples (same noise, same order)."""
    p = psnr(ref, test, data_range)
    finite = p[torch.isfinite(p)]
    return {"psnr_db": float(finite.mean()) if finite.numel() else math.inf,
            "ssim": float(ssim(ref, test, data_range).mean()),
            "rel_err": float(tensor_errors(ref, test)["rel_err"].mean()), "n": int(ref.shape[0])}
