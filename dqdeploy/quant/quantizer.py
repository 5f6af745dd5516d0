"""Quantizers with learnable step sizes (LSQ): per-output-channel weights, and per-time-step
activations (the Temporal Parallel Quantizer). All parameters are created in ``__init__``.
"""

from __future__ import annotations

import torch
from torch import nn

from .primitives import fake_quant, qrange, quantize, round_ste, search_weight_scale
from .timestep import StepIndex


class WeightQuantizer(nn.Module):
    """Symmetric per-output-channel quantizer of a weight [O, ...] with a learnable scale [O]:
    ``scale`` when given (an artifact's), else the clipping search's on ``weight``."""

    def __init__(self, weight: torch.Tensor, bits: int, scale: torch.Tensor | None = None) -> None:
        super().__init__()
        self.bits = bits
        self.qmin, self.qmax = qrange(bits, True)
        self.scale = nn.Parameter(search_weight_scale(weight, bits) if scale is None else scale.detach())

    def _shaped_scale(self, w: torch.Tensor) -> torch.Tensor:
        """The step per output channel: the magnitude of ``scale`` (a learned step that crosses zero keeps
        its grid, so the integers stay within the bit width and the stored weight is the simulated one)."""
        return self.scale.abs().view(-1, *([1] * (w.dim() - 1)))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return fake_quant(w, self._shaped_scale(w), 0.0, self.qmin, self.qmax)

    @torch.no_grad()
    def integers(self, w: torch.Tensor) -> torch.Tensor:
        """The weight's integers (int8 tensor; 4-bit values fit losslessly)."""
        return quantize(w, self._shaped_scale(w), 0.0, self.qmin, self.qmax).to(torch.int8)

    @torch.no_grad()
    def clip_to_grid(self, w: torch.Tensor) -> torch.Tensor:
        """``w`` with the entries beyond the grid (more than ``qmin``/``qmax`` steps) set to its edge: the
        same integers, hence the same quantized weight, and nothing stored outside the bit width (a
        learned step can shrink far below max-abs / qmax, clipping a channel's outliers)."""
        s = self._shaped_scale(w)
        steps = w / s
        return torch.where((steps < self.qmin) | (steps > self.qmax), s * steps.clamp(self.qmin, self.qmax), w)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, channels={self.scale.numel()}"


class ActQuantizer(nn.Module):
    """Per-tensor activation quantizer with one step size (and zero point) per time step.

    Each sample uses the row of its own time step, read from the shared :class:`StepIndex`; a batch
    may mix steps, and a backward pass reaches exactly the rows that were used. When the tensor's
    leading dim is a multiple of the batch (attention's (B*H, N, d) layout) rows repeat per head.
    """

    def __init__(self, n_steps: int, bits: int, symmetric: bool, step_index: StepIndex) -> None:
        super().__init__()
        self.bits = bits
        self.symmetric = symmetric
        self.qmin, self.qmax = qrange(bits, symmetric)
        self.step_index = step_index
        self.scale = nn.Parameter(torch.ones(n_steps))
        if symmetric:
            self.register_buffer("zero_point", torch.zeros(n_steps))
        else:
            self.zero_point = nn.Parameter(torch.zeros(n_steps))
        self.enabled = True

    @property
    def n_steps(self) -> int:
        return self.scale.numel()

    def rows_for(self, x: torch.Tensor) -> torch.Tensor:
        """Per-sample rows of ``x`` [N, ...] from the bound step index."""
        rows = self.step_index.value.to(self.scale.device)
        if rows.numel() != x.shape[0]:
            if x.shape[0] % rows.numel():
                raise RuntimeError(f"activation batch {x.shape[0]} is not a multiple of {rows.numel()} steps")
            rows = rows.repeat_interleave(x.shape[0] // rows.numel())
        return rows

    def forward(self, x: torch.Tensor, integer_form: bool = False):
        """The fake-quantized ``x``; with ``integer_form``, ``(q, step)`` instead, ``q * step`` being that value:
        ``q`` integer-valued (zero point removed, gradients as LSQ's), ``step`` per sample, shaped to broadcast
        against ``x`` (``(x, 1)`` when disabled). A matmul of two such ``q`` is exact in float32 while its sums
        stay below 2**24, as an integer kernel computes it. Forward hooks see ``x`` either way."""
        if not self.enabled:
            return (x, torch.ones((), dtype=x.dtype, device=x.device)) if integer_form else x
        rows = self.rows_for(x)
        shape = (-1,) + (1,) * (x.dim() - 1)
        scale = self.scale.abs()[rows].view(shape)  # abs keeps a learned scale positive
        if integer_form:
            zero_point = round_ste(self.zero_point[rows].view(shape))
            return torch.clamp(round_ste(x / scale) + zero_point, self.qmin, self.qmax) - zero_point, scale
        zero_point = self.zero_point[rows].view(shape)
        return fake_quant(x, scale, zero_point, self.qmin, self.qmax)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, symmetric={self.symmetric}, steps={self.n_steps}"
