"""Integer weight storage (artifact format 2): 4-bit packing, exact round trips for W8A8 and W4A8
(odd weight counts included), the file's size, tampered integer tensors, loading without the
weight-scale search, format-1 artifacts still read, and the stored calibration subset."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDIMScheduler, UNet2DModel
from safetensors.torch import load_file

import dqdeploy.quant.quantizer as quantizer_module
from dqdeploy.core.errors import ArtifactError
from dqdeploy.core.recipe import W4A8, W8A8, CalibrationConfig
from dqdeploy.io.artifact import CALIB_INPUTS, WEIGHTS, load_quantized, read_manifest, save_artifact, save_quantized
from dqdeploy.io.storage import file_header, int_key, pack_int4, packed_size, unpack_int4, weight_bytes
from dqdeploy.quant.modules import quant_layers
from dqdeploy.quant.primitives import CLIP_RATIOS, qrange, quant_error, search_weight_scale
from dqdeploy.quant.trajectories import calibration_subset, collect
from dqdeploy.stages.quantize import quantize_denoiser
from dqdeploy.verify.inspect import describe
from tests.helpers import random_calib, tiny_unet

CALIB = CalibrationConfig(steps=4, samples=16, trajectories=4, batch_size=4)


def odd_unet() -> UNet2DModel:
    """9 and 18 channels, 3 input channels: conv weights of 243 and 729 values (odd counts)."""
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, block_out_channels=(9, 18), layers_per_block=1,
        norm_num_groups=3, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=9,
    ).eval()


def _artifact(unet, recipe, path):
    calib = collect(unet, DDIMScheduler(num_train_timesteps=1000), CALIB)
    result = quantize_denoiser(unet, recipe.replace(iters=2, batch_size=8), calib, CALIB, {"num_train_timesteps": 1000})
    return result, save_quantized(result, path)


@pytest.fixture(scope="module")
def w8(tmp_path_factory):
    return _artifact(tiny_unet(), W8A8, tmp_path_factory.mktemp("w8") / "q")


@pytest.fixture(scope="module")
def w4_odd(tmp_path_factory):
    return _artifact(odd_unet(), W4A8, tmp_path_factory.mktemp("w4") / "q")


@pytest.mark.parametrize("n", [1, 2, 7, 16, 729])
def test_int4_packing_round_trips_every_value(n):
    q = torch.arange(n) % 16 - 8  # every value of [-8, 7]
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.numel() == packed_size(n)
    assert torch.equal(unpack_int4(packed, n), q.to(torch.int8))


def test_int4_packing_order_is_low_nibble_first_twos_complement():
    assert pack_int4(torch.tensor([1, -1, -8])).tolist() == [0xF1, 0x08]  # odd count: last high nibble 0


def _outputs(model, cfg, seed=0):
    g = torch.Generator().manual_seed(seed)
    steps = model.table.tolist()
    t = torch.tensor([steps[0], steps[-1], (steps[0] + steps[1]) / 2])
    x = torch.randn(3, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g)
    with torch.no_grad():
        return model(x, t).sample


@pytest.mark.parametrize("which", ["w8", "w4_odd"])
def test_round_trip_outputs_are_bit_identical(which, request):
    result, path = request.getfixturevalue(which)
    assert torch.equal(_outputs(load_quantized(path), result.model.config), _outputs(result.model, result.model.config))


def test_weights_are_stored_as_integers(w8, w4_odd):
    for (result, path), bits in ((w8, 8), (w4_odd, 4)):
        layers = quant_layers(result.model.denoiser)
        header = file_header(path / WEIGHTS)
        assert not any(f"{n}.weight" in header for n in layers)
        numels = [layers[n].weight.numel() for n in layers if layers[n].weight_quantizer.bits == bits]
        assert any(n % 2 for n in numels) or bits == 8  # the odd model has odd weight counts
        stored = sum(math.prod(header[int_key(n, bits)][1]) for n in layers if layers[n].weight_quantizer.bits == bits)
        assert stored == (sum(numels) if bits == 8 else sum(packed_size(n) for n in numels))
        assert weight_bytes(header)[f"int{bits}"] == stored


def test_w8a8_weights_file_is_about_a_quarter_of_fp32(w8):
    result, path = w8
    fp32_bytes = sum(p.numel() * 4 for p in result.model.denoiser.parameters())
    sizes = weight_bytes(file_header(path / WEIGHTS))
    quantized = sum(m.weight.numel() for m in quant_layers(result.model.denoiser).values())
    assert sizes["int8"] == quantized  # one byte per weight
    # the rest: biases, norms, per-step tables, 1/s and the layers kept in float (a big share of a tiny model)
    assert sum(sizes.values()) < 0.35 * fp32_bytes, sizes
    assert "8-bit integers" in describe(path)


def _tampered(src, dst, change):
    """A copy of artifact ``src`` whose weights file went through ``change``, written (sha256 and
    seal recomputed) by dqdeploy's own writer: only the tensor checks can refuse it."""
    tensors = load_file(str(src / WEIGHTS))
    change(tensors)
    save_artifact(dst, read_manifest(src), {WEIGHTS: tensors, CALIB_INPUTS: load_file(str(src / CALIB_INPUTS))})
    return dst


def _packed_layer(result):
    return next(n for n, m in quant_layers(result.model.denoiser).items()
                if m.weight_quantizer.bits == 4 and m.weight.numel() % 2)


def test_tampered_integer_tensors_are_refused(w4_odd, tmp_path):
    result, path = w4_odd
    key = int_key(_packed_layer(result), 4)

    def pad_nibble(t):
        t[key][-1] |= 0x70

    cases = {
        "out of range (unused nibble set)": (pad_nibble, "unused nibble"),
        "wrong dtype": (lambda t: t.update({key: t[key].to(torch.int8)}), "is I8, expected U8"),
        "wrong packed size": (lambda t: t.update({key: t[key][:-1]}), "has shape"),
        "float weights in place of integers": (lambda t: t.update({key: t[key].float()}), "is F32, expected U8"),
    }
    for i, (name, (change, message)) in enumerate(cases.items()):
        with pytest.raises(ArtifactError, match=message):
            load_quantized(_tampered(path, tmp_path / f"q{i}", change))


def test_load_does_not_search_weight_scales(w4_odd, monkeypatch):
    calls = []
    original = quantizer_module.search_weight_scale
    monkeypatch.setattr(quantizer_module, "search_weight_scale", lambda *a, **k: calls.append(1) or original(*a, **k))
    result, path = w4_odd
    load_quantized(path)
    assert calls == []
    fresh = quantize_denoiser(odd_unet(), W4A8.replace(distill="none", fallback="none"), random_calib(odd_unet()))
    assert len(calls) == len(quant_layers(fresh.model.denoiser))  # the spy sees the quantize-time search


def test_format_1_artifacts_with_float_weights_are_still_read(w8, tmp_path):
    result, path = w8
    manifest = read_manifest(path)
    manifest.format_version = 1
    old = save_artifact(tmp_path / "v1", manifest, {WEIGHTS: result.model.denoiser.state_dict(),
                                                   CALIB_INPUTS: load_file(str(path / CALIB_INPUTS))})
    assert torch.equal(_outputs(load_quantized(old), result.model.config), _outputs(result.model, result.model.config))
    assert "format v1" in describe(old)


def _reference_search(w, bits, p=2.4):
    """The weight-scale search as first written: one ratio at a time, strict improvement."""
    qmin, qmax = qrange(bits, True)
    flat = w.reshape(w.shape[0], -1).float()
    amax = flat.abs().amax(1).clamp(min=1e-12)
    best_err, best = torch.full_like(amax, float("inf")), amax / qmax
    for ratio in CLIP_RATIOS:
        scale = (ratio * amax / qmax)[:, None]
        err = quant_error(flat, scale, torch.zeros_like(scale), qmin, qmax, p)
        best_err, best = torch.where(err < best_err, err, best_err), torch.where(err < best_err, scale[:, 0], best)
    return best


@pytest.mark.parametrize("shape", [(64, 32, 3, 3), (7, 300), (1, 5), (33, 9, 1, 1)])
def test_weight_scale_search_result_is_unchanged(shape):
    g = torch.Generator().manual_seed(sum(shape))
    w = torch.randn(shape, generator=g) * torch.rand(shape[0], *([1] * (len(shape) - 1)), generator=g)
    for bits in (4, 8):
        assert torch.equal(search_weight_scale(w, bits), _reference_search(w, bits))


def test_stored_calibration_subset_keeps_every_step():
    unet = tiny_unet()
    steps = [float(t) for t in range(951, 0, -50)]  # 20 steps
    calib = random_calib(unet, n=120, timesteps=steps)
    subset = calibration_subset(calib)
    assert sorted(subset["timestep"].unique().tolist()) == sorted(steps)
    assert len(subset["timestep"]) == 20 * 3  # 64 // 20 samples per step
    limited = calibration_subset(calib, steps=8, per_step=8)
    assert len(limited["timestep"].unique()) == 8 and len(limited["timestep"]) == 48  # 6 samples per step exist
