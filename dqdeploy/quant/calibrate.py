"""Initialisation of the per-time-step activation step sizes (TPQ) from calibration data.

Two passes over the calibration set with forward hooks on every activation quantizer (quantizers
off, weights quantized): the first finds each step's range, the second scores clipping
ratios of that range by quantization MSE, per step. Steps without calibration samples take the
range of all steps.

Under torchrun each rank runs its share of the batches (every ``world``-th) and the ranks combine
what they saw into exactly the numbers of one process: ranges by min/max, and the error sums by
replaying every rank's per-sample errors in the one-process order (a float sum depends on its
order, so summing per-rank partial sums would not be bit-equal). Output scales sample their values
with one generator in batch order, so each rank first learns the sizes of the other ranks' outputs
(one extra pass over its own batches) to draw what one process draws.
"""

from __future__ import annotations

from typing import cast

import torch
from torch import nn

from ..core.inputs import Hook, PreHook, forward_hooks
from ..system import distributed
from ..system.progress import progress
from .modules import QuantizedDenoiser, QuantLayer, act_quantizers, quant_layers, set_act_quant
from .primitives import CLIP_RATIOS, minmax_scale, search_tensor_scale
from .quantizer import ActQuantizer
from .trajectories import CalibrationSet


class _StepStats:
    """Per-step running min/max and per-candidate squared error of one layer's input."""

    def __init__(self, n_steps: int, n_candidates: int) -> None:
        self.lo = torch.full((n_steps,), float("inf"))
        self.hi = torch.full((n_steps,), float("-inf"))
        self.err = torch.zeros(n_candidates, n_steps)

    def observe_range(self, flat: torch.Tensor, rows: torch.Tensor) -> None:
        self.lo.scatter_reduce_(0, rows, flat.amin(1), "amin")
        self.hi.scatter_reduce_(0, rows, flat.amax(1), "amax")

    def filled_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        seen = torch.isfinite(self.lo)
        lo = torch.where(seen, self.lo, self.lo[seen].min() if seen.any() else torch.tensor(-1.0))
        hi = torch.where(seen, self.hi, self.hi[seen].max() if seen.any() else torch.tensor(1.0))
        return lo, hi


def _combine(stats: dict[str, _StepStats], records: dict[str, list[tuple[int, torch.Tensor, torch.Tensor]]],
             phase: str) -> None:
    """Every rank's statistics of one pass, combined as one process computes them."""
    if phase == "range":
        lo = distributed.all_reduce(torch.stack([st.lo for st in stats.values()]), "min")
        hi = distributed.all_reduce(torch.stack([st.hi for st in stats.values()]), "max")
        for i, st in enumerate(stats.values()):
            st.lo, st.hi = lo[i].clone(), hi[i].clone()
        return
    for name, st in stats.items():  # one layer at a time: its per-sample errors of every rank, in batch order
        found = sorted((r for part in distributed.all_gather(records[name]) for r in part), key=lambda r: r[0])
        records[name].clear()
        for _, rows, errs in found:
            for c in range(len(errs)):
                st.err[c].index_add_(0, rows, errs[c])


@torch.no_grad()
def init_activation_scales(model: QuantizedDenoiser, calib: CalibrationSet, *, method: str = "mse",
                           batch_size: int = 32) -> None:
    """Set every activation quantizer's per-step scale (and zero point) from ``calib``: each QuantLayer's
    input quantizer and, with quantized attention, each attention's query, key and value quantizers."""
    quantizers = act_quantizers(model)
    if not quantizers:
        return
    n_steps = model.table.n_rows
    stats = {name: _StepStats(n_steps, len(CLIP_RATIOS)) for name in quantizers}
    phase: dict = {"name": "range", "batch": 0}
    many = distributed.active()
    records: dict[str, list[tuple[int, torch.Tensor, torch.Tensor]]] = {name: [] for name in quantizers}

    def make_hook(name: str, q: ActQuantizer) -> PreHook:
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0]  # what the quantizer rounds (a QuantLayer's dilated input)
            rows = q.rows_for(x)
            flat = x.detach().reshape(x.shape[0], -1).float()
            st = stats[name]
            if phase["name"] == "range":
                st.observe_range(flat, rows)
                return
            lo, hi = st.filled_range()
            errs = []
            for c, ratio in enumerate(CLIP_RATIOS):
                scale, zp = minmax_scale(ratio * lo[rows], ratio * hi[rows], q.qmin, q.qmax, q.symmetric)
                xq = (torch.clamp(torch.round(flat / scale[:, None]) + zp[:, None], q.qmin, q.qmax)
                      - zp[:, None]) * scale[:, None]
                if many:  # kept per sample, summed in the one-process order once every rank's are known
                    errs.append((xq - flat).pow(2).sum(1))
                else:
                    st.err[c].index_add_(0, rows, (xq - flat).pow(2).sum(1))
            if many:
                records[name].append((phase["batch"], rows, torch.stack(errs)))

        return hook

    set_act_quant(model, False)
    try:
        with forward_hooks((q, "pre", make_hook(name, q)) for name, q in quantizers.items()):
            for p in ["range", "mse"] if method == "mse" else ["range"]:
                phase["name"] = p
                for b, batch in progress(calib.local_batches(batch_size), len(calib.batch_indices(batch_size)),
                                         f"activation scales ({p})", unit="batch"):
                    phase["batch"] = b
                    batch.call(model)
                if many:
                    _combine(stats, records, p)
    finally:
        set_act_quant(model, True)
    _set_input_scales(quantizers, stats, n_steps, method)


@torch.no_grad()
def _set_input_scales(quantizers: dict[str, ActQuantizer], stats: dict[str, _StepStats], n_steps: int,
                      method: str) -> None:
    """Each quantizer's per-step scale and zero point from the range of its input (clipped by the
    MSE-best ratio with ``method="mse"``)."""
    for name, q in quantizers.items():
        lo, hi = stats[name].filled_range()
        ratio = torch.ones(n_steps)
        if method == "mse":
            ratio = CLIP_RATIOS[stats[name].err.argmin(0)]
        scale, zp = minmax_scale(ratio * lo, ratio * hi, q.qmin, q.qmax, q.symmetric)
        q.scale.copy_(scale)
        q.zero_point.copy_(zp)


@torch.no_grad()
def input_channel_absmax(model: nn.Module, names: list[str], calib: CalibrationSet,
                         batch_size: int = 32) -> dict[str, torch.Tensor]:
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
    if distributed.active():  # max is exact in any order; a layer no rank saw stays absent, as in one process
        seen = {n for part in distributed.all_gather(list(result)) for n in part}
        for name in [n for n in names if n in seen]:
            module = model.get_submodule(name)
            width = cast(int, module.in_channels if isinstance(module, nn.Conv2d) else module.in_features)
            result[name] = distributed.all_reduce(result.get(name, torch.zeros(width)), "max")
    return result


def run_with_hooks(model: nn.Module, hooks: list[Hook], calib: CalibrationSet, batch_size: int) -> None:
    """Run ``model`` over this rank's calibration batches (all of them in one process) with ``hooks``
    registered (removed afterwards, also on error)."""
    with forward_hooks(hooks):
        for _, batch in progress(calib.local_batches(batch_size), len(calib.batch_indices(batch_size)),
                                 "calibration inputs", unit="batch"):
            batch.call(model)


@torch.no_grad()
def init_output_scales(model: QuantizedDenoiser, calib: CalibrationSet, batch_size: int = 32,
                       keep: int = 1 << 15) -> None:
    """Initialise each output quantizer's ``c`` (step ``c * s_t``) by MSE over the bias-free outputs
    normalised by their step's input scale, with every input quantizer calibrated and on. Each
    output contributes ``keep`` values drawn with one generator over the batches in order (under
    torchrun: the same draws, see the module's docstring)."""
    layers = {n: m for n, m in quant_layers(model).items() if m.output_scale is not None}
    if not layers:
        return
    values: dict[str, list[tuple[int, torch.Tensor]]] = {n: [] for n in layers}
    gen = torch.Generator().manual_seed(0)
    state: dict = {"batch": 0, "sizes": None}  # sizes: (layer, numel) of each output, in call order

    def make_hook(name: str, layer: QuantLayer):
        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            if state["sizes"] is not None:
                state["sizes"].append((name, out.numel()))
                return
            x = layer.input_quantizer(layer.dilated_input(args[0]))
            w = layer.weight_quantizer(layer.weight)
            y = layer._compute(x, w, None)
            q = layer.input_quantizer
            y = y / q.scale.abs()[q.rows_for(y)].view(-1, *([1] * (y.dim() - 1)))
            flat = y.flatten()
            assert flat.numel() == out.numel()  # the sizes the other ranks replay the draws with
            kept = torch.cat([flat[torch.randperm(flat.numel(), generator=gen)[:keep]], flat.abs().max().view(1)])
            values[name].append((state["batch"], kept))

        return hook

    for layer in layers.values():  # observe outputs before any output rounding
        layer.output_enabled = False
    try:
        with forward_hooks([(m, "post", make_hook(n, m)) for n, m in layers.items()]):
            _sample_outputs(model, calib, batch_size, gen, state)
    finally:
        for layer in layers.values():
            layer.output_enabled = True
    for name, layer in layers.items():
        assert layer.output_scale is not None  # only output-quantized layers are in ``layers``
        found = sorted((v for part in distributed.all_gather(values[name]) for v in part), key=lambda v: v[0])
        layer.output_scale.data.fill_(search_tensor_scale(torch.cat([v for _, v in found]),
                                                          layer.out_qmin, layer.out_qmax))


def _sample_outputs(model: QuantizedDenoiser, calib: CalibrationSet, batch_size: int, gen: torch.Generator,
                    state: dict) -> None:
    """Run this rank's batches with the output hooks sampling from ``gen``; under torchrun, the draws
    of the other ranks' batches are made here too (sizes learnt from a first pass), in batch order."""
    sizes: dict[int, list[tuple[str, int]]] = {}
    if distributed.active():
        for b, batch in calib.local_batches(batch_size):
            state["sizes"] = sizes[b] = []
            batch.call(model)
        state["sizes"] = None
        sizes = {b: seq for part in distributed.all_gather(sizes) for b, seq in part.items()}
    mine = set(calib.batch_indices(batch_size))
    n_batches = -(-len(calib) // batch_size)
    for b in progress(range(n_batches), n_batches, "output scales", unit="batch"):
        if b in mine:
            state["batch"] = b
            calib.batch(torch.arange(b * batch_size, min((b + 1) * batch_size, len(calib)))).call(model)
        else:
            for _, numel in sizes[b]:
                torch.randperm(numel, generator=gen)
