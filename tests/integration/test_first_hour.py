"""Issue 23, a diffusers user's first hour: a Stable-Diffusion-like folder (a conditional UNet with 4 latent
channels, a PNDM scheduler, a VAE) quantized with ``--steps 4``, then sampled, evaluated and inspected."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from diffusers import PNDMScheduler
from PIL import Image

from dqdeploy.core.errors import CalibrationError
from dqdeploy.core.recipe import W8A8, CalibrationConfig
from dqdeploy.eval.report import EvalConfig, quality_report
from dqdeploy.quant.trajectories import Conditioning, _steps_text, check_guidance
from dqdeploy.stages.generate import choose_sampler
from dqdeploy.stages.quantize import quantize
from dqdeploy.stages.sources import open_model
from dqdeploy.verify.inspect import describe
from tests.helpers import tiny_cond_unet, tiny_flux, tiny_unet, tiny_vae, write_cond_file, write_pipeline
from tests.integration.test_cli_errors import FAST, ROOT, assert_user_error, dqdeploy

CALIB = CalibrationConfig(steps=4, samples=16, trajectories=2, batch_size=2)
RECIPE = W8A8.replace(distill="none", fallback="none")


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    """(pipeline folder with unet/ scheduler/ vae/, cond file, cond file without uncond rows, artifact)."""
    root = tmp_path_factory.mktemp("sd")
    pipe = root / "pipe"
    tiny_cond_unet().save_pretrained(str(pipe / "unet"))
    # Stable Diffusion's own scheduler config: PLMS with the PRK warm-up skipped, timesteps offset by 1
    scheduler = PNDMScheduler(num_train_timesteps=1000, skip_prk_steps=True, steps_offset=1)
    scheduler.save_pretrained(str(pipe / "scheduler"))
    tiny_vae().save_pretrained(str(pipe / "vae"))
    cond = write_cond_file(root / "cond.safetensors")
    no_uncond = write_cond_file(root / "no_uncond.safetensors", uncond=False)
    q = quantize(pipe, RECIPE, CALIB, root / "q", cond_file=cond).path
    return pipe, cond, no_uncond, q


def test_the_calibrated_sampler_and_step_count_are_the_defaults(sd):
    _pipe, _cond, _no_uncond, q = sd
    with open_model(q) as opened:
        assert opened.timesteps == [751.0, 501.0, 501.0, 251.0, 1.0]  # PNDM calls the UNet twice at 501
        sampler = choose_sampler(opened)
    assert (type(sampler.make()).__name__, sampler.steps) == ("PNDMScheduler", 4)
    assert sampler.describe() == "sampling with PNDMScheduler, 4 steps (the calibrated sampler and step count)"
    with open_model(q) as opened:
        asked = choose_sampler(opened, "ddim", 7)
    assert asked.describe() == "sampling with DDIMScheduler, 7 steps (--scheduler, --steps)"


def test_an_export_keeps_the_calibrated_defaults(sd, tmp_path):
    """An export records the scheduler and the timesteps, not the step count: it is found from the timesteps."""
    from dqdeploy.exporters.export import export

    exported = export(sd[3], tmp_path / "e", target="ort", simplify=False)
    with open_model(exported) as opened:
        sampler = choose_sampler(opened)
    assert sampler.describe() == "sampling with PNDMScheduler, 4 steps (the calibrated sampler and step count)"


def test_sample_says_and_uses_the_calibrated_sampler_and_decodes_with_the_vae(sd, tmp_path):
    pipe, cond, _no_uncond, q = sd
    png = tmp_path / "grid.png"
    proc = dqdeploy("sample", q, "--cond", cond, "--n", 2, "--batch-size", 2, "--vae", pipe, "--out", png)
    assert proc.returncode == 0, proc.stderr
    assert "sampling with PNDMScheduler, 4 steps (the calibrated sampler and step count)" in proc.stderr
    with Image.open(png) as img:  # two 16x16 RGB images side by side, shown 4x enlarged, 2 px padding
        assert img.mode == "RGB" and img.size == (2 * (16 * 4 + 2) + 2, 16 * 4 + 4)


def test_sample_of_a_latent_model_without_a_vae_is_refused_before_sampling(sd, tmp_path):
    pipe, cond, _no_uncond, q = sd
    proc = dqdeploy("sample", q, "--cond", cond, "--n", 2, "--out", tmp_path / "grid.png")
    assert_user_error(proc, "4-channel latents", "--vae")
    assert "sampling with" not in proc.stderr and not (tmp_path / "grid.png").exists()
    proc = dqdeploy("sample", q, "--cond", cond, "--n", 2, "--vae", pipe / "unet", "--out", tmp_path / "g.png")
    assert_user_error(proc, "expected an AutoencoderKL")


def test_sample_of_a_diffusers_folder_finds_its_vae(sd, tmp_path):
    pipe, cond, _no_uncond, _q = sd
    proc = dqdeploy("sample", pipe, "--cond", cond, "--n", 1, "--steps", 2, "--out", tmp_path / "grid.png")
    assert proc.returncode == 0, proc.stderr
    assert "sampling with PNDMScheduler, 2 steps (the model folder's sampler, --steps)" in proc.stderr
    with Image.open(tmp_path / "grid.png") as img:
        assert img.mode == "RGB"


def test_eval_against_the_fp_model_uses_the_calibrated_sampler(sd):
    pipe, cond, _no_uncond, q = sd
    report = quality_report(q, pipe, EvalConfig(n=2, step_samples=1, batch_size=2, cond_file=cond))
    assert report["config"]["scheduler"] == "PNDMScheduler" and report["config"]["steps"] == 4
    assert len(report["per_step"]) == 5  # one row per UNet call


def test_inspect_names_each_timestep_once(sd):
    text = describe(sd[3])
    assert "PNDMScheduler x 4 steps (5 denoiser calls)" in text
    assert "4 calibrated (751, 501, 251, 1); 5 denoiser calls: the sampler calls it more than once at 501" in text
    assert _steps_text(64, 4, 5) == "64 x 4 sampler steps, 5 denoiser calls each"
    assert _steps_text(64, 50, 50) == "64 x 50 sampler steps"


def test_guidance_without_unconditional_rows_is_refused_by_every_command(sd, tmp_path):
    pipe, _cond, no_uncond, q = sd
    needles = ("--guidance 3", "no_uncond.safetensors has no 'uncond_encoder_hidden_states'", "--guidance 1")
    assert_user_error(dqdeploy("sample", q, "--cond", no_uncond, "--guidance", 3, "--vae", pipe, "--n", 1,
                               "--out", tmp_path / "s.png"), *needles)
    assert_user_error(dqdeploy("eval", q, "--fp", pipe, "--cond", no_uncond, "--guidance", 3, "--n", 2), *needles)
    proc = dqdeploy("quantize", pipe, "--cond", no_uncond, "--guidance", 3, "--out", tmp_path / "q", *FAST)
    assert_user_error(proc, *needles)
    assert not (tmp_path / "q").exists() and not (tmp_path / "q.checkpoint").exists()
    assert not (tmp_path / "s.png").exists()


def test_guidance_check_spares_flux_and_guidance_one():
    cond = Conditioning(torch.zeros(1, 5, 24))
    with pytest.raises(CalibrationError, match="uncond_encoder_hidden_states"):
        check_guidance(cond, 2.0, tiny_cond_unet())
    check_guidance(cond, 1.0, tiny_cond_unet())  # no guidance asked
    check_guidance(Conditioning(torch.zeros(1, 5, 24), uncond=torch.zeros(1, 5, 24)), 2.0, tiny_cond_unet())
    check_guidance(Conditioning(torch.zeros(1, 5, 16), pooled=torch.zeros(1, 12)), 3.5, tiny_flux())  # an input


def test_progress_bars_stay_out_of_a_log_file(tmp_path):
    """stderr redirected to a file: no carriage-return redraws or cursor escapes of progress bars; export's steps
    logged as they start and end."""
    pipe = write_pipeline(tiny_unet(), tmp_path / "pipe")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TQDM_")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]))
    log = tmp_path / "log.txt"
    for args in (["quantize", pipe, "--out", tmp_path / "q", *FAST],
                 ["sample", tmp_path / "q", "--n", 2, "--out", tmp_path / "s.png"],
                 ["export", tmp_path / "q", "--target", "ort", "--out", tmp_path / "e"]):
        with open(log, "ab") as err:
            proc = subprocess.run([sys.executable, "-m", "dqdeploy.cli", *map(str, args)], stdout=subprocess.PIPE,
                                  stderr=err, env=env, cwd=ROOT, timeout=300)
        assert proc.returncode == 0, log.read_text()[-3000:]
    text = log.read_text()
    assert "\r" not in text and "\x1b[" not in text, repr(text[:500])
    assert "sampling with DDPMScheduler, 4 steps (the calibrated sampler and step count)" in text
    for step in ("load the artifact", "float ONNX export", "Q/DQ surgery", "write the graph"):  # export's steps, no -v
        assert f"dqdeploy.progress: {step} ...\n" in text and f"dqdeploy.progress: {step}: " in text, text[-3000:]


def test_quantize_of_a_loaded_pipeline_or_unet_says_to_pass_the_folder():
    """``dqdeploy.quantize(pipe)`` / ``dqdeploy.quantize(pipe.unet)``, the recipe forgotten too: the folder is
    what is asked for, and how to get one."""
    from diffusers import DDPMPipeline

    import dqdeploy
    from dqdeploy.core.errors import DQDeployError
    from tests.helpers import scheduler

    pipe = DDPMPipeline(unet=tiny_unet(), scheduler=scheduler())
    with pytest.raises(DQDeployError, match="model_dir must be a path, found DDPMPipeline") as err:
        dqdeploy.quantize(pipe)
    assert "pipe.save_pretrained(DIR)" in str(err.value)
    with pytest.raises(DQDeployError, match="model_dir must be a path, found UNet2DModel") as err:
        dqdeploy.quantize(model_dir=pipe.unet)
    assert "scheduler_dir" in str(err.value)
