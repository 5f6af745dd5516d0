"""Block-wise knowledge distillation (BKD, DilateQuant arXiv 2409.14307) and the whole-model baseline.

For block k: the FP block's output on FP inputs is the target; the quantized block is fed the
inputs produced by the already-distilled quantized blocks before it. Weights, biases, weight step
sizes and per-step activation step sizes (and zero points) train jointly with Adam.

The data is captured by propagation (:mod:`.propagate`: one FP forward per batch for every target,
a replay answered from cached outputs for each block's inputs) and lives on disk
(:mod:`.blockstore`), read one batch at a time. The targets (:func:`block_targets`,
:func:`model_targets`) are taken from the float model before it is converted, so quantize holds
the weights once. A :class:`BlockCheckpoint` saves each finished block and restores it on a
resumed run.

Slices: each global batch (``recipe.batch_size`` samples) is split into ``world * micro_batches``
slices; a rank holds ``micro_batches`` of them, weights each slice's loss by its share of the batch
and accumulates the gradients; under torchrun the ranks' gradients are summed before each Adam step.
So one step sees the global batch whatever the split, and two processes compute exactly what one
process with ``micro_batches=2`` computes (the same slices, the same sums). Against the unsplit
batch (one process, ``micro_batches=1``) a split changes float results slightly: matrix products
of another batch shape round differently, and the slices' losses and gradients are added in
another order.
"""

from __future__ import annotations

import contextlib
import logging
import math
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ..core.recipe import Recipe
from ..core.terminal import bar as progress_bar
from ..system import distributed
from ..system.progress import progress, rss_gb, trim_heap
from .attention import attention_quantizers
from .blocks import Block
from .blockstore import BlockStore, contiguous
from .modules import QuantizedDenoiser, QuantLayer, quant_layers
from .propagate import FP, INPUTS, cache_outputs, capture_inputs, capture_targets, output_tensors
from .quantizer import ActQuantizer
from .trajectories import CalibrationSet

log = logging.getLogger(__name__)
__all__ = ["BlockCheckpoint", "BlockReport", "Targets", "block_loss", "block_targets", "distill_blocks",
           "distill_model", "model_targets", "open_store", "output_tensors"]


@dataclass
class BlockReport:
    """Distillation record of one block: MSE before and after, and the loss curve."""

    name: str
    loss_before: float
    loss_after: float
    curve: list[float] = field(default_factory=list)


def block_loss(out: Any, targets: list[torch.Tensor]) -> torch.Tensor:
    """Sum of the MSEs of every output tensor of a block against its FP targets."""
    return sum((F.mse_loss(o, t) for o, t in zip(output_tensors(out), targets)), torch.zeros(()))


class BlockCheckpoint(Protocol):
    """Saves each distilled block, and gives back the blocks a resumed run already finished."""

    def restore(self, index: int, name: str, block: nn.Module) -> BlockReport | None:
        """Load block ``index``'s saved parameters into ``block`` and return its report; None if not saved."""

    def save(self, index: int, name: str, block: nn.Module, report: BlockReport) -> None:
        """Record block ``index`` as finished (its parameters and report)."""


def _param_groups(layers: list[QuantLayer], recipe: Recipe, attention: Sequence[ActQuantizer] = ()) -> list[dict]:
    """Adam's groups: weights and biases at ``lr_weight``; every step size (weights, inputs, outputs and the
    ``attention`` quantizers of quantized attention) at ``lr_quant``."""
    weights, quant = [], []
    for layer in layers:
        weights.append(layer.weight)
        if layer.bias is not None:
            weights.append(layer.bias)
        quant.append(layer.weight_quantizer.scale)
        quant.append(layer.input_quantizer.scale)
        if layer.output_scale is not None:
            quant.append(layer.output_scale)
        if isinstance(layer.input_quantizer.zero_point, nn.Parameter):
            quant.append(layer.input_quantizer.zero_point)
    for q in attention:
        quant.append(q.scale)
    return [{"params": weights, "lr": recipe.lr_weight}, {"params": quant, "lr": recipe.lr_quant}]


def _train(
    name: str,
    losses: Callable[[int], Iterator[torch.Tensor]],
    layers: list[QuantLayer],
    n_batches: int,
    recipe: Recipe,
    iters: int,
    seed: int,
    attention: Sequence[ActQuantizer] = (),
) -> BlockReport:
    """Adam on randomly drawn global batches ``i``: ``losses(i)`` yields the share-weighted loss of
    each of this rank's slices of batch ``i`` (ranks draw the same ``i`` and sum their gradients)."""

    def batch_loss(i: int, backward: bool) -> float:
        total = 0.0
        for loss in losses(i):
            if backward and loss.requires_grad:
                loss.backward()  # gradients of the slices accumulate
            total += loss.item()
        return total

    def mean_loss() -> float:
        with torch.no_grad():
            values = [batch_loss(i, False) for i in range(n_batches)]
        if distributed.active():  # each batch's loss is the sum of its slices' shares
            values = distributed.all_reduce(torch.tensor(values, dtype=torch.float64)).tolist()
        return float(sum(values) / n_batches)

    before = mean_loss()
    curve: list[float] = []
    if iters > 0 and layers:
        groups = _param_groups(layers, recipe, attention)
        params = [p for g in groups for p in g["params"]]
        opt = torch.optim.Adam(groups)
        gen = torch.Generator().manual_seed(seed)
        bar = progress_bar(range(iters), desc=f"distill {name}", leave=False)
        running = before
        with _requires_grad(params, True):
            for step in bar:
                i = int(torch.randint(n_batches, (1,), generator=gen))
                opt.zero_grad(set_to_none=True)
                value = batch_loss(i, True)
                if distributed.active():
                    # the global batch's loss
                    value = float(distributed.all_reduce(torch.tensor(value, dtype=torch.float64)))
                if not math.isfinite(value):
                    raise FloatingPointError(f"distillation loss of {name} became {value} at step {step}")
                distributed.sum_gradients(params)
                opt.step()
                running = 0.9 * running + 0.1 * value
                curve.append(value)
                if step % 20 == 0:
                    bar.set_postfix(loss=f"{running:.3e}")
        opt.zero_grad(set_to_none=True)  # a finished block keeps no gradients (they added up to the model's size)
    return BlockReport(name, before, mean_loss(), curve)


@contextmanager
def _requires_grad(params: Iterable[torch.Tensor], flag: bool) -> Iterator[None]:
    """``params`` require gradients (``flag``) in the ``with`` body; their own flags restored after.
    Distillation freezes the whole model, then unfreezes the parameters of the block it trains: no
    gradient is computed, nor kept, for norms, float layers or other blocks."""
    saved = [(p, p.requires_grad) for p in params]
    try:
        for p, _ in saved:
            p.requires_grad_(flag)
        yield
    finally:
        for p, old in saved:
            p.requires_grad_(old)


@dataclass
class Targets:
    """The full-precision targets of distillation, taken from the float model before it is converted
    (so the conversion can happen in place): this rank's slices of the seeded batch order, and every
    block's outputs per slice in ``store`` (block-wise) or the model's output per slice (``outputs``)."""

    slices: Slices
    store: BlockStore | None = None
    blocks: list[str] = field(default_factory=list)  # the blocks whose targets are in ``store``, by index
    outputs: list[torch.Tensor] = field(default_factory=list)


def block_targets(fp_denoiser: nn.Module, blocks: list[Block], calib: CalibrationSet, recipe: Recipe, store: BlockStore,
                  seed: int = 0, *, micro_batches: int = 1) -> Targets:
    """The FP outputs of every block, one FP forward per slice, into ``store``."""
    sl = _seeded_slices(len(calib), recipe.batch_size, seed, micro_batches)
    names = [b.name for b in blocks]
    capture_targets(fp_denoiser, names, calib, sl.parts, store)
    return Targets(sl, store, names)


@torch.no_grad()
def model_targets(fp_denoiser: nn.Module, calib: CalibrationSet, recipe: Recipe, seed: int = 0, *,
                  micro_batches: int = 1) -> Targets:
    """The FP model's output on every slice (whole-model distillation)."""
    sl = _seeded_slices(len(calib), recipe.batch_size, seed, micro_batches)
    return Targets(sl, outputs=[calib.batch(p).call(fp_denoiser) for p in sl.parts])


def distill_blocks(
    qmodel: QuantizedDenoiser,
    blocks: list[Block],
    calib: CalibrationSet,
    recipe: Recipe,
    targets: Targets,
    seed: int = 0,
    *,
    checkpoint: BlockCheckpoint | None = None,
) -> list[BlockReport]:
    """BKD over ``blocks`` (in execution order, the ones ``targets`` were captured for); returns one
    report per block with a quantized layer (a block whose layers all stayed in float runs as it is)."""
    sl, store = targets.slices, targets.store
    assert store is not None, "block-wise distillation needs block targets (block_targets)"
    target_index = {name: i for i, name in enumerate(targets.blocks)}
    blocks = [b for b in blocks if any(isinstance(qmodel.denoiser.get_submodule(n), QuantLayer) for n in b.layers)]
    rows = [qmodel.table.index(calib.inputs.timestep[p], len(p)) for p in sl.parts]
    names = [b.name for b in blocks]
    reports = []
    with _requires_grad(qmodel.parameters(), False):  # only the block in training computes gradients (_train)
        for k, block in enumerate(progress(blocks, len(blocks), "block-wise distillation", unit="block")):
            qblock = qmodel.denoiser.get_submodule(block.name)
            n_parts = capture_inputs(qmodel, names, k, calib, sl.parts, store)
            report = checkpoint.restore(k, block.name, qblock) if checkpoint else None
            if report is not None:
                log.info("block %s restored from the checkpoint", block.name)
            else:
                report = _distill_block(qmodel, qblock, block, (k, target_index[block.name]), store, rows, sl, n_parts,
                                        recipe, seed)
                if checkpoint:
                    checkpoint.save(k, block.name, qblock, report)
            reports.append(report)
            cache_outputs(qmodel, qblock, k, rows, store)
            store.drop(INPUTS, k)
            store.drop(FP, target_index[block.name])
            trim_heap()  # the block's activations and optimizer state leave the process before the next block
            log.debug("block %s done: RSS now %.2f GB", block.name, rss_gb() or 0.0)
    return reports


@contextmanager
def open_store(workdir: str | Path | None) -> Iterator[BlockStore]:
    """A :class:`BlockStore` in ``workdir`` (a temporary folder when None), emptied at the end."""
    with contextlib.ExitStack() as stack:
        root = (Path(workdir) if workdir is not None
                else Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="dqdeploy-distill-"))) / "data")
        store = BlockStore(root)
        try:
            yield store
        finally:
            store.clear()


def _distill_block(qmodel: QuantizedDenoiser, qblock: nn.Module, block: Block, index: tuple[int, int],
                   store: BlockStore, rows: list[torch.Tensor], sl: Slices, n_parts: int, recipe: Recipe,
                   seed: int) -> BlockReport:
    """Train block ``k`` on its stored inputs and FP targets (one entry per slice of ``sl``);
    ``index``: ``k`` and the index of its targets."""
    k, t = index
    if int(distributed.all_reduce(torch.tensor(n_parts), "max")) == 0:  # never called by the model's forward
        return BlockReport(block.name, 0.0, 0.0)
    layers = [m for n in block.layers
              if isinstance(m := qmodel.denoiser.get_submodule(n), QuantLayer)]  # not the fallback ones

    def losses(i: int) -> Iterator[torch.Tensor]:
        for p in sl.groups[i]:
            args, kwargs = contiguous(store.get(INPUTS, k, p))  # (a strided view crashed conv backward in torch 2.13)
            out = qmodel.run_rows(rows[p], qblock, *args, **kwargs)
            yield block_loss(out, store.get(FP, t, p)) * sl.shares[p]

    qblock.train()
    try:
        return _train(block.name, losses, layers, len(sl.groups), recipe, recipe.iters, seed + k,
                      attention_quantizers(qblock))
    finally:
        qblock.eval()


@dataclass
class Slices:
    """This rank's slices of the global batches: ``parts`` (sample indices; empty slices left out),
    each part's ``shares`` of its batch, and ``groups[i]``: the parts of global batch ``i``."""

    parts: list[torch.Tensor]
    shares: list[float]
    groups: list[list[int]]


def _seeded_slices(n: int, batch: int, seed: int, micro_batches: int) -> Slices:
    """This rank's slices of the batches of a seeded random order of ``n`` samples."""
    return rank_slices(torch.randperm(n, generator=torch.Generator().manual_seed(seed)), batch, micro_batches)


def rank_slices(order: torch.Tensor, batch: int, micro_batches: int = 1) -> Slices:
    """Every global batch of ``order`` split into ``world * micro_batches`` slices; this rank's
    ``micro_batches`` consecutive ones (one process, one micro-batch: the whole batches)."""
    n, first = distributed.world() * micro_batches, distributed.rank() * micro_batches
    sl = Slices([], [], [])
    for b in order.split(batch):
        sl.groups.append([])
        for piece in b.tensor_split(n)[first : first + micro_batches]:
            if len(piece):
                sl.groups[-1].append(len(sl.parts))
                sl.parts.append(piece)
                sl.shares.append(len(piece) / len(b))
    return sl


def distill_model(qmodel: QuantizedDenoiser, calib: CalibrationSet, recipe: Recipe, targets: Targets,
                  seed: int = 0) -> list[BlockReport]:
    """Whole-model distillation baseline: every quantized parameter against the FP output (``model_targets``)."""
    sl = targets.slices

    def losses(i: int) -> Iterator[torch.Tensor]:
        for p in sl.groups[i]:
            yield F.mse_loss(calib.batch(sl.parts[p]).call(qmodel), targets.outputs[p]) * sl.shares[p]

    layers = list(quant_layers(qmodel).values())
    with _requires_grad(qmodel.parameters(), False):
        return [_train("model", losses, layers, len(sl.groups), recipe, recipe.iters, seed,
                       attention_quantizers(qmodel))]
