"""The quantized artifact: exact save -> load round trip, integrity (sha256), format version,
corrupted or incomplete folders, and atomic writes."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from diffusers import DDIMScheduler

from dqdeploy.core.errors import ArtifactError, DQDeployError
from dqdeploy.core.recipe import W4A4, W4A8, W8A8, CalibrationConfig
from dqdeploy.io.artifact import (
    CALIB_INPUTS,
    FORMAT_VERSION,
    MANIFEST,
    WEIGHTS,
    Manifest,
    load_calibration_inputs,
    load_quantized,
    read_manifest,
    save_artifact,
    save_quantized,
    sha256,
)
from dqdeploy.io.atomic import atomic_dir, atomic_write_bytes
from dqdeploy.io.integrity import seal
from dqdeploy.quant.modules import quant_layers
from dqdeploy.quant.trajectories import collect, load_conditioning
from dqdeploy.stages.quantize import quantize_denoiser
from tests.helpers import tiny_cond_unet, tiny_unet, write_cond_file

CALIB = CalibrationConfig(steps=5, samples=24, trajectories=4, batch_size=4)


@pytest.fixture(scope="module")
def uncond(tmp_path_factory):
    """(QuantizeResult, artifact folder) of a W8A8 unconditional UNet (trained a few iterations)."""
    unet = tiny_unet()
    calib = collect(unet, DDIMScheduler(num_train_timesteps=1000), CALIB)
    result = quantize_denoiser(unet, W8A8.replace(iters=3, batch_size=8), calib, CALIB, {"num_train_timesteps": 1000})
    return result, save_quantized(result, tmp_path_factory.mktemp("art") / "q")


@pytest.fixture(scope="module")
def cond(tmp_path_factory):
    """A W4A8 conditional UNet in the ORT layout (output quantizers too), asymmetric activations."""
    root = tmp_path_factory.mktemp("cart")
    unet = tiny_cond_unet()
    conditioning = load_conditioning(write_cond_file(root / "cond.safetensors"))
    calib = collect(unet, DDIMScheduler(num_train_timesteps=1000), CALIB, conditioning)
    recipe = W4A8.replace(iters=3, batch_size=8, layout="ort", act_symmetric=False)
    result = quantize_denoiser(unet, recipe, calib, CALIB)
    return result, save_quantized(result, root / "q")


def _inputs(result, n=4, conditional=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = result.model.config
    steps = result.manifest.timesteps
    # calibrated steps and in-between ones, mixed in one batch
    t = torch.tensor([steps[0], steps[2], (steps[1] + steps[2]) / 2, steps[-1]][:n])
    x = torch.randn(n, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g)
    kwargs = {"encoder_hidden_states": torch.randn(n, 5, cfg.cross_attention_dim, generator=g)} if conditional else {}
    return x, t, kwargs


@pytest.mark.parametrize("which", ["uncond", "cond"])
def test_save_load_reproduces_outputs_exactly(which, request):
    result, path = request.getfixturevalue(which)
    loaded = load_quantized(path)
    x, t, kwargs = _inputs(result, conditional=which == "cond")
    with torch.no_grad():
        expected = result.model(x, t, **kwargs).sample
        got = loaded(x, t, **kwargs).sample
    assert torch.equal(got, expected)
    assert loaded.table.tolist() == result.model.table.tolist()
    assert set(quant_layers(loaded.denoiser)) == set(quant_layers(result.model.denoiser))
    # every tensor (1/s, weight and per-step activation scales, biases, norms) comes back bit-exact;
    # a quantized layer's weight comes back as the fake-quantized weight (integers * scale)
    saved, original = loaded.denoiser.state_dict(), result.model.denoiser.state_dict()
    assert saved.keys() == original.keys()
    layers = quant_layers(result.model.denoiser)
    with torch.no_grad():
        for name, layer in layers.items():
            original[f"{name}.weight"] = layer.weight_quantizer(layer.weight)
    assert all(torch.equal(saved[k], original[k]) for k in saved)


def test_manifest_contents(uncond):
    result, path = uncond
    m = read_manifest(path)
    assert m.format_version == FORMAT_VERSION
    assert m.recipe == W8A8.replace(iters=3, batch_size=8)
    assert m.model_class == "UNet2DModel" and m.model_config["block_out_channels"] == [16, 32]
    assert m.timesteps == result.model.table.tolist() and len(m.timesteps) == CALIB.steps
    assert set(m.layers) == set(quant_layers(result.model.denoiser))
    assert {meta.kind for meta in m.layers.values()} == {"conv", "linear"}
    assert set(m.fallback).isdisjoint(m.layers)  # layers kept in float (fallback auto) are not quantized
    assert m.scheduler_config == {"num_train_timesteps": 1000}
    assert [b["name"] for b in m.blocks] == [r.name for r in result.reports]
    assert m.files == {WEIGHTS: sha256(path / WEIGHTS), CALIB_INPUTS: sha256(path / CALIB_INPUTS)}
    assert Manifest.from_dict(json.loads(m.to_json()), path) == m
    assert json.loads((path / "distill_report.json").read_text())[0]["name"] == result.reports[0].name
    assert (path / "distill_loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = load_calibration_inputs(path)
    assert saved.keys() == result.calib_inputs.keys() == {"sample", "timestep"}
    assert all(torch.equal(saved[k], result.calib_inputs[k]) for k in saved)


@pytest.fixture
def copy(uncond, tmp_path):
    dst = tmp_path / "q"
    shutil.copytree(uncond[1], dst)
    return dst


def _flip_byte(path, offset=-100):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_tampered_weights_are_refused(copy):
    _flip_byte(copy / WEIGHTS)
    with pytest.raises(ArtifactError, match="sha256") as err:
        load_quantized(copy)
    assert WEIGHTS in str(err.value)


def test_tampered_calibration_inputs_are_refused(copy):
    _flip_byte(copy / CALIB_INPUTS)
    with pytest.raises(ArtifactError, match="sha256"):
        load_calibration_inputs(copy)


def test_missing_weights_file(copy):
    (copy / WEIGHTS).unlink()
    with pytest.raises(ArtifactError, match="missing from the artifact"):
        load_quantized(copy)


def _edit_manifest(folder, **changes):
    data = json.loads((folder / MANIFEST).read_text())
    data.update(changes)
    (folder / MANIFEST).write_text(json.dumps(data))


def test_other_format_version_is_refused(copy):
    _edit_manifest(copy, format_version=FORMAT_VERSION + 1)
    with pytest.raises(ArtifactError, match=f"format version {FORMAT_VERSION + 1} is not supported") as err:
        load_quantized(copy)
    assert "re-run `dqdeploy quantize`" in str(err.value)


def test_other_format_is_refused(copy):
    _edit_manifest(copy, format="something-else")
    with pytest.raises(ArtifactError, match="not a dqdeploy quantized artifact"):
        read_manifest(copy)


def test_missing_manifest_reads_as_an_interrupted_run(copy):
    (copy / MANIFEST).unlink()
    with pytest.raises(ArtifactError, match="manifest.json is missing") as err:
        load_quantized(copy)
    assert "interrupted" in str(err.value)


def test_invalid_json_manifest(copy):
    (copy / MANIFEST).write_text('{"format": "dqdeploy-quantized", ')
    with pytest.raises(ArtifactError, match="not valid JSON"):
        load_quantized(copy)


def test_malformed_manifest(copy):
    data = json.loads((copy / MANIFEST).read_text())
    del data["layers"]
    (copy / MANIFEST).write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match="malformed manifest"):
        read_manifest(copy)


def test_hand_edited_manifest_is_refused_by_its_seal(copy):
    data = json.loads((copy / MANIFEST).read_text())
    data["timesteps"][0] += 1.0
    (copy / MANIFEST).write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match="does not match its integrity record"):
        load_quantized(copy)


def test_manifest_and_weights_that_disagree(copy):
    """Even with a recomputed seal, the manifest is cross-checked against the model and the tensors."""
    data = json.loads((copy / MANIFEST).read_text())
    data["layers"]["no_such.layer"] = next(iter(data["layers"].values()))
    (copy / MANIFEST).write_text(json.dumps(seal(data)))
    with pytest.raises(ArtifactError, match="'no_such.layer' does not exist"):
        load_quantized(copy)
    data["layers"].pop("no_such.layer")
    data["layers"].pop(next(iter(data["layers"])))  # the weights file still holds its quantizer tensors
    (copy / MANIFEST).write_text(json.dumps(seal(data)))
    with pytest.raises(ArtifactError, match=r"weights file disagree\): 1 tensors missing"):
        load_quantized(copy)


def test_existing_output_is_kept_without_overwrite(uncond, copy):
    before = sha256(copy / WEIGHTS)
    with pytest.raises(DQDeployError, match="already exists"):
        save_quantized(uncond[0], copy)
    assert sha256(copy / WEIGHTS) == before
    save_quantized(uncond[0], copy, overwrite=True)  # replaced in one rename, no leftovers
    assert load_quantized(copy) is not None
    assert sorted(p.name for p in copy.parent.iterdir()) == ["q"]


def _leftovers(parent):
    return [p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def test_failure_inside_atomic_dir_leaves_nothing(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom"), atomic_dir(target) as tmp:
        (tmp / "partial.bin").write_bytes(b"x" * 100)
        assert tmp.parent == tmp_path and ".out.tmp-" in tmp.name
        raise RuntimeError("boom")
    assert not target.exists()
    assert _leftovers(tmp_path) == [] and list(tmp_path.iterdir()) == []


def test_failed_save_leaves_no_artifact_and_keeps_the_old_one(uncond, tmp_path):
    result, good = uncond
    # the second tensor file cannot be written, after the first one has been
    bad = {WEIGHTS: result.model.denoiser.state_dict(), "broken.safetensors": {"x": "not a tensor"}}
    with pytest.raises(AttributeError):
        save_artifact(tmp_path / "new", result.manifest, bad)
    assert not (tmp_path / "new").exists() and _leftovers(tmp_path) == []
    # with overwrite, a failure keeps the previous artifact intact
    shutil.copytree(good, tmp_path / "old")
    before = {p.name: sha256(p) for p in (tmp_path / "old").iterdir()}
    with pytest.raises(AttributeError):
        save_artifact(tmp_path / "old", result.manifest, bad, overwrite=True)
    assert {p.name: sha256(p) for p in (tmp_path / "old").iterdir()} == before
    assert _leftovers(tmp_path) == []
    assert load_quantized(tmp_path / "old") is not None


def test_atomic_write_bytes(tmp_path):
    path = atomic_write_bytes(tmp_path / "sub" / "f.bin", b"abc")
    assert path.read_bytes() == b"abc"
    atomic_write_bytes(path, b"defg")
    assert path.read_bytes() == b"defg" and [p.name for p in path.parent.iterdir()] == ["f.bin"]


def test_w4a4_artifact_from_before_8_bit_end_activations_still_loads(tmp_path):
    """Before the W4A4 preset kept 8-bit inputs at the first and last layer, its artifacts quantized them at
    4 bits: such an artifact (its layers record the bits they were calibrated with) still loads, as written;
    any other relabelled layer is still refused."""
    unet = tiny_unet()
    calib = collect(unet, DDIMScheduler(num_train_timesteps=1000), CALIB)
    result = quantize_denoiser(unet, W4A4.replace(distill="none", fallback="none"), calib, CALIB,
                               {"num_train_timesteps": 1000})
    q = save_quantized(result, tmp_path / "q")
    data = json.loads((q / MANIFEST).read_text())
    assert data["layers"]["conv_in"]["act_bits"] == 8
    data["layers"]["conv_in"]["act_bits"] = 4
    (q / MANIFEST).write_text(json.dumps(seal(data)))
    loaded = load_quantized(q)
    assert dict(quant_layers(loaded.denoiser))["conv_in"].input_quantizer.qmax == 7
    data["layers"]["down_blocks.0.resnets.0.conv1"]["act_bits"] = 8
    (q / MANIFEST).write_text(json.dumps(seal(data)))
    with pytest.raises(ArtifactError, match="activation quantizer contradicts the recipe"):
        load_quantized(q)
