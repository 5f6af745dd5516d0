"""``dqdeploy eval Q --fp MODEL``: the quality report for a user's own model (no digits classifier),
for an unconditional UNet2DModel artifact, a conditional UNet2DConditionModel artifact under
classifier-free guidance, and an exported folder on ONNX Runtime."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from dqdeploy.core.recipe import W4A8, W8A8, CalibrationConfig
from dqdeploy.eval.report import EvalConfig, quality_report
from dqdeploy.exporters.export import export
from dqdeploy.stages.quantize import quantize
from tests.helpers import tiny_cond_unet, tiny_unet, write_bare_unet, write_cond_file, write_pipeline
from tests.integration.test_cli_errors import assert_user_error, dqdeploy

CALIB = CalibrationConfig(steps=5, samples=32, trajectories=8, batch_size=8)


@pytest.fixture(scope="module")
def uncond(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    pipe = write_pipeline(tiny_unet(), root / "pipe")
    return pipe, quantize(pipe, W8A8.replace(iters=5, batch_size=16), CALIB, root / "q").path


def test_cli_report_json_png_for_a_non_digits_model(uncond, tmp_path):
    pipe, q = uncond
    proc = dqdeploy("eval", q, "--fp", pipe, "--n", 8, "--step-samples", 2, "--batch-size", 8,
                    "--report", tmp_path / "r.json", "--png", tmp_path / "side.png", "--fid-extractor", "pixels")
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert len(report["per_step"]) == 5 and report["config"]["steps"] == 5
    for s in report["per_step"]:
        assert 0 < s["rel_err"] < 1 and 0 < s["cosine"] <= 1 and s["snr_db"] > 0
    assert report["images"]["n"] == 8 and 0 < report["images"]["ssim"] <= 1
    assert report["fid"]["extractor"] == "pixels" and report["fid"]["reference"] == "fp samples"
    assert report["fid"]["fp"] == pytest.approx(0.0, abs=1e-6) and report["fid"]["quantized"] > 0
    assert "digits" not in report  # 1x8x8 is not the digits family
    with Image.open(tmp_path / "side.png") as img:  # two 3x3 grids of 8x8 tiles upscaled 8x, side by side
        assert img.width > 2 * img.height - 40
    assert json.loads(proc.stdout)["images"]["n"] == 8


def test_reference_folder_fid_and_exported_graph_on_ort(uncond, tmp_path):
    pipe, q = uncond
    ref = tmp_path / "ref"
    ref.mkdir()
    for i in range(6):
        Image.new("L", (12, 12), color=40 * i).save(ref / f"{i}.png")
    exported_dir = export(q, tmp_path / "e", target="ort", simplify=False)
    cfg = EvalConfig(n=6, step_samples=2, batch_size=6, runtime="ort", fid_ref=ref)
    report = quality_report(exported_dir, pipe, cfg)
    assert report["kind"] == "export" and report["fid"]["n_reference"] == 6
    assert report["fid"]["extractor"] == "pixels" and report["fid"]["fp"] > 0 and "ratio" in report["fid"]
    assert report["per_step_summary"]["mean_rel_err"] < 1


def test_conditional_artifact_under_guidance(tmp_path):
    unet_dir, sched_dir = write_bare_unet(tiny_cond_unet(), tmp_path)
    cond_file = write_cond_file(tmp_path / "cond.safetensors")
    calib = CalibrationConfig(steps=4, samples=32, trajectories=4, batch_size=4, guidance=3.0)
    q = quantize(unet_dir, W4A8.replace(iters=3, batch_size=16), calib, tmp_path / "q",
                 scheduler_dir=sched_dir, cond_file=cond_file).path
    cfg = EvalConfig(n=4, step_samples=2, batch_size=4, cond_file=cond_file, guidance=3.0, scheduler_dir=sched_dir)
    report = quality_report(q, unet_dir, cfg, png=tmp_path / "side.png")
    assert len(report["per_step"]) == 4 and (tmp_path / "side.png").is_file()
    assert all(0 < s["rel_err"] < 2 for s in report["per_step"])


def test_user_errors(uncond, tmp_path):
    pipe, q = uncond
    assert_user_error(dqdeploy("eval", q, "--png", tmp_path / "x.png"), "--fp")
    assert_user_error(dqdeploy("eval", q, "--n", 4), "not a digits model", "--fp")
    assert_user_error(dqdeploy("eval", q, "--fp", q, "--n", 4), "diffusers model folder")
    assert_user_error(dqdeploy("eval", q, "--fp", pipe, "--n", 4, "--fid-extractor", "nope"),
                      "unknown feature extractor")
    assert not (tmp_path / "x.png").exists()
