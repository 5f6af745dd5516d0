"""kill -9 in the middle of block-wise distillation, then ``quantize --resume``: the artifact equals an
uninterrupted run's, tensor for tensor; a checkpoint is never silently reused nor destroyed."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.hostile.runner import refused, run, spawn, tree

RUN = ["--recipe", "w4a8", "--steps", "3", "--trajectories", "4", "--calib-samples", "16", "--iters", "25",
       "--batch-size", "4", "--fallback", "none"]
BLOCKS = 17  # of tests.helpers.tiny_unet


def _blocks_done(ckpt: Path) -> int:
    try:
        return len(json.loads((ckpt / "checkpoint.json").read_text())["blocks"])
    except (OSError, ValueError, KeyError):
        return 0


def _kill_9_when(proc, ready, never: str) -> None:
    """kill -9 ``proc`` as soon as ``ready()`` (within 300 s, else fail with ``never``)."""
    start = time.monotonic()
    while not ready():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() - start < 300, never
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL


def _artifact_tensors(folder: Path) -> dict[str, torch.Tensor]:
    return {f"{name}/{k}": v for name in ("model.safetensors", "calibration_inputs.safetensors")
            for k, v in load_file(str(folder / name)).items()}


@pytest.mark.hostile("interruption", "resumed")
@pytest.mark.parametrize("attention", ["float", "int8"])
def test_kill_9_during_distillation_then_resume_equals_an_uninterrupted_run(pipe_dir, tmp_path, attention):
    """(With --attention int8 the checkpoint's calibrated model carries the attention quantizers: restored too.)"""
    args = [*RUN, "--attention", attention]
    out, ckpt = tmp_path / "q", tmp_path / "q.checkpoint"
    _kill_9_when(spawn("quantize", pipe_dir, "--out", out, *args), lambda: _blocks_done(ckpt) >= 3,
                 "distillation never reached block 3")
    done = _blocks_done(ckpt)
    assert 3 <= done < BLOCKS and not out.exists()

    before = tree(ckpt)
    refused(run("quantize", pipe_dir, "--out", out, *args), "interrupted run", "--resume", code=2)
    other = [a if a != "25" else "26" for a in args]
    refused(run("quantize", pipe_dir, "--out", out, *other, "--resume"), "another run", "recipe", code=2)
    assert tree(ckpt) == before  # refusals touch nothing

    resumed = spawn("-v", "quantize", pipe_dir, "--out", out, *args, "--resume")
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err
    assert "calibration set restored" in err and err.count("restored from the checkpoint") == done + 2, err
    assert not ckpt.exists()  # removed once the artifact is written

    fresh = spawn("quantize", pipe_dir, "--out", tmp_path / "fresh", *args)
    _, err = fresh.communicate(timeout=600)
    assert fresh.returncode == 0, err
    got, want = _artifact_tensors(out), _artifact_tensors(tmp_path / "fresh")
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want), [k for k in want if not torch.equal(got[k], want[k])]
    manifests = [json.loads((f / "manifest.json").read_text()) for f in (out, tmp_path / "fresh")]
    assert manifests[0]["blocks"] == manifests[1]["blocks"] and len(manifests[0]["blocks"]) == BLOCKS
    assert manifests[0].get("attention") == manifests[1].get("attention")
    assert bool(manifests[0].get("attention")) == (attention == "int8")


def _layers_scored(ckpt: Path) -> int:
    try:
        return len(json.loads((ckpt / "checkpoint.json").read_text())["search"]["gains"])
    except (OSError, ValueError, KeyError):
        return 0


@pytest.mark.hostile("interruption", "resumed")
def test_kill_9_during_the_fallback_search_then_resume_scores_only_the_rest(pipe_dir, tmp_path):
    """The fallback search keeps each scored layer's gain in the checkpoint: a resumed run scores only the layers
    left and chooses what an uninterrupted run chooses (the same artifact)."""
    args = ["--recipe", "w8a8", "--steps", "3", "--trajectories", "4", "--calib-samples", "16", "--no-distill",
            "--fallback", "auto", "--no-quality-check"]
    out, ckpt = tmp_path / "q", tmp_path / "q.checkpoint"
    _kill_9_when(spawn("quantize", pipe_dir, "--out", out, *args), lambda: _layers_scored(ckpt) >= 5,
                 "the search never scored 5 layers")
    scored = _layers_scored(ckpt)
    state = json.loads((ckpt / "checkpoint.json").read_text())
    assert 5 <= scored < len(state["search"]["order"]) and not out.exists()

    resumed = spawn("-v", "quantize", pipe_dir, "--out", out, *args, "--resume")
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err
    assert f"{scored} of {len(state['search']['order'])} layers scored before, restored" in err, err
    assert f"sensitivity (leave one out): 0/{len(state['search']['order']) - scored} layer" in err, err

    fresh = spawn("quantize", pipe_dir, "--out", tmp_path / "fresh", *args)
    _, err = fresh.communicate(timeout=600)
    assert fresh.returncode == 0, err
    got, want = _artifact_tensors(out), _artifact_tensors(tmp_path / "fresh")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    manifests = [json.loads((f / "manifest.json").read_text()) for f in (out, tmp_path / "fresh")]
    assert manifests[0]["fallback"] == manifests[1]["fallback"]
