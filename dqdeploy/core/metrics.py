"""Error measures shared by every comparison (check, sensitivity, eval, the quantize stage's quality figure): one
definition of each.

* ``relative_error``: per-sample ``||out - ref|| / ||ref||``.
* ``tensor_errors``: per-sample relative error, SNR in dB and cosine similarity of two batches.
* ``StepErrors``: those accumulated per sampling step; ``summarize_steps`` their mean over steps and the worst step
  -- the per-step denoiser error of ``dqdeploy eval --fp`` and of the figure ``quantize`` records.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .errors import DQDeployError

STEP_METRICS = ("rel_err", "snr_db", "cosine")


def relative_error(out: torch.Tensor, ref: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Per-sample ``||out - ref|| / ||ref||`` over ``[N, ...]`` tensors (``||ref||`` clamped to ``eps``)."""
    diff = (out - ref).flatten(1).norm(dim=1)
    return diff / ref.flatten(1).norm(dim=1).clamp(min=eps)


def flat_pair(ref: torch.Tensor, test: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two batches of one shape as float64 ``[N, -1]`` matrices (refused: other shapes, empty batches)."""
    if ref.shape != test.shape or ref.ndim < 1 or ref.shape[0] == 0:
        raise DQDeployError(f"comparison needs two non-empty batches of one shape, found {tuple(ref.shape)} "
                            f"and {tuple(test.shape)}")
    n = ref.shape[0]
    return ref.detach().double().reshape(n, -1), test.detach().double().reshape(n, -1)


def tensor_errors(ref: torch.Tensor, test: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-sample ``rel_err``, ``snr_db`` and ``cosine`` of ``test`` against ``ref`` ([N, ...] each)."""
    r, q = flat_pair(ref, test)
    err, norm = (q - r).norm(dim=1), r.norm(dim=1).clamp_min(1e-30)
    rel = relative_error(q, r, eps=1e-30)
    snr = 20.0 * torch.log10(norm / err.clamp_min(1e-30))
    cos = F.cosine_similarity(r, q, dim=1, eps=1e-30)
    return {"rel_err": rel.float(), "snr_db": snr.float(), "cosine": cos.float()}


class StepErrors:
    """:func:`tensor_errors` of denoiser outputs collected per sampling step (several calls per step add up)."""

    def __init__(self) -> None:
        self._steps: dict[int, tuple[float, dict[str, list[torch.Tensor]]]] = {}

    def add(self, step: int, t: float, ref: torch.Tensor, test: torch.Tensor) -> None:
        """Record the errors of ``test`` against ``ref`` at sampling step ``step`` (model timestep ``t``)."""
        bucket = self._steps.setdefault(step, (float(t), {k: [] for k in STEP_METRICS}))[1]
        for k, v in tensor_errors(ref, test).items():
            bucket[k].append(v)

    def per_step(self) -> list[dict[str, float]]:
        """One dict per step, in step order: ``step``, ``t`` and the means over its samples of each metric."""
        return [{"step": i, "t": t, **{k: float(torch.cat(v).mean()) for k, v in values.items()}}
                for i, (t, values) in sorted(self._steps.items())]


def summarize_steps(per_step: list[dict[str, float]]) -> dict[str, float]:
    """Mean over steps of each metric, and the worst step (largest relative error)."""
    if not per_step:
        raise DQDeployError("no per-step errors to summarise (zero sampling steps?)")
    out = {f"mean_{k}": sum(s[k] for s in per_step) / len(per_step) for k in STEP_METRICS}
    worst = max(per_step, key=lambda s: s["rel_err"])
    return out | {"worst_step": worst["step"], "worst_t": worst["t"], "worst_rel_err": worst["rel_err"]}
