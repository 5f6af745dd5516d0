"""Per-time-step activation scale initialisation (TPQ) on real FP trajectories of a tiny UNet,
checked against activation statistics gathered independently; non-finite calibration data."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler

from dqdeploy.core.errors import CalibrationError
from dqdeploy.core.inputs import DenoiserInputs
from dqdeploy.core.recipe import W8A8, CalibrationConfig
from dqdeploy.quant.calibrate import init_activation_scales, init_output_scales, input_channel_absmax
from dqdeploy.quant.modules import quant_layers, set_act_quant
from dqdeploy.quant.primitives import CLIP_RATIOS
from dqdeploy.quant.timestep import TimestepTable
from dqdeploy.quant.trajectories import CalibrationSet, collect
from dqdeploy.stages.quantize import build_quantized, quantize_denoiser
from tests.helpers import tiny_unet

STEPS = 5


@pytest.fixture(scope="module")
def unet():
    return tiny_unet()


@pytest.fixture(scope="module")
def calib(unet):
    cfg = CalibrationConfig(steps=STEPS, samples=40, trajectories=8, batch_size=8)
    return collect(unet, DDIMScheduler(num_train_timesteps=1000), cfg)


def _build(unet, calib, recipe=W8A8):
    model, _ = build_quantized(unet, recipe, TimestepTable(calib.timesteps), calib)
    return model


@torch.no_grad()
def _observed(model, calib) -> dict[str, dict[int, torch.Tensor]]:
    """Per layer and step row: the flattened inputs its activation quantizer sees (x / s), with
    every activation quantizer off (as during calibration)."""
    seen: dict[str, dict[int, list]] = {n: {} for n in quant_layers(model)}
    handles = []
    for name, layer in quant_layers(model).items():
        def hook(mod, args, name=name, layer=layer):
            x = layer.dilated_input(args[0])
            rows = layer.input_quantizer.rows_for(x)
            for r in rows.unique().tolist():
                seen[name].setdefault(r, []).append(x[rows == r].flatten())
        handles.append(layer.register_forward_pre_hook(hook))
    set_act_quant(model, False)
    try:
        for batch in calib.batches(16):
            batch.call(model)
    finally:
        set_act_quant(model, True)
        for h in handles:
            h.remove()
    return {n: {r: torch.cat(v) for r, v in per.items()} for n, per in seen.items()}


def _mse(x: torch.Tensor, scale: float) -> float:
    return float(((torch.clamp(torch.round(x / scale), -128, 127) * scale - x) ** 2).sum())


def test_calibration_data_covers_every_step(calib):
    assert len(calib.timesteps) == STEPS and len(calib) == 40
    assert set(calib.rows.tolist()) == set(range(STEPS))
    assert torch.equal(torch.tensor(calib.timesteps)[calib.rows], calib.inputs.timestep)


def test_minmax_scales_are_each_steps_max_abs(unet, calib):
    model = _build(unet, calib)
    init_activation_scales(model, calib, method="minmax", batch_size=16)
    observed = _observed(model, calib)
    for name, layer in quant_layers(model).items():
        expected = torch.stack([observed[name][r].abs().max() / 127 for r in range(STEPS)])
        assert torch.allclose(layer.input_quantizer.scale, expected, rtol=1e-5), name
        assert layer.input_quantizer.enabled  # switched back on after calibration


def test_mse_scales_differ_per_step_and_never_exceed_the_observed_range(unet, calib):
    model = _build(unet, calib)
    init_activation_scales(model, calib, method="mse", batch_size=16)
    observed = _observed(model, calib)
    spreads = []
    for name, layer in quant_layers(model).items():
        scale = layer.input_quantizer.scale.detach()
        for r in range(STEPS):
            x = observed[name][r]
            full = float(x.abs().max()) / 127
            ratio = float(scale[r]) / full
            assert CLIP_RATIOS[0] - 1e-4 <= ratio <= 1 + 1e-5, (name, r, ratio)
            # the chosen clipping is never worse than covering the whole range
            assert _mse(x, float(scale[r])) <= _mse(x, full) * (1 + 1e-5), (name, r)
        spreads.append(float(scale.max() / scale.min()))
    assert all(s > 1.0 for s in spreads)  # no layer has one scale for every step
    assert sum(s > 1.05 for s in spreads) >= 0.9 * len(spreads)
    assert not any(h for layer in quant_layers(model).values() for h in layer._forward_pre_hooks)


def test_a_step_without_samples_takes_the_range_of_all_steps(unet, calib):
    keep = calib.rows != 2
    partial = CalibrationSet(calib.inputs.slice(keep), calib.rows[keep], calib.timesteps)
    model = _build(unet, partial)
    init_activation_scales(model, partial, method="minmax", batch_size=16)
    for name, layer in quant_layers(model).items():
        scale = layer.input_quantizer.scale.detach()
        others = torch.cat([scale[:2], scale[3:]])
        assert torch.isclose(scale[2], others.max()), name


def test_asymmetric_scales_cover_the_observed_range(unet, calib):
    model = _build(unet, calib, W8A8.replace(act_symmetric=False))
    init_activation_scales(model, calib, method="minmax", batch_size=16)
    observed = _observed(model, calib)
    for name, layer in quant_layers(model).items():
        scale, zero_point = layer.input_quantizer.scale.detach(), layer.input_quantizer.zero_point.detach()
        for r in range(STEPS):
            x = observed[name][r]
            lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
            assert float(scale[r]) == pytest.approx((hi - lo) / 255, rel=1e-5)
            zp = float(zero_point[r])
            assert 0 <= zp <= 255 and zp == round(zp)
            # the low end of the range lands on the grid's 0 (within half a step)
            assert zp + lo / float(scale[r]) == pytest.approx(0.0, abs=0.5 + 1e-4)


def test_smoothquant_statistics_are_per_input_channel_max_abs(unet, calib):
    names = ["conv_in", "down_blocks.1.attentions.0.to_q", "time_embedding.linear_1"]
    got = input_channel_absmax(unet, names, calib, batch_size=16)
    assert torch.allclose(got["conv_in"], calib.inputs.sample.abs().amax(dim=(0, 2, 3)))
    assert got["down_blocks.1.attentions.0.to_q"].shape == (32,)
    assert got["time_embedding.linear_1"].shape == (unet.time_embedding.linear_1.in_features,)
    assert not any(m._forward_pre_hooks for m in unet.modules())


def test_output_scales_are_initialised_for_the_ort_layout(unet, calib):
    model = _build(unet, calib, W8A8.replace(layout="ort"))
    init_activation_scales(model, calib, method="mse", batch_size=16)
    init_output_scales(model, calib, batch_size=16)
    with_output = [m for m in quant_layers(model).values() if m.output_scale is not None]
    assert with_output and all(m.output_enabled for m in with_output)
    values = [float(m.output_scale.detach()) for m in with_output]
    assert all(v > 0 and v != 1.0 for v in values)


def test_nan_in_calibration_data_is_a_calibration_error(unet, calib):
    x = calib.inputs.sample.clone()
    x[3, 0, 2, 2] = float("nan")
    bad = CalibrationSet(DenoiserInputs(x, calib.inputs.timestep), calib.rows, calib.timesteps)
    with pytest.raises(CalibrationError, match="non-finite"):
        quantize_denoiser(unet, W8A8.replace(distill="none"), bad)


def test_diverging_fp_model_is_reported_while_collecting():
    unet = tiny_unet()
    with torch.no_grad():
        unet.conv_out.weight[0, 0, 0, 0] = float("inf")
    cfg = CalibrationConfig(steps=2, samples=4, trajectories=2, batch_size=2)
    with pytest.raises(CalibrationError, match="NaN/Inf"):
        collect(unet, DDIMScheduler(num_train_timesteps=1000), cfg)
