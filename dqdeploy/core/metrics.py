"""Error measures shared by every comparison (check, sensitivity, eval): one definition of each."""

from __future__ import annotations

import torch


def relative_error(out: torch.Tensor, ref: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Per-sample ``||out - ref|| / ||ref||`` over ``[N, ...]`` tensors (``||ref||`` clamped to ``eps``)."""
    diff = (out - ref).flatten(1).norm(dim=1)
    return diff / ref.flatten(1).norm(dim=1).clamp(min=eps)
