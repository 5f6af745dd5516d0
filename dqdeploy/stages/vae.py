"""Latents to images for a PNG: the pipeline's AutoencoderKL decodes a latent denoiser's samples.

A denoiser whose samples have 1 or 3 channels makes images itself. Any other (Stable Diffusion's 4
latent channels, SD3's 16) needs the VAE of the pipeline it came from: ``--vae DIR`` (that pipeline
folder or its ``vae/``), else the ``vae/`` beside the denoiser of a diffusers folder. Everything is
found, loaded and checked before any sampling.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..core.errors import DQDeployError, ModelLoadError
from ..io.folders import FolderKind
from ..io.models import latent_shape

IMAGE_CHANNELS = (1, 3)
DECODE_CHUNK = 4  # latents decoded at once: SD's VAE makes 128-channel 512x512 activations, 134 MB each per image
VAE_CLASS = "AutoencoderKL"
VAE_HINT = ("pass --vae DIR: the vae/ folder (AutoencoderKL) of the diffusers pipeline the model was quantized from, "
            "or that pipeline folder")


def find_vae(path: Path, kind: FolderKind) -> Path | None:
    """The ``vae/`` beside the denoiser of a diffusers folder: ``PATH/vae`` (a pipeline folder) or
    ``PATH/../vae`` (PATH is the pipeline's ``unet/``); None for artifacts and exports (they keep no VAE)."""
    if kind != "fp":
        return None
    return next((c for c in (path / "vae", path.parent / "vae") if (c / "config.json").is_file()), None)


class VaeDecoder:
    """``latents -> images`` in [-1, 1]: ``vae.decode(latents / scaling_factor + shift_factor)``, as diffusers'
    pipelines decode (the factors from the VAE's config)."""

    def __init__(self, folder: Path, config: dict[str, Any]) -> None:
        from diffusers import AutoencoderKL

        hint = "point --vae at a diffusers AutoencoderKL folder with safetensors weights"
        try:
            vae, info = AutoencoderKL.from_pretrained(str(folder), use_safetensors=True, low_cpu_mem_usage=False,
                                                      torch_dtype=torch.float32, output_loading_info=True)
        except Exception as exc:  # diffusers raises OSError/ValueError/EnvironmentError for incomplete folders
            raise ModelLoadError(f"cannot load the VAE in {folder}: {type(exc).__name__}: {str(exc)[:300]}",
                                 hint=hint) from None
        missing = sorted(info.get("missing_keys") or []) + [str(m[0]) for m in info.get("mismatched_keys") or []]
        if missing:  # diffusers would leave them at their random initial values, with a log line only
            raise ModelLoadError(f"cannot load the VAE in {folder}: its weights file lacks {len(missing)} of the "
                                 f"model's tensors or holds them in other shapes (e.g. {', '.join(missing[:3])})",
                                 hint=hint)
        self.vae = vae.eval()
        self.folder = folder
        self.channels = int(config.get("latent_channels", 4))
        self.scaling = float(config.get("scaling_factor") or 1.0)
        self.shift = float(config.get("shift_factor") or 0.0)

    @torch.no_grad()
    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.vae.decode(chunk.float() / self.scaling + self.shift).sample
                          for chunk in latents.split(DECODE_CHUNK)])

    def image_shape(self, latent: tuple[int, ...]) -> tuple[int, int, int]:
        """``(C, H, W)`` of the images decoded from latents ``latent`` = ``(c, h, w)`` (one 2x upsampling per
        decoder block but the last, as AutoencoderKL builds its decoder)."""
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        return int(self.vae.config.out_channels), int(latent[1]) * factor, int(latent[2]) * factor


def _vae_config(folder: Path) -> dict[str, Any]:
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{folder} is not a VAE folder: its config.json cannot be read "
                             f"({type(exc).__name__}: {exc})", hint=VAE_HINT) from None
    if not isinstance(config, dict) or config.get("_class_name", VAE_CLASS) != VAE_CLASS:
        found = config.get("_class_name") if isinstance(config, dict) else type(config).__name__
        raise ModelLoadError(f"{folder} holds a {found}, expected an {VAE_CLASS}", hint=VAE_HINT)
    return config


def image_decoder(path: str | Path, kind: FolderKind, denoiser: Any, vae: str | Path | None = None,
                  required: bool = True) -> VaeDecoder | None:
    """What turns ``denoiser``'s samples into images: None where they are images (1 or 3 channels, no
    ``vae`` given), else the VAE of ``vae`` (a VAE folder or a pipeline folder with ``vae/``) or beside
    ``path``; refused (before any sampling) where there is none (``required=False``: None then), or where
    its latent channels differ."""
    shape = latent_shape(denoiser)
    if len(shape) != 3:
        raise DQDeployError(f"{path} makes packed latents {tuple(shape)} (Flux): decoding them to a PNG is not "
                            "supported", hint="run the model in its diffusers pipeline to decode its latents")
    if vae is None and shape[0] in IMAGE_CHANNELS:
        return None
    folder = None if vae is None else Path(vae) / "vae" if (Path(vae) / "vae" / "config.json").is_file() else Path(vae)
    folder = folder or find_vae(Path(path), kind)
    if folder is None and not required:
        return None
    if folder is None:
        raise DQDeployError(f"{path} makes {shape[0]}-channel latents ({'x'.join(map(str, shape))}), not images: "
                            "a PNG needs the VAE that decodes them, and none was given or found beside the model",
                            hint=VAE_HINT)
    config = _vae_config(folder)
    if int(config.get("latent_channels", 4)) != shape[0]:
        raise ModelLoadError(f"the VAE in {folder} decodes {config.get('latent_channels', 4)}-channel latents, {path} "
                             f"makes {shape[0]}-channel ones", hint=VAE_HINT)
    return VaeDecoder(folder, config)
