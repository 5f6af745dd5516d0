"""Block-wise knowledge distillation (BKD, DilateQuant arXiv 2409.14307) and the whole-model baseline.

For block k: the FP block's output on FP inputs is the target; the quantized block is fed the
inputs produced by the already-distilled quantized blocks before it. Weights, biases, weight step
sizes and per-step activation step sizes (and zero points) train jointly with Adam. Only one
block's inputs and targets are held at a time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..inputs import Hook, forward_hooks
from ..recipe import Recipe
from .blocks import Block
from .modules import QuantizedUNet, QuantLayer, quant_layers
from .trajectories import CalibrationSet


class _Stop(Exception):
    """Ends a forward pass as soon as the block of interest has been seen."""


@dataclass
class BlockReport:
    """Distillation record of one block: MSE before and after, and the loss curve."""

    name: str
    loss_before: float
    loss_after: float
    curve: list[float] = field(default_factory=list)


def _detach(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().contiguous()  # (a strided view crashed conv backward in torch 2.13)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_detach(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _detach(v) for k, v in obj.items()}
    return obj


def output_tensors(out: Any) -> list[torch.Tensor]:
    """Every tensor of a block output: a tensor, a tuple (transformer blocks return
    ``(encoder_hidden_states, hidden_states)``, the first possibly None), or a diffusers output."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        found = [t for o in out if o is not None for t in output_tensors(o)]
        if found:
            return found
    if hasattr(out, "sample"):
        return [out.sample]
    raise TypeError(f"cannot find a tensor in block output of type {type(out).__name__}")


def block_loss(out: Any, targets: list[torch.Tensor]) -> torch.Tensor:
    """Sum of the MSEs of every output tensor of a block against its FP targets."""
    return sum((F.mse_loss(o, t) for o, t in zip(output_tensors(out), targets)), torch.zeros(()))


@torch.no_grad()
def _capture(model: nn.Module, module: nn.Module, calib: CalibrationSet, order: torch.Tensor, batch: int, want: str) -> list:
    """Per calibration batch: the block's (args, kwargs) (``want="inputs"``) or output tensor."""
    seen: list = []

    def pre(mod, args, kwargs):
        if want == "inputs":
            seen.append((_detach(args), _detach(kwargs)))
            raise _Stop

    def post(mod, args, kwargs, out):
        seen.append([o.detach() for o in output_tensors(out)])
        raise _Stop

    hooks: list[Hook] = [(module, "pre", pre)]
    if want == "output":
        hooks.append((module, "post", post))
    with forward_hooks(hooks, with_kwargs=True):
        for start in range(0, len(calib), batch):
            try:
                calib.batch(order[start : start + batch]).call(model)
            except _Stop:
                pass
    return seen


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
    """Adam on ``forward(i) -> loss`` over randomly drawn captured batches ``i``."""

    def mean_loss() -> float:
        with torch.no_grad():
            return float(sum(forward(i).item() for i in range(n_batches)) / n_batches)

    before = mean_loss()
    curve: list[float] = []
    if iters > 0 and layers:
        opt = torch.optim.Adam(_param_groups(layers, recipe))
        gen = torch.Generator().manual_seed(seed)
        bar = tqdm(range(iters), desc=f"distill {name}", leave=False)
        running = before
        for step in bar:
            i = int(torch.randint(n_batches, (1,), generator=gen))
            loss = forward(i)
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"distillation loss of {name} became {loss.item()} at step {step}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            running = 0.9 * running + 0.1 * loss.item()
            curve.append(loss.item())
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
) -> list[BlockReport]:
    """BKD over ``blocks`` (in execution order); returns one report per block."""
    order = torch.randperm(len(calib), generator=torch.Generator().manual_seed(seed))
    reports = []
    for k, block in enumerate(tqdm(blocks, desc="block-wise distillation", unit="block")):
        qblock = qmodel.unet.get_submodule(block.name)
        fpblock = fp_unet.get_submodule(block.name)
        inputs = _capture(qmodel, qblock, calib, order, recipe.batch_size, "inputs")
        targets = _capture(fp_unet, fpblock, calib, order, recipe.batch_size, "output")
        rows = [qmodel.table.index(calib.inputs.timestep[b], len(b)) for b in order.split(recipe.batch_size)]
        layers = [cast(QuantLayer, qmodel.unet.get_submodule(n)) for n in block.layers]

        def forward(i: int) -> torch.Tensor:
            args, kwargs = inputs[i]
            out = qmodel.run_rows(rows[i], qblock, *args, **kwargs)
            return block_loss(out, targets[i])

        qblock.train()
        reports.append(_train(block.name, forward, layers, len(inputs), recipe, recipe.iters, seed + k))
        qblock.eval()
    return reports


def distill_model(
    qmodel: QuantizedUNet, fp_unet: nn.Module, calib: CalibrationSet, recipe: Recipe, seed: int = 0
) -> list[BlockReport]:
    """Whole-model distillation baseline: every quantized parameter against the FP output."""
    order = torch.randperm(len(calib), generator=torch.Generator().manual_seed(seed))
    batches = [order[s : s + recipe.batch_size] for s in range(0, len(calib), recipe.batch_size)]
    with torch.no_grad():
        targets = [calib.batch(b).call(fp_unet) for b in batches]

    def forward(i: int) -> torch.Tensor:
        return F.mse_loss(calib.batch(batches[i]).call(qmodel), targets[i])

    layers = list(quant_layers(qmodel).values())
    return [_train("model", forward, layers, len(batches), recipe, recipe.iters, seed)]

