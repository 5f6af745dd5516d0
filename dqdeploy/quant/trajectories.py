"""Calibration data from full-precision sampling trajectories.

The FP UNet samples ``trajectories`` images with the requested scheduler and step count; the UNet
inputs ``(x_t, t, cond)`` of randomly chosen (trajectory, step) pairs are kept. Under
classifier-free guidance both the conditional and the unconditional input are kept, since the
deployed model sees both. Everything is seeded.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..errors import CalibrationError
from ..inputs import CONTEXT, DenoiserInputs
from ..models import latent_shape
from ..recipe import CalibrationConfig
from ..sampling import denoise

COND_KEY = CONTEXT
UNCOND_KEY = "uncond_encoder_hidden_states"


@dataclass
class Conditioning:
    """Text conditioning for calibration: ``cond`` [P, S, D], optional ``uncond`` [1, S, D]."""

    cond: torch.Tensor
    uncond: torch.Tensor | None = None

    def for_batch(self, first: int, n: int) -> torch.Tensor:
        idx = torch.arange(first, first + n) % self.cond.shape[0]
        return self.cond[idx]


def load_conditioning(path: str | Path) -> Conditioning:
    """Read ``--cond FILE.safetensors``: ``encoder_hidden_states`` [P, S, D] (required) and
    ``uncond_encoder_hidden_states`` [1, S, D] (optional, enables classifier-free guidance)."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise CalibrationError(f"conditioning file {path} not found")
    try:
        tensors = load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types
        raise CalibrationError(f"{path} is not a readable safetensors file: {exc}") from None
    if COND_KEY not in tensors:
        raise CalibrationError(
            f"{path} has keys {sorted(tensors)}; expected {COND_KEY!r} [P, S, D]",
            hint=f"save prompt embeddings under {COND_KEY!r} (and optionally {UNCOND_KEY!r})",
        )
    cond = tensors[COND_KEY].float()
    uncond = tensors.get(UNCOND_KEY)
    if cond.dim() != 3 or (uncond is not None and uncond.shape[-2:] != cond.shape[-2:]):
        raise CalibrationError(
            f"{path}: {COND_KEY} must be [P, S, D] and {UNCOND_KEY} [1, S, D]; "
            f"found {tuple(cond.shape)} and {None if uncond is None else tuple(uncond.shape)}"
        )
    return Conditioning(cond, None if uncond is None else uncond[:1].float())


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

    def validate(self) -> None:
        """Refuse non-finite inputs (the FP model diverged on its own trajectories)."""
        named = {"x_t": self.inputs.sample, **{"cond" if k == CONTEXT else k: v for k, v in self.inputs.conditioning.items()}}
        for name, tensor in named.items():
            if not torch.isfinite(tensor).all():
                bad = int((~torch.isfinite(tensor)).sum())
                raise CalibrationError(
                    f"calibration {name} holds {bad} non-finite values (NaN/Inf): the full-precision "
                    "model diverged on its own trajectories",
                    hint="check the model weights, the scheduler config and the conditioning file",
                )


@torch.no_grad()
def collect(
    unet: torch.nn.Module,
    scheduler,
    config: CalibrationConfig,
    conditioning: Conditioning | None = None,
    guidance: float | None = None,
) -> CalibrationSet:
    """Sample FP trajectories and keep ``config.samples`` UNet inputs drawn at random across steps."""
    guidance = config.guidance if guidance is None else guidance
    cfg_on = conditioning is not None and conditioning.uncond is not None and guidance != 1.0
    per_pair = 2 if cfg_on else 1
    gen = torch.Generator().manual_seed(config.seed)
    n_pairs = config.trajectories * config.steps
    wanted = min(n_pairs, -(-config.samples // per_pair))
    chosen = torch.zeros(n_pairs, dtype=torch.bool)
    chosen[torch.randperm(n_pairs, generator=gen)[:wanted]] = True
    chosen = chosen.view(config.trajectories, config.steps)

    shape = latent_shape(unet)
    uncond = None if conditioning is None else conditioning.uncond
    xs, ts, rows, conds = [], [], [], []
    timesteps: list[float] = []
    bar = tqdm(total=config.trajectories, desc="calibration trajectories", unit="traj")
    for first in range(0, config.trajectories, config.batch_size):
        n = min(config.batch_size, config.trajectories - first)
        noise = torch.randn(n, *shape, generator=gen)
        cond = None if conditioning is None else conditioning.for_batch(first, n)
        keep = chosen[first : first + n]

        def record(i: int, t: torch.Tensor, model_input: torch.Tensor) -> None:
            if i == 0 and not timesteps:
                timesteps.extend(float(v) for v in scheduler.timesteps)
            sel = keep[:, i].nonzero().flatten()
            if sel.numel() == 0:
                return
            contexts = [None if cond is None else cond[sel]]
            if cfg_on and uncond is not None and cond is not None:
                contexts = [uncond.expand(sel.numel(), -1, -1), cond[sel]]
            for context in contexts:
                xs.append(model_input[sel].clone())
                ts.append(torch.full((sel.numel(),), float(t)))
                rows.append(torch.full((sel.numel(),), i, dtype=torch.long))
                if context is not None:
                    conds.append(context.clone())

        denoise(
            unet, scheduler, noise, config.steps,
            cond=cond, uncond=uncond,
            guidance=guidance, generator=gen, callback=record,
        )
        bar.update(n)
    bar.close()
    inputs = DenoiserInputs.create(torch.cat(xs), torch.cat(ts), encoder_hidden_states=torch.cat(conds) if conds else None)
    calib = CalibrationSet(inputs, torch.cat(rows), timesteps)
    calib.validate()
    return calib
