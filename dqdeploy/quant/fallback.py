"""Fallback: the quantized layers kept in float, chosen by sensitivity (``auto``) or by name pattern,
(put back by :func:`dqdeploy.stages.layer_plan.keep_in_float`)."""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ..core.errors import RecipeError
from ..core.recipe import Recipe
from ..system import distributed
from .modules import QuantizedDenoiser, quant_layers
from .sensitivity import Row, analyze, choose_fallback, layer_macs, screen
from .trajectories import CalibrationSet, calibration_subset

log = logging.getLogger(__name__)
EXHAUSTIVE_UP_TO = 192  # auto: leave-one-out scores every layer of a model with at most this many quantized layers
# (every zoo member: the largest, cond, has 141; SD-1.5 has 282)
SCREENED = 0  # else the first-order screen's estimates choose; leave-one-out on that many of the layers it ranks
# highest (recipe.fallback_candidates overrides): at SD-1.5 size each scored layer costs a quantized forward pass
# of the whole subset (8 samples, ~4 min on one core), 32 of them over two hours
SCREEN_BATCH = 1  # samples per backward pass of the whole model: its activations are the screen's memory peak


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


@dataclass
class SearchProgress:
    """What a fallback search has finished -- the layers it scores, in order (None: not yet ranked), and the gain
    of each scored layer -- and ``save``, called with both after each step (a run's checkpoint keeps them, so
    that ``--resume`` goes on from there). One process only: under torchrun every rank searches afresh."""

    order: list[str] | None = None
    gains: dict[str, float] = field(default_factory=dict)
    save: Callable[[list[str], dict[str, float]], None] = lambda order, gains: None

    def add(self, row: Row) -> None:
        assert self.order is not None
        self.gains[row.name] = row.gain
        self.save(self.order, self.gains)


def fallback_layers(
    qmodel: QuantizedDenoiser, recipe: Recipe, calib: CalibrationSet, *, seed: int = 0,
    step_weights: dict[float, float] | None = None, clock: Callable[[], float] = time.monotonic,
    done: SearchProgress | None = None,
) -> list[str]:
    """The layers ``recipe.fallback`` keeps in float: by sensitivity on a calibration subset
    (``auto``, needs calibrated scales; steps weighted by ``step_weights``; within ``recipe.fallback_time``
    seconds on ``clock`` when set; ``done``: a search interrupted before, continued), by module-name pattern, or
    none."""
    if recipe.fallback == "none":
        return []
    names = list(quant_layers(qmodel.denoiser))
    if recipe.fallback == "auto":
        # the analysis subset (named tensors, read with the model's spec)
        subset = calibration_subset(calib, steps=8, per_step=8, seed=seed)
        done = SearchProgress() if done is None or distributed.active() else done
        start = clock()
        if done.order is None and candidate_count(recipe, len(names)) == 0:  # the screen's estimates choose
            done.order, done.gains = names, screen_gains(qmodel, subset, names, step_weights)
            done.save(done.order, done.gains)
        elif done.order is None:
            done.order = search_order(qmodel, recipe, subset, names, step_weights)
            done.save(done.order, done.gains)
        elif done.gains:
            log.info("fallback auto: %d of %d layers scored before, restored from the checkpoint", len(done.gains),
                     len(done.order))
        order = done.order
        mine = [order[i] for i in distributed.shard(len(order)) if order[i] not in done.gains]  # every world-th
        budget = None if recipe.fallback_time is None else recipe.fallback_time - (clock() - start)  # screen included
        report = analyze(qmodel, subset, step_weights=step_weights, detail=False, blocks=False, only=mine,
                         time_budget=budget, clock=clock, on_row=done.add)
        rows = {r.name: r for part in distributed.all_gather(report.layers) for r in part}
        restored = [n for n in done.gains if n not in rows]
        # MACs per layer: one more forward pass, only for rows not measured now or a budget over every layer
        macs = layer_macs(qmodel, subset) if restored or len(rows) + len(restored) < len(names) else {}
        layers = quant_layers(qmodel.denoiser)
        rows |= {n: Row(n, layers[n].kind, macs.get(n, 0), done.gains[n]) for n in restored}
        report = dataclasses.replace(report, layers=[rows[n] for n in names if n in rows])
        total = None
        if len(rows) < len(names):  # screened or cut short: the MAC budget is still a share of every layer
            total = sum(macs.values())
        if len(rows) < len(order):
            log.warning("fallback auto: the time budget (fallback_time, --fallback-time) of %g s ran out after "
                        "scoring %d of %d candidate layers; the %d layers not scored stay quantized (fallback chose "
                        "among the scored ones only)", recipe.fallback_time, len(rows), len(order),
                        len(order) - len(rows))
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


def candidate_count(recipe: Recipe, n_layers: int) -> int:
    """How many layers the leave-one-out search scores: ``recipe.fallback_candidates``, else every layer up to
    :data:`EXHAUSTIVE_UP_TO` layers and :data:`SCREENED` above (never more than there are); 0: none, the screen's
    estimates choose."""
    n = recipe.fallback_candidates
    if n is None:
        n = n_layers if n_layers <= EXHAUSTIVE_UP_TO else SCREENED
    return min(n, n_layers)


def screen_gains(qmodel: QuantizedDenoiser, subset, names: list[str],
                 step_weights: dict[float, float] | None) -> dict[str, float]:
    """Every layer's gain as :func:`~.sensitivity.screen` estimates it (what fallback chooses by with no
    leave-one-out candidates)."""
    start = time.monotonic()
    estimate = screen(qmodel, subset, step_weights=step_weights, batch=SCREEN_BATCH)
    log.info("fallback auto: a first-order screen estimated the gains of %d layers in %.0f s; they choose (no "
             "leave-one-out: --fallback-candidates N scores the N most promising)", len(names),
             time.monotonic() - start)
    return {n: float(estimate[n]) for n in names}


def search_order(qmodel: QuantizedDenoiser, recipe: Recipe, subset, names: list[str],
                 step_weights: dict[float, float] | None) -> list[str]:
    """The layers the leave-one-out search scores, in the order it scores them: all of ``names`` in model order
    when it scores every layer without a time budget; else ranked by :func:`~.sensitivity.screen` (most
    promising first, so a time budget cuts the least promising), the first :func:`candidate_count`. Under
    torchrun the ranks share the screen's batches and get the same order."""
    count = candidate_count(recipe, len(names))
    if count == len(names) and recipe.fallback_time is None:
        return names
    start = time.monotonic()
    estimate = screen(qmodel, subset, step_weights=step_weights, batch=SCREEN_BATCH)
    log.info("fallback auto: a first-order screen ranked %d layers in %.0f s; leave-one-out scores the first %d",
             len(names), time.monotonic() - start, count)
    return sorted(names, key=lambda n: -estimate[n])[:count]  # stable: ties keep model order
