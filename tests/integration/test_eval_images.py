"""Issue 23, evaluation in image space: ``eval Q --fp PIPE`` on a latent model (a tiny Stable-Diffusion-like folder
with a VAE) decodes both models' final latents with the folder's AutoencoderKL and scores the images; the latent
figures stay beside them, labelled; a verdict line on stderr; the side-by-side PNG shows decoded images."""

from __future__ import annotations

import json
import math
import shutil

import pytest
from PIL import Image
from safetensors.torch import save_file

from dqdeploy.eval.compare import image_errors
from dqdeploy.eval.report import EvalConfig, quality_report
from dqdeploy.eval.verdict import CLOSE_PSNR_DB, CLOSE_SSIM, VISIBLE_PSNR_DB, VISIBLE_SSIM, level
from dqdeploy.stages.generate import generate
from tests.integration.test_cli_errors import assert_user_error, dqdeploy
from tests.integration.test_first_hour import sd  # noqa: F401  (the module-scoped fixture: pipe, cond, q)

SMALL = dict(n=2, batch_size=2, step_samples=1)


def test_eval_scores_vae_decoded_images_and_keeps_the_latent_figures(sd, tmp_path):  # noqa: F811
    pipe, cond, _no_uncond, q = sd
    png, report_file = tmp_path / "side.png", tmp_path / "report.json"
    proc = dqdeploy("eval", q, "--fp", pipe, "--cond", cond, "--n", 2, "--batch-size", 2, "--step-samples", 1,
                    "--png", png, "--report", report_file)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    images, latents = out["images"], out["latents"]
    assert images["space"] == f"VAE-decoded images ({pipe / 'vae'})" and out["vae"] == str(pipe / "vae")
    assert latents["space"] == "final latents (not images)"
    assert images["psnr_db"] != latents["psnr_db"] and images["ssim"] != latents["ssim"]
    assert 0 < images["psnr_db"] < 200 and 0 < images["ssim"] <= 1
    assert json.loads(report_file.read_text())["images"] == images
    # the verdict: a line on stderr, the same text in the JSON
    assert out["verdict"]["level"] == level(images["psnr_db"], images["ssim"])
    line = next(s for s in proc.stderr.splitlines() if s.startswith("quality: PSNR"))
    assert line == out["verdict"]["text"]
    assert f"PSNR {images['psnr_db']:.1f} dB, SSIM {images['ssim']:.3f} on VAE-decoded images" in line
    assert "per-step denoiser error" in line and "sampling with PNDMScheduler, 4 steps" in proc.stderr
    # two 16x16 RGB images per panel (8x8 latents decoded), 4x enlarged, 2 px padding; 14 px header, 8 px gap
    panel = 2 * (16 * 4 + 2) + 2
    with Image.open(png) as img:
        assert img.mode == "RGB" and img.size == (2 * panel + 8, 14 + 16 * 4 + 4)


def test_the_image_figures_are_those_of_the_decoded_samples(sd):  # noqa: F811
    """The same numbers from `sample`'s own path: both models' images decoded by the pipeline's VAE."""
    pipe, cond, _no_uncond, q = sd
    report = quality_report(q, pipe, EvalConfig(cond_file=cond, **SMALL))
    kw = dict(n=2, batch_size=2, steps=4, cond_file=cond, vae=pipe)
    fp_images, q_images = generate(pipe, **kw), generate(q, **kw)
    assert fp_images.shape == (2, 3, 16, 16)
    expected = image_errors(fp_images, q_images)
    assert {k: report["images"][k] for k in expected} == pytest.approx(expected)


def test_the_fp_model_against_itself_is_identical(sd):  # noqa: F811
    pipe, cond, _no_uncond, _q = sd
    report = quality_report(pipe, pipe, EvalConfig(cond_file=cond, **SMALL))
    assert math.isinf(report["images"]["psnr_db"]) and report["images"]["ssim"] == pytest.approx(1.0)
    assert math.isinf(report["latents"]["psnr_db"])
    assert report["verdict"]["level"] == "identical" and "identical to FP" in report["verdict"]["text"]


def test_without_a_vae_the_figures_are_on_latents_and_say_so(sd, tmp_path):  # noqa: F811
    pipe, cond, _no_uncond, q = sd
    bare = tmp_path / "no_vae"
    for part in ("unet", "scheduler"):
        shutil.copytree(pipe / part, bare / part)
    report = quality_report(q, bare, EvalConfig(cond_file=cond, **SMALL))
    assert "images" not in report and report["latents"]["psnr_db"] > 0
    assert "PSNR/SSIM are on latents, not images" in report["warnings"][-1]
    assert report["verdict"]["level"] is None and "--vae DIR" in report["verdict"]["text"]
    with_vae = quality_report(q, bare, EvalConfig(cond_file=cond, vae=pipe, **SMALL))  # --vae: the images again
    assert with_vae["images"]["space"].startswith("VAE-decoded images")


def test_a_bad_vae_is_refused_before_sampling(sd, tmp_path):  # noqa: F811
    pipe, cond, _no_uncond, q = sd
    args = ("--fp", pipe, "--cond", cond, "--n", 2, "--step-samples", 1)
    png = tmp_path / "side.png"
    proc = dqdeploy("eval", q, *args, "--vae", pipe / "unet", "--png", png)
    assert_user_error(proc, "expected an AutoencoderKL", "--vae")
    broken = tmp_path / "broken_vae"
    broken.mkdir()
    shutil.copy(pipe / "vae" / "config.json", broken / "config.json")
    save_file({"nothing": __import__("torch").zeros(1)}, str(broken / "diffusion_pytorch_model.safetensors"))
    proc = dqdeploy("eval", q, *args, "--vae", broken, "--png", png)
    assert_user_error(proc, f"cannot load the VAE in {broken}")
    config = json.loads((pipe / "vae" / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, "latent_channels": 16}))
    assert_user_error(dqdeploy("eval", q, *args, "--vae", broken), "decodes 16-channel latents")
    assert "sampling with" not in proc.stderr and not png.exists()
    assert_user_error(dqdeploy("eval", q, "--n", 2, "--fid-ref", tmp_path), "samples are 4x8x8", "pass --vae DIR")


def test_without_fp_the_decoded_samples_meet_the_reference_images(sd, tmp_path):  # noqa: F811
    """`eval Q --vae PIPE --fid-ref FOLDER --grid G`: the Frechet distance and the grid of decoded RGB images."""
    import numpy as np

    pipe, cond, _no_uncond, q = sd
    refs = tmp_path / "refs"
    refs.mkdir()
    for i in range(4):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(refs / f"{i}.png")
    grid = tmp_path / "grid.png"
    proc = dqdeploy("eval", q, "--cond", cond, "--n", 4, "--batch-size", 4, "--vae", pipe, "--fid-ref", refs,
                    "--fid-extractor", "pixels", "--grid", grid)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["vae"] == str(pipe / "vae") and out["fid"]["n_reference"] == 4 and out["fid"]["value"] > 0
    with Image.open(grid) as img:  # 2 x 2 decoded 16x16 RGB images, 4x enlarged, 2 px padding
        assert img.mode == "RGB" and img.size == (2 * (16 * 4 + 2) + 2,) * 2


def test_verdict_thresholds():
    assert level(math.inf, 1.0) == "identical"
    assert level(CLOSE_PSNR_DB, CLOSE_SSIM) == "close"
    assert level(CLOSE_PSNR_DB + 10, CLOSE_SSIM - 0.01) == "visible"
    assert level(VISIBLE_PSNR_DB, VISIBLE_SSIM) == "visible"
    assert level(VISIBLE_PSNR_DB - 0.1, 0.99) == "far" and level(40.0, VISIBLE_SSIM - 0.01) == "far"


def test_latents_are_decoded_a_few_at_a_time_with_the_same_result(sd):  # noqa: F811
    import torch

    from dqdeploy.stages.vae import DECODE_CHUNK, image_decoder
    from tests.helpers import tiny_cond_unet

    decoder = image_decoder(sd[0], "fp", tiny_cond_unet())
    assert decoder is not None and decoder.image_shape((4, 8, 8)) == (3, 16, 16)
    latents = torch.randn(DECODE_CHUNK + 1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    alone = torch.cat([decoder(x[None]) for x in latents])
    assert torch.allclose(decoder(latents), alone, atol=1e-5) and alone.shape == (DECODE_CHUNK + 1, 3, 16, 16)
