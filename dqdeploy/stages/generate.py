"""Seeded image generation from any model folder (FP, quantized, exported), batch by batch."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..core.denoisers import latent_shape, spec_of
from ..core.errors import CalibrationError
from ..core.sampling import denoise, model_tokens, set_timesteps
from ..core.terminal import bar, say
from ..core.vocab import Runtime
from ..io.models import make_scheduler
from ..quant.conditioning import Conditioning, check_conditioning, load_conditioning
from .sources import OpenedModel, open_model


def load_cond(opened: OpenedModel, cond_file: str | Path | None, guidance: float = 1.0) -> Conditioning | None:
    """The conditioning of a conditional model (from ``--cond``: prompt embeddings, pooled ones for
    SD3/Flux, unconditional rows), ``None`` for an unconditional one; checked to allow ``guidance``."""
    if not opened.conditional:
        return None
    if cond_file is None:
        raise CalibrationError("this model is conditional: pass --cond FILE.safetensors with prompt embeddings")
    conditioning = load_conditioning(cond_file)
    check_conditioning(conditioning, guidance, opened.denoiser, cond_file)
    return conditioning


DEFAULT_STEPS = 50  # without a calibrated step count


@dataclass(frozen=True)
class Sampler:
    """The sampler a sampling command uses: a scheduler class, its config, the step count, and why."""

    name: str  # a diffusers scheduler class or alias
    config: dict[str, Any]
    steps: int
    why: str  # where the class and the count come from, for the user

    def make(self) -> Any:
        """A fresh scheduler (checked to accept ``steps``)."""
        return make_scheduler(self.name, self.config, self.steps)

    def describe(self) -> str:
        """``sampling with PNDMScheduler, 4 steps (the calibrated sampler and step count)``."""
        return f"sampling with {type(self.make()).__name__}, {self.steps} steps ({self.why})"


def calibrated_steps(opened: OpenedModel) -> int | None:
    """The sampler steps an artifact or export was calibrated with: the smallest count whose sampler makes
    as many denoiser calls as there are calibrated timesteps (PNDM calls the denoiser once more than its steps)."""
    if not opened.timesteps or not opened.scheduler_config:
        return None
    spec = spec_of(opened.denoiser)
    tokens = model_tokens(spec, torch.zeros(latent_shape(spec, opened.denoiser.config, 1, 16)))
    scheduler = make_scheduler(None, opened.scheduler_config)
    for steps in range(1, len(opened.timesteps) + 1):
        set_timesteps(scheduler, spec, steps, tokens)
        if len(scheduler.timesteps) == len(opened.timesteps):
            return steps
    return len(opened.timesteps)


def choose_sampler(opened: OpenedModel, scheduler: str | None = None, steps: int | None = None,
                   fallback_config: dict[str, Any] | None = None) -> Sampler:
    """``--scheduler`` / ``--steps`` where given, else the calibrated sampler and step count (recorded with the
    artifact or export), else the model folder's own sampler (``fallback_config``: the FP folder's, for an
    export without one) and 50 steps."""
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise CalibrationError(f"steps={steps!r}: expected a whole number >= 1")
    config = opened.scheduler_config or fallback_config or {}
    calibrated = opened.kind != "fp" and bool(opened.scheduler_config)
    counted = steps or calibrated_steps(opened)
    whence = ("--scheduler" if scheduler else "the calibrated sampler" if calibrated
              else "the model folder's sampler" if config.get("_class_name") else "the default sampler")
    how_many = "--steps" if steps else "the calibrated step count" if counted else "the default step count"
    why = ("the calibrated sampler and step count" if (whence, how_many) == ("the calibrated sampler",
                                                                              "the calibrated step count")
           else f"{whence}, {how_many}")
    return Sampler(scheduler or config.get("_class_name") or "DDIMScheduler", config, counted or DEFAULT_STEPS, why)


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
    sampler: Sampler | None = None,
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """:func:`generate` on an opened model; sample ``i`` uses prompt row ``i % P`` of ``conditioning``.

    The sampler defaults to the calibrated one and its step count (:func:`choose_sampler`, said on
    stderr); ``sampler``: one chosen already (said by the caller), which ``steps`` and ``scheduler`` then
    do not change. ``decode``: applied to each batch of samples before clamping (a VAE's decoder).
    """
    for name, value in (("n", n), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise CalibrationError(f"{name}={value!r}: expected a whole number >= 1")
    check_conditioning(conditioning, guidance, opened.denoiser)
    if sampler is None:
        sampler = choose_sampler(opened, scheduler, steps)
        say(sampler.describe())
    sched, steps = sampler.make(), sampler.steps
    spec = spec_of(opened.denoiser)
    uncond = None if conditioning is None else conditioning.unconditional()
    gen = torch.Generator().manual_seed(seed)
    out = []
    for first in bar(range(0, n, batch_size), desc="generating", unit="batch"):
        b = min(batch_size, n - first)
        noise = torch.randn(*latent_shape(spec, opened.denoiser.config, b, resolution), generator=gen)
        cond = None if conditioning is None else conditioning.for_batch(first, b)
        x = denoise(opened.denoiser, sched, noise, steps, cond=cond, uncond=uncond, guidance=guidance, generator=gen)
        out.append(x if decode is None else decode(x))
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
    images: bool = False,
    vae: str | Path | None = None,
) -> torch.Tensor:
    """``n`` samples (clamped to [-1, 1]) with the same noise for every model given the same seed.

    ``images`` (or a ``vae`` folder): images rather than the model's raw samples, latents decoded by
    ``vae`` or the ``vae/`` beside a diffusers folder (:func:`dqdeploy.stages.vae.image_decoder`, refused
    before sampling where there is none)."""
    with open_model(path, runtime, scheduler_dir=scheduler_dir) as opened:  # removes a temporary export
        conditioning, decode = load_cond(opened, cond_file, guidance), None
        if images or vae is not None:
            from .vae import image_decoder

            decode = image_decoder(path, opened.kind, opened.denoiser, vae)
        return generate_from(opened, n=n, steps=steps, scheduler=scheduler, seed=seed, batch_size=batch_size,
                             conditioning=conditioning, guidance=guidance, resolution=resolution, decode=decode)
