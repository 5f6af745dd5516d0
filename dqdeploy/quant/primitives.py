"""Pure quantization math (no modules, no state): fake quantization with straight-through
gradients, integer grids and scale search. Tested against closed forms.
"""

from __future__ import annotations

import torch


def qrange(bits: int, symmetric: bool = True) -> tuple[int, int]:
    """Integer grid of a ``bits``-bit quantizer: signed for symmetric, unsigned for asymmetric."""
    if symmetric:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest even, with an identity gradient (straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


def quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | float, qmin: int,
             qmax: int) -> torch.Tensor:
    """Integers ``clamp(round(x / scale) + zero_point, qmin, qmax)`` (float dtype, no gradient tricks)."""
    return torch.clamp(torch.round(x / scale) + zero_point, qmin, qmax)


def fake_quant(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | float, qmin: int, qmax: int
) -> torch.Tensor:
    """Quantize-dequantize with LSQ gradients: STE through rounding, exact gradient to ``scale``.

    ``scale`` and ``zero_point`` broadcast against ``x``. A learnable ``zero_point`` is rounded with
    the straight-through estimator so it stays on the integer grid.
    """
    zp = round_ste(zero_point) if isinstance(zero_point, torch.Tensor) else zero_point
    q = torch.clamp(round_ste(x / scale) + zp, qmin, qmax)
    return (q - zp) * scale


def minmax_scale(
    lo: torch.Tensor, hi: torch.Tensor, qmin: int, qmax: int, symmetric: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point covering ``[lo, hi]`` (elementwise tensors)."""
    eps = torch.finfo(torch.float32).eps
    if symmetric:
        amax = torch.maximum(lo.abs(), hi.abs())
        return torch.clamp(amax / qmax, min=eps), torch.zeros_like(amax)
    lo = torch.minimum(lo, torch.zeros_like(lo))
    hi = torch.maximum(hi, torch.zeros_like(hi))
    scale = torch.clamp((hi - lo) / (qmax - qmin), min=eps)
    return scale, torch.round(qmin - lo / scale)


def quant_error(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int,
                p: float = 2.0) -> torch.Tensor:
    """Sum over the last dim of ``|fake_quant(x) - x|^p``; ``x`` [..., N], ``scale`` [..., 1]."""
    with torch.no_grad():
        xq = (quantize(x, scale, zero_point, qmin, qmax) - zero_point) * scale
        return (xq - x).abs().pow(p).sum(-1)


CLIP_RATIOS = torch.linspace(0.30, 1.0, 36)


def search_tensor_scale(values: torch.Tensor, qmin: int, qmax: int) -> float:
    """One symmetric scale for ``values`` (a sample of a tensor) minimising the rounding MSE over
    clipping ratios of its max |value|."""
    flat = values.detach().float().flatten()
    candidates = (CLIP_RATIOS * flat.abs().max().clamp(min=1e-12) / qmax)[:, None]
    err = quant_error(flat.expand(len(candidates), -1), candidates, torch.zeros_like(candidates), qmin, qmax)
    return float(candidates[int(err.argmin())])


def search_weight_scale(w: torch.Tensor, bits: int, p: float = 2.4) -> torch.Tensor:
    """Per-output-channel symmetric scale minimising ``|fq(w) - w|^p`` over clipping ratios.

    ``w`` [O, ...]; returns [O]: for each channel the scale of the first ratio reaching the least
    error (the ratio 1.0, max-abs, is always a candidate). One work buffer the size of ``w`` is
    reused for every ratio: fresh allocations per operation cost more than the arithmetic.
    """
    qmin, qmax = qrange(bits, True)
    flat = w.detach().reshape(w.shape[0], -1).float()
    amax = flat.abs().amax(1).clamp(min=1e-12)
    work = torch.empty_like(flat)
    errs = torch.empty(len(CLIP_RATIOS), flat.shape[0])
    for i, ratio in enumerate(CLIP_RATIOS):
        scale = (ratio * amax / qmax)[:, None]
        torch.div(flat, scale, out=work)
        work.round_().clamp_(qmin, qmax).mul_(scale).sub_(flat).abs_().pow_(p)
        torch.sum(work, -1, out=errs[i])
    return CLIP_RATIOS[errs.argmin(0)] * amax / qmax  # argmin: the first of equal errors
