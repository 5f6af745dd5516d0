"""Issue 23, a first try of a new model: ``quantize --preset quick`` (few steps and samples, no distillation, no
sensitivity search) on the shipped digits model and on a tiny Stable-Diffusion-like folder; the artifact records the
values the preset set, exports and passes ``check``; options given on the command line win over the preset."""

from __future__ import annotations

import json

import pytest
from diffusers import PNDMScheduler

from dqdeploy.cli.quantize import PRESETS
from tests.helpers import tiny_cond_unet, tiny_vae, write_cond_file
from tests.integration.test_cli_errors import ROOT, assert_user_error, dqdeploy

DIGITS = ROOT / "dqdeploy" / "assets" / "digits-ddpm"


def manifest(q) -> dict:
    return json.loads((q / "manifest.json").read_text())


def export_and_check(q, tmp_path) -> None:
    proc = dqdeploy("export", q, "--target", "ort", "--out", tmp_path / "e")
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = dqdeploy("check", q, tmp_path / "e", "--samples", 2)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]


def assert_quick(data: dict) -> None:
    quick = PRESETS["quick"]
    assert (data["calibration"]["steps"], data["calibration"]["samples"], data["calibration"]["trajectories"]) == (
        quick["steps"], quick["calib_samples"], quick["trajectories"])
    assert (data["recipe"]["distill"], data["recipe"]["fallback"]) == ("none", "none")


def test_quick_on_the_shipped_digits_model_exports_and_checks(tmp_path):
    q = tmp_path / "q"
    proc = dqdeploy("quantize", DIGITS, "--preset", "quick", "--out", q)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert ("--preset quick: --steps 10 --calib-samples 128 --trajectories 8 --distill none --fallback none"
            in proc.stderr)
    assert_quick(manifest(q))
    assert "before distillation" not in proc.stdout  # nothing distilled
    export_and_check(q, tmp_path)


@pytest.fixture(scope="module")
def sd_like(tmp_path_factory):
    root = tmp_path_factory.mktemp("sdq")
    tiny_cond_unet().save_pretrained(str(root / "pipe" / "unet"))
    PNDMScheduler(num_train_timesteps=1000, skip_prk_steps=True, steps_offset=1).save_pretrained(
        str(root / "pipe" / "scheduler"))
    tiny_vae().save_pretrained(str(root / "pipe" / "vae"))
    return root / "pipe", write_cond_file(root / "cond.safetensors")


def test_quick_on_a_tiny_sd_like_folder_exports_and_checks(sd_like, tmp_path):
    pipe, cond = sd_like
    q = tmp_path / "q"
    proc = dqdeploy("quantize", pipe, "--cond", cond, "--preset", "quick", "--out", q)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_quick(manifest(q))
    export_and_check(q, tmp_path)


def test_options_on_the_command_line_win_over_the_preset(sd_like, tmp_path):
    """--steps and --calib-samples replace the preset's; --iters asks for distillation and --fallback-budget for the
    sensitivity search, which the preset would turn off; the rest of the preset stays."""
    pipe, cond = sd_like
    q = tmp_path / "q"
    proc = dqdeploy("quantize", pipe, "--cond", cond, "--preset", "quick", "--steps", 3, "--calib-samples", 12,
                    "--iters", 2, "--fallback-budget", 0.1, "--out", q)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "--preset quick: --trajectories 8" in proc.stderr and "--steps 10" not in proc.stderr
    data = manifest(q)
    assert (data["calibration"]["steps"], data["calibration"]["samples"], data["calibration"]["trajectories"]) == (
        3, 12, 8)
    assert (data["recipe"]["distill"], data["recipe"]["iters"]) == ("block", 2)
    assert (data["recipe"]["fallback"], data["recipe"]["fallback_budget"]) == ("auto", 0.1)
    assert "before distillation" in proc.stdout


def chosen(*args) -> dict:
    """What --preset sets for this command line (parsed by the real command, not run)."""
    from dqdeploy.cli.quantize import preset_values, quantize

    ctx = quantize.make_context("quantize", ["MODEL", "--out", "OUT", *map(str, args)])
    return preset_values(ctx, ctx.params["preset"])


def test_what_the_preset_sets_and_what_it_leaves_to_the_command_line():
    assert chosen() == {} and chosen("--preset", "default") == {}
    assert chosen("--preset", "quick") == PRESETS["quick"]
    rest = {k: v for k, v in PRESETS["quick"].items() if k not in ("steps", "distill_mode")}
    assert chosen("--preset", "quick", "--steps", 50, "--no-distill") == rest
    assert chosen("--preset", "quick", "--lr-quant", 1e-3)["fallback"] == "none"
    assert "fallback" not in chosen("--preset", "quick", "--fallback-time", 30)


def test_an_unknown_preset_is_refused_and_help_says_what_quick_sets(tmp_path):
    assert_user_error(dqdeploy("quantize", DIGITS, "--preset", "fast", "--out", tmp_path / "q"),
                      "'fast' is not one of 'default', 'quick'")
    assert not (tmp_path / "q").exists()
    help_text = " ".join(dqdeploy("quantize", "--help").stdout.split())
    assert "--steps 10" in help_text and "--trajectories 8 --distill none --fallback none" in help_text
