"""The one line of ``dqdeploy eval --fp`` a person reads: image PSNR / SSIM against the FP model on the same noise,
a level with its thresholds, and the per-step denoiser error.

Levels (PSNR in dB and SSIM of the quantized images against the FP model's, values in [-1, 1]):

* ``identical``: every image equals the FP one (PSNR infinite);
* ``close``: PSNR >= 28 dB and SSIM >= 0.90 -- differences hard to see side by side;
* ``visible``: PSNR >= 20 dB and SSIM >= 0.70 -- the same images with visible differences;
* ``far``: below -- other images; try another recipe or more calibration.

The thresholds are rules of thumb for 8-bit images (JPEG at usual quality is 30-40 dB), not a perceptual model.
"""

from __future__ import annotations

import math
from typing import Any

CLOSE_PSNR_DB, CLOSE_SSIM = 28.0, 0.90
VISIBLE_PSNR_DB, VISIBLE_SSIM = 20.0, 0.70
_WORDS = {
    "identical": "identical to FP",
    "close": f"close to FP (PSNR >= {CLOSE_PSNR_DB:g} dB and SSIM >= {CLOSE_SSIM:g})",
    "visible": f"visible differences from FP (PSNR >= {VISIBLE_PSNR_DB:g} dB and SSIM >= {VISIBLE_SSIM:g}, "
               f"below {CLOSE_PSNR_DB:g} dB / {CLOSE_SSIM:g}): look at --png",
    "far": f"far from FP (PSNR < {VISIBLE_PSNR_DB:g} dB or SSIM < {VISIBLE_SSIM:g}): quantize again with more "
           "calibration (--calib-samples, --trajectories, --iters) or a wider recipe (--recipe w8a8)",
}


def level(psnr_db: float, ssim: float) -> str:
    """``identical``, ``close``, ``visible`` or ``far`` (see the module docstring)."""
    if math.isinf(psnr_db) and psnr_db > 0:
        return "identical"
    if psnr_db >= CLOSE_PSNR_DB and ssim >= CLOSE_SSIM:
        return "close"
    if psnr_db >= VISIBLE_PSNR_DB and ssim >= VISIBLE_SSIM:
        return "visible"
    return "far"


def _step_text(summary: dict[str, float]) -> str:
    return (f"per-step denoiser error {100 * summary['mean_rel_err']:.2g}% mean relative "
            f"(worst {100 * summary['worst_rel_err']:.2g}% at step {int(summary['worst_step'])}, "
            f"t={summary['worst_t']:g})")


def verdict(images: dict[str, Any] | None, space: str, per_step_summary: dict[str, float]) -> dict[str, Any]:
    """``{"level", "text"}`` from the image metrics (``images``: :func:`dqdeploy.eval.compare.image_errors` of the
    images in ``space``, e.g. "VAE-decoded images"; None where the model makes latents and no VAE decodes them)."""
    steps = _step_text(per_step_summary)
    if images is None:
        return {"level": None, "text": f"quality: no images to judge (latents and no VAE: pass --vae DIR); {steps}"}
    key = level(images["psnr_db"], images["ssim"])
    return {"level": key,
            "text": f"quality: PSNR {images['psnr_db']:.1f} dB, SSIM {images['ssim']:.3f} on {space} against the FP "
                    f"model on the same noise -- {_WORDS[key]}; {steps}"}
