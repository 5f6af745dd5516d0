"""Weight Dilation (DilateQuant, arXiv 2409.14307) and the SmoothQuant baseline: per-input-channel
factors ``s`` with ``W' = W * s`` and ``X' = X / s``. Pure functions of tensors.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _as_rows(w: torch.Tensor) -> torch.Tensor:
    """[O, K, ...] -> [O, K, R] (kernel positions flattened into R)."""
    return w.detach().float().reshape(w.shape[0], w.shape[1], -1)


def dilation_factors(weights: Sequence[torch.Tensor] | torch.Tensor) -> torch.Tensor:
    """Weight Dilation factors ``s`` [K] (all >= 1) for one or more weights sharing an input.

    A channel that holds the max or min of some output channel is saturated (``s = 1``); any other
    channel grows by the largest factor that keeps every entry inside its row's [min, max], so each
    output channel keeps its range (and its per-channel step size) after dilation.
    """
    if isinstance(weights, torch.Tensor):
        weights = [weights]
    k = weights[0].shape[1]
    limit = torch.full((k,), float("inf"))
    saturated = torch.zeros(k, dtype=torch.bool)
    for w in weights:
        if w.shape[1] != k:
            raise ValueError(f"weights sharing an input must have the same input channels ({w.shape[1]} != {k})")
        rows = _as_rows(w)
        wmax = rows.amax(dim=(1, 2), keepdim=True)
        wmin = rows.amin(dim=(1, 2), keepdim=True)
        saturated |= ((rows == wmax) | (rows == wmin)).any(dim=2).any(dim=0)
        inf = torch.full_like(rows, float("inf"))
        up = torch.where((rows > 0) & (wmax > 0), wmax / rows, inf)
        down = torch.where((rows < 0) & (wmin < 0), wmin / rows, inf)
        limit = torch.minimum(limit, torch.minimum(up, down).amin(dim=(0, 2)))
    s = torch.where(saturated | torch.isinf(limit), torch.ones_like(limit), limit)
    return s.clamp(min=1.0)


def smoothquant_factors(
    act_absmax: torch.Tensor, weights: Sequence[torch.Tensor] | torch.Tensor, alpha: float = 0.5
) -> torch.Tensor:
    """SmoothQuant factors ``s_k = max|X_k|^a / max|W_k|^(1-a)`` [K] (the baseline WD is compared with)."""
    if isinstance(weights, torch.Tensor):
        weights = [weights]
    w_absmax = torch.stack([_as_rows(w).abs().amax(dim=(0, 2)) for w in weights]).amax(0)
    eps = 1e-5
    s = act_absmax.float().clamp(min=eps).pow(alpha) / w_absmax.clamp(min=eps).pow(1 - alpha)
    return s.clamp(min=eps)
