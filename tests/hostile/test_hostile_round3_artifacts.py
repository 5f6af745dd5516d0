"""Round 3, artifacts whose seal an attacker recomputed: step sizes no quantizer produces (negative, absurdly large
or denormal) are refused whatever the seal says; what the range checks cannot see (swapped scales, random 4-bit
bytes) is stated in the README."""

from __future__ import annotations

import pytest

from tests.hostile.runner import has_fix, refused, run
from tests.hostile.test_hostile_artifacts import _retensor

LAYER = "down_blocks.0.resnets.0.conv1"


def _set(key: str, value):
    def change(t):
        if callable(value):
            t[key] = value(t[key])
        else:
            t[key][0] = value
    return change


CASES = {
    "negated weight scales": _set(f"{LAYER}.weight_quantizer.scale", lambda s: -s),
    "one negative weight scale": _set(f"{LAYER}.weight_quantizer.scale", -0.01),
    "negated activation steps": _set(f"{LAYER}.input_quantizer.scale", lambda s: -s),
    "weight scale 1e30": _set(f"{LAYER}.weight_quantizer.scale", 1e30),
    "weight scale 1e-40": _set(f"{LAYER}.weight_quantizer.scale", 1e-40),
    "activation step 1e30": _set(f"{LAYER}.input_quantizer.scale", 1e30),
    "activation step 1e-40": _set(f"{LAYER}.input_quantizer.scale", 1e-40),
}


@pytest.mark.hostile("artifacts", "refused")
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("command", ["export", "sample"])
def test_impossible_step_sizes_are_refused_despite_a_valid_seal(case, command, artifact, copy_of, tmp_path):
    q = copy_of(artifact)
    _retensor("model.safetensors", CASES[case])(q)
    args = (["--out", tmp_path / "e", "--no-simplify"] if command == "export"
            else ["--n", "2", "--steps", "2", "--out", tmp_path / "x.png"])
    result = run(command, q, *args)
    refused(result, "step size", code=2)
    has_fix(result)
    assert not (tmp_path / "e").exists() and not (tmp_path / "x.png").exists()


@pytest.mark.hostile("artifacts", "succeeds")
def test_a_negative_learned_step_is_stored_positive_and_loads_the_same_model(tmp_path):
    """A step size that crossed zero in training: the quantizers use its magnitude, saved as q * |s| (the same
    weight), loaded bit for bit -- also when the step is so small that the channel clips at both ends (-128 once
    came back as +128 wrapped to -128: the sign of every clipped weight of the channel flipped)."""
    import torch

    from dqdeploy import load_quantized
    from dqdeploy.core.recipe import W8A8
    from dqdeploy.io.artifact import save_quantized
    from dqdeploy.quant.modules import quant_layers
    from dqdeploy.stages.quantize import quantize_denoiser
    from tests.helpers import random_calib, scheduler, tiny_unet

    unet = tiny_unet()
    result = quantize_denoiser(unet, W8A8.replace(distill="none", act_init="minmax", fallback="none"),
                               random_calib(unet, n=8), scheduler_config=dict(scheduler().config))
    layer = quant_layers(result.model.denoiser)[LAYER]
    with torch.no_grad():
        layer.weight_quantizer.scale[:3] *= -1
        layer.weight_quantizer.scale[3] = -layer.weight[3].abs().max() / 400
        layer.input_quantizer.scale[:] *= -1
    x = torch.randn(2, 1, 8, 8)
    t = torch.tensor([601.0, 601.0])
    want = result.model(x, t).sample
    loaded = load_quantized(save_quantized(result, tmp_path / "q"))
    assert torch.equal(loaded(x, t).sample, want)
    assert bool((quant_layers(loaded.denoiser)[LAYER].weight_quantizer.scale > 0).all())


@pytest.mark.hostile("artifacts", "refused")
def test_a_resealed_sample_size_is_refused(artifact, copy_of, tmp_path):
    import json

    from tests.hostile.test_hostile_artifacts import _manifest, _write

    q = copy_of(artifact)
    data = _manifest(q)
    data.pop("integrity", None)
    data["model_config"]["sample_size"] = 2 * data["model_config"]["sample_size"]
    _write(q, data)
    result = run("sample", q, "--n", "2", "--steps", "2", "--out", tmp_path / "x.png")
    refused(result, "calibrated at", code=2)
    assert not (tmp_path / "x.png").exists() and json.loads((q / "manifest.json").read_text())
