"""``quantize --fallback-time``: bad values are refused before any calibration (exit 2, no traceback, the option
named); a budget that runs out says how many layers were scored, and the search reports its progress."""

from __future__ import annotations

import pytest

import dqdeploy
from dqdeploy.core.errors import DQDeployError
from tests.hostile.runner import refused, run, spawn

CASE = pytest.mark.hostile("api", "refused")
SMALL = ["--steps", "2", "--calib-samples", "8", "--trajectories", "2", "--iters", "1"]


@pytest.fixture
def no_calibration(monkeypatch):
    import dqdeploy.stages.quantize as stage

    monkeypatch.setattr(stage, "collect", lambda *a, **k: pytest.fail("calibrated before the option was checked"))


@CASE
@pytest.mark.parametrize("value, match", [("0", "> 0"), ("-5", "> 0"), ("abc", "not a number"), ("nan", "> 0"),
                                          ("inf", "> 0"), ("", "not a number")])
def test_a_bad_fallback_time_is_refused(value, match, pipe_dir, tmp_path, no_calibration):
    result = run("quantize", pipe_dir, "--out", tmp_path / "q", "--fallback-time", value, *SMALL)
    refused(result, "--fallback-time", match, code=2)
    assert not (tmp_path / "q").exists() and not (tmp_path / "q.checkpoint").exists()


@CASE
@pytest.mark.parametrize("fallback", ["none", "conv_in"])
def test_a_fallback_time_without_auto_is_refused(fallback, pipe_dir, tmp_path, no_calibration):
    result = run("quantize", pipe_dir, "--out", tmp_path / "q", "--fallback", fallback, "--fallback-time", "60",
                 *SMALL)
    refused(result, "--fallback-time applies to --fallback auto", code=2)


@CASE
@pytest.mark.parametrize("value", [0, -1, "60", float("nan"), True])
def test_the_api_refuses_a_bad_fallback_time(value, pipe_dir, no_calibration):
    with pytest.raises(DQDeployError, match="fallback_time"):
        dqdeploy.quantize(pipe_dir, {"fallback_time": value})


@CASE
@pytest.mark.parametrize("value, match", [("-1", "-1 is not in the range"), ("-3", "not in the range"),
                                          ("2.5", "not a valid integer"), ("all", "not a valid integer")])
def test_a_bad_fallback_candidates_is_refused(value, match, pipe_dir, tmp_path, no_calibration):
    result = run("quantize", pipe_dir, "--out", tmp_path / "q", "--fallback-candidates", value, *SMALL)
    refused(result, "--fallback-candidates", match, code=2)
    assert not (tmp_path / "q").exists()


@CASE
def test_fallback_candidates_without_auto_is_refused(pipe_dir, tmp_path, no_calibration):
    result = run("quantize", pipe_dir, "--out", tmp_path / "q", "--fallback", "none", "--fallback-candidates", "4",
                 *SMALL)
    refused(result, "--fallback-candidates applies to --fallback auto", code=2)


@CASE
@pytest.mark.parametrize("value", [-1, "8", 2.5, True])  # (0: the screen alone chooses)
def test_the_api_refuses_bad_fallback_candidates(value, pipe_dir, no_calibration):
    with pytest.raises(DQDeployError, match="fallback_candidates"):
        dqdeploy.quantize(pipe_dir, {"fallback_candidates": value})


@pytest.mark.hostile("api", "handled")
def test_a_budget_that_runs_out_says_what_was_scored(pipe_dir, tmp_path):
    """A budget far below one forward pass: deterministically no layer scored, none kept in float."""
    proc = spawn("quantize", pipe_dir, "--out", tmp_path / "q", "--fallback-time", "1e-9", *SMALL)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    assert "sensitivity (leave one out): 0/" in err  # the progress line (not a terminal, no -v needed)
    assert "ran out after scoring 0 of " in err and "layers not scored stay quantized" in err
    assert "Traceback" not in err and "kept in float" not in out
    assert dqdeploy.load_quantized(tmp_path / "q") is not None  # the artifact loads; its recipe records the budget
    assert '"fallback_time": 1e-09' in (tmp_path / "q" / "manifest.json").read_text()


def _blocks_done(ckpt) -> int:
    import json

    try:
        return len(json.loads((ckpt / "checkpoint.json").read_text())["blocks"])
    except (OSError, ValueError, KeyError):
        return 0


@pytest.mark.hostile("interruption", "resumed")
def test_resume_keeps_the_fallback_the_budgeted_search_chose(pipe_dir, tmp_path):
    """kill -9 after the calibrated model is checkpointed: --resume with the same --fallback-time keeps the layers
    that search chose (no second search); another --fallback-time is another run, refused."""
    import json
    import signal
    import time

    args = ["--out", tmp_path / "q", "--recipe", "w4a8", "--steps", "3", "--trajectories", "4", "--calib-samples",
            "16", "--iters", "25", "--batch-size", "4", "--fallback-time", "3600"]
    ckpt = tmp_path / "q.checkpoint"
    proc = spawn("quantize", pipe_dir, *args)
    start = time.monotonic()
    while not _blocks_done(ckpt):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() - start < 300, "distillation never started"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    refused(run("quantize", pipe_dir, *args[:-1], "3000", "--resume"), "another run", "recipe", code=2)
    resumed = spawn("quantize", pipe_dir, *args, "--resume")
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err
    assert "sensitivity (leave one out)" not in err  # the fallback came from the checkpoint
    assert json.loads((tmp_path / "q" / "manifest.json").read_text())["recipe"]["fallback_time"] == 3600
