"""Stable-Diffusion-shaped UNet2DConditionModel configs built in code (no hub), and pipeline folders
with random weights for them: the fixtures of ``bench/scale.py`` and of the scale tests.

* ``sd15``: Stable Diffusion 1.5's UNet config (859.5M parameters, 3.44 GB FP32; 64x64 latent,
  77x768 text conditioning).
* ``sdxl``: Stable Diffusion XL's UNet config (2.57B parameters, 10.3 GB FP32) without its
  ``text_time`` added conditioning (``text_embeds``/``time_ids`` are not graph inputs in dqdeploy
  yet; that embedding is 0.2% of the weights). Latent 128x128, 77x2048 conditioning.
* ``reduced(width)``: SD 1.5's block layout (cross-attention down/up blocks, mid block, 8 heads,
  77-token conditioning) at ``width`` channels in the first block: the same code paths, small
  enough for tests.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

SD_DOWN = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
SD_UP = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
SEQ_LEN = 77


def sd15() -> dict[str, Any]:
    """Stable Diffusion 1.5's UNet2DConditionModel config."""
    return dict(sample_size=64, in_channels=4, out_channels=4, down_block_types=SD_DOWN, up_block_types=SD_UP,
                block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768,
                attention_head_dim=8, norm_num_groups=32, flip_sin_to_cos=True, freq_shift=0)


def sdxl() -> dict[str, Any]:
    """Stable Diffusion XL's UNet2DConditionModel config, without the text_time added conditioning."""
    return dict(sample_size=128, in_channels=4, out_channels=4,
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                block_out_channels=(320, 640, 1280), layers_per_block=2, cross_attention_dim=2048,
                attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10), use_linear_projection=True,
                norm_num_groups=32, flip_sin_to_cos=True, freq_shift=0)


def reduced(width: int = 32, cross_dim: int = 64, sample_size: int = 16) -> dict[str, Any]:
    """SD 1.5's layout at ``width`` channels in the first block (x1, x2, x4, x4 like SD)."""
    return sd15() | dict(sample_size=sample_size, block_out_channels=(width, 2 * width, 4 * width, 4 * width),
                         cross_attention_dim=cross_dim, norm_num_groups=min(32, width // 2))


CONFIGS = {"sd15": sd15, "sdxl": sdxl, "reduced": reduced}


def build(config: dict[str, Any], seed: int = 0) -> torch.nn.Module:
    """A UNet2DConditionModel with random weights from ``config``."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(**config).eval()


def write_folder(config: dict[str, Any], path: Path, seed: int = 0, prompts: int = 2) -> tuple[Path, Path]:
    """A pipeline folder (model_index.json, unet/, scheduler/) with random weights, and a ``--cond``
    file (``prompts`` rows of 77 tokens plus an unconditional row). Returns (folder, cond file)."""
    import json

    from diffusers import DDIMScheduler
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    unet = build(config, seed)
    unet.save_pretrained(str(path / "unet"), safe_serialization=True)
    del unet
    DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                  clip_sample=False, set_alpha_to_one=False, steps_offset=1).save_pretrained(str(path / "scheduler"))
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.0",
             "unet": ["diffusers", "UNet2DConditionModel"], "scheduler": ["diffusers", "DDIMScheduler"]}
    (path / "model_index.json").write_text(json.dumps(index, indent=2))
    g = torch.Generator().manual_seed(seed)
    dim = int(config["cross_attention_dim"])
    cond = path.parent / f"{path.name}-cond.safetensors"
    save_file({"encoder_hidden_states": torch.randn(prompts, SEQ_LEN, dim, generator=g),
               "uncond_encoder_hidden_states": torch.randn(1, SEQ_LEN, dim, generator=g)}, str(cond))
    return path, cond
