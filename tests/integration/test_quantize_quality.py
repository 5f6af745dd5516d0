"""``quantize`` ends with the per-step denoiser error against the FP model on held trajectories (the figure of
``dqdeploy eval --fp``): recorded in the manifest, printed, shown by ``inspect``, and a warning naming the next step
when it is far above the zoo's level at the recipe. Artifacts without the figure still load and inspect."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dqdeploy import quantize
from dqdeploy.core.errors import ArtifactError
from dqdeploy.core.metrics import summarize_steps
from dqdeploy.core.recipe import W4A8, W8A8, CalibrationConfig
from dqdeploy.eval.compare import step_errors
from dqdeploy.io.artifact import load_quantized, read_manifest
from dqdeploy.io.folders import MANIFEST
from dqdeploy.io.integrity import seal
from dqdeploy.io.models import load_model, make_scheduler
from dqdeploy.stages.quality import HELD_SEED, HELD_TRAJECTORIES, artifact_quality, held_count
from dqdeploy.stages.quality_risk import REFERENCE_ENV, REFERENCE_FORMAT, assess, load_reference, next_steps
from dqdeploy.verify.inspect import describe
from tests.helpers import tiny_unet, write_pipeline

ROOT = Path(__file__).resolve().parents[2]
CALIB = CalibrationConfig(scheduler="ddim", steps=6, samples=32, trajectories=6, batch_size=8)
FAST = ["--scheduler", "ddim", "--steps", "4", "--calib-samples", "24", "--trajectories", "4", "--iters", "3",
        "--batch-size", "8"]


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory):
    return write_pipeline(tiny_unet(), tmp_path_factory.mktemp("pipe") / "ddpm")


@pytest.fixture(scope="module")
def result(pipe_dir):
    return quantize(pipe_dir, W8A8.replace(iters=10, batch_size=16), CALIB, pipe_dir.parent / "q")


def _reference(path: Path, warn_above: float) -> Path:
    levels = {"worst": warn_above / 2, "warn_above": warn_above, "members": {"tiny": warn_above / 2}}
    path.write_text(json.dumps({"format": REFERENCE_FORMAT, "far_above": 2.0, "recipes": {"w8a8": levels}}))
    return path


def test_the_figure_is_recorded_and_is_eval_fp_s_figure(result, pipe_dir):
    q = result.manifest.quality
    assert q is not None and read_manifest(result.path).quality == q
    assert q["trajectories"] == HELD_TRAJECTORIES and q["inputs"] == HELD_TRAJECTORIES * CALIB.steps
    assert q["steps"] == CALIB.steps and 0 < q["mean_rel_err"] < 0.2 and q["worst_rel_err"] >= q["mean_rel_err"]
    # never more held trajectories than the calibration's (SD size at the smallest budget: 2)
    assert held_count(dataclasses.replace(CALIB, trajectories=2)) == 2 and held_count(CALIB) == HELD_TRAJECTORIES
    # the figure `eval --fp` computes (step_errors along FP trajectories), on the held trajectories' noise
    loaded = load_model(pipe_dir)
    noise = torch.randn(HELD_TRAJECTORIES, 1, 8, 8, generator=torch.Generator().manual_seed(CALIB.seed + HELD_SEED))
    per_step = step_errors(loaded.denoiser, load_quantized(result.path),
                           make_scheduler("DDIMScheduler", loaded.scheduler_config), noise, CALIB.steps)
    assert summarize_steps(per_step)["mean_rel_err"] == pytest.approx(q["mean_rel_err"], rel=1e-4)
    # measured afresh on the saved artifact: the same figure
    assert artifact_quality(result.path, pipe_dir)["mean_rel_err"] == pytest.approx(q["mean_rel_err"], rel=1e-4)
    assert "quality" in describe(result.path) and f"{q['mean_rel_err']:.4f}" in describe(result.path)


def test_artifact_without_the_figure_loads_and_inspects(result, tmp_path):
    old = tmp_path / "old"
    old.mkdir()
    for f in result.path.iterdir():
        (old / f.name).write_bytes(f.read_bytes())
    data = json.loads((old / MANIFEST).read_text())
    del data["quality"], data["integrity"]
    (old / MANIFEST).write_text(json.dumps(seal(data)))  # as a dqdeploy before the check wrote it
    assert read_manifest(old).quality is None
    assert "not recorded" in describe(old)
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(load_quantized(old)(x, 500).sample, load_quantized(result.path)(x, 500).sample)
    assert "quality" not in json.loads(read_manifest(old).to_json())  # written back as it was


@pytest.mark.parametrize("bad", ["high", {"mean_rel_err": "x"}, {"mean_rel_err": float("nan")}])
def test_a_malformed_figure_is_refused(result, tmp_path, bad):
    data = json.loads((result.path / MANIFEST).read_text())
    data["quality"] = bad
    q = tmp_path / "bad"
    q.mkdir()
    for f in result.path.iterdir():
        (q / f.name).write_bytes(f.read_bytes())
    (q / MANIFEST).write_text(json.dumps(seal(data)))
    with pytest.raises(ArtifactError, match="quality"):
        read_manifest(q)


def test_the_verdict_names_the_next_step(result, tmp_path):
    q = {k: v for k, v in result.manifest.quality.items() if k not in ("reference", "at_risk", "next_step")}
    low = load_reference(_reference(tmp_path / "low.json", q["mean_rel_err"] / 10))
    verdict = assess(q, W8A8, CALIB, low)
    assert verdict["at_risk"] and "--calib-samples" in verdict["next_step"] and "--iters 1200" in verdict["next_step"]
    assert "--recipe w8a8" not in verdict["next_step"] and "--recipe w8a8" in next_steps(W4A8, CALIB)
    assert "block-wise distillation (--distill block)" in next_steps(W8A8.replace(distill="none"), CALIB)
    high = load_reference(_reference(tmp_path / "high.json", q["mean_rel_err"] * 10))
    assert not assess(q, W8A8, CALIB, high)["at_risk"]
    assert assess(q, W4A8, CALIB, high) == q | {"reference": None, "at_risk": False}  # no level for w4a8
    # a run without distillation is compared with the zoo's level without it (w8a8-ptq), not with distilled runs
    assert assess(q, W8A8.replace(distill="none"), CALIB, high) == q | {"reference": None, "at_risk": False}
    (tmp_path / "broken.json").write_text("{}")
    with pytest.raises(ArtifactError, match="quality reference"):
        load_reference(tmp_path / "broken.json")


def _cli(*args, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), **(env or {})}
    return subprocess.run([sys.executable, "-m", "dqdeploy.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=300)


def test_cli_prints_the_figure_and_warns_when_far_above_the_reference(pipe_dir, tmp_path):
    ref = _reference(tmp_path / "tiny.json", 1e-9)  # an artificially small reference: any quantization is far above
    proc = _cli("quantize", pipe_dir, "--out", tmp_path / "q", *FAST, env={REFERENCE_ENV: str(ref)})
    assert proc.returncode == 0, proc.stderr
    assert "per-step denoiser error vs full precision: mean relative error" in proc.stdout
    assert "quality at risk" in proc.stderr and "--iters 12" in proc.stderr and "--fallback-budget" in proc.stderr
    for phase in ("calibration trajectories", "held trajectories", "weight scales", "activation scales (mse)",
                  "output scales", "distillation targets", "block-wise distillation",
                  "quality check"):  # stderr is a pipe: lines, not bars
        assert any(phase in line and "about 0s left" in line for line in proc.stderr.splitlines()), phase
    assert read_manifest(tmp_path / "q").quality["at_risk"] is True
    shown = _cli("inspect", tmp_path / "q")
    assert "AT RISK" in shown.stdout, shown.stdout + shown.stderr
    quiet = _cli("quantize", pipe_dir, "--out", tmp_path / "q2", *FAST, "--no-quality-check",
                 env={REFERENCE_ENV: str(ref)})
    assert quiet.returncode == 0 and "quality at risk" not in quiet.stderr, quiet.stderr
    assert read_manifest(tmp_path / "q2").quality is None
