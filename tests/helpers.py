"""Tiny real diffusers models built in code, and folders in the layouts users have."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DConditionModel, UNet2DModel
from safetensors.torch import save_file

CROSS_DIM = 24
SEQ_LEN = 5


def tiny_unet(seed: int = 0) -> UNet2DModel:
    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
        norm_num_groups=8, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=8,
    ).eval()


def tiny_cond_unet(seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        norm_num_groups=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=CROSS_DIM, attention_head_dim=4,
    ).eval()


def scheduler() -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")


def write_pipeline(unet: UNet2DModel, path: Path) -> Path:
    """A DDPM pipeline folder (model_index.json, unet/, scheduler/)."""
    DDPMPipeline(unet=unet, scheduler=scheduler()).save_pretrained(str(path), safe_serialization=True)
    return path


def write_bare_unet(unet: torch.nn.Module, path: Path) -> tuple[Path, Path]:
    """A bare UNet folder and a separate scheduler folder."""
    unet.save_pretrained(str(path / "unet_only"))
    DDIMScheduler(num_train_timesteps=1000).save_pretrained(str(path / "sched"))
    return path / "unet_only", path / "sched"


def write_cond_file(path: Path, prompts: int = 3, uncond: bool = True, seed: int = 0) -> Path:
    g = torch.Generator().manual_seed(seed)
    tensors = {"encoder_hidden_states": torch.randn(prompts, SEQ_LEN, CROSS_DIM, generator=g)}
    if uncond:
        tensors["uncond_encoder_hidden_states"] = torch.randn(1, SEQ_LEN, CROSS_DIM, generator=g)
    save_file(tensors, str(path))
    return path


def random_calib(unet: torch.nn.Module, n: int = 8, timesteps=(901.0, 601.0, 301.0, 1.0), seed: int = 0):
    """A CalibrationSet of random UNet inputs spread over ``timesteps`` (no sampling run): enough for
    building a quantized model or checking wiring; use ``collect`` where real activations matter."""
    from dqdeploy.inputs import DenoiserInputs
    from dqdeploy.quant.trajectories import CalibrationSet

    g = torch.Generator().manual_seed(seed)
    cfg = unet.config
    rows = torch.arange(n) % len(timesteps)
    t = torch.tensor(timesteps, dtype=torch.float32)[rows]
    x = torch.randn(n, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g)
    cond = None
    if getattr(cfg, "cross_attention_dim", None) is not None:
        cond = torch.randn(n, SEQ_LEN, cfg.cross_attention_dim, generator=g)
    return CalibrationSet(DenoiserInputs.create(x, t, encoder_hidden_states=cond), rows, list(timesteps))
