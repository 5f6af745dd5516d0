"""Frechet-distance feature extractors (built-in, TorchScript, module:function) and reference folders."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from dqdeploy.core.errors import DQDeployError
from dqdeploy.eval.features import extract, load_extractor, load_reference_images, pixel_features


class _Mean(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


def test_torchscript_and_import_path_extractors(tmp_path):
    path = tmp_path / "f.pt"
    torch.jit.save(torch.jit.script(_Mean()), str(path))
    x = torch.rand(5, 3, 8, 8) * 2 - 1
    assert torch.allclose(extract(load_extractor(str(path)), x), x.mean(dim=(2, 3)))
    fn = load_extractor("dqdeploy.eval.features:pixel_features")
    assert extract(fn, x).shape == (5, 3 * 8 * 8)
    assert extract(load_extractor("pixels"), torch.zeros(2, 1, 32, 32)).shape == (2, 64)  # pooled to 8x8


def test_bad_extractors_are_typed_errors(tmp_path):
    for spec, needle in (("nope", "unknown feature extractor"), (str(tmp_path / "x.pt"), "not found"),
                         ("dqdeploy.nothing:fn", "cannot import")):
        with pytest.raises(DQDeployError, match=needle):
            load_extractor(spec)
    with pytest.raises(DQDeployError, match="non-finite"):
        extract(lambda x: x.flatten(1) / 0.0, torch.zeros(2, 1, 4, 4))


def test_reference_folder_resized_to_model_channels(tmp_path):
    for i, colour in enumerate(((0, 0, 0), (255, 255, 255), (255, 0, 0))):
        Image.new("RGB", (20, 10), color=colour).save(tmp_path / f"{i}.png")
    (tmp_path / "notes.txt").write_text("ignored")
    rgb = load_reference_images(tmp_path, 3, (8, 8))
    assert rgb.shape == (3, 3, 8, 8) and rgb[0].max() == -1 and rgb[1].min() == 1
    assert rgb[2, 0].min() == 1 and rgb[2, 1].max() == -1
    assert load_reference_images(tmp_path, 1, (4, 4)).shape == (3, 1, 4, 4)
    with pytest.raises(DQDeployError, match="1- or 3-channel"):
        load_reference_images(tmp_path, 4, (4, 4))
    with pytest.raises(DQDeployError, match="does not exist"):
        load_reference_images(tmp_path / "missing", 1, (4, 4))
    assert pixel_features(torch.zeros(1, 1, 4, 4)).shape == (1, 16)
