"""Sensitivity analysis: a layer made deliberately fragile (one outlier input channel, weight column
scaled down so the function barely changes) must top the ranking, and for activations, not weights."""

from __future__ import annotations

import contextlib

import pytest
import torch

from dqdeploy.core.inputs import forward_hooks
from dqdeploy.core.metrics import relative_error
from dqdeploy.core.recipe import W8A8
from dqdeploy.quant import sensitivity
from dqdeploy.quant.modules import quant_layers
from dqdeploy.quant.sensitivity import ErrorMeter, analyze, as_inputs, choose_fallback, quantized_only, screen
from dqdeploy.stages.quantize import quantize_denoiser
from tests.helpers import random_calib, tiny_cond_unet, tiny_unet

FRAGILE = "up_blocks.1.resnets.0.conv2"


def fragile_unet():
    """tiny_unet whose FRAGILE conv reads one channel 40x larger than the rest (its weight column / 40)."""
    unet = tiny_unet()
    block = unet.get_submodule(FRAGILE.rsplit(".", 1)[0])
    with torch.no_grad():
        block.norm2.weight[3] *= 40.0
        block.norm2.bias[3] = 40.0
        block.conv2.weight[:, 3] /= 40.0
    return unet


@pytest.fixture(scope="module")
def fragile_result():
    unet = fragile_unet()
    recipe = W8A8.replace(scaling="none", distill="none", fallback="none")  # Weight Dilation would shrink the outlier
    return unet, quantize_denoiser(unet, recipe, random_calib(unet, n=16))


def test_finds_the_fragile_layer(fragile_result):
    _, result = fragile_result
    report = analyze(result.model, result.calib_inputs)
    top = report.ranked()[0]
    assert top.name == FRAGILE
    assert top.act > 5 * top.weight  # the outlier hurts the activation quantizer, not the weights
    assert top.alone == max(r.alone for r in report.layers)
    assert len(top.alone_per_step) == len(report.timesteps) == len(report.full_per_step)
    block = max(report.blocks, key=lambda r: r.gain)
    assert FRAGILE.startswith(block.name + ".")
    assert "| " + FRAGILE + " |" in report.table(top=3)


def test_quantized_only_restores_state(fragile_result):
    _, result = fragile_result
    layers = quant_layers(result.model.denoiser)
    with quantized_only(result.model, [FRAGILE], ()):
        on = [n for n, m in layers.items() if m.quantize_weight or m.input_quantizer.enabled]
        assert on == [FRAGILE]
    assert all(m.quantize_weight and m.input_quantizer.enabled for m in layers.values())


def test_fallback_keeps_the_fragile_layer_in_float(fragile_result):
    unet, _ = fragile_result
    recipe = W8A8.replace(scaling="none", distill="none", fallback="auto")
    result = quantize_denoiser(unet, recipe, random_calib(unet, n=16))
    assert FRAGILE in result.manifest.fallback
    assert FRAGILE not in result.manifest.layers
    assert type(result.model.denoiser.get_submodule(FRAGILE)) is torch.nn.Conv2d
    report = analyze(result.model, result.calib_inputs, detail=False, blocks=False)
    plain = quantize_denoiser(unet, recipe.replace(fallback="none"), random_calib(unet, n=16))
    assert report.full < 0.5 * analyze(plain.model, plain.calib_inputs, detail=False, blocks=False).full


def test_choose_fallback_respects_budget(fragile_result):
    _, result = fragile_result
    report = analyze(result.model, result.calib_inputs, detail=False, blocks=False)
    total = sum(r.macs for r in report.layers)
    for budget in (0.0, 0.05, 0.2):
        chosen = choose_fallback(report, budget)
        assert sum(r.macs for r in report.layers if r.name in chosen) <= budget * total
    assert choose_fallback(report, 0.0) == []


def test_the_screen_ranks_the_fragile_layer_first(fragile_result):
    _, result = fragile_result
    model = result.model
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    estimate = screen(model, result.calib_inputs)
    assert set(estimate) == set(quant_layers(model.denoiser))
    assert max(estimate, key=estimate.__getitem__) == FRAGILE
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable  # restored
    assert all(p.grad is None for p in model.parameters())  # nothing accumulated on the model


@pytest.mark.parametrize("name", [FRAGILE, "conv_in", "down_blocks.0.resnets.0.time_emb_proj"])
def test_the_screen_is_the_derivative_of_the_error(fragile_result, name):
    """The screen's estimate for a layer is ``dM/da`` at ``a = 1`` where the layer outputs ``y_fp + a (y - y_fp)``:
    computed here by autograd through a scalar ``a``, one layer at a time, on the same step weights and batches."""
    _, result = fragile_result
    model, inputs = result.model, as_inputs(result.calib_inputs, result.model)
    weights = {float(t): 1.0 + i for i, t in enumerate(sorted(inputs.timestep.float().unique().tolist()))}
    estimate = screen(model, inputs, step_weights=weights, batch=3)[name]
    layer = quant_layers(model.denoiser)[name]
    meter = ErrorMeter(model, inputs, 32, weights)
    a = torch.ones((), dtype=torch.float64, requires_grad=True)

    def mix(mod, args, out):
        with quantized_only(model, [n for n in quant_layers(model.denoiser) if n != name],
                            [n for n in quant_layers(model.denoiser) if n != name]), torch.no_grad():
            fp = mod.forward(*args)  # the layer with its own quantizers off (no hooks)
        # = out at a = 1; the derivative's sum over the output in float64, as the screen sums (in float32 the
        # sum's cancellation leaves ~1% of the first layers' small derivatives, by the CPU's reduction order)
        return out.detach() + ((a - 1) * (out.detach() - fp).double()).float()

    per_sample = meter.weights[meter.step_of] / torch.bincount(meter.step_of)[meter.step_of]
    with forward_hooks([(layer, "post", mix)]), torch.enable_grad():
        # in the screen's batches of 3: a batch of another size runs other kernels, whose rounding moves
        # the quantizers' roundings and with them the small derivatives of the first layers by ~1% on some CPUs
        out = torch.cat([inputs.slice(idx).call(model) for idx in torch.arange(len(inputs)).split(3)])
        err = relative_error(out, meter.ref)
    (derivative,) = torch.autograd.grad((err * per_sample).sum(), a)
    assert estimate == pytest.approx(float(derivative), rel=1e-4, abs=1e-9)
    assert abs(estimate) > 1e-7


def test_the_screen_recomputes_blocks_in_its_backward_pass_with_the_same_result(monkeypatch):
    """The screen's backward pass keeps activations at block boundaries only (diffusers' gradient checkpointing: the
    blocks run again during the backward pass, at the same time steps); its estimates equal those of a backward pass
    that kept everything, and the blocks' own checkpointing setting is restored."""
    model = tiny_cond_unet()
    result = quantize_denoiser(model, W8A8.replace(distill="none", fallback="none"), random_calib(model, n=4))
    qmodel = result.model
    runs: list[int] = []
    block = qmodel.denoiser.down_blocks[0].resnets[0]
    handle = block.register_forward_pre_hook(lambda mod, args: runs.append(1))
    checkpointed_estimate = screen(qmodel, result.calib_inputs)
    checkpointed_runs = len(runs)
    monkeypatch.setattr(sensitivity, "checkpointed", lambda denoiser: contextlib.nullcontext())
    kept_estimate = screen(qmodel, result.calib_inputs)
    handle.remove()
    assert checkpointed_estimate == kept_estimate
    assert checkpointed_runs > len(runs) - checkpointed_runs  # the block ran again in the backward pass
    assert not any(m.gradient_checkpointing for m in qmodel.denoiser.modules() if hasattr(m, "gradient_checkpointing"))
