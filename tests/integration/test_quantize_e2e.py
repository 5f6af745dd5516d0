"""End to end: ``dqdeploy.quantize`` on model folders in the layouts users have (a DDPM pipeline
folder; a bare conditional UNet + scheduler folder + conditioning file under guidance), then the
reloaded artifact sampling inside real diffusers scheduler loops; every ablation switch."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMPipeline, DDIMScheduler

from dqdeploy import quantize
from dqdeploy.core.recipe import W4A8, W8A8, CalibrationConfig
from dqdeploy.io.artifact import load_calibration_inputs, load_quantized, read_manifest
from dqdeploy.io.models import load_denoiser
from dqdeploy.quant.modules import quant_layers
from dqdeploy.quant.quantizer import ActQuantizer
from dqdeploy.quant.trajectories import load_conditioning
from tests.helpers import tiny_cond_unet, tiny_unet, write_bare_unet, write_cond_file, write_pipeline

CALIB = CalibrationConfig(steps=8, samples=48, trajectories=8, batch_size=8)
SMALL = CalibrationConfig(steps=5, samples=32, trajectories=8, batch_size=8)


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory):
    return write_pipeline(tiny_unet(), tmp_path_factory.mktemp("pipe") / "ddpm")


@pytest.fixture(scope="module")
def uncond(pipe_dir):
    out = pipe_dir.parent / "q"
    return quantize(pipe_dir, W8A8.replace(iters=15, batch_size=16), CALIB, out)


@pytest.fixture(scope="module")
def cond_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cond")
    unet_dir, sched_dir = write_bare_unet(tiny_cond_unet(), root)
    return unet_dir, sched_dir, write_cond_file(root / "cond.safetensors")


@pytest.fixture(scope="module")
def cond(cond_setup):
    unet_dir, sched_dir, cond_file = cond_setup
    calib = CalibrationConfig(steps=8, samples=48, trajectories=8, batch_size=8, guidance=3.0)
    return quantize(unet_dir, W4A8.replace(iters=15, batch_size=16), calib, unet_dir.parent / "q",
                    scheduler_dir=sched_dir, cond_file=cond_file)


def _step_errors(quantized, fp, inputs: dict) -> list[float]:
    """Relative error of the quantized UNet vs FP per calibrated step, on the saved calibration
    inputs (the x_t each step really sees; random noise at a late step would be off-distribution)."""
    errors = []
    kwargs_all = {k: v for k, v in inputs.items() if k == "encoder_hidden_states"}
    with torch.no_grad():
        for t in inputs["timestep"].unique():
            m = inputs["timestep"] == t
            kw = {k: v[m] for k, v in kwargs_all.items()}
            q = quantized(inputs["sample"][m], inputs["timestep"][m], **kw).sample
            f = fp(inputs["sample"][m], inputs["timestep"][m], **kw).sample
            errors.append(float((q - f).norm() / f.norm()))
    return errors


def test_unconditional_pipeline_folder(uncond, pipe_dir):
    path = uncond.path
    assert (path / "manifest.json").is_file() and uncond.manifest.model_class == "UNet2DModel"
    assert len(uncond.manifest.timesteps) == CALIB.steps
    loaded = load_quantized(path)
    sched = DDIMScheduler.from_config(read_manifest(path).scheduler_config)

    def sample(unet):
        pipe = DDIMPipeline(unet=unet, scheduler=sched)
        pipe.set_progress_bar_config(disable=True)
        return pipe(batch_size=2, num_inference_steps=2, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images

    images = sample(loaded)
    assert images.shape == (2, 8, 8, 1) and images.dtype.name == "float32"
    assert ((images >= 0) & (images <= 1)).all()
    assert (images == sample(uncond.model)).all()  # the reloaded artifact is the model quantize built
    # W8A8 tracks the FP UNet at every calibrated step (a broken scale would be off by far more)
    errors = _step_errors(loaded, load_denoiser(pipe_dir), load_calibration_inputs(path))
    assert len(errors) == CALIB.steps and max(errors) < 0.1, errors


def test_conditional_bare_unet_with_guidance(cond, cond_setup):
    unet_dir, sched_dir, cond_file = cond_setup
    m = cond.manifest
    assert m.model_class == "UNet2DConditionModel" and m.calibration["guidance"] == 3.0
    assert {"sample", "timestep", "encoder_hidden_states"} == set(cond.calib_inputs)
    loaded = load_quantized(cond.path)
    conditioning = load_conditioning(cond_file)
    text, uncond_emb = conditioning.cond[:2], conditioning.uncond

    def sample(unet):
        sched = DDIMScheduler.from_config(m.scheduler_config)
        sched.set_timesteps(2)
        x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        context = torch.cat([uncond_emb.expand_as(text), text])
        with torch.no_grad():
            for t in sched.timesteps:  # classifier-free guidance: [uncond; cond] in one batch
                eps_u, eps_c = unet(torch.cat([x, x]), t, encoder_hidden_states=context).sample.chunk(2)
                x = sched.step(eps_u + 3.0 * (eps_c - eps_u), t, x).prev_sample
        return x

    out = sample(loaded)
    assert out.shape == (2, 4, 8, 8) and torch.isfinite(out).all()
    assert torch.equal(out, sample(cond.model))
    inputs = load_calibration_inputs(cond.path)
    # under guidance the calibration set holds unconditional and conditional contexts alike
    assert any(torch.equal(c, uncond_emb[0]) for c in inputs["encoder_hidden_states"])
    errors = _step_errors(loaded, load_denoiser(unet_dir), inputs)
    assert max(errors) < 0.3, errors  # 4-bit weights on a random tiny model: coarse, but bounded


def _property_checks(changes: dict, result, loaded) -> None:
    layers = quant_layers(loaded.denoiser)
    if changes.get("scaling") == "none":
        assert all(torch.equal(m.input_scale, torch.ones_like(m.input_scale)) for m in layers.values())
    if changes.get("scaling") in ("smoothquant", None):
        assert sum(not torch.equal(m.input_scale, torch.ones_like(m.input_scale)) for m in layers.values()) > 10
    if changes.get("timestep_scales") == "collapsed":
        assert all(q.scale.numel() == 1 for q in loaded.modules() if isinstance(q, ActQuantizer))
        assert len(result.manifest.timesteps) == SMALL.steps  # still recorded, but all map to row 0
    else:
        assert all(q.scale.numel() == SMALL.steps for q in loaded.modules() if isinstance(q, ActQuantizer))
    if changes.get("fallback", "").startswith("conv_in"):
        assert "conv_in" in result.manifest.fallback and not any("attentions" in n for n in result.manifest.layers)
        assert all("attentions" in n or n == "conv_in" for n in result.manifest.fallback)
    elif changes.get("fallback") == "none":
        assert result.manifest.fallback == []
    if changes.get("distill") == "none":
        assert result.reports == [] and result.manifest.blocks == []
        assert not (result.path / "distill_loss.png").exists()
    elif changes.get("distill") == "model":
        assert [r.name for r in result.reports] == ["model"]
    else:
        assert len(result.reports) > 10
    if changes.get("layout", W8A8.layout) == "ort":
        assert any(meta.output_quant for meta in result.manifest.layers.values())
        assert not any(meta.output_quant for name, meta in result.manifest.layers.items() if name == "conv_out")
        assert any(m.output_scale is not None for m in layers.values())
    else:
        assert not any(meta.output_quant for meta in result.manifest.layers.values())


@pytest.mark.parametrize("changes", [
    {"scaling": "none"},
    {"scaling": "smoothquant"},
    {"timestep_scales": "collapsed"},
    {"distill": "none"},
    {"distill": "model"},
    {"layout": "trt"},
    {"fallback": "none"},
    {"fallback": "conv_in,*attentions*"},
], ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_ablation_switches_write_loadable_artifacts(changes, pipe_dir, tmp_path):
    recipe = W8A8.replace(iters=10, batch_size=16, **changes)
    result = quantize(pipe_dir, recipe, SMALL, tmp_path / "q")
    assert read_manifest(result.path).recipe == recipe
    loaded = load_quantized(result.path)
    x = torch.randn(3, 1, 8, 8)
    t = torch.tensor(result.manifest.timesteps[:3])
    with torch.no_grad():
        assert torch.equal(loaded(x, t).sample, result.model(x, t).sample)
    _property_checks(changes, result, loaded)
