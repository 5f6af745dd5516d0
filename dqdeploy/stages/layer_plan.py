"""Layer planning: which Conv2d/Linear layers of a float denoiser the recipe converts, with what
metadata and dilation vector, and the conversion itself (:func:`build_quantized`).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from typing import cast

import torch
from torch import nn

from ..core.denoisers import spec_for
from ..core.errors import ModelLoadError
from ..core.recipe import Recipe
from ..core.terminal import bar
from ..io.artifact import LayerMeta, install_quant_layers
from ..io.float_layers import FloatLayers
from ..quant.attention import install_attention_quant, sdpa_attentions
from ..quant.calibrate import input_channel_absmax
from ..quant.dilation import dilation_factors, smoothquant_factors
from ..quant.input_sharing import analyze_inputs
from ..quant.modules import QUANTIZABLE, QuantizedDenoiser, quantizes_output, replace_module
from ..quant.timestep import TimestepTable
from ..quant.trajectories import CalibrationSet


def example_forward(denoiser: nn.Module, calib: CalibrationSet, n: int = 2) -> Callable[[], torch.Tensor]:
    """One forward of ``denoiser`` on the first ``n`` calibration inputs (traced by analysis and partition)."""
    inputs = calib.batch(torch.arange(min(n, len(calib))))
    return lambda: inputs.call(denoiser)


def _dilations(
    denoiser: nn.Module, names: list[str], info: dict, recipe: Recipe, calib: CalibrationSet
) -> dict[str, torch.Tensor | None]:
    """Per-layer ``s`` vectors: one per input-sharing group."""
    if recipe.scaling == "none":
        return {n: None for n in names}
    groups: dict[str, list[str]] = {}
    for n in names:
        groups.setdefault(info[n].group, []).append(n)
    absmax = (input_channel_absmax(denoiser, [g[0] for g in groups.values()], calib)
              if recipe.scaling == "smoothquant" else {})
    result: dict[str, torch.Tensor | None] = {}
    for members in bar(groups.values(), desc=f"dilation ({recipe.scaling})", unit="group", leave=False):
        weights = [cast(torch.Tensor, denoiser.get_submodule(m).weight) for m in members]
        if any(getattr(denoiser.get_submodule(m), "groups", 1) != 1 for m in members):
            s = None  # grouped convs mix channels per group: leave them undilated
        elif recipe.scaling == "wd":
            s = dilation_factors(weights)
        else:
            s = smoothquant_factors(absmax[members[0]], weights, recipe.smoothquant_alpha)
        for m in members:
            result[m] = s
    return result


def plan_layers(denoiser: nn.Module, recipe: Recipe,
                calib: CalibrationSet) -> tuple[dict[str, LayerMeta], dict[str, torch.Tensor | None]]:
    """What the conversion of the float ``denoiser`` will do, per layer the recipe selects and the
    model calls: its metadata and dilation vector (WD from the FP weights, SmoothQuant from the
    calibration activations). Nothing is changed."""
    names = [n for n, m in denoiser.named_modules() if isinstance(m, QUANTIZABLE) and recipe.selects(n)]
    if not names:
        raise ModelLoadError("the recipe selects no Conv2d/Linear layer",
                             hint="check the recipe's include/exclude patterns")
    info = analyze_inputs(denoiser, example_forward(denoiser, calib), names)
    names = [n for n in names if n in info]  # layers never called keep FP weights
    ends = spec_for(type(denoiser).__name__).ends
    metas = {
        name: LayerMeta(
            "conv" if isinstance(denoiser.get_submodule(name), nn.Conv2d) else "linear",
            recipe.weight_bits_for(name, ends), recipe.act_bits_for(name, ends), recipe.act_symmetric,
            info[name].group, info[name].fold,
            recipe.layout == "ort" and quantizes_output(name, info[name].rank),  # output Q on the fused layers
        )
        for name in names
    }
    return metas, _dilations(denoiser, names, info, recipe, calib)


def plan_attention(denoiser: nn.Module, recipe: Recipe, calib: CalibrationSet) -> list[str]:
    """The attention modules the recipe quantizes (``attention="int8"``): those it selects whose forward
    calls scaled dot-product attention; none for float attention."""
    if recipe.attention == "float":
        return []
    names = sdpa_attentions(denoiser, example_forward(denoiser, calib), recipe.selects)
    if not names:
        raise ModelLoadError(f"--attention int8: no attention of {type(denoiser).__name__} that the recipe selects "
                             "calls scaled_dot_product_attention",
                             hint="quantize with --attention float, or check the recipe's include/exclude patterns")
    return names


def build_quantized(
    denoiser: nn.Module, recipe: Recipe, table: TimestepTable, calib: CalibrationSet
) -> tuple[QuantizedDenoiser, dict[str, LayerMeta]]:
    """A copy of ``denoiser`` with the recipe's Conv2d/Linear layers replaced by QuantLayers (weight
    scales searched, activation scales not yet calibrated), and its attention quantized if the recipe says so."""
    model = copy.deepcopy(denoiser).eval()
    metas, dil = plan_layers(model, recipe, calib)
    attention = plan_attention(model, recipe, calib)
    qmodel = install_quant_layers(model, metas, table, dil)
    install_attention_quant(qmodel.denoiser, attention, table.n_rows, recipe.act_bits, qmodel.step_index)
    return qmodel, metas


def keep_in_float(
    qmodel: QuantizedDenoiser, floats: FloatLayers, metas: dict[str, LayerMeta], names: list[str]
) -> dict[str, LayerMeta]:
    """Put the float layers ``names`` (kept by ``floats``) back into ``qmodel``; returns the remaining
    layers' metadata. A layer whose input is shared with a float layer can no longer fold ``1/s``
    into the norm."""
    groups = {metas[n].group for n in names}
    for name in names:
        replace_module(qmodel.denoiser, name, floats.restore(name))
    return {
        n: dataclasses.replace(m, fold="mul") if m.group in groups and m.fold != "mul" else m
        for n, m in metas.items() if n not in names
    }
