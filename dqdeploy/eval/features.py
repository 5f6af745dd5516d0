"""Feature extractors and reference images for a Frechet distance (FID) on any image model.

An extractor maps images ``[N, C, H, W]`` in [-1, 1] to features ``[N, D]``. ``load_extractor(spec)``:

* ``"digits"`` -- the shipped digits classifier (1x16x16 images): the digits-FID.
* ``"pixels"`` -- images average-pooled to at most 8x8 per channel: a Frechet distance in pixel
  space. Always available, much weaker than a learned embedding; reported under its own name.
* ``PATH.pt`` / ``PATH.ts`` -- a TorchScript module (``torch.jit.save``), e.g. an Inception or
  CLIP image tower the user exported; called on [-1, 1] images, its output is flattened.
* ``"package.module:function"`` -- an importable Python callable with the same contract.

``load_reference_images(folder, channels, size)`` reads PNG/JPEG/BMP/WebP images, converts them to
the model's channels and size, and maps them to [-1, 1].
"""

from __future__ import annotations

import importlib
import os
import stat
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from ..core.errors import DQDeployError

Extractor = Callable[[torch.Tensor], torch.Tensor]
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
BUILTIN = ("digits", "pixels")


def pixel_features(images: torch.Tensor) -> torch.Tensor:
    """Images average-pooled to at most 8x8 per channel, flattened ``[N, C*h*w]``."""
    h, w = images.shape[-2:]
    return torch.nn.functional.adaptive_avg_pool2d(images.float(), (min(8, h), min(8, w))).flatten(1)


def _digits_features(images: torch.Tensor) -> torch.Tensor:
    from .fid import classifier_features

    return classifier_features(images)


def load_extractor(spec: str) -> Extractor:
    """The feature extractor named by ``spec`` (see the module docstring)."""
    if spec == "digits":
        return _digits_features
    if spec == "pixels":
        return pixel_features
    path = Path(spec)
    if path.suffix in (".pt", ".ts", ".pth", ".jit"):
        if not path.is_file():
            raise DQDeployError(f"feature extractor file {path} not found",
                                hint="pass a TorchScript file written by torch.jit.save, 'digits', 'pixels' or "
                                     "module:function")
        try:
            module = torch.jit.load(str(path), map_location="cpu").eval()
        except (RuntimeError, ValueError) as exc:
            raise DQDeployError(f"{path} is not a TorchScript module: {exc}",
                                hint="save the extractor with torch.jit.save(torch.jit.script(model), path)") from None
        return lambda x: module(x)
    if ":" in spec:
        mod_name, _, attr = spec.partition(":")
        try:
            if not mod_name or not attr or mod_name.startswith("."):
                raise ValueError("expected package.module:function")
            fn = getattr(importlib.import_module(mod_name), attr)
        except (ImportError, AttributeError, ValueError, TypeError) as exc:
            raise DQDeployError(f"cannot import the feature extractor {spec!r}: {exc}",
                                hint="use package.module:function, importable from the current environment") from None
        if not callable(fn):
            raise DQDeployError(f"feature extractor {spec!r} is not callable")
        return fn
    raise DQDeployError(f"unknown feature extractor {spec!r}",
                        hint="use 'digits', 'pixels', a TorchScript .pt/.ts file or package.module:function")


@torch.no_grad()
def extract(extractor: Extractor, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Features ``[N, D]`` of ``images`` batch by batch: one row per image, finite."""
    feats = torch.cat([_features(extractor, images[i:i + batch_size]) for i in range(0, images.shape[0], batch_size)])
    if not torch.isfinite(feats).all():
        raise DQDeployError("the feature extractor returned non-finite features",
                            hint="check that it expects images in [-1, 1] of this size and channel count")
    return feats


def _features(extractor: Extractor, batch: torch.Tensor) -> torch.Tensor:
    """One batch's features ``[B, D]``; a failing or ill-shaped extractor as :class:`DQDeployError`."""
    try:
        out = torch.as_tensor(extractor(batch)).float()
    except Exception as exc:  # a user's callable or TorchScript: anything can go wrong inside it
        raise DQDeployError(f"the feature extractor failed on images {tuple(batch.shape)}: {type(exc).__name__}: {exc}",
                            hint="it must map images [N, C, H, W] in [-1, 1] to features [N, ...]") from None
    if out.dim() < 1 or out.shape[0] != batch.shape[0]:
        raise DQDeployError(f"the feature extractor returned {tuple(out.shape)} for {batch.shape[0]} images; "
                            "expected one row of features per image",
                            hint="it must map images [N, C, H, W] to features [N, ...]")
    return out.reshape(out.shape[0], -1)


def check_extractor(extractor: Extractor, shape: tuple[int, ...]) -> None:
    """Run ``extractor`` on two different random images of ``shape`` [C, H, W] before any sampling: a broken one, or
    one that gives every image the same features (a Frechet distance of 0 whatever the images), fails now."""
    feats = extract(extractor, torch.rand(2, *shape, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    if bool((feats == feats[:1]).all()):
        raise DQDeployError("the feature extractor returned the same features for two different images: a Frechet "
                            "distance on them would be 0 whatever the images",
                            hint="check that it expects images in [-1, 1] of this size and channel count")


def _regular(path: Path) -> bool:
    """A regular file (symlinks followed; FIFOs, folders, devices and dangling or looping links are not)."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def load_reference_images(folder: str | Path, channels: int, size: tuple[int, int]) -> torch.Tensor:
    """All images in ``folder`` as ``[N, channels, H, W]`` in [-1, 1] (bilinear resize, L or RGB)."""
    from PIL import Image

    folder = Path(folder)
    if not folder.is_dir():
        raise DQDeployError(f"reference image folder {folder} does not exist",
                            hint="pass a folder of PNG/JPEG images of the training distribution")
    files = sorted(p for p in folder.iterdir()
                   if p.suffix.lower() in IMAGE_SUFFIXES and _regular(p))  # no FIFOs, folders, loops
    if len(files) < 2:
        raise DQDeployError(f"{folder} holds {len(files)} images ({', '.join(IMAGE_SUFFIXES)}); a Frechet "
                            "distance needs at least 2 (hundreds for a stable value)")
    if channels not in (1, 3):
        raise DQDeployError("reference images can be compared with 1- or 3-channel samples, "
                            f"the model makes {channels}",
                            hint="pass --fid-extractor for a latent model and compare decoded images yourself")
    mode = "L" if channels == 1 else "RGB"
    out = []
    for f in files:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(f) as img:
                    px = torch.frombuffer(bytearray(img.convert(mode).tobytes()), dtype=torch.uint8)
                    h, w = img.size[1], img.size[0]
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
            raise DQDeployError(f"reference image {f} cannot be read: {type(exc).__name__}: {exc}",
                                hint="remove it from the folder, or replace it with a valid image") from None
        x = px.view(h, w, channels).permute(2, 0, 1)[None].float() / 127.5 - 1.0
        out.append(torch.nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False)
                   if (h, w) != tuple(size) else x)
    return torch.cat(out).clamp(-1, 1)
