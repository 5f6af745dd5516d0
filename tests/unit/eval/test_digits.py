"""Digits data, the shipped classifier and DDPM assets, and PNG grids."""

import json

import pytest
import torch
from PIL import Image

from dqdeploy.core.errors import DQDeployError, ModelLoadError
from dqdeploy.eval import digits as digits_mod
from dqdeploy.eval.digits import (
    DigitsClassifier,
    classifier_accuracy,
    classifier_dir,
    digits_model_dir,
    digits_split,
    load_classifier,
    load_digits_images,
    load_digits_labels,
    save_classifier,
)
from dqdeploy.eval.grid import save_grid


def test_images_shape_range_and_labels():
    x = load_digits_images()
    assert x.shape == (1797, 1, 16, 16) and x.dtype == torch.float32
    assert x.min() == -1.0 and x.max() == 1.0
    assert (x[:, :, :, 0] < -0.9).float().mean() > 0.99  # left column is background, ink is +1
    assert (x[:, 0, 0, 0] == -1.0).all() and x.mean() < -0.2
    x8 = load_digits_images(8)
    assert x8.shape == (1797, 1, 8, 8)
    assert torch.equal(load_digits_images(), x)  # deterministic
    y = load_digits_labels()
    assert y.shape == (1797,) and y.dtype == torch.long and set(y.tolist()) == set(range(10))
    with pytest.raises(DQDeployError):
        load_digits_images(4)


def test_split_is_seeded_and_disjoint():
    tr, te = digits_split(seed=0)
    tr2, te2 = digits_split(seed=0)
    assert torch.equal(tr, tr2) and torch.equal(te, te2)
    assert len(set(tr.tolist()) & set(te.tolist())) == 0 and tr.numel() + te.numel() == 1797
    assert not torch.equal(te, digits_split(seed=1)[1])


def test_shipped_classifier_accuracy():
    clf = load_classifier()
    meta = json.loads((classifier_dir() / "config.json").read_text())
    split = meta["metrics"]["split"]
    _, test_idx = digits_split(seed=split["seed"], test_fraction=split["test_fraction"])
    x, y = load_digits_images(), load_digits_labels()
    acc = classifier_accuracy(clf, x[test_idx], y[test_idx])
    assert acc > 0.95
    assert acc == pytest.approx(meta["metrics"]["heldout_accuracy"], abs=1e-9)
    feats = clf.features(x[:7])
    assert feats.shape == (7, clf.config.feature_dim) and 64 <= feats.shape[1] <= 128
    # a freshly initialised classifier is at chance level: the accuracy check can fail
    assert classifier_accuracy(DigitsClassifier(), x[test_idx], y[test_idx]) < 0.5


def test_classifier_round_trip_and_errors(tmp_path):
    model = DigitsClassifier().eval()
    save_classifier(model, tmp_path / "clf")
    loaded = load_classifier(tmp_path / "clf")
    x = load_digits_images()[:5]
    assert torch.equal(model(x), loaded(x))
    assert not list((tmp_path / "clf").glob("*.pt*")) and not list((tmp_path / "clf").glob("*.bin"))
    with pytest.raises(ModelLoadError, match="train_digits.py"):
        load_classifier(tmp_path / "missing")
    with pytest.raises(DQDeployError):
        loaded(torch.zeros(2, 1, 8, 8))


def test_shipped_ddpm_loads_and_samples():
    from diffusers import DDIMScheduler, UNet2DModel

    path = digits_model_dir()
    assert (path / "model_index.json").is_file()
    assert (path / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    unet = UNet2DModel.from_pretrained(path, subfolder="unet").eval()
    sched = DDIMScheduler.from_pretrained(path, subfolder="scheduler")
    assert sched.config.num_train_timesteps == 1000 and sched.config.prediction_type == "epsilon"
    assert 1e6 < sum(p.numel() for p in unet.parameters()) < 2e6
    assert any("Attn" in t for t in unet.config.down_block_types)
    sched.set_timesteps(2)
    x = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(unet(x, t).sample, t, x).prev_sample
    assert x.shape == (3, 1, 16, 16) and torch.isfinite(x).all()


def test_missing_ddpm_names_the_training_command(tmp_path, monkeypatch):
    monkeypatch.setattr(digits_mod, "ASSETS_DIR", tmp_path)
    with pytest.raises(ModelLoadError, match="python scripts/train_digits.py"):
        digits_model_dir()


def test_save_grid_png(tmp_path):
    imgs = torch.linspace(-1, 1, 10 * 16 * 16).reshape(10, 1, 16, 16)
    out = save_grid(imgs, tmp_path / "sub" / "g.png", nrow=4, padding=2, scale=3)
    assert out == tmp_path / "sub" / "g.png"
    with Image.open(out) as im:
        im.load()
        assert im.format == "PNG" and im.mode == "L"
        assert im.size == (4 * (48 + 2) + 2, 3 * (48 + 2) + 2)
        assert im.getpixel((2, 2)) == 0  # first pixel of image 0 is -1 -> black
        assert im.getpixel((0, 0)) == 128  # padding (pad_value 0.0 -> mid grey)
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["g.png"]  # no temp file left behind
    rgb = save_grid(torch.zeros(2, 3, 8, 8), tmp_path / "rgb.png")
    with Image.open(rgb) as im:
        assert im.mode == "RGB" and im.size == (2 * 10 + 2, 10 + 2)
    with pytest.raises(DQDeployError):
        save_grid(torch.zeros(2, 16, 16), tmp_path / "bad.png")
