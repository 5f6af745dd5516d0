"""Exports with a dynamic latent height and width: ``dqdeploy export Q --dynamic-resolution MIN:MAX``.

The graph's ``sample`` / ``hidden_states`` [B, C, H, W] gets symbolic H and W, each any multiple of
the model's resolution step in ``[MIN, MAX]`` (latent pixels, like ``quantize --resolution``): a
UNet halves the latent once per down block (step ``2 ** (len(block_out_channels) - 1)``), a
diffusion transformer (SD3) cuts it into ``patch_size`` patches. The per-step scale tables do not
depend on the resolution, so the Q/DQ surgery is unchanged. Refused: Flux (packed token latents with
position ids for one grid) and PixArt (its position table is recomputed in Python per size, so a
traced graph would keep one size's table).
"""

from __future__ import annotations

from typing import Any

from ..core.denoisers import DenoiserSpec
from ..core.errors import ExportError

Range = tuple[int, int]
MAX_LATENT = 1024  # latent pixels: 8192-pixel images for an 8x VAE, far beyond any denoiser's memory at batch 1


def resolution_step(spec: DenoiserSpec, config: Any) -> int:
    """The latent height/width a model takes must be a multiple of this."""
    if spec.is_transformer:
        return int(config.get("patch_size") or 1)
    return 2 ** (len(config["block_out_channels"]) - 1)


def parse_range(text: str) -> Range:
    """``"MIN:MAX"`` -> (MIN, MAX) (ValueError when malformed)."""
    lo, hi = (int(v) for v in text.split(":"))
    if not 1 <= lo <= hi:
        raise ValueError(f"{text!r}: expected 1 <= MIN <= MAX")
    return lo, hi


def check_range(spec: DenoiserSpec, config: Any, size: tuple[int, int], lo: int, hi: int) -> int:
    """Refuse a range the model cannot take (errors say why and what would work); returns the step.

    ``size`` is the (H, W) of the example the graph is traced with (the calibration resolution):
    it must lie inside the range.
    """
    if spec.packed:
        raise ExportError(f"{spec.class_name} takes packed token latents [B, (H/2)*(W/2), C] with position ids "
                          "(img_ids) made for one grid: a dynamic height/width is not supported",
                          hint="export once per resolution (quantize --resolution N, then export)")
    if spec.fixed_resolution:
        raise ExportError(spec.fixed_resolution,
                          hint="export once per resolution (quantize --resolution N, then export)")
    step = resolution_step(spec, config)
    where = "a UNet with %d down blocks" % len(config["block_out_channels"]) if not spec.is_transformer else \
        f"patch_size {step}"
    # a range that passes every check below: multiples of the step around the asked one, holding the traced size
    near_lo = min(max(2 * step, lo // step * step), min(size))
    near_hi = min(max(near_lo, -(-hi // step) * step, max(size)), MAX_LATENT // step * step)
    hint = f"e.g. --dynamic-resolution {near_lo}:{near_hi}"
    if lo % step or hi % step or lo < 2 * step:
        raise ExportError(f"--dynamic-resolution {lo}:{hi}: both ends must be multiples of {step} ({where}) and "
                          f"MIN at least {2 * step}", hint=hint)
    if hi > MAX_LATENT:
        raise ExportError(f"--dynamic-resolution {lo}:{hi}: MAX above {MAX_LATENT} latent pixels "
                          f"({8 * MAX_LATENT} image pixels for an 8x VAE) is beyond what a denoiser can run in memory",
                          hint=hint)
    if not all(lo <= s <= hi for s in size):
        raise ExportError(f"--dynamic-resolution {lo}:{hi} does not contain the calibration resolution "
                          f"{size[0]}x{size[1]} (the graph is traced there)", hint=hint)
    max_embed = config.get("pos_embed_max_size")
    if spec.is_transformer and max_embed and hi > max_embed * step:
        raise ExportError(f"--dynamic-resolution {lo}:{hi}: the model's position embedding covers at most "
                          f"{max_embed * step} latent pixels (pos_embed_max_size {max_embed} x patch_size {step})",
                          hint=f"use MAX <= {max_embed * step}")
    return step


def sample_axes(spec: DenoiserSpec, config: Any, size: tuple[int, int], lo: int, hi: int) -> dict[int, Any]:
    """``{axis: torch.export dim}`` for H and W of the sample input (after :func:`check_range`)."""
    import torch

    step = check_range(spec, config, size, lo, hi)
    h = torch.export.Dim("height_q", min=lo // step, max=hi // step)
    w = torch.export.Dim("width_q", min=lo // step, max=hi // step)
    return {2: step * h, 3: step * w}
