"""Calibration data from full-precision sampling trajectories.

The FP denoiser (UNet or transformer) samples ``trajectories`` images with the requested scheduler
and step count; the model inputs ``(x_t, t, cond)`` of randomly chosen (trajectory, step) pairs are
kept, ``t`` being the timestep the model sees (flow matching: ``sigma * 1000``, a float). Under
classifier-free guidance both the conditional and the unconditional input are kept, since the
deployed model sees both. Everything is seeded.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from ..core.denoisers import GUIDANCE, latent_shape, spec_of
from ..core.errors import CalibrationError
from ..core.inputs import CONTEXT, DenoiserInputs
from ..core.recipe import CalibrationConfig
from ..core.sampling import advance, denoise, model_tokens, set_timesteps, shared_inputs
from ..system import distributed
from ..system.progress import Progress
from .conditioning import (  # noqa: F401  (the conditioning file's names and readers, re-exported where they lived)
    ALIASES,
    COND_KEY,
    MASK_KEY,
    POOLED_KEY,
    UNCOND_KEY,
    UNCOND_MASK_KEY,
    UNCOND_POOLED_KEY,
    Conditioning,
    check_conditioning,
    check_guidance,
    check_text_mask,
    conditioning_from,
    load_conditioning,
    read_prompts,
)


@dataclass
class CalibrationSet:
    """Denoiser inputs recorded on FP trajectories (``inputs``: N rows), ``rows`` [N] (index of each
    time step in ``timesteps``) and the calibrated ``timesteps`` in sampling order."""

    inputs: DenoiserInputs
    rows: torch.Tensor
    timesteps: list[float]

    def __len__(self) -> int:
        return len(self.inputs)

    def batch(self, idx: torch.Tensor) -> DenoiserInputs:
        """The inputs at rows ``idx``."""
        return self.inputs.slice(idx)

    def batches(self, batch_size: int) -> Iterator[DenoiserInputs]:
        """Consecutive batches of at most ``batch_size`` rows, in order."""
        for start in range(0, len(self), batch_size):
            yield self.batch(torch.arange(start, min(start + batch_size, len(self))))

    def batch_indices(self, batch_size: int) -> range:
        """Indices of this rank's share of :meth:`batches` (every ``world``-th; all in one process)."""
        return distributed.shard(-(-len(self) // batch_size))

    def local_batches(self, batch_size: int) -> Iterator[tuple[int, DenoiserInputs]]:
        """``(index, batch)`` of this rank's share of :meth:`batches` (all of them in one process)."""
        for b in self.batch_indices(batch_size):
            yield b, self.batch(torch.arange(b * batch_size, min((b + 1) * batch_size, len(self))))

    def validate(self) -> None:
        """Refuse non-finite inputs (the FP model diverged on its own trajectories)."""
        named = {"x_t": self.inputs.sample,
                 **{"cond" if k == CONTEXT else k: v for k, v in self.inputs.conditioning.items()}}
        for name, tensor in named.items():
            if not torch.isfinite(tensor).all():
                bad = int((~torch.isfinite(tensor)).sum())
                raise CalibrationError(
                    f"calibration {name} holds {bad} non-finite values (NaN/Inf): the full-precision "
                    "model diverged on its own trajectories",
                    hint="check the model weights, the scheduler config and the conditioning file",
                )


def _cat(chunks: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    chunks = [c for c in chunks if c]  # a chunk that kept no sample holds no keys
    return {k: torch.cat([c[k] for c in chunks]) for k in chunks[0]} if chunks else {}


def model_calls(scheduler, spec, denoiser: torch.nn.Module, config: CalibrationConfig) -> int:
    """Model calls per trajectory: PNDM's warm-up calls the model more often than once per step."""
    probe = torch.zeros(*latent_shape(spec, denoiser.config, 1, config.resolution))
    set_timesteps(scheduler, spec, config.steps, model_tokens(spec, probe))
    return len(scheduler.timesteps)


def _steps_text(trajectories: int, steps: int, calls: int) -> str:
    """``64 x 4 sampler steps``, and the denoiser calls per trajectory where the sampler makes more (PNDM)."""
    return f"{trajectories} x {steps} sampler steps" + ("" if calls == steps else f", {calls} denoiser calls each")


@torch.no_grad()
def collect(
    denoiser: torch.nn.Module,
    scheduler,
    config: CalibrationConfig,
    conditioning: Conditioning | None = None,
    guidance: float | None = None,
) -> CalibrationSet:
    """Sample FP trajectories and keep ``config.samples`` model inputs drawn at random across steps.

    Trajectories run in chunks of ``config.batch_size`` from one seeded generator. Under torchrun each
    rank runs every ``world``-th chunk and the chunks are gathered in order; every rank still draws
    every chunk's noise (and, through :func:`~dqdeploy.core.sampling.advance`, the sampler's own draws of
    the chunks it skips), so each chunk starts from the generator state of a one-process run and
    every rank holds exactly the set one process draws."""
    spec = spec_of(denoiser)
    guidance = config.guidance if guidance is None else guidance
    embedded = GUIDANCE in spec.input_names(denoiser.config)  # Flux: guidance is an input, not CFG
    check_conditioning(conditioning, guidance, denoiser)
    uncond = None if conditioning is None else conditioning.unconditional()
    cfg_on = uncond is not None and guidance != 1.0 and not embedded
    per_pair = 2 if cfg_on else 1
    gen = torch.Generator().manual_seed(config.seed)
    calls = model_calls(scheduler, spec, denoiser, config)
    n_pairs = config.trajectories * calls
    wanted = min(n_pairs, -(-config.samples // per_pair))
    chosen = torch.zeros(n_pairs, dtype=torch.bool)
    chosen[torch.randperm(n_pairs, generator=gen)[:wanted]] = True
    chosen = chosen.view(config.trajectories, calls)

    starts = range(0, config.trajectories, config.batch_size)
    mine = set(distributed.shard(len(starts)))
    local: dict[int, dict] = {}
    # one tick per model call
    with Progress(sum(min(config.batch_size, config.trajectories - starts[c]) for c in mine) * calls,
                  f"calibration trajectories ({_steps_text(config.trajectories, config.steps, calls)})",
                  unit="traj-step") as bar:
        for c, first in enumerate(starts):
            n = min(config.batch_size, config.trajectories - first)
            noise = torch.randn(*latent_shape(spec, denoiser.config, n, config.resolution), generator=gen)
            if c not in mine:  # another rank's chunk: draw what it draws, run no model
                advance(scheduler, spec, noise, config.steps, gen)
                continue
            local[c] = _chunk(denoiser, scheduler, config, conditioning, guidance, first, noise,
                              chosen[first : first + n], uncond, cfg_on, gen, tick=functools.partial(bar.update, n))
    if (distributed.active()
            and len(set(distributed.all_gather(hashlib.sha256(gen.get_state().numpy().tobytes()).hexdigest()))) > 1):
        raise CalibrationError(f"the sampler {type(scheduler).__name__} draws random numbers that depend on more than "
                               "shapes: ranks that skipped a chunk of trajectories are out of step with the rank "
                               "that ran it",
                               hint="quantize with this scheduler in one process, or calibrate with a deterministic "
                                    "sampler")
    chunks = {c: chunk for part in distributed.all_gather(local) for c, chunk in part.items()}
    ordered = [chunks[c] for c in range(len(starts))]
    inputs = DenoiserInputs(torch.cat([o["x"] for o in ordered]), torch.cat([o["t"] for o in ordered]),
                            _cat([o["cond"] for o in ordered]), spec.sample, ordered[-1]["shared"])
    calib = CalibrationSet(inputs, torch.cat([o["rows"] for o in ordered]), ordered[0]["timesteps"])
    calib.validate()
    return calib


def _chunk(denoiser, scheduler, config: CalibrationConfig, conditioning: Conditioning | None, guidance: float,
           first: int, noise: torch.Tensor, keep: torch.Tensor, uncond: dict[str, torch.Tensor] | None, cfg_on: bool,
           gen: torch.Generator, tick: Callable[[], object] = lambda: None) -> dict:
    """Trajectories ``first ..`` from ``noise`` (the sampler draws from ``gen``): the model inputs
    ``keep`` [n, calls] selects (under CFG with the unconditional input first); ``tick`` after every model call."""
    spec = spec_of(denoiser)
    n = noise.shape[0]
    cond = {} if conditioning is None else conditioning.for_batch(first, n)
    if GUIDANCE in spec.input_names(denoiser.config):
        cond[GUIDANCE] = torch.full((n,), float(guidance))
    xs, ts, rows, conds = [], [], [], []
    timesteps: list[float] = []

    def record(i: int, t: torch.Tensor, model_input: torch.Tensor) -> None:
        tick()
        if i == 0 and not timesteps:
            timesteps.extend(float(v) for v in spec.model_timestep(scheduler.timesteps))
        sel = keep[:, i].nonzero().flatten()
        if sel.numel() == 0:
            return
        picked = {k: v[sel] for k, v in cond.items()}
        contexts = [picked]
        if cfg_on and uncond is not None:
            contexts = [{k: uncond[k].expand_as(v) for k, v in picked.items()}, picked]
        for context in contexts:
            xs.append(model_input[sel].clone())
            ts.append(torch.full((sel.numel(),), float(t)))
            rows.append(torch.full((sel.numel(),), i, dtype=torch.long))
            conds.append({k: v.clone() for k, v in context.items()})

    denoise(denoiser, scheduler, noise, config.steps, cond=cond or None, uncond=uncond, guidance=guidance,
            generator=gen, callback=record)
    empty = torch.zeros(0, *noise.shape[1:])
    return {"x": torch.cat(xs) if xs else empty, "t": torch.cat(ts) if ts else torch.zeros(0),
            "rows": torch.cat(rows) if rows else torch.zeros(0, dtype=torch.long), "cond": _cat(conds),
            "shared": shared_inputs(spec, noise, cond), "timesteps": timesteps}


SUBSET_SAMPLES = 64  # the stored subset's size when the steps allow (at least MIN_PER_STEP per step)
MIN_PER_STEP = 2


def calibration_subset(
    calib: CalibrationSet, steps: int | None = None, per_step: int | None = None, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Calibration inputs kept in the artifact (export calibration, accuracy checks): up to
    ``per_step`` seeded samples at each of ``steps`` time steps spread over the trajectory. By
    default every step that has calibration samples, with ``SUBSET_SAMPLES / steps`` samples each
    (between 2 and 8), so ``check`` covers every calibrated step and the artifact stays small."""
    gen = torch.Generator().manual_seed(seed)
    present = calib.rows.unique()
    count = len(present) if steps is None else min(steps, len(present))
    per_step = per_step or max(MIN_PER_STEP, min(8, SUBSET_SAMPLES // max(count, 1)))
    chosen = present[torch.linspace(0, len(present) - 1, count).round().long().unique()]
    idx = []
    for row in chosen:
        members = (calib.rows == row).nonzero().flatten()
        idx.append(members[torch.randperm(len(members), generator=gen)[:per_step]])
    return calib.batch(torch.cat(idx)).to_dict()
