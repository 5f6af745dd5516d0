"""Seeded image generation from any model folder (FP, quantized, exported), batch by batch."""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..core.denoisers import latent_shape, spec_of
from ..core.errors import CalibrationError
from ..core.sampling import denoise
from ..core.vocab import Runtime
from ..io.models import make_scheduler
from ..quant.trajectories import Conditioning, load_conditioning
from .sources import OpenedModel, open_model


def load_cond(opened: OpenedModel, cond_file: str | Path | None) -> Conditioning | None:
    """The conditioning of a conditional model (from ``--cond``: prompt embeddings, pooled ones for
    SD3/Flux, unconditional rows), ``None`` for an unconditional one."""
    if not opened.conditional:
        return None
    if cond_file is None:
        raise CalibrationError("this model is conditional: pass --cond FILE.safetensors with prompt embeddings")
    return load_conditioning(cond_file)


def generate_from(
    opened: OpenedModel,
    *,
    n: int = 64,
    steps: int | None = None,
    scheduler: str | None = None,
    seed: int = 0,
    batch_size: int = 64,
    conditioning: Conditioning | None = None,
    guidance: float = 1.0,
    resolution: int | None = None,
) -> torch.Tensor:
    """:func:`generate` on an opened model; sample ``i`` uses prompt row ``i % P`` of ``conditioning``.

    The sampler defaults to the calibrated one (the class recorded with the artifact or export),
    else the model folder's own, else DDIM.
    """
    for name, value in (("n", n), ("batch_size", batch_size), ("steps", 1 if steps is None else steps)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise CalibrationError(f"{name}={value!r}: expected a whole number >= 1")
    steps = steps or (len(opened.timesteps) or 50)
    sched = make_scheduler(scheduler, opened.scheduler_config, steps)
    spec = spec_of(opened.denoiser)
    uncond = None if conditioning is None else conditioning.unconditional()
    gen = torch.Generator().manual_seed(seed)
    out = []
    for first in tqdm(range(0, n, batch_size), desc="generating", unit="batch"):
        b = min(batch_size, n - first)
        noise = torch.randn(*latent_shape(spec, opened.denoiser.config, b, resolution), generator=gen)
        cond = None if conditioning is None else conditioning.for_batch(first, b)
        out.append(denoise(opened.denoiser, sched, noise, steps, cond=cond, uncond=uncond, guidance=guidance,
                           generator=gen))
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
    resolution: int | None = None,
) -> torch.Tensor:
    """``n`` samples (clamped to [-1, 1]) with the same noise for every model given the same seed."""
    with open_model(path, runtime, scheduler_dir=scheduler_dir) as opened:  # removes a temporary export
        return generate_from(opened, n=n, steps=steps, scheduler=scheduler, seed=seed, batch_size=batch_size,
                             conditioning=load_cond(opened, cond_file), guidance=guidance, resolution=resolution)
