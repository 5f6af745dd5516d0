"""Time-step bookkeeping for the Temporal Parallel Quantizer.

``TimestepTable`` maps a diffusers ``timestep`` (scalar or [B]) to the row of the calibrated step
nearest to it. ``StepIndex`` carries the per-sample row index of the current forward call from
the quantized denoiser to every activation quantizer: it is set explicitly around each call, never
counted or inferred.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch


class TimestepTable:
    """The calibrated time steps (in sampling order) and the nearest-step lookup."""

    def __init__(self, timesteps: Sequence[float] | torch.Tensor, collapsed: bool = False) -> None:
        values = torch.as_tensor(timesteps, dtype=torch.float32).flatten()
        if values.numel() == 0:
            raise ValueError("a timestep table needs at least one time step")
        self.timesteps = values
        self.collapsed = collapsed

    @property
    def n_rows(self) -> int:
        """Rows of every per-step table: one per calibrated step, or one in collapsed mode."""
        return 1 if self.collapsed else len(self)

    def __len__(self) -> int:
        return int(self.timesteps.numel())

    def tolist(self) -> list[float]:
        return [float(t) for t in self.timesteps]

    def index(self, timestep: torch.Tensor | float | int, batch: int) -> torch.Tensor:
        """Row index [batch] (int64) of the nearest calibrated step for each sample."""
        t = torch.as_tensor(timestep).to(torch.float32).flatten().cpu()
        if t.numel() == 1:
            t = t.expand(batch)
        if t.numel() != batch:
            raise ValueError(f"timestep has {t.numel()} values for a batch of {batch}")
        if self.collapsed:
            return torch.zeros(batch, dtype=torch.long)
        return (t[:, None] - self.timesteps[None, :]).abs().argmin(dim=1)

    def is_calibrated(self, timestep: torch.Tensor | float | int) -> bool:
        """True when every value of ``timestep`` is one of the calibrated steps."""
        t = torch.as_tensor(timestep).to(torch.float32).flatten().cpu()
        return bool(torch.isin(t, self.timesteps).all())


class StepIndex:
    """Holder of the per-sample step rows of the forward call in progress."""

    def __init__(self) -> None:
        self._value: torch.Tensor | None = None

    @property
    def value(self) -> torch.Tensor:
        if self._value is None:
            raise RuntimeError(
                "activation quantizer called outside a quantized forward: no time step is bound "
                "(call the QuantizedDenoiser, or bind rows with StepIndex.bound)"
            )
        return self._value

    @contextlib.contextmanager
    def bound(self, rows: torch.Tensor) -> Iterator[None]:
        """Bind ``rows`` [B] for the duration of one forward call (re-entrant)."""
        previous, self._value = self._value, rows
        try:
            yield
        finally:
            self._value = previous
