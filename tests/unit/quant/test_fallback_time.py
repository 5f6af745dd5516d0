"""The automatic fallback's time budget (``Recipe.fallback_time``, ``quantize --fallback-time``) and the progress of
its sensitivity search. Time comes from an injected clock that advances one second per reading (read once at the
start and once before each layer), so a budget of ``k + 0.5`` s scores exactly ``k`` layers: no real waiting."""

from __future__ import annotations

import io
import itertools
import json
import logging
import time

import pytest

from dqdeploy.core.errors import RecipeError
from dqdeploy.core.recipe import W8A8, Recipe
from dqdeploy.quant.fallback import SearchProgress, candidate_count, fallback_layers, search_order
from dqdeploy.quant.modules import quant_layers
from dqdeploy.quant.sensitivity import analyze, choose_fallback, layer_macs, screen
from dqdeploy.quant.trajectories import calibration_subset
from dqdeploy.stages.quantize import quantize_denoiser
from dqdeploy.system.progress import Progress, progress, stage
from tests.helpers import random_calib, tiny_unet


def ticking():
    """A clock that reads 0, 1, 2, ... seconds."""
    return itertools.count().__next__


@pytest.fixture(scope="module")
def calibrated():
    unet = tiny_unet()
    calib = random_calib(unet, n=16)
    result = quantize_denoiser(unet, W8A8.replace(distill="none", fallback="none"), calib)
    return result.model, calib


@pytest.fixture
def lines(monkeypatch):
    """Not a terminal (so the progress lines are logged); the ``dqdeploy.progress`` records it logs."""
    monkeypatch.setattr("dqdeploy.system.progress.sys.stderr", io.StringIO())
    records: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: records.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("dqdeploy.progress")
    old = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield records
    logger.removeHandler(handler)
    logger.setLevel(old)


@pytest.mark.parametrize("k", [0, 1, 3])
def test_analyze_stops_after_k_layers(calibrated, k):
    qmodel, calib = calibrated
    names = list(quant_layers(qmodel.denoiser))
    report = analyze(qmodel, calib.inputs, detail=False, blocks=False, time_budget=k + 0.5, clock=ticking())
    assert [r.name for r in report.layers] == names[:k]
    full = analyze(qmodel, calib.inputs, detail=False, blocks=False)
    assert [r.gain for r in report.layers] == [r.gain for r in full.layers[:k]]  # the same rows, measured alike


def test_a_budget_that_is_not_reached_changes_nothing(calibrated):
    qmodel, calib = calibrated
    names = list(quant_layers(qmodel.denoiser))
    report = analyze(qmodel, calib.inputs, detail=False, blocks=False, time_budget=len(names) + 10, clock=ticking())
    assert report == analyze(qmodel, calib.inputs, detail=False, blocks=False)


def test_fallback_chooses_among_the_scored_layers_and_says_so(calibrated, caplog):
    """Under a budget the search scores the layers in the screen's order (most promising first); the screen's
    time counts against the budget (one more clock reading: k - 1 layers scored)."""
    qmodel, calib = calibrated
    names = list(quant_layers(qmodel.denoiser))
    k = 4
    recipe = W8A8.replace(fallback="auto", fallback_budget=0.5, fallback_time=k + 0.5)
    with caplog.at_level(logging.WARNING, logger="dqdeploy.quant.fallback"):
        chosen = fallback_layers(qmodel, recipe, calib, clock=ticking())
    subset = calibration_subset(calib, steps=8, per_step=8, seed=0)
    scored = search_order(qmodel, recipe, subset, names, None)[:k - 1]
    assert scored != names[:k - 1]  # not model order
    assert chosen and set(chosen) <= set(scored)
    warning = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warning) == 1
    assert f"scoring {k - 1} of {len(names)} candidate layers" in warning[0]
    assert f"the {len(names) - k + 1} layers not scored stay quantized" in warning[0]
    assert fallback_layers(qmodel, recipe, calib, clock=ticking()) == chosen  # deterministic
    # the same choice as choose_fallback over that measured set, the MAC budget a share of every layer's MACs
    report = analyze(qmodel, subset, detail=False, blocks=False, only=scored)
    report.layers.sort(key=lambda r: names.index(r.name))
    assert chosen == choose_fallback(report, 0.5, total_macs=sum(layer_macs(qmodel, subset).values()))


def test_without_a_budget_no_warning(calibrated, caplog):
    qmodel, calib = calibrated
    with caplog.at_level(logging.WARNING, logger="dqdeploy.quant.fallback"):
        fallback_layers(qmodel, W8A8.replace(fallback="auto"), calib, clock=ticking())
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


def test_the_mac_budget_is_a_share_of_every_layer(calibrated):
    qmodel, calib = calibrated
    report = analyze(qmodel, calib.inputs, detail=False, blocks=False)
    top = report.ranked()[0]
    part = type(report)(report.timesteps, report.step_weights, report.full, report.full_per_step, [top], [])
    assert choose_fallback(part, 0.5) == []  # alone, the layer is 100% of the MACs the report holds
    assert choose_fallback(part, 0.5, total_macs=top.macs * 2) == [top.name]  # half of every layer's MACs
    assert choose_fallback(part, 0.5, total_macs=top.macs * 2 - 1) == []


def test_the_search_reports_progress(calibrated, lines):
    qmodel, calib = calibrated
    n = len(quant_layers(qmodel.denoiser))
    fallback_layers(qmodel, W8A8.replace(fallback="auto"), calib)
    assert lines[0] == f"sensitivity (leave one out): 0/{n} layer"
    assert lines[-1].startswith(f"sensitivity (leave one out): {n}/{n} layer, ")
    assert "elapsed, about 0s left" in lines[-1]


def test_progress_logs_at_least_every_interval(lines):
    clock = ticking()  # 1 s per item (one reading at the start, one after each item)
    assert list(progress(range(200), 200, "search", unit="layer", every=60.0, clock=clock)) == list(range(200))
    assert lines[0] == "search: 0/200 layer"
    assert lines[1] == "search: 60/200 layer, 1m00s elapsed, about 2m20s left"
    assert [line.split(",")[0] for line in lines[1:]] == [f"search: {d}/200 layer" for d in (60, 120, 180, 200)]


def test_a_counter_reports_units_of_any_size_and_can_be_off(lines):
    """``Progress`` counted by hand (a calibration chunk ticks once per trajectory in it): the same lines as
    ``progress``; ``enabled=False`` (loading an artifact: nothing searched) shows nothing."""
    with Progress(10, "trajectories", unit="traj-step", clock=ticking()) as shown:
        for _ in range(5):
            shown.update(2)
    assert lines[0] == "trajectories: 0/10 traj-step"
    assert lines[-1].startswith("trajectories: 10/10 traj-step, ") and len(lines) == 2
    lines.clear()
    with Progress(3, "weight scales", unit="layer", enabled=False) as shown:
        shown.update(3)
    assert not lines


def _wait_for(lines, text):
    deadline = time.monotonic() + 60
    while not any(text in line for line in lines) and time.monotonic() < deadline:
        time.sleep(0.01)


def test_a_step_without_its_own_progress_is_no_silence(lines):
    """A quantize step with no progress of its own (one traced forward of a large model) still writes a line
    whenever ``every`` seconds pass; inside it, a ``Progress`` alone writes (the innermost heartbeat)."""
    with stage(logging.getLogger("dqdeploy.test"), "input analysis", every=0.2):
        _wait_for(lines, "still running")
    assert lines and all(line.startswith("input analysis: still running, ") for line in lines)
    lines.clear()
    with stage(logging.getLogger("dqdeploy.test"), "calibration", every=0.2):
        with Progress(2, "trajectories", unit="traj-step", every=0.2) as shown:
            _wait_for(lines, "the next one still running")
            shown.update(2)
    assert lines[0] == "trajectories: 0/2 traj-step" and lines[-1].startswith("trajectories: 2/2 traj-step, ")
    assert not any(line.startswith("calibration: still running") for line in lines)


def test_a_long_item_is_no_silence(lines):
    """One item longer than ``every``: the heartbeat line comes while it runs (the item waits for it)."""

    def items():
        yield 0
        deadline = time.monotonic() + 60
        while not any("still running" in line for line in lines) and time.monotonic() < deadline:
            time.sleep(0.01)
        yield 1

    assert list(progress(items(), 2, "search", unit="layer", every=0.2)) == [0, 1]
    beats = [line for line in lines if line.endswith("the next one still running")]
    assert beats and all(line.startswith("search: 1/2 layer, ") for line in beats)
    assert lines[-1].startswith("search: 2/2 layer, ")


def test_progress_on_a_terminal_is_a_bar(capsys, lines):
    assert list(progress(range(3), 3, "search", unit="layer", terminal=True)) == [0, 1, 2]
    assert not lines  # the bar shows it
    err = capsys.readouterr().err
    assert "search" in err and "layer" in err


@pytest.mark.parametrize("value", [0, -1, 0.0, float("nan"), float("inf"), "60", True])
def test_recipe_refuses_a_bad_fallback_time(value):
    with pytest.raises(RecipeError, match="fallback_time"):
        W8A8.replace(fallback_time=value)


def test_fallback_time_is_left_out_of_the_json_at_its_default():
    assert "fallback_time" not in W8A8.to_dict()
    r = W8A8.replace(fallback_time=90)
    assert r.to_dict()["fallback_time"] == 90 and Recipe.from_dict(json.loads(r.to_json())) == r


@pytest.mark.parametrize("layers, candidates, expected", [(93, None, 93), (192, None, 192), (193, None, 0),
                                                          (282, None, 0), (282, 10, 10), (20, 50, 20), (93, 0, 0)])
def test_how_many_layers_the_search_scores(layers, candidates, expected):
    assert candidate_count(W8A8.replace(fallback_candidates=candidates), layers) == expected


def test_with_no_candidates_the_screens_estimates_choose(calibrated, lines):
    """``fallback_candidates=0`` (the default above 192 layers): no leave-one-out; the screen's estimates are the
    gains fallback chooses by (kept as the search's progress, so a resumed run does not screen again)."""
    qmodel, calib = calibrated
    done = SearchProgress()
    chosen = fallback_layers(qmodel, W8A8.replace(fallback="auto", fallback_candidates=0, fallback_budget=0.5), calib,
                             done=done)
    estimate = screen(qmodel, calibration_subset(calib, steps=8, per_step=8, seed=0))
    assert done.gains == {n: float(v) for n, v in estimate.items()} and done.order == list(estimate)
    assert chosen and chosen[0] == max(estimate, key=estimate.__getitem__)
    assert not any(line.startswith("sensitivity (leave one out): 1/") for line in lines)  # nothing scored


def test_a_screened_search_chooses_among_the_screens_top_layers(calibrated):
    qmodel, calib = calibrated
    names = list(quant_layers(qmodel.denoiser))
    recipe = W8A8.replace(fallback="auto", fallback_budget=0.5, fallback_candidates=4)
    subset = calibration_subset(calib, steps=8, per_step=8, seed=0)
    top = search_order(qmodel, recipe, subset, names, None)
    assert len(top) == 4 and top != names[:4]
    chosen = fallback_layers(qmodel, recipe, calib)
    assert chosen and set(chosen) <= set(top)
    # every layer a candidate (no budget): the exhaustive search, in model order, the screen not run
    assert search_order(qmodel, recipe.replace(fallback_candidates=len(names)), subset, names, None) == names
    assert fallback_layers(qmodel, recipe.replace(fallback_candidates=len(names)), calib) == \
        fallback_layers(qmodel, recipe.replace(fallback_candidates=None), calib)
