"""Round 3, many processes (``quantize --nproc N``): user errors refused before torchrun starts or said once, with
the error's own exit code and no torchrun traceback; SIGTERM ends cleanly; nothing left in the temp folder."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dqdeploy.io.atomic import PARTIAL_MARKER, own_tempdir
from tests.hostile.runner import env

CASE = pytest.mark.hostile("processes", "refused")
SMALL = ["--steps", "3", "--calib-samples", "8", "--trajectories", "2", "--iters", "1", "--fallback", "none"]


def _quantize(pipe_dir: Path, tmp: Path, *args: str,
              extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    scratch = tmp / "tmpdir"
    scratch.mkdir(exist_ok=True)
    return subprocess.run([sys.executable, "-m", "dqdeploy", "quantize", str(pipe_dir), *args],
                          capture_output=True, text=True,
                          env={**env(), "TMPDIR": str(scratch), **(extra_env or {})}, timeout=300)


def _clean(result: subprocess.CompletedProcess, needle: str, code: int = 2) -> None:
    assert result.returncode == code, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr and "ChildFailedError" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.count("error: ") == 1 and needle in result.stderr, result.stderr[-3000:]


@CASE
def test_existing_out_is_refused_once_before_any_process_starts(pipe_dir, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    result = _quantize(pipe_dir, tmp_path, "--out", str(out), "--nproc", "2", *SMALL)
    _clean(result, "already exists")
    assert "torch.distributed" not in result.stderr  # torchrun never started
    assert (out / "keep.txt").read_text() == "precious"


@CASE
def test_more_processes_than_cores_are_refused(pipe_dir, tmp_path):
    _clean(_quantize(pipe_dir, tmp_path, "--out", str(tmp_path / "q"), "--nproc", str((os.cpu_count() or 1) * 32)),
           "more processes than")


@CASE
def test_a_bad_collective_timeout_is_refused_before_launch(pipe_dir, tmp_path):
    _clean(_quantize(pipe_dir, tmp_path, "--out", str(tmp_path / "q"), "--nproc", "2",
                     extra_env={"DQDEPLOY_DIST_TIMEOUT": "x"}),
           "DQDEPLOY_DIST_TIMEOUT")


@CASE
def test_an_error_inside_the_ranks_is_said_once_with_its_exit_code(pipe_dir, tmp_path):
    result = _quantize(pipe_dir, tmp_path, "--out", str(tmp_path / "q"), "--nproc", "2", "--scheduler", "nope", *SMALL)
    _clean(result, "unknown or unsupported scheduler")
    assert not (tmp_path / "q").exists() and list((tmp_path / "tmpdir").iterdir()) == []


@pytest.mark.hostile("processes", "cleaned")
def test_sigterm_to_the_launcher_ends_cleanly(pipe_dir, tmp_path):
    scratch = tmp_path / "tmpdir"
    scratch.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "dqdeploy", "quantize", str(pipe_dir), "--out", str(tmp_path / "q"),
                             "--nproc", "2", "--steps", "3", "--calib-samples", "16", "--trajectories", "4",
                             "--iters", "400", "--fallback", "none"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**env(), "TMPDIR": str(scratch)})
    time.sleep(8)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    assert "Traceback" not in err and err.count("terminated: no output was left behind") == 1, err[-3000:]
    assert not (tmp_path / "q").exists() and list(scratch.iterdir()) == []


@pytest.mark.hostile("processes", "cleaned")
def test_a_dead_ranks_temporary_folder_is_swept_by_the_next_run(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = tmp_path / f"dqdeploy-quantize-{2 ** 22 + 7}-abc"  # pid_max is at most 2**22: no such process
    (dead / "data").mkdir(parents=True)
    (dead / PARTIAL_MARKER).write_text("x")
    (dead / "data" / "fp-00000-000000.safetensors").write_bytes(b"shard")
    foreign = tmp_path / f"dqdeploy-quantize-{2 ** 22 + 8}-mine"  # no marker: not dqdeploy's, kept
    foreign.mkdir()
    with own_tempdir("dqdeploy-quantize") as mine:
        assert mine.is_dir() and not dead.exists() and foreign.is_dir()
    assert not mine.exists()
