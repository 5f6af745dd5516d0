"""Exports with a dynamic latent height and width (``dqdeploy export Q --dynamic-resolution MIN:MAX``) or text
length (``--dynamic-text-length MIN:MAX``).

The graph's ``sample`` / ``hidden_states`` [B, C, H, W] gets symbolic H and W, each any multiple of
the model's resolution step in ``[MIN, MAX]`` (latent pixels, like ``quantize --resolution``): a
UNet halves the latent once per down block (step ``2 ** (len(block_out_channels) - 1)``), a
diffusion transformer (SD3) cuts it into ``patch_size`` patches. The per-step scale tables do not
depend on the resolution, so the Q/DQ surgery is unchanged. Refused: Flux (packed token latents with
position ids for one grid) and PixArt (its position table is recomputed in Python per size, so a
traced graph would keep one size's table).

The text length is the sequence axis of ``encoder_hidden_states`` (and of PixArt's ``encoder_attention_mask``): any
length in ``[MIN, MAX]`` tokens. Attention over the text tokens does not depend on their count and the per-step scales
do not either; by default the graph keeps the calibration conditioning's length, as before the option existed.
Refused: unconditional UNets (no text input) and Flux (its ``txt_ids`` position ids, one row per token, are made
for one length).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..core.denoisers import DenoiserSpec
from ..core.errors import ExportError
from ..core.vocab import CONTEXT, TEXT_MASK

Range = tuple[int, int]
MAX_LATENT = 1024  # latent pixels: 8192-pixel images for an 8x VAE, far beyond any denoiser's memory at batch 1
MAX_TEXT = 4096  # text tokens: 16x T5's usual 256, beyond every pipeline's max_sequence_length
TEXT_AXES = {CONTEXT: 1, TEXT_MASK: 1}  # the sequence axis of each input that has one


@dataclass(frozen=True)
class DynamicAxes:
    """What an export makes dynamic besides the batch: ``resolution`` (latent H/W) and ``text_length`` (tokens),
    each ``(MIN, MAX)`` or None (fixed at the traced example's size)."""

    resolution: Range | None = None
    text_length: Range | None = None


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


def range_arg(value: Any, name: str, unit: str, example: str) -> Range | None:
    """A ``(MIN, MAX)`` argument of the API (``dynamic_resolution``, ``dynamic_text_length``): a pair of ints or a
    ``"MIN:MAX"`` string; ``unit`` and ``example`` word the error."""
    if value is None:
        return None
    try:
        if isinstance(value, str):
            return parse_range(value)
        lo, hi = value
        if isinstance(lo, bool) or isinstance(hi, bool) or not isinstance(lo, int) or not isinstance(hi, int):
            raise ValueError
        return parse_range(f"{lo}:{hi}")
    except (ValueError, TypeError):
        raise ExportError(f"{name}={value!r}: expected (MIN, MAX) or 'MIN:MAX' {unit} with 1 <= MIN <= MAX",
                          hint=f"e.g. {name}={example}") from None


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


def check_text_range(spec: DenoiserSpec, names: list[str], length: int, lo: int, hi: int) -> None:
    """Refuse a text-length range the graph cannot take; ``names``: the graph's inputs, ``length``: the traced
    example's text tokens (the calibration conditioning's), which the range must hold."""
    hint = f"e.g. --dynamic-text-length {min(lo, length)}:{min(max(hi, length), MAX_TEXT)}"
    if CONTEXT not in names:
        raise ExportError(f"--dynamic-text-length: {spec.class_name} without text conditioning has no text input",
                          hint="drop --dynamic-text-length")
    if spec.shared:
        raise ExportError(f"--dynamic-text-length: {spec.class_name} takes position ids ({', '.join(spec.shared)}) "
                          "made for one text length", hint="export once per text length (drop --dynamic-text-length)")
    if hi > MAX_TEXT:
        raise ExportError(f"--dynamic-text-length {lo}:{hi}: MAX above {MAX_TEXT} tokens is beyond every text "
                          "encoder's length", hint=hint)
    if not lo <= length <= hi:
        raise ExportError(f"--dynamic-text-length {lo}:{hi} does not contain the calibration conditioning's "
                          f"{length} tokens (the graph is traced there)", hint=hint)


def text_axes(spec: DenoiserSpec, names: list[str], length: int, lo: int, hi: int) -> dict[str, dict[int, Any]]:
    """``{input: {axis: torch.export dim}}``: one symbolic sequence length for every input that has the text axis
    (after :func:`check_text_range`)."""
    import torch

    check_text_range(spec, names, length, lo, hi)
    sequence = torch.export.Dim("sequence", min=lo, max=hi)
    return {name: {axis: sequence} for name, axis in TEXT_AXES.items() if name in names}
