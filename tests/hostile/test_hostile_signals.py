"""Interruptions with real signals to real subprocesses, and concurrent runs on one output."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from tests.hostile.runner import leftovers, spawn

LONG_QUANTIZE = ["--steps", "50", "--trajectories", "256", "--calib-samples", "512", "--iters", "50",
                 "--batch-size", "8"]


def _fast_quantize(folder: Path) -> list[str]:
    recipe = folder / "fast.json"
    recipe.write_text('{"name": "fast", "distill": "none", "act_init": "minmax"}')
    return ["--recipe", str(recipe), "--steps", "2", "--trajectories", "2", "--calib-samples", "4"]


def _wait_until(predicate, proc, timeout: float = 120.0) -> None:
    start = time.monotonic()
    while not predicate():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() - start < timeout, "the run never reached the point to interrupt"
        time.sleep(0.2)


def _ours(tmpdir: Path) -> list[str]:
    """dqdeploy's entries in a temp folder (ONNX Runtime keeps a small ``.ses`` file of its own there)."""
    return [p.name for p in tmpdir.iterdir() if p.name.startswith("dqdeploy")]


def _torch_loaded(proc) -> bool:
    try:
        return "libtorch" in Path(f"/proc/{proc.pid}/maps").read_text()
    except OSError:
        return False


@pytest.mark.hostile("interruption", "cleaned")
@pytest.mark.parametrize("sig, code, word, delay", [
    (signal.SIGTERM, 143, "terminated", 0.0),  # while torch is still importing: re-delivered after the import
    (signal.SIGTERM, 143, "terminated", 4.0),  # during the calibration trajectories
    (signal.SIGINT, 130, "interrupted", 4.0),
])
def test_signal_during_quantize_exits_cleanly(sig, code, word, delay, pipe_dir, tmp_path):
    proc = spawn("quantize", pipe_dir, "--out", tmp_path / "q", *LONG_QUANTIZE)
    _wait_until(lambda: _torch_loaded(proc), proc)
    time.sleep(delay)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert "Traceback" not in err and word in err, err
    assert not (tmp_path / "q").exists() and leftovers(tmp_path) == []
    assert not (tmp_path / "q.checkpoint").exists()  # nothing worth resuming before the calibration set exists


@pytest.mark.hostile("interruption", "cleaned")
def test_sigterm_while_exporting_for_sampling_removes_every_temporary_folder(artifact, tmp_path):
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    proc = spawn("sample", artifact, "--runtime", "ort", "--n", "4", "--steps", "2", "--out", tmp_path / "grid.png",
                 env_extra={"TMPDIR": str(scratch)})
    _wait_until(lambda: any(scratch.glob("dqdeploy-export-*")), proc)
    time.sleep(2.0)  # inside the on-the-fly export
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143 and "Traceback" not in err and "terminated" in err, err
    assert _ours(scratch) == [] and not (tmp_path / "grid.png").exists()


@pytest.mark.hostile("interruption", "cleaned")
def test_sampling_an_artifact_on_ort_leaves_no_temporary_export(artifact, tmp_path, monkeypatch):
    import tempfile

    from tests.hostile.runner import run

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    result = run("sample", artifact, "--runtime", "ort", "--n", "2", "--steps", "2", "--out", tmp_path / "grid.png")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "grid.png").is_file() and _ours(scratch) == []


@pytest.mark.hostile("concurrency", "one wins")
def test_two_runs_racing_for_one_folder(pipe_dir, tmp_path):
    out = tmp_path / "q"
    fast = _fast_quantize(tmp_path)
    procs = [spawn("quantize", pipe_dir, "--out", out, *fast) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    loser = next(err for code, err in results if code == 2)
    assert "Traceback" not in loser and ("already exists" in loser or "appeared while" in loser), loser
    assert (out / "manifest.json").is_file() and leftovers(tmp_path) == []
    import json

    config = json.loads((out / "manifest.json").read_text())["model_config"]
    assert "_name_or_path" not in config  # no machine-specific absolute path in the artifact


@pytest.mark.hostile("concurrency", "last wins")
def test_two_overwriting_runs_leave_one_complete_folder(pipe_dir, tmp_path):
    out = tmp_path / "q"
    fast = _fast_quantize(tmp_path)
    first = spawn("quantize", pipe_dir, "--out", out, *fast)
    assert first.wait(timeout=300) == 0, first.stderr.read()
    procs = [spawn("quantize", pipe_dir, "--out", out, "--overwrite", "--seed", str(i), *fast) for i in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    # both normally succeed; a run that loses the instant between the two renames says so (exit 2)
    assert 0 in [code for code, _ in results] and all(code in (0, 2) for code, _ in results), results
    assert all("Traceback" not in err for _, err in results), results
    from dqdeploy.io.artifact import load_quantized

    assert load_quantized(out) is not None and leftovers(tmp_path) == []
