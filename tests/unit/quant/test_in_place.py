"""Quantizing in place (one copy of the weights): the same artifact as converting a copy, fallback
layers put back bit for bit from disk, and the kept float layers' files removed."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from dqdeploy.core.recipe import W4A8
from dqdeploy.io.float_layers import FloatLayers
from dqdeploy.io.storage import stored_state
from dqdeploy.quant.modules import QuantLayer, quant_layers
from dqdeploy.stages.quantize import quantize_denoiser
from tests.helpers import random_calib, tiny_cond_unet


def test_float_layers_round_trip_exactly_through_disk(tmp_path):
    conv, linear = nn.Conv2d(3, 5, 3), nn.Linear(4, 2, bias=False)
    originals = {"a": copy.deepcopy(conv.state_dict()), "b": copy.deepcopy(linear.state_dict())}
    floats = FloatLayers(["a", "b"], tmp_path / "data")
    floats.keep("a", conv)
    floats.keep("b", linear)
    floats.keep("c", nn.Linear(2, 2))  # not a candidate: not kept
    assert conv.weight.is_meta and linear.weight.is_meta  # no memory held
    assert len(list((tmp_path / "data").iterdir())) == 2
    back = floats.restore("a")
    assert back is conv and not back.weight.is_meta
    assert all(torch.equal(t, originals["a"][k]) for k, t in back.state_dict().items())
    floats.clear()
    assert not list((tmp_path / "data").iterdir())


@pytest.mark.slow
def test_in_place_writes_what_a_copy_writes(tmp_path):
    fp = tiny_cond_unet()
    calib = random_calib(fp, n=16)
    recipe = W4A8.replace(iters=3, batch_size=8, fallback="auto", fallback_budget=0.2)
    reference = quantize_denoiser(fp, recipe, calib)
    assert not quant_layers(fp)  # the copy was converted, fp is untouched
    model = copy.deepcopy(fp)
    result = quantize_denoiser(model, recipe, calib, in_place=True)
    assert result.model.denoiser is model and quant_layers(model)
    assert result.manifest.fallback and result.manifest.fallback == reference.manifest.fallback
    assert result.manifest.blocks == reference.manifest.blocks
    ours, theirs = stored_state(result.model.denoiser), stored_state(reference.model.denoiser)
    assert sorted(ours) == sorted(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    for name in result.manifest.fallback:  # back from disk, bit for bit
        layer = model.get_submodule(name)
        assert not isinstance(layer, QuantLayer)
        assert all(torch.equal(t, fp.get_submodule(name).state_dict()[k]) for k, t in layer.state_dict().items())


def test_a_block_whose_layers_all_fall_back_is_not_distilled():
    fp = tiny_cond_unet()
    calib = random_calib(fp, n=8)
    result = quantize_denoiser(fp, W4A8.replace(iters=2, batch_size=8, fallback="conv_in,time_embedding.*"), calib,
                               in_place=True)
    names = [b["name"] for b in result.manifest.blocks]
    assert "conv_in" not in names and "time_embedding" not in names and "conv_out" in names
    assert not isinstance(fp.conv_in, QuantLayer) and isinstance(fp.conv_out, QuantLayer)


def test_float_layers_loaded_from_a_file_are_read_back_from_it(tmp_path):
    """A layer whose every tensor came from the model's safetensors file is read back from there (nothing
    written); one with a tensor from elsewhere goes to the data folder."""
    from safetensors.torch import save_file

    conv, linear = nn.Conv2d(3, 5, 3), nn.Linear(4, 2)
    originals = {"a": copy.deepcopy(conv.state_dict()), "b": copy.deepcopy(linear.state_dict())}
    source = tmp_path / "model.safetensors"
    save_file({"a.weight": conv.weight.detach(), "a.bias": conv.bias.detach(), "b.weight": linear.weight.detach()},
              str(source))
    floats = FloatLayers(["a", "b"], tmp_path / "data", {"a.weight": source, "a.bias": source, "b.weight": source})
    floats.keep("a", conv)
    floats.keep("b", linear)  # b.bias was not read from the file
    assert conv.weight.is_meta and linear.weight.is_meta
    assert [p.name for p in (tmp_path / "data").iterdir()] == ["float-00000.safetensors"]  # b only
    for name in ("a", "b"):
        back = floats.restore(name)
        assert all(torch.equal(t, originals[name][k]) for k, t in back.state_dict().items()), name
    floats.clear()
    assert source.is_file() and not list((tmp_path / "data").iterdir())  # the model's file is never touched
