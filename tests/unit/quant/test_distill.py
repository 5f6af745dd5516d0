"""Block partition (every quantized layer once, in execution order) and block-wise distillation
(BKD) lowering the block losses of a W4A8 tiny UNet; the whole-model baseline."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler

from dqdeploy.core.recipe import W4A8, CalibrationConfig
from dqdeploy.quant.blocks import partition
from dqdeploy.quant.calibrate import init_activation_scales
from dqdeploy.quant.distill import distill_model, model_targets
from dqdeploy.quant.modules import quant_layers
from dqdeploy.quant.timestep import TimestepTable
from dqdeploy.quant.trajectories import collect
from dqdeploy.stages.quantize import build_quantized, example_forward
from tests.helpers import distill, random_calib, tiny_cond_unet, tiny_unet

RECIPE = W4A8.replace(iters=30, batch_size=16, lr_weight=1e-4)


@pytest.fixture(scope="module")
def unet():
    return tiny_unet()


@pytest.fixture(scope="module")
def calib(unet):
    cfg = CalibrationConfig(steps=5, samples=48, trajectories=8, batch_size=8)
    return collect(unet, DDIMScheduler(num_train_timesteps=1000), cfg)


def _calibrated(unet, calib, recipe=RECIPE):
    model, _ = build_quantized(unet, recipe, TimestepTable(calib.timesteps), calib)
    init_activation_scales(model, calib, batch_size=recipe.batch_size)
    return model


def _execution_order(model, run) -> list[str]:
    order: list[str] = []
    handles = [m.register_forward_pre_hook(lambda mod, a, n=n: order.append(n) if n not in order else None)
               for n, m in quant_layers(model.denoiser).items()]
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    return order


@pytest.mark.parametrize("make", [tiny_unet, tiny_cond_unet], ids=["UNet2DModel", "UNet2DConditionModel"])
def test_partition_covers_every_layer_once_in_execution_order(make):
    unet = make()
    calib = random_calib(unet, n=2)
    model, _ = build_quantized(unet, RECIPE, TimestepTable(calib.timesteps), calib)
    run = example_forward(model, calib)
    blocks = partition(model.denoiser, run)
    flat = [layer for b in blocks for layer in b.layers]
    assert len(flat) == len(set(flat))  # no layer in two blocks
    assert set(flat) == set(quant_layers(model.denoiser))  # every quantized layer in one
    assert all(b.layers for b in blocks)
    order = _execution_order(model, run)
    position = {name: i for i, name in enumerate(order)}
    # blocks are contiguous runs of the execution order, listed in that order
    assert [n for b in blocks for n in sorted(b.layers, key=position.__getitem__)] == order
    kinds = {type(model.denoiser.get_submodule(b.name)).__name__ for b in blocks}
    assert {"ResnetBlock2D", "Downsample2D", "Upsample2D", "TimestepEmbedding", "QuantLayer"} <= kinds
    assert kinds & {"Attention", "Transformer2DModel"}
    assert [b.name for b in blocks if b.name in ("conv_in", "conv_out")] == ["conv_in", "conv_out"]


def test_block_distillation_lowers_block_losses(unet, calib):
    model = _calibrated(unet, calib)
    fp_before = {k: v.clone() for k, v in unet.state_dict().items()}
    params_before = {n: (m.weight.detach().clone(), m.weight_quantizer.scale.detach().clone(),
                         m.input_quantizer.scale.detach().clone()) for n, m in quant_layers(model.denoiser).items()}
    blocks = partition(model.denoiser, example_forward(model, calib))
    reports = distill(model, unet, blocks, calib, RECIPE)
    assert [r.name for r in reports] == [b.name for b in blocks]
    assert all(len(r.curve) == RECIPE.iters for r in reports)
    ratios = torch.tensor([r.loss_after / r.loss_before for r in reports])
    # W4A8 leaves real error to remove: the mean block loss drops clearly, and most blocks improve
    assert ratios.mean() < 0.9, ratios
    assert (ratios < 1).float().mean() >= 0.75, ratios
    assert sum(r.loss_after for r in reports) < 0.85 * sum(r.loss_before for r in reports)
    # weights, weight step sizes and per-step activation step sizes all trained ...
    for name, m in quant_layers(model.denoiser).items():
        w, ws, acts = params_before[name]
        assert not torch.equal(m.weight, w), name
        assert not torch.equal(m.weight_quantizer.scale, ws), name
        assert not torch.equal(m.input_quantizer.scale, acts), name
    # ... and the full-precision teacher did not move
    assert all(torch.equal(v, fp_before[k]) for k, v in unet.state_dict().items())
    assert all(not model.denoiser.get_submodule(b.name).training for b in blocks)
    assert all(p.grad is None for p in model.parameters())  # no block keeps its gradients (memory)


def test_zero_iterations_measure_without_changing_anything(unet, calib):
    model = _calibrated(unet, calib)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    blocks = partition(model.denoiser, example_forward(model, calib))[:4]
    reports = distill(model, unet, blocks, calib, RECIPE.replace(iters=0))
    assert all(r.loss_before == r.loss_after and r.loss_before > 0 and not r.curve for r in reports)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_whole_model_distillation_lowers_output_loss(unet, calib):
    model = _calibrated(unet, calib)
    recipe = RECIPE.replace(iters=20)
    reports = distill_model(model, calib, recipe, model_targets(unet, calib, recipe))
    assert [r.name for r in reports] == ["model"]
    assert reports[0].loss_after < reports[0].loss_before


@pytest.mark.parametrize("make", [tiny_unet, tiny_cond_unet], ids=["UNet2DModel", "UNet2DConditionModel"])
def test_partition_of_the_float_model_names_the_blocks_the_conversion_will_have(make):
    """Quantize takes its distillation targets before converting: the float model's partition over
    the layers to be quantized is the quantized model's partition."""
    unet = make()
    calib = random_calib(unet, n=2)
    model, metas = build_quantized(unet, RECIPE, TimestepTable(calib.timesteps), calib)
    before = partition(unet, example_forward(unet, calib), layers=list(metas))
    assert before == partition(model.denoiser, example_forward(model, calib))
