"""The quality figure ``quantize`` ends with: the per-step denoiser error of the quantized model against the FP
model (the figure ``dqdeploy eval --fp`` computes: :class:`dqdeploy.core.metrics.StepErrors`), on a small held set.

The held set is ``HELD_TRAJECTORIES`` FP sampling trajectories (no more than the calibration's own: at Stable
Diffusion size and the smallest budget, 2, the check must not cost more than the calibration) drawn like the
calibration's (same sampler, steps,
guidance and conditioning) from noise the calibration never drew (seed ``calibration.seed + HELD_SEED``): every
denoiser input of them with the FP output, recorded while the FP model is still in memory. After distillation the
quantized model answers the same inputs; the errors are averaged per step, then over steps. Nothing is recomputed
with the FP model at the end, so converting the model in place costs nothing here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..core.denoisers import latent_shape, spec_of
from ..core.metrics import StepErrors, summarize_steps
from ..core.recipe import CalibrationConfig
from ..core.sampling import observe_denoise, output_of
from ..quant.conditioning import Conditioning
from ..quant.trajectories import model_calls
from ..system.progress import Progress, progress

HELD_TRAJECTORIES = 4
HELD_SEED = 7919  # added to the calibration seed: noise the calibration trajectories never drew
METRIC = "per-step denoiser error vs full precision (mean over steps of the batch-mean relative error)"


@dataclass
class HeldSet:
    """FP denoiser calls on held trajectories: ``(step, model timestep, keywords, FP output)`` each."""

    calls: list[tuple[int, float, dict[str, Any], torch.Tensor]]
    trajectories: int

    @property
    def inputs(self) -> int:
        """Denoiser inputs held (under classifier-free guidance both halves count)."""
        return sum(int(out.shape[0]) for *_, out in self.calls)


def _copy(value: Any) -> Any:
    return value.detach().clone() if isinstance(value, torch.Tensor) else value


@torch.no_grad()
def held_count(calibration: CalibrationConfig) -> int:
    """Held trajectories of a run: ``HELD_TRAJECTORIES``, no more than the calibration draws."""
    return min(HELD_TRAJECTORIES, calibration.trajectories)


def collect_held(denoiser: torch.nn.Module, scheduler: Any, calibration: CalibrationConfig,
                 conditioning: Conditioning | None = None, trajectories: int | None = None) -> HeldSet:
    """Record the FP ``denoiser``'s calls on ``trajectories`` held trajectories (None: :func:`held_count`; see the
    module docstring); the prompts are the ones the calibration would use next (rows ``calibration.trajectories ..``,
    round-robin)."""
    trajectories = held_count(calibration) if trajectories is None else trajectories
    spec = spec_of(denoiser)
    gen = torch.Generator().manual_seed(calibration.seed + HELD_SEED)
    noise = torch.randn(*latent_shape(spec, denoiser.config, trajectories, calibration.resolution), generator=gen)
    cond = None if conditioning is None else conditioning.for_batch(calibration.trajectories, trajectories)
    uncond = None if conditioning is None else conditioning.unconditional()
    calls: list[tuple[int, float, dict[str, Any], torch.Tensor]] = []

    with Progress(model_calls(scheduler, spec, denoiser, calibration), f"held trajectories ({trajectories}, for the "
                  "quality check)", unit="step") as shown:

        def record(step: int, t: float, inputs: dict[str, Any], out: torch.Tensor) -> None:
            calls.append((step, t, {k: _copy(v) for k, v in inputs.items()}, out.detach().clone()))
            shown.update()

        observe_denoise(denoiser, scheduler, noise, calibration.steps, record, cond=cond, uncond=uncond,
                        guidance=calibration.guidance, generator=gen)
    return HeldSet(calls, trajectories)


@torch.no_grad()
def held_quality(model: Any, held: HeldSet) -> dict[str, Any]:
    """The per-step denoiser error of ``model`` (any denoiser callable) on ``held``: the manifest's ``quality``
    (deterministic: no timings, so that a resumed or many-process run writes the same artifact)."""
    errors = StepErrors()
    for step, t, inputs, ref in progress(held.calls, len(held.calls), "quality check", unit="step"):
        errors.add(step, t, ref, output_of(model, inputs))
    per_step = errors.per_step()
    summary = summarize_steps(per_step)
    return {"metric": METRIC, "trajectories": held.trajectories, "inputs": held.inputs, "steps": len(per_step),
            "mean_rel_err": round(summary["mean_rel_err"], 6), "mean_snr_db": round(summary["mean_snr_db"], 3),
            "mean_cosine": round(summary["mean_cosine"], 6), "worst_step": int(summary["worst_step"]),
            "worst_rel_err": round(summary["worst_rel_err"], 6)}


def held_for(artifact: str | Path, model_dir: str | Path, cond_file: str | Path | None = None,
             trajectories: int | None = None) -> HeldSet:
    """The held set ``quantize`` recorded for ``artifact``, recorded again from the FP folder ``model_dir`` it was
    quantized from (the calibration settings read from its manifest)."""
    from ..io.artifact import read_manifest
    from ..io.models import load_model, make_scheduler
    from ..quant.conditioning import load_conditioning

    calibration = CalibrationConfig(**read_manifest(artifact).calibration)
    loaded = load_model(model_dir)
    scheduler = make_scheduler(calibration.scheduler, loaded.scheduler_config, calibration.steps)
    conditioning = load_conditioning(cond_file) if cond_file is not None else None
    return collect_held(loaded.denoiser, scheduler, calibration, conditioning, trajectories)


def artifact_quality(artifact: str | Path, model_dir: str | Path, cond_file: str | Path | None = None,
                     trajectories: int | None = None) -> dict[str, Any]:
    """The figure ``quantize`` records, measured afresh for an existing ``artifact`` against the FP folder
    ``model_dir`` it was quantized from."""
    from ..io.artifact import load_quantized

    return held_quality(load_quantized(artifact), held_for(artifact, model_dir, cond_file, trajectories))
