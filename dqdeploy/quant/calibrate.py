"""Initialisation of the per-time-step activation step sizes (TPQ) from calibration data.

Two passes over the calibration set with forward hooks on every QuantLayer (activation
quantizers off, weights quantized): the first finds each step's range, the second scores clipping
ratios of that range by quantization MSE, per step. Steps without calibration samples take the
range of all steps. Under torchrun each rank runs its share of the batches and the statistics
(min, max, float64 error sums) are all-reduced after each pass: the same numbers as one process,
up to the order of the error sums.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import distributed
from ..inputs import Hook, PreHook, forward_hooks
from .modules import QuantizedUNet, QuantLayer, quant_layers, set_act_quant
from .primitives import CLIP_RATIOS, candidate_errors, minmax_scale, tensor_scale_candidates
from .trajectories import CalibrationSet


class _StepStats:
    """Per-step running min/max and per-candidate squared error of one layer's input."""

    def __init__(self, n_steps: int, n_candidates: int) -> None:
        self.lo = torch.full((n_steps,), float("inf"))
        self.hi = torch.full((n_steps,), float("-inf"))
        self.err = torch.zeros(n_candidates, n_steps, dtype=torch.float64)

    def observe_range(self, flat: torch.Tensor, rows: torch.Tensor) -> None:
        self.lo.scatter_reduce_(0, rows, flat.amin(1), "amin")
        self.hi.scatter_reduce_(0, rows, flat.amax(1), "amax")

    def filled_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        seen = torch.isfinite(self.lo)
        lo = torch.where(seen, self.lo, self.lo[seen].min() if seen.any() else torch.tensor(-1.0))
        hi = torch.where(seen, self.hi, self.hi[seen].max() if seen.any() else torch.tensor(1.0))
        return lo, hi


def _reduce(stats: list[_StepStats], phase: str) -> None:
    """Combine every rank's statistics of one pass (one collective per kind)."""
    if phase == "range":
        lo, hi = torch.stack([st.lo for st in stats]), torch.stack([st.hi for st in stats])
        distributed.all_reduce(lo, "min"), distributed.all_reduce(hi, "max")
        for i, st in enumerate(stats):
            st.lo, st.hi = lo[i], hi[i]
    else:
        err = distributed.all_reduce(torch.stack([st.err for st in stats]))
        for i, st in enumerate(stats):
            st.err = err[i]


@torch.no_grad()
def init_activation_scales(model: QuantizedUNet, calib: CalibrationSet, *, method: str = "mse", batch_size: int = 32) -> None:
    """Set every activation quantizer's per-step scale (and zero point) from ``calib``."""
    layers = quant_layers(model)
    if not layers:
        return
    n_steps = model.table.n_rows
    stats = {name: _StepStats(n_steps, len(CLIP_RATIOS)) for name in layers}
    phase = {"name": "range"}

    def make_hook(name: str, layer: QuantLayer) -> PreHook:
        q = layer.input_quantizer

        def hook(module: nn.Module, args: tuple) -> None:
            x = layer.dilated_input(args[0])
            rows = q.rows_for(x)
            flat = x.detach().reshape(x.shape[0], -1).float()
            st = stats[name]
            if phase["name"] == "range":
                st.observe_range(flat, rows)
                return
            lo, hi = st.filled_range()
            for c, ratio in enumerate(CLIP_RATIOS):
                scale, zp = minmax_scale(ratio * lo[rows], ratio * hi[rows], q.qmin, q.qmax, q.symmetric)
                xq = (torch.clamp(torch.round(flat / scale[:, None]) + zp[:, None], q.qmin, q.qmax) - zp[:, None]) * scale[:, None]
                st.err[c].index_add_(0, rows, (xq - flat).pow(2).sum(1).double())

        return hook

    set_act_quant(model, False)
    try:
        with forward_hooks((layer, "pre", make_hook(name, layer)) for name, layer in layers.items()):
            for p in ["range", "mse"] if method == "mse" else ["range"]:
                phase["name"] = p
                for _, batch in tqdm(calib.local_batches(batch_size), desc=f"calibrate ({p})", leave=False):
                    batch.call(model)
                _reduce(list(stats.values()), p)
    finally:
        set_act_quant(model, True)

    for name, layer in layers.items():
        q = layer.input_quantizer
        lo, hi = stats[name].filled_range()
        ratio = torch.ones(n_steps)
        if method == "mse":
            ratio = CLIP_RATIOS[stats[name].err.argmin(0)]
        scale, zp = minmax_scale(ratio * lo, ratio * hi, q.qmin, q.qmax, q.symmetric)
        q.scale.copy_(scale)
        q.zero_point.copy_(zp)


@torch.no_grad()
def input_channel_absmax(model: nn.Module, names: list[str], calib: CalibrationSet, batch_size: int = 32) -> dict[str, torch.Tensor]:
    """Per-input-channel max |x| of the inputs of the named Conv2d/Linear layers (SmoothQuant)."""
    result: dict[str, torch.Tensor] = {}

    def make_hook(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0].detach()
            dims = [d for d in range(x.dim()) if d != (1 if isinstance(module, nn.Conv2d) else x.dim() - 1)]
            amax = x.abs().amax(dim=dims).float()
            result[name] = amax if name not in result else torch.maximum(result[name], amax)

        return hook

    run_with_hooks(model, [(model.get_submodule(n), "pre", make_hook(n)) for n in names], calib, batch_size)
    for name in names:  # a rank without batches contributes zeros
        module = model.get_submodule(name)
        width = cast(int, module.in_channels if isinstance(module, nn.Conv2d) else module.in_features)
        result[name] = distributed.all_reduce(result.get(name, torch.zeros(width)), "max")
    return result


def run_with_hooks(
    model: nn.Module, hooks: list[Hook], calib: CalibrationSet, batch_size: int, on_batch: Callable[[int], object] | None = None
) -> None:
    """Run ``model`` over this rank's calibration batches with ``hooks`` registered (removed
    afterwards, also on error); ``on_batch(index)`` before each batch."""
    with forward_hooks(hooks):
        for b, batch in calib.local_batches(batch_size):
            if on_batch is not None:
                on_batch(b)
            batch.call(model)


@torch.no_grad()
def init_output_scales(model: QuantizedUNet, calib: CalibrationSet, batch_size: int = 32, keep: int = 1 << 15) -> None:
    """Initialise each output quantizer's ``c`` (step ``c * s_t``) by MSE over the bias-free outputs
    normalised by their step's input scale, with every input quantizer calibrated and on. Each batch
    keeps a sample (seeded by the batch's index) of every output; ranks combine max and errors."""
    layers = {n: m for n, m in quant_layers(model).items() if m.output_scale is not None}
    if not layers:
        return
    values: dict[str, list[torch.Tensor]] = {n: [] for n in layers}
    gen = torch.Generator()

    def make_hook(name: str, layer: QuantLayer):
        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            x = layer.input_quantizer(layer.dilated_input(args[0]))
            w = layer.weight_quantizer(layer.weight)
            y = layer._compute(x, w, None)
            q = layer.input_quantizer
            y = y / q.scale.abs()[q.rows_for(y)].view(-1, *([1] * (y.dim() - 1)))
            flat = y.flatten()
            values[name].append(torch.cat([flat[torch.randperm(flat.numel(), generator=gen)[:keep]], flat.abs().max().view(1)]))

        return hook

    for layer in layers.values():  # observe outputs before any output rounding
        layer.output_enabled = False
    try:
        run_with_hooks(model, [(m, "post", make_hook(n, m)) for n, m in layers.items()], calib, batch_size,
                       on_batch=gen.manual_seed)
    finally:
        for layer in layers.values():
            layer.output_enabled = True
    amax = distributed.all_reduce(torch.stack([max((v.abs().max() for v in values[n]), default=torch.tensor(0.0))
                                               for n in layers]), "max")
    candidates = [tensor_scale_candidates(a, m.out_qmax) for a, m in zip(amax, layers.values())]
    err = distributed.all_reduce(torch.stack([
        sum((candidate_errors(v, c, m.out_qmin, m.out_qmax) for v in values[n]), torch.zeros(len(c), dtype=torch.float64))
        for (n, m), c in zip(layers.items(), candidates)
    ]))
    for (name, layer), c, e in zip(layers.items(), candidates, err):
        assert layer.output_scale is not None  # only output-quantized layers are in ``layers``
        layer.output_scale.data.fill_(float(c[int(e.argmin())]))
