"""Sensitivity analysis: a layer made deliberately fragile (one outlier input channel, weight column
scaled down so the function barely changes) must top the ranking, and for activations, not weights."""

from __future__ import annotations

import pytest
import torch

from dqdeploy.core.recipe import W8A8
from dqdeploy.quant.modules import quant_layers
from dqdeploy.quant.sensitivity import analyze, choose_fallback, quantized_only
from dqdeploy.stages.quantize import quantize_denoiser
from tests.helpers import random_calib, tiny_unet

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
