"""Recipes: presets, JSON round trip, validation with helpful messages, wildcard layer selection,
first/last layers at 8 bits -- checked on the recipe and on a quantized tiny UNet built from it."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from dqdeploy.core.errors import ModelLoadError, RecipeError
from dqdeploy.core.recipe import PRESETS, RECIPE_VERSION, W4A4, W4A8, W8A8, CalibrationConfig, Recipe, resolve_recipe
from dqdeploy.quant.modules import QUANTIZABLE, quant_layers
from dqdeploy.quant.timestep import TimestepTable
from dqdeploy.stages.quantize import build_quantized
from tests.helpers import random_calib, tiny_unet


def test_presets():
    assert set(PRESETS) == {"w8a8", "w7a8", "w4a8", "w4a4"}
    assert (W8A8.weight_bits, W8A8.act_bits) == (8, 8)
    assert (W4A8.weight_bits, W4A8.act_bits) == (4, 8)
    assert (W4A4.weight_bits, W4A4.act_bits) == (4, 4)
    assert W8A8.deployable and W4A8.deployable and not W4A4.deployable
    assert not W8A8.replace(act_symmetric=False).deployable
    # the method's defaults: Weight Dilation, per-step scales, block-wise distillation
    assert (W4A8.scaling, W4A8.timestep_scales, W4A8.distill) == ("wd", "per-step", "block")
    assert resolve_recipe("W4A8") is W4A8 and resolve_recipe("w8a8") is W8A8


def test_recipes_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        W8A8.weight_bits = 4  # type: ignore[misc]
    assert W8A8.replace(weight_bits=4).weight_bits == 4 and W8A8.weight_bits == 8


@pytest.mark.parametrize("recipe", [
    W8A8, W4A8,
    W4A8.replace(name="custom", include=("down_blocks.*", "conv_*"), exclude=("*attentions*",), scaling="smoothquant",
                 smoothquant_alpha=0.7, timestep_scales="collapsed", distill="model", layout="ort", iters=7,
                 first_last_bits=None, act_symmetric=False, lr_weight=0.0),
], ids=["w8a8", "w4a8", "custom"])
def test_json_round_trip(recipe, tmp_path):
    text = recipe.to_json()
    assert json.loads(text)["version"] == RECIPE_VERSION
    assert Recipe.from_dict(json.loads(text)) == recipe
    path = tmp_path / "r.json"
    path.write_text(text)
    assert Recipe.load(path) == recipe
    assert resolve_recipe(str(path)) == recipe


@pytest.mark.parametrize("changes, message", [
    ({"weight_bits": 3}, "weight_bits=3 (expected 4, 7 or 8)"),
    ({"act_bits": 16}, "act_bits=16 (expected 4 or 8)"),
    ({"first_last_bits": 2}, "first_last_bits=2"),
    ({"scaling": "foo"}, "scaling='foo' (expected one of wd, smoothquant, none)"),
    ({"dilation": "foo"}, "scaling='foo' (expected one of wd, smoothquant, none)"),  # the old key name
    ({"timestep_scales": "per-batch"}, "timestep_scales='per-batch'"),
    ({"distill": "layer"}, "distill='layer' (expected one of block, model, none)"),
    ({"layout": "openvino"}, "layout='openvino'"),
    ({"iters": -1}, "iters=-1"),
    ({"batch_size": 0}, "batch_size=0"),
    ({"smoothquant_alpha": 1.5}, "smoothquant_alpha=1.5"),
    ({"lr_quant": -1e-3}, "learning rates must be >= 0"),
    ({"include": ()}, "include is empty"),
    ({"version": 99}, f"reads recipe version {RECIPE_VERSION}"),
    ({"iters": "10"}, "iters='10' (expected an integer)"),
    ({"include": "conv_in"}, "include='conv_in' (expected a list"),
], ids=lambda v: str(v) if isinstance(v, dict) else "")
def test_invalid_values_raise_recipe_error_with_the_reason(changes, message):
    with pytest.raises(RecipeError) as err:
        Recipe.from_dict({**W8A8.to_dict(), **changes})
    assert message in str(err.value)
    assert str(err.value).startswith("invalid recipe")


def test_every_problem_is_reported_at_once_with_a_fix():
    with pytest.raises(RecipeError) as err:
        Recipe(weight_bits=3, scaling="foo", iters=-1)
    text = str(err.value)
    assert "weight_bits=3" in text and "scaling='foo'" in text and "iters=-1" in text
    assert "fix:" in text and "--help" in text


def test_unknown_keys_are_refused_listing_the_allowed_ones():
    with pytest.raises(RecipeError) as err:
        Recipe.from_dict({"weight_bits": 4, "wieght_bits": 4, "lr": 1e-3})
    text = str(err.value)
    assert "unknown recipe keys: lr, wieght_bits" in text and "allowed keys:" in text and "weight_bits" in text


def test_recipe_files_that_cannot_be_read(tmp_path):
    with pytest.raises(RecipeError, match="not found"):
        Recipe.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{weight_bits: 4")
    with pytest.raises(RecipeError, match="not valid JSON"):
        Recipe.load(tmp_path / "bad.json")
    (tmp_path / "list.json").write_text("[4, 8]")
    with pytest.raises(RecipeError, match="JSON object"):
        Recipe.load(tmp_path / "list.json")
    with pytest.raises(RecipeError, match="unknown recipe 'w3a3'") as err:
        resolve_recipe("w3a3")
    assert "w8a8" in str(err.value)  # the hint names the presets


def test_calibration_config_validation():
    with pytest.raises(RecipeError, match="steps"):
        CalibrationConfig(steps=0)
    with pytest.raises(RecipeError, match="guidance"):
        CalibrationConfig(guidance=-1.0)
    assert CalibrationConfig(steps=10).to_dict()["steps"] == 10


def test_wildcard_selection():
    r = W8A8.replace(include=("down_blocks.*", "conv_in"), exclude=("*attentions*", "*.conv_shortcut"))
    assert r.selects("conv_in")
    assert r.selects("down_blocks.0.resnets.0.conv1")
    assert not r.selects("down_blocks.1.attentions.0.to_q")
    assert not r.selects("down_blocks.1.resnets.0.conv_shortcut")
    assert not r.selects("up_blocks.0.resnets.0.conv1")
    assert not r.selects("conv_out")
    assert W8A8.selects("anything.at.all")
    assert W8A8.replace(exclude=("*",)).selects("conv_in") is False


def test_first_and_last_layers_stay_at_8_bits_for_w4a8():
    assert W4A8.weight_bits_for("conv_in") == 8 and W4A8.weight_bits_for("conv_out") == 8
    assert W4A8.weight_bits_for("down_blocks.0.resnets.0.conv1") == 4
    assert W4A8.replace(first_last_bits=None).weight_bits_for("conv_in") == 4


def _build(recipe):
    unet = tiny_unet()
    calib = random_calib(unet, n=2)
    return unet, *build_quantized(unet, recipe, TimestepTable(calib.timesteps), calib)


def test_built_model_follows_the_selection():
    recipe = W8A8.replace(include=("down_blocks.*", "conv_in"), exclude=("*attentions*",))
    unet, model, metas = _build(recipe)
    expected = {n for n, m in unet.named_modules() if isinstance(m, QUANTIZABLE) and recipe.selects(n)}
    assert set(quant_layers(model.denoiser)) == set(metas) == expected
    assert "conv_in" in expected and "down_blocks.0.resnets.0.conv1" in expected
    # the rest keep their FP modules and weights
    assert type(model.denoiser.get_submodule("conv_out")) is torch.nn.Conv2d
    assert torch.equal(model.denoiser.get_submodule("down_blocks.1.attentions.0.to_q").weight,
                       unet.get_submodule("down_blocks.1.attentions.0.to_q").weight)


def test_built_w4a8_model_has_8_bit_first_and_last_layers():
    _, model, metas = _build(W4A8)
    layers = quant_layers(model.denoiser)
    bits = {n: layers[n].weight_quantizer.bits for n in layers}
    assert bits.pop("conv_in") == 8 and bits.pop("conv_out") == 8
    assert set(bits.values()) == {4}
    assert metas["conv_in"].weight_bits == 8 and metas["down_blocks.0.resnets.0.conv1"].weight_bits == 4
    # a 4-bit layer's weights really lie on a 16-level grid; the 8-bit first layer's do not
    w4 = layers["down_blocks.0.resnets.0.conv1"]
    ints = w4.weight_quantizer.integers(w4.weight)
    assert ints.min() >= -8 and ints.max() <= 7
    first = layers["conv_in"]
    assert first.weight_quantizer.integers(first.weight).abs().max() > 7


def test_a_recipe_that_selects_nothing_is_a_model_load_error():
    with pytest.raises(ModelLoadError, match="selects no Conv2d/Linear"):
        _build(W8A8.replace(include=("no_such_layer*",)))


def test_first_last_names_stand_for_each_model_kinds_own_ends():
    """conv_in / conv_out mean a transformer's patch embedding and proj_out (Flux: x_embedder), kept at 8 bits
    by W4A8; the same names inside a UNet (its transformer blocks' proj_out) stay at 4 bits."""
    from dqdeploy.core.denoisers import SPECS
    from dqdeploy.core.recipe import W4A8

    sd3, flux, unet = (SPECS[c].ends for c in ("SD3Transformer2DModel", "FluxTransformer2DModel", "UNet2DModel"))
    assert W4A8.weight_bits_for("pos_embed.proj", sd3) == W4A8.weight_bits_for("proj_out", sd3) == 8
    assert W4A8.weight_bits_for("x_embedder", flux) == 8 and W4A8.weight_bits_for("pos_embed.proj", flux) == 4
    assert W4A8.weight_bits_for("transformer_blocks.0.ff.net.2", sd3) == 4
    assert W4A8.weight_bits_for("conv_in", unet) == 8 and W4A8.weight_bits_for("proj_out", unet) == 4
    assert W4A8.replace(first_last_bits=None).weight_bits_for("proj_out", sd3) == 4


def test_w4a4_keeps_8_bit_activations_at_the_ends_and_on_act8_layers():
    r = W4A4.replace(act8_layers=("*conv_shortcut",))
    assert r.act_bits_for("conv_in") == r.act_bits_for("conv_out") == 8
    assert r.act_bits_for("up_blocks.0.resnets.0.conv_shortcut") == 8
    assert r.act_bits_for("up_blocks.0.resnets.0.conv1") == 4
    assert r.replace(first_last_bits=None).act_bits_for("conv_in") == 4
    # 8-bit activations never drop: W4A8 is unchanged by its ends or by act8 patterns
    assert W4A8.replace(first_last_bits=4, act8_layers=("*",)).act_bits_for("conv_in") == 8
    _, model, metas = _build(r)
    layers = quant_layers(model.denoiser)
    assert layers["conv_in"].input_quantizer.bits == 8 and metas["conv_in"].act_bits == 8
    assert layers["down_blocks.0.resnets.0.conv1"].input_quantizer.bits == 4
    shortcuts = [n for n in layers if n.endswith("conv_shortcut")]
    assert shortcuts and all(layers[n].input_quantizer.bits == 8 for n in shortcuts)


def test_act8_layers_is_left_out_of_the_json_at_its_default():
    """Recipes written before the field existed keep the same JSON (manifests, benchmark hashes)."""
    assert "act8_layers" not in W8A8.to_dict()
    r = W8A8.replace(act8_layers=("conv_*",))
    assert r.to_dict()["act8_layers"] == ("conv_*",) and Recipe.from_dict(json.loads(r.to_json())) == r
    with pytest.raises(RecipeError, match="act8_layers"):
        W8A8.replace(act8_layers="conv_*")


def test_seven_bit_weights_are_a_recipe_and_a_preset():
    import pytest as _pytest

    from dqdeploy.core.errors import RecipeError
    from dqdeploy.core.recipe import PRESETS, W7A8, Recipe

    assert PRESETS["w7a8"] is W7A8 and W7A8.weight_bits == 7 and W7A8.weight_bits_for("conv_in") == 7
    assert Recipe.from_dict(W7A8.to_dict()) == W7A8
    with _pytest.raises(RecipeError, match="act_bits=7"):
        Recipe(act_bits=7)
    with _pytest.raises(RecipeError, match="expected 4, 7 or 8"):
        Recipe(weight_bits=6)
