"""Where the quantization error comes from: per-layer and per-block sensitivity of a quantized denoiser.

Every measurement is the denoiser output error against full precision, ``||eps_q - eps_fp|| /
||eps_fp||`` per sample, averaged per calibrated time step, on a fixed set of denoiser inputs (the
artifact's stored calibration inputs; UNets and diffusion transformers alike). Steps are combined
with weights ``|c_t|``, the factor by which an error in the predicted noise enters the sample in the
DDIM update ``x_prev = sqrt(a_prev) * x0_pred + sqrt(1 - a_prev) * eps`` (``c_t = sqrt(1 - a_prev) -
sqrt(a_prev / a_t) * sqrt(1 - a_t)``): the last step's relative error is large but barely moves the
image, so it must not dominate. For flow matching (``x_next = x + (sigma_next - sigma) * v``) the
factor is the step's ``|sigma_next - sigma|``. Full precision is the same model with every quantizer off
(dilated weights times ``1/s`` inputs are exactly the FP layer). Per layer:

* ``weight`` / ``act`` / ``alone``: only this layer's weight, input (and output) quantizer, or both, on;
* ``gain``: error of the fully quantized model minus its error with only this layer in float --
  what keeping the layer in float would save (the fallback criterion);
* ``macs``: multiply-accumulates per sample, for the fallback budget.

Per block (ResnetBlock2D, attention, ...): ``alone`` and ``gain`` with the whole block switched.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, cast

import torch

from ..core.denoisers import spec_of
from ..core.inputs import DenoiserInputs, forward_hooks
from ..core.metrics import relative_error
from ..system import distributed
from ..system.progress import progress
from .blocks import partition
from .modules import QuantizedDenoiser, QuantLayer, quant_layers

log = logging.getLogger(__name__)
Inputs = DenoiserInputs | Mapping[str, torch.Tensor]  # or the named tensors of calibration_inputs.safetensors


def as_inputs(inputs: Inputs, model: object) -> DenoiserInputs:
    """``DenoiserInputs`` from either form (named tensors: with the input names of ``model``'s kind --
    ``hidden_states`` for transformers, Flux's position ids without a batch axis)."""
    return inputs if isinstance(inputs, DenoiserInputs) else spec_of(model).inputs_from_dict(inputs)


@dataclass
class Row:
    """Sensitivity of one layer or block. Errors are mean relative output errors (0.01 = 1%)."""

    name: str
    kind: str  # "conv" | "linear" | "block"
    macs: int
    gain: float
    alone: float | None = None
    weight: float | None = None
    act: float | None = None
    alone_per_step: list[float] = field(default_factory=list)


@dataclass
class SensitivityReport:
    """Per-layer and per-block sensitivity, with the full model's error per step for reference."""

    timesteps: list[float]
    step_weights: list[float]  # normalised weights of the steps in ``full`` / ``gain`` / ``alone``
    full: float
    full_per_step: list[float]
    layers: list[Row]
    blocks: list[Row]

    def to_dict(self) -> dict:
        return asdict(self)

    def ranked(self, by: str = "gain") -> list[Row]:
        """Layers, most costly first."""
        return sorted(self.layers, key=lambda r: getattr(r, by), reverse=True)

    def table(self, top: int | None = None) -> str:
        """Markdown tables: layers ranked by ``gain``, then blocks."""
        total = sum(r.macs for r in self.layers) or 1
        lines = [
            f"full model: relative output error {self.full:.4f} (weighted over {len(self.timesteps)} time steps "
            "by their effect on the sample)",
            "per step: " + ", ".join(f"t={t:g} {e:.4f}" for t, e in zip(self.timesteps, self.full_per_step)),
            "",
            "| layer | kind | MACs % | weight only | act only | alone | gain if float |",
            "|---|---|---:|---:|---:|---:|---:|",
        ]
        for r in self.ranked()[:top]:
            lines.append(f"| {r.name} | {r.kind} | {100 * r.macs / total:.2f} | {r.weight:.4f} | {r.act:.4f} "
                         f"| {r.alone:.4f} | {r.gain:+.4f} |")
        lines += ["", "| block | MACs % | alone | gain if float |", "|---|---:|---:|---:|"]
        for r in sorted(self.blocks, key=lambda r: r.gain, reverse=True)[:top]:
            lines.append(f"| {r.name} | {100 * r.macs / total:.2f} | {r.alone:.4f} | {r.gain:+.4f} |")
        return "\n".join(lines)


@contextlib.contextmanager
def quantized_only(model: QuantizedDenoiser, weights: Iterable[str] | None,
                   acts: Iterable[str] | None) -> Iterator[None]:
    """Within the block, only the named layers (names inside ``model.denoiser``) quantize their weights /
    activations (None: all)."""
    layers = quant_layers(model.denoiser)
    saved = {n: (m.quantize_weight, m.input_quantizer.enabled) for n, m in layers.items()}
    w = set(layers) if weights is None else set(weights)
    a = set(layers) if acts is None else set(acts)
    try:
        for n, m in layers.items():
            m.quantize_weight = n in w
            m.input_quantizer.enabled = n in a
        yield
    finally:
        for n, m in layers.items():
            m.quantize_weight, m.input_quantizer.enabled = saved[n]


@torch.no_grad()
def outputs(model: torch.nn.Module, inputs: Inputs, batch: int = 32) -> torch.Tensor:
    """The model's output for every input sample (batched)."""
    inputs = as_inputs(inputs, model)
    return torch.cat([inputs.slice(idx).call(model) for idx in torch.arange(len(inputs)).split(batch)])


def trajectory_weights(alphas_cumprod: torch.Tensor, schedule: list[float],
                       final_alpha: float = 1.0) -> dict[float, float]:
    """``|c_t|`` (see the module doc) for every step of ``schedule`` (timesteps in sampling order)."""
    weights = {}
    for k, t in enumerate(schedule):
        a_t = float(alphas_cumprod[int(round(t))])
        a_prev = float(alphas_cumprod[int(round(schedule[k + 1]))]) if k + 1 < len(schedule) else final_alpha
        weights[float(t)] = abs((1 - a_prev) ** 0.5 - (a_prev / a_t) ** 0.5 * (1 - a_t) ** 0.5)
    return weights


def flow_weights(schedule: list[float]) -> dict[float, float]:
    """``|sigma_next - sigma|`` of every step of a flow-matching ``schedule`` (model timesteps in sampling
    order, proportional to sigma; the last step ends at 0). Only ratios matter: the meter normalises."""
    return {float(t): abs(float(t) - (float(schedule[k + 1]) if k + 1 < len(schedule) else 0.0))
            for k, t in enumerate(schedule)}


def scheduler_weights(scheduler, schedule: list[float]) -> dict[float, float] | None:
    """:func:`trajectory_weights` from a diffusers scheduler, :func:`flow_weights` for a flow-matching
    one (no ``alphas_cumprod``, ``sigmas`` instead), else None (steps weighted equally)."""
    alphas = getattr(scheduler, "alphas_cumprod", None)
    if alphas is None:
        return flow_weights(schedule) if "FlowMatch" in type(scheduler).__name__ else None
    final = 1.0 if getattr(scheduler.config, "set_alpha_to_one", True) else float(alphas[0])
    return trajectory_weights(torch.as_tensor(alphas), schedule, final)


class ErrorMeter:
    """Relative error vs the FP outputs, per time step and combined with the step weights."""

    def __init__(self, model: QuantizedDenoiser, inputs: Inputs, batch: int,
                 weights: dict[float, float] | None) -> None:
        inputs = as_inputs(inputs, model)
        self.model, self.inputs, self.batch = model, inputs, batch
        t = inputs.timestep.float()
        self.steps = sorted(t.unique().tolist(), reverse=True)
        self.step_of = torch.tensor([self.steps.index(v) for v in t.tolist()])
        w = torch.tensor([1.0 if weights is None else weights.get(v, 0.0) for v in self.steps])
        self.weights = w / w.sum() if w.sum() > 0 else torch.full_like(w, 1 / len(w))
        with quantized_only(model, (), ()):
            self.ref = outputs(model, inputs, batch)

    def per_step(self, weights: Iterable[str] | None, acts: Iterable[str] | None) -> tuple[float, list[float]]:
        with quantized_only(self.model, weights, acts):
            err = relative_error(outputs(self.model, self.inputs, self.batch), self.ref)
        steps = [float(err[self.step_of == k].mean()) for k in range(len(self.steps))]
        return float((torch.tensor(steps) * self.weights).sum()), steps

    def mean(self, weights: Iterable[str] | None, acts: Iterable[str] | None) -> float:
        return self.per_step(weights, acts)[0]


@torch.no_grad()
def layer_macs(model: QuantizedDenoiser, inputs: Inputs) -> dict[str, int]:
    """Multiply-accumulates per sample of every QuantLayer, from one traced forward."""
    result: dict[str, int] = {}

    def make_hook(name: str, layer: QuantLayer):
        def hook(mod, args, out):
            per_out = layer.weight[0].numel()  # (in / groups) * kernel, or in_features
            result[name] = (int(out[0].numel() * per_out) if layer.kind == "conv"
                            else int(out.numel() // out.shape[0] * per_out))

        return hook

    with forward_hooks((m, "post", make_hook(n, m)) for n, m in quant_layers(model.denoiser).items()):
        outputs(model, as_inputs(inputs, model).slice(0))
    return result


def screen(model: QuantizedDenoiser, inputs: Inputs, *, step_weights: dict[float, float] | None = None,
           batch: int = 1, only: Sequence[str] | None = None) -> dict[str, float]:
    """First-order estimate of every layer's ``gain`` (see :func:`analyze`) from one forward and one backward pass
    per batch, instead of one forward pass per layer: ``gain_i ~ <dM/dy_i, y_i - y_i^fp>``, where ``M`` is the
    step-weighted relative output error of the fully quantized model, ``y_i`` layer ``i``'s output and ``y_i^fp``
    its output with its own quantizers off on the same input (what leave-one-out switches). Costs about four
    forward passes of ``inputs`` whatever the number of layers; under torchrun the ranks share the batches.
    ``only``: score these layers only. The backward pass keeps the model's activations at block boundaries only
    (diffusers' gradient checkpointing, where the model has it: each block is run again during the backward
    pass), so its memory is one block's activations, not the whole model's."""
    model.eval()
    inputs = as_inputs(inputs, model)
    meter = ErrorMeter(model, inputs, batch, step_weights)
    layers = {n: m for n, m in quant_layers(model.denoiser).items() if only is None or n in set(only)}
    sums = {n: torch.zeros((), dtype=torch.float64) for n in layers}

    backward = False  # while the backward pass recomputes a checkpointed block: its outputs get no gradient

    def make_hook(name: str, layer: QuantLayer):
        def hook(mod, args, out):
            if backward:
                return out.detach().requires_grad_() if not out.requires_grad else None  # as in the forward pass
            saved = layer.quantize_weight, layer.input_quantizer.enabled
            try:
                layer.quantize_weight, layer.input_quantizer.enabled = False, False
                with torch.no_grad():
                    delta = (out - mod.forward(*args)).detach()  # forward: not this hook again
            finally:
                layer.quantize_weight, layer.input_quantizer.enabled = saved
            if not out.requires_grad:  # parameters are frozen here: the first layers' outputs start the graph
                out = out.detach().requires_grad_()
            out.register_hook(lambda g: _accumulate(sums[name], g, delta))
            return out

        return hook

    weight = meter.weights[meter.step_of] / torch.bincount(meter.step_of, minlength=len(meter.steps))[meter.step_of]
    trainable = [p for p in model.parameters() if p.requires_grad]
    try:
        for p in trainable:
            p.requires_grad_(False)
        with forward_hooks((m, "post", make_hook(n, m)) for n, m in layers.items()), \
                checkpointed(model.denoiser):
            batches = list(torch.arange(len(inputs)).split(batch))[distributed.rank()::distributed.world()]
            for idx in progress(batches, len(batches), "sensitivity (screen)", unit="batch"):
                part = inputs.slice(idx)
                with quantized_only(model, None, None), torch.enable_grad():
                    err = relative_error(part.call(model), meter.ref[idx])
                    backward = True  # recomputed blocks quantize at the same steps as the forward pass:
                    with model.step_index.bound(model.table.index(part.timestep, len(idx))):
                        (err * weight[idx]).sum().backward()
                    backward = False
    finally:
        for p in trainable:
            p.requires_grad_(True)
    parts = distributed.all_gather({n: float(v) for n, v in sums.items()})  # under torchrun: each rank's batches
    return {n: sum(part[n] for part in parts) for n in sums}  # summed in rank order: the same on every rank


@contextlib.contextmanager
def checkpointed(denoiser: torch.nn.Module) -> Iterator[None]:
    """diffusers' gradient checkpointing on for the ``with`` body (a model without it is left as it is), then
    every block's own setting back."""
    blocks = {m: m.gradient_checkpointing for m in denoiser.modules() if hasattr(m, "gradient_checkpointing")}
    if not blocks or not getattr(denoiser, "_supports_gradient_checkpointing", False):
        yield
        return
    cast(Any, denoiser).enable_gradient_checkpointing()  # a diffusers ModelMixin
    try:
        yield
    finally:
        for m, on in blocks.items():
            m.gradient_checkpointing = on


def _accumulate(total: torch.Tensor, grad: torch.Tensor, delta: torch.Tensor) -> None:
    """``total += <grad, delta>`` in float64 (a tensor hook: returns None, so the gradient is left as it is)."""
    total.add_((grad.double() * delta.double()).sum())


def analyze(
    model: QuantizedDenoiser,
    inputs: Inputs,
    *,
    step_weights: dict[float, float] | None = None,
    detail: bool = True,
    blocks: bool = True,
    batch: int = 32,
    only: Sequence[str] | None = None,
    time_budget: float | None = None,
    clock: Callable[[], float] = time.monotonic,
    on_row: Callable[[Row], None] = lambda row: None,
) -> SensitivityReport:
    """Measure per-layer (and per-block) sensitivity of ``model`` on ``inputs``, steps combined with
    ``step_weights`` (timestep -> weight; None: equal). Without ``detail`` only each layer's
    ``gain`` is measured (one pass per layer: what the fallback needs). ``only``: rows for these
    layers only, measured in that order (the others stay quantized as usual). ``time_budget``: seconds from the
    start (read on ``clock``, once at the start and once before each layer) after which no further layer is
    measured: the report then holds the rows of the layers measured so far, in the order measured, and no blocks.
    ``on_row``: called with each layer's row as soon as it is measured (a search saving its progress)."""
    model.eval()
    start = clock()
    layers = quant_layers(model.denoiser)
    names = list(layers)
    meter = ErrorMeter(model, inputs, batch, step_weights)
    macs = layer_macs(model, inputs)
    full, full_steps = meter.per_step(None, None)
    todo = names if only is None else [n for n in dict.fromkeys(only) if n in layers]  # in the order given
    rows: list[Row] = []
    for name in progress(todo, len(todo), "sensitivity (layers)" if detail else "sensitivity (leave one out)",
                         unit="layer"):
        if time_budget is not None and clock() - start >= time_budget:
            log.info("sensitivity: the time budget of %g s ran out after %d of %d layers", time_budget, len(rows),
                     len(todo))
            return SensitivityReport(meter.steps, meter.weights.tolist(), full, full_steps, rows, [])
        others = [n for n in names if n != name]
        row = Row(name=name, kind=layers[name].kind, macs=macs.get(name, 0),
                  gain=full - meter.mean(others, others))
        if detail:
            row.alone, row.alone_per_step = meter.per_step([name], [name])
            row.weight, row.act = meter.mean([name], ()), meter.mean((), [name])
        rows.append(row)
        on_row(row)
    block_rows = _block_rows(model, inputs, meter, macs, full) if blocks and detail else []
    return SensitivityReport(meter.steps, meter.weights.tolist(), full, full_steps, rows, block_rows)


def _block_rows(model: QuantizedDenoiser, inputs: Inputs, meter: ErrorMeter, macs: dict[str, int],
                full: float) -> list[Row]:
    """``alone`` and ``gain`` of every block (its layers switched together)."""
    names = list(quant_layers(model.denoiser))
    first = as_inputs(inputs, model).slice(slice(0, 2))
    found = partition(model.denoiser, lambda: outputs(model, first))
    block_rows = []
    for block in progress(found, len(found), "sensitivity (blocks)", unit="block"):
        members = set(block.layers)
        others = [n for n in names if n not in members]
        alone, alone_steps = meter.per_step(members, members)
        block_rows.append(Row(
            name=block.name, kind="block", macs=sum(macs.get(n, 0) for n in members),
            alone=alone, gain=full - meter.mean(others, others), alone_per_step=alone_steps,
        ))
    return block_rows


def choose_fallback(report: SensitivityReport, budget: float = 0.05, min_share: float = 0.02, *,
                    total_macs: int | None = None) -> list[str]:
    """Layers to keep in float: most costly first (by ``gain``), while their MACs stay within
    ``budget`` of the total and each still saves at least ``min_share`` of the error that remains
    once the layers chosen before it are in float (gains are treated as additive). ``total_macs``: the
    MACs of every layer, where the report holds only some (a search cut short); else the report's sum."""
    total = total_macs or sum(r.macs for r in report.layers) or 1
    chosen: list[str] = []
    used, remaining = 0, report.full
    for r in report.ranked():
        if r.gain < min_share * remaining:
            break
        if used + r.macs <= budget * total:
            chosen.append(r.name)
            used += r.macs
            remaining -= r.gain
    return chosen


def plot(report: SensitivityReport, top: int = 20) -> bytes:
    """PNG: the top layers' gain and alone error (bars), and error per time step (full model, top layers)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ranked = report.ranked()[:top]
    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 4.5))
    pos = range(len(ranked))
    a.bar([p - 0.2 for p in pos], [r.gain for r in ranked], width=0.4, label="gain if float")
    a.bar([p + 0.2 for p in pos], [r.alone for r in ranked], width=0.4, label="alone")
    a.set_xticks(list(pos), [r.name for r in ranked], rotation=90, fontsize=6)
    a.set_ylabel("relative output error")
    a.set_title(f"layers (full model {report.full:.4f})")
    a.legend()
    x = list(range(len(report.timesteps)))
    b.plot(x, report.full_per_step, "k-o", lw=2, label="all quantized")
    for r in ranked[:5]:
        b.plot(x, r.alone_per_step, "-", lw=1, label=f"{r.name} alone")
    b.set_xticks(x, [f"{t:.0f}" for t in report.timesteps], rotation=90, fontsize=7)
    b.set_xlabel("time step (sampling order)")
    b.set_title("error per time step")
    b.legend(fontsize=6)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()
