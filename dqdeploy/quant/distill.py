"""Block-wise knowledge distillation (BKD, DilateQuant arXiv 2409.14307) and the whole-model baseline.

For block k: the FP block's output on FP inputs is the target; the quantized block is fed the
inputs produced by the already-distilled quantized blocks before it. Weights, biases, weight step
sizes and per-step activation step sizes (and zero points) train jointly with Adam.

The data is captured by propagation (:mod:`.propagate`: one FP forward per batch for every target,
a replay answered from cached outputs for each block's inputs) and lives on disk
(:mod:`.blockstore`), read one batch at a time. A :class:`BlockCheckpoint` saves each finished
block and restores it on a resumed run.

Data parallel under torchrun: every rank holds its slice of each global batch, weights its loss by
the slice's share of the batch and the gradients are summed over the ranks before each Adam step,
so a step is the one-process step on the global batch (up to reduction order).
"""

from __future__ import annotations

import contextlib
import logging
import math
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, cast

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .. import distributed
from ..recipe import Recipe
from .blocks import Block
from .blockstore import BlockStore, contiguous
from .modules import QuantizedUNet, QuantLayer, quant_layers
from .propagate import FP, INPUTS, cache_outputs, capture_inputs, capture_targets, output_tensors
from .trajectories import CalibrationSet

log = logging.getLogger(__name__)
__all__ = ["BlockCheckpoint", "BlockReport", "block_loss", "distill_blocks", "distill_model", "output_tensors"]


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


def _param_groups(layers: list[QuantLayer], recipe: Recipe) -> list[dict]:
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
    return [{"params": weights, "lr": recipe.lr_weight}, {"params": quant, "lr": recipe.lr_quant}]


def _train(
    name: str,
    forward,
    layers: list[QuantLayer],
    n_batches: int,
    recipe: Recipe,
    iters: int,
    seed: int,
) -> BlockReport:
    """Adam on ``forward(i) -> loss`` over randomly drawn captured batches ``i`` (``forward`` gives this
    rank's share of the batch's loss; ranks sum the gradients, and draw the same ``i``)."""

    def mean_loss() -> float:
        with torch.no_grad():
            losses = torch.tensor([forward(i).item() for i in range(n_batches)], dtype=torch.float64)
        return float(distributed.all_reduce(losses).sum() / n_batches)

    before = mean_loss()
    curve: list[float] = []
    if iters > 0 and layers:
        groups = _param_groups(layers, recipe)
        params = [p for g in groups for p in g["params"]]
        opt = torch.optim.Adam(groups)
        gen = torch.Generator().manual_seed(seed)
        bar = tqdm(range(iters), desc=f"distill {name}", leave=False)
        running = before
        for step in bar:
            i = int(torch.randint(n_batches, (1,), generator=gen))
            loss = forward(i)
            value = float(distributed.all_reduce(loss.detach().double()))  # the global batch's loss
            if not math.isfinite(value):
                raise FloatingPointError(f"distillation loss of {name} became {value} at step {step}")
            opt.zero_grad(set_to_none=True)
            if loss.requires_grad:  # an empty slice of the batch adds no gradient
                loss.backward()
            distributed.sum_gradients(params)
            opt.step()
            running = 0.9 * running + 0.1 * value
            curve.append(value)
            if step % 20 == 0:
                bar.set_postfix(loss=f"{running:.3e}")
    return BlockReport(name, before, mean_loss(), curve)


def distill_blocks(
    qmodel: QuantizedUNet,
    fp_unet: nn.Module,
    blocks: list[Block],
    calib: CalibrationSet,
    recipe: Recipe,
    seed: int = 0,
    *,
    workdir: str | Path | None = None,
    checkpoint: BlockCheckpoint | None = None,
) -> list[BlockReport]:
    """BKD over ``blocks`` (in execution order); returns one report per block. The data goes to
    ``workdir`` (a folder it creates and removes; a temporary folder when None)."""
    order = torch.randperm(len(calib), generator=torch.Generator().manual_seed(seed))
    batches, shares = rank_slices(order, recipe.batch_size)
    rows = [qmodel.table.index(calib.inputs.timestep[b], len(b)) for b in batches]
    names = [b.name for b in blocks]
    with _store(workdir) as store:
        capture_targets(fp_unet, names, calib, batches, store)
        reports = []
        for k, block in enumerate(tqdm(blocks, desc="block-wise distillation", unit="block")):
            qblock = qmodel.unet.get_submodule(block.name)
            n_batches = capture_inputs(qmodel, names, k, calib, batches, store)
            report = checkpoint.restore(k, block.name, qblock) if checkpoint else None
            if report is not None:
                log.info("block %s restored from the checkpoint", block.name)
            else:
                report = _distill_block(qmodel, qblock, block, k, store, rows, shares, n_batches, recipe, seed)
                if checkpoint:
                    checkpoint.save(k, block.name, qblock, report)
            reports.append(report)
            cache_outputs(qmodel, qblock, k, rows, store)
            store.drop(INPUTS, k)
            store.drop(FP, k)
    return reports


@contextmanager
def _store(workdir: str | Path | None) -> Iterator[BlockStore]:
    with contextlib.ExitStack() as stack:
        root = Path(workdir) if workdir is not None else Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="dqdeploy-distill-"))) / "data"
        store = BlockStore(root)
        try:
            yield store
        finally:
            store.clear()


def _distill_block(qmodel: QuantizedUNet, qblock: nn.Module, block: Block, k: int, store: BlockStore,
                   rows: list[torch.Tensor], shares: list[float], n_batches: int, recipe: Recipe, seed: int) -> BlockReport:
    """Train block ``k`` on its stored inputs and FP targets (``shares``: each batch's part of its global batch)."""
    if int(distributed.all_reduce(torch.tensor(n_batches), "max")) == 0:  # never called by the model's forward
        return BlockReport(block.name, 0.0, 0.0)
    layers = [cast(QuantLayer, qmodel.unet.get_submodule(n)) for n in block.layers]

    def forward(i: int) -> torch.Tensor:
        if not store.has(INPUTS, k, i):  # this rank's slice of batch i is empty
            return torch.zeros(())
        args, kwargs = contiguous(store.get(INPUTS, k, i))  # (a strided view crashed conv backward in torch 2.13)
        out = qmodel.run_rows(rows[i], qblock, *args, **kwargs)
        return block_loss(out, store.get(FP, k, i)) * shares[i]

    qblock.train()
    try:
        return _train(block.name, forward, layers, len(rows), recipe, recipe.iters, seed + k)
    finally:
        qblock.eval()


def rank_slices(order: torch.Tensor, batch: int) -> tuple[list[torch.Tensor], list[float]]:
    """This rank's part of every global batch of ``order`` (all of it in one process) and the
    part's share of its batch."""
    parts = [b.tensor_split(distributed.world())[distributed.rank()] for b in order.split(batch)]
    return parts, [len(p) / len(b) for p, b in zip(parts, order.split(batch))]


def distill_model(
    qmodel: QuantizedUNet, fp_unet: nn.Module, calib: CalibrationSet, recipe: Recipe, seed: int = 0
) -> list[BlockReport]:
    """Whole-model distillation baseline: every quantized parameter against the FP output."""
    order = torch.randperm(len(calib), generator=torch.Generator().manual_seed(seed))
    parts, shares = rank_slices(order, recipe.batch_size)
    with torch.no_grad():
        targets = [calib.batch(b).call(fp_unet) if len(b) else None for b in parts]

    def forward(i: int) -> torch.Tensor:
        target = targets[i]
        if target is None:
            return torch.zeros(())
        return F.mse_loss(calib.batch(parts[i]).call(qmodel), target) * shares[i]

    layers = list(quant_layers(qmodel).values())
    return [_train("model", forward, layers, len(parts), recipe, recipe.iters, seed)]
