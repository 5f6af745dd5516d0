"""Seeded image generation from any model folder (FP, quantized, exported), batch by batch."""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm

from .errors import CalibrationError
from .models import latent_shape, make_scheduler
from .sampling import denoise
from .sources import OpenedModel, open_model
from .vocab import Runtime


def load_cond(opened: OpenedModel, cond_file: str | Path | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(cond, uncond)`` embeddings for a conditional model (from ``--cond``), ``(None, None)`` otherwise."""
    if not opened.conditional:
        return None, None
    if cond_file is None:
        raise CalibrationError("this model is conditional: pass --cond FILE.safetensors with prompt embeddings")
    from .quant.trajectories import load_conditioning

    c = load_conditioning(cond_file)
    return c.cond, c.uncond


def generate_from(
    opened: OpenedModel,
    *,
    n: int = 64,
    steps: int | None = None,
    scheduler: str | None = None,
    seed: int = 0,
    batch_size: int = 64,
    cond: torch.Tensor | None = None,
    uncond: torch.Tensor | None = None,
    guidance: float = 1.0,
) -> torch.Tensor:
    """:func:`generate` on an opened model; sample ``i`` uses prompt ``cond[i % P]``."""
    steps = steps or (len(opened.timesteps) or 50)
    sched = make_scheduler(scheduler or "ddim", opened.scheduler_config)
    shape = latent_shape(opened.unet)
    gen = torch.Generator().manual_seed(seed)
    out = []
    for first in tqdm(range(0, n, batch_size), desc="generating", unit="batch"):
        b = min(batch_size, n - first)
        noise = torch.randn(b, *shape, generator=gen)
        batch_cond = None if cond is None else cond[torch.arange(first, first + b) % cond.shape[0]]
        out.append(denoise(opened.unet, sched, noise, steps, cond=batch_cond, uncond=uncond, guidance=guidance, generator=gen))
    return torch.cat(out).clamp(-1, 1)


def generate(
    path: str | Path,
    *,
    n: int = 64,
    steps: int | None = None,
    scheduler: str | None = None,
    seed: int = 0,
    batch_size: int = 64,
    runtime: Runtime = "auto",
    cond_file: str | Path | None = None,
    guidance: float = 1.0,
    scheduler_dir: str | Path | None = None,
) -> torch.Tensor:
    """``n`` samples (clamped to [-1, 1]) with the same noise for every model given the same seed."""
    opened = open_model(path, runtime, scheduler_dir=scheduler_dir)
    cond, uncond = load_cond(opened, cond_file)
    return generate_from(opened, n=n, steps=steps, scheduler=scheduler, seed=seed, batch_size=batch_size,
                         cond=cond, uncond=uncond, guidance=guidance)
