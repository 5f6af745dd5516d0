"""Fallback: the quantized layers kept in float, chosen by sensitivity (``auto``) or by name pattern,
and put back from the :class:`~dqdeploy.quant.float_layers.FloatLayers` the conversion kept."""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from .. import distributed
from ..errors import RecipeError
from ..recipe import Recipe
from .float_layers import FloatLayers
from .modules import QuantizedDenoiser, quant_layers, replace_module
from .sensitivity import analyze, choose_fallback, layer_macs
from .trajectories import CalibrationSet, calibration_subset

if TYPE_CHECKING:  # the artifact module builds on quant/, not the reverse
    from ..artifact import LayerMeta

log = logging.getLogger(__name__)


def fallback_candidates(recipe: Recipe, planned: list[str]) -> list[str]:
    """The layers fallback may choose: any (``auto``), those matching the patterns, or none. Patterns that match
    no layer, or every layer (nothing would be quantized), are a :class:`RecipeError`."""
    if recipe.fallback == "none":
        return []
    if recipe.fallback == "auto":
        return planned
    chosen = [n for n in planned if any(fnmatch.fnmatchcase(n, p) for p in recipe.fallback_patterns)]
    if not chosen:
        raise RecipeError(f"fallback patterns {recipe.fallback!r} match no quantized layer",
                          hint=f"use module names such as {', '.join(planned[:3])} (wildcards allowed), or auto / none")
    if len(chosen) == len(planned):
        raise RecipeError(f"fallback patterns {recipe.fallback!r} match every one of the {len(planned)} quantized "
                          "layers: nothing would be quantized",
                          hint="name the layers to keep in float, e.g. conv_in,conv_out")
    return chosen


def check_fallback(recipe: Recipe, model) -> None:
    """:func:`fallback_candidates`' refusals on the layers of a freshly loaded ``model``: before any calibration."""
    from .modules import QUANTIZABLE

    fallback_candidates(recipe, [n for n, m in model.named_modules()
                                 if isinstance(m, QUANTIZABLE) and recipe.selects(n)])


def fallback_layers(
    qmodel: QuantizedDenoiser, recipe: Recipe, calib: CalibrationSet, *, seed: int = 0,
    step_weights: dict[float, float] | None = None, clock: Callable[[], float] = time.monotonic
) -> list[str]:
    """The layers ``recipe.fallback`` keeps in float: by sensitivity on a calibration subset
    (``auto``, needs calibrated scales; steps weighted by ``step_weights``; within ``recipe.fallback_time``
    seconds on ``clock`` when set), by module-name pattern, or none."""
    if recipe.fallback == "none":
        return []
    names = list(quant_layers(qmodel.denoiser))
    if recipe.fallback == "auto":
        # the analysis subset (named tensors, read with the model's spec)
        subset = calibration_subset(calib, steps=8, per_step=8, seed=seed)
        mine = [names[i] for i in distributed.shard(len(names))]  # ranks measure every world-th layer
        report = analyze(qmodel, subset, step_weights=step_weights, detail=False, blocks=False, only=mine,
                         time_budget=recipe.fallback_time, clock=clock)
        rows = {r.name: r for part in distributed.all_gather(report.layers) for r in part}
        report = dataclasses.replace(report, layers=[rows[n] for n in names if n in rows])
        total = None
        if len(rows) < len(names):  # the time budget ran out: the MAC budget is still a share of every layer
            total = sum(layer_macs(qmodel, subset).values())
            log.warning("fallback auto: the time budget (fallback_time, --fallback-time) of %g s ran out after "
                        "scoring %d of %d layers; the %d layers not scored stay quantized (fallback chose among the "
                        "scored ones only)", recipe.fallback_time, len(rows), len(names), len(names) - len(rows))
        chosen = choose_fallback(report, recipe.fallback_budget, total_macs=total)
        log.info("fallback auto: %s", ", ".join(chosen) or "no layer")
        return chosen
    chosen = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in recipe.fallback_patterns)]
    if not chosen:
        raise RecipeError(
            f"fallback patterns {recipe.fallback!r} match no quantized layer",
            hint=f"use module names such as {', '.join(names[:3])} (wildcards allowed), or auto / none",
        )
    return chosen


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
