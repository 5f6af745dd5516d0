"""The ``dqdeploy`` command line as a user runs it (a real subprocess, real exit codes): user
errors print ``error: ...`` and exit non-zero without a traceback; one successful quantize + inspect."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import tiny_cond_unet, tiny_unet, write_bare_unet, write_pipeline

ROOT = Path(__file__).resolve().parents[2]
FAST = ["--steps", "4", "--calib-samples", "24", "--trajectories", "4", "--iters", "3", "--batch-size", "8"]


def dqdeploy(*args, cwd: Path | None = None, max_file_bytes: int | None = None, tmpdir: Path | None = None
             ) -> subprocess.CompletedProcess:
    """Run the CLI (``max_file_bytes``: the file-size limit of the process, so that writing past it
    fails as on a full disk; ``tmpdir``: its TMPDIR)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           **({"TMPDIR": str(tmpdir)} if tmpdir else {})}

    def limit() -> None:
        if max_file_bytes is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (max_file_bytes, max_file_bytes))

    return subprocess.run([sys.executable, "-m", "dqdeploy.cli", *map(str, args)], capture_output=True,
                          text=True, env=env, cwd=cwd or ROOT, timeout=300, preexec_fn=limit)


def assert_user_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "error:" in proc.stderr.lower(), proc.stderr
    for needle in needles:
        assert needle in proc.stderr, proc.stderr


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory):
    return write_pipeline(tiny_unet(), tmp_path_factory.mktemp("cli") / "pipe")


@pytest.fixture(scope="module")
def artifact(pipe_dir):
    """A successful ``dqdeploy quantize`` run on a tiny pipeline folder."""
    out = pipe_dir.parent / "q"
    proc = dqdeploy("quantize", pipe_dir, "--out", out, "--recipe", "w4a8", *FAST)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"-> {out}" in proc.stdout and "quantized" in proc.stdout
    assert "before distillation" in proc.stdout
    return out


def test_help_mentions_the_recipe():
    proc = dqdeploy("quantize", "--help")
    assert proc.returncode == 0 and "--recipe" in proc.stdout and "w4a8" in proc.stdout


def test_quantize_then_inspect(artifact):
    proc = dqdeploy("inspect", artifact)
    assert proc.returncode == 0, proc.stderr
    assert "UNet2DModel" in proc.stdout and "w4a8: W4A8" in proc.stdout
    assert "at 8-bit" in proc.stdout and "at 4-bit" in proc.stdout  # conv_in / conv_out stay at 8 bits
    assert "DDPMScheduler x 4 steps" in proc.stdout  # no --scheduler: the folder's own
    as_json = json.loads(dqdeploy("inspect", artifact, "--json").stdout)
    assert as_json["recipe"]["iters"] == 3 and len(as_json["timesteps"]) == 4


def test_missing_model_folder(tmp_path):
    proc = dqdeploy("quantize", tmp_path / "nope", "--out", tmp_path / "q")
    assert_user_error(proc, "does not exist")
    assert not (tmp_path / "q").exists()


def test_unsupported_model_class(tmp_path):
    folder = tmp_path / "vq"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_class_name": "VQModel", "in_channels": 3}))
    proc = dqdeploy("quantize", folder, "--out", tmp_path / "q", "--scheduler-dir", folder)
    assert_user_error(proc, "unsupported model class 'VQModel'", "UNet2DModel")


def test_impossible_recipe_values(pipe_dir, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"weight_bits": 3, "dilation": "foo"}))
    proc = dqdeploy("quantize", pipe_dir, "--out", tmp_path / "q", "--recipe", bad)
    assert_user_error(proc, "weight_bits=3", "scaling='foo'")
    typo = tmp_path / "typo.json"
    typo.write_text(json.dumps({"iters": "many"}))
    assert_user_error(dqdeploy("quantize", pipe_dir, "--out", tmp_path / "q", "--recipe", typo), "iters='many'")
    assert_user_error(dqdeploy("quantize", pipe_dir, "--out", tmp_path / "q", "--recipe", "w3a3"), "unknown recipe")
    assert not (tmp_path / "q").exists()


def test_conditional_model_without_cond(tmp_path):
    unet_dir, sched_dir = write_bare_unet(tiny_cond_unet(), tmp_path)
    proc = dqdeploy("quantize", unet_dir, "--out", tmp_path / "q", "--scheduler-dir", sched_dir, *FAST)
    assert_user_error(proc, "conditional", "--cond")
    assert not (tmp_path / "q").exists()


def test_tampered_artifact_is_refused_by_inspect(artifact, tmp_path):
    import shutil

    copy = tmp_path / "q"
    shutil.copytree(artifact, copy)
    data = bytearray((copy / "model.safetensors").read_bytes())
    data[-10] ^= 0x01
    (copy / "model.safetensors").write_bytes(bytes(data))
    assert_user_error(dqdeploy("inspect", copy), "sha256")
    (copy / "manifest.json").write_text("{ not json")
    assert_user_error(dqdeploy("inspect", copy), "not valid JSON")


def test_existing_output_needs_overwrite(artifact, pipe_dir):
    assert_user_error(dqdeploy("quantize", pipe_dir, "--out", artifact, *FAST), "already exists", "--overwrite")


def test_contradicting_ablation_flags_are_a_usage_error(pipe_dir, tmp_path):
    proc = dqdeploy("quantize", pipe_dir, "--out", tmp_path / "q", "--no-distill", "--distill", "block")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "contradicts" in proc.stderr


def test_a_full_disk_is_a_user_error_and_leaves_no_output(pipe_dir, tmp_path):
    """Writes past the process's file-size limit fail as on a full disk would (EFBIG, like ENOSPC)."""
    out = tmp_path / "q"
    proc = dqdeploy("quantize", pipe_dir, "--out", out, *FAST, max_file_bytes=20_000, tmpdir=tmp_path)
    assert_user_error(proc, "writing failed", "File too large", "fix: free space")
    assert proc.returncode == 1
    assert not out.exists()  # nothing half-written under the output's name
    assert "--resume continues" in proc.stderr  # the calibration set it had written is kept for a resumed run
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.checkpoint"]  # no temporary folder left
