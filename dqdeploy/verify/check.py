"""Accuracy checks of an exported graph against the PyTorch simulation, with Polygraphy.

Whole network, per time step: Polygraphy's Comparator runs the simulation (a Polygraphy runner
around the QuantizedDenoiser) and the exported graph (``OnnxrtRunner`` / ``TrtRunner``) on the
artifact's calibration inputs, one iteration per calibrated step. Tolerances come from the
quantization error itself: rounding ties flip a few integers and the flips cascade, so a deployed
graph may differ from the simulation by up to ``tolerance_ratio`` x (simulation vs full precision).

Per layer (``per_layer=True``): the integers entering every quantized layer, read from the graph's
QuantizeLinear outputs, against the simulation's, to find the first layer that diverges.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..core.denoisers import spec_for, spec_of
from ..core.errors import ArtifactError, CheckFailedError, require
from ..core.inputs import OUTPUT, DenoiserInputs, forward_hooks
from ..core.metrics import relative_error
from ..core.vocab import GraphRuntime, Inexact
from ..exporters.attention_qdq import attention_q_name
from ..exporters.qdq import UINT8_ZERO_POINT, input_q_name
from ..io.artifact import load_calibration_inputs, load_quantized, manifest_seal
from ..quant.attention import attention_quants
from ..quant.modules import QuantizedDenoiser, quant_layers, set_act_quant, set_weight_quant
from ..quant.primitives import quantize
from ..quant.quantizer import ActQuantizer
from ..runtimes.spec import LORA_PREFIX, ExportSpec, TensorSpec, read_spec
from ..system.cpu import cpu_info
from ..system.trt_gate import require_tensorrt

# Graphs that round where the simulation does not -- the ORT layout's output quantization of an
# artifact not quantized with layout="ort", or FP16 activations -- get twice the simulation's
# quantization error as their whole-network budget.
EXTRA_ROUNDING_RATIO = 2.0
# The verdict. Float sums run in another order in the graph than in PyTorch (and differ between CPUs'
# kernels), so an activation on a rounding tie lands on the other integer now and then and the flip
# cascades: a step of a correct graph may reach about 1x its tolerance (W4A8 digits, worst step 0.89x on
# a VNNI CPU, 1.02x at one step of 50 under an emulated Haswell). A defect of the integer path
# (saturating kernels, a wrong scale or zero point) moves every step. So a graph passes when no step is
# beyond OUTLIER_RATIO x its tolerance and at most one step in OUTLIER_EVERY is beyond 1x.
OUTLIER_RATIO = 2.0
OUTLIER_EVERY = 10


@dataclass
class StepResult:
    """Agreement at one time step."""

    timestep: float
    samples: int
    rel_err: float  # ||export - sim|| / ||sim||
    cosine: float
    quant_err: float  # ||sim - fp|| / ||fp||: the simulation's own quantization error
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.rel_err <= self.tolerance


@dataclass
class LayerResult:
    """Integer agreement at one quantized layer's input."""

    name: str
    mismatch: float  # fraction of integers that differ
    max_diff: int


@dataclass
class CheckResult:
    """The report of ``check_export``."""

    runtime: str
    target: str  # the export target of the checked graph
    steps: list[StepResult]
    layers: list[LayerResult] = field(default_factory=list)
    first_divergent: str | None = None
    unchecked: list[float] = field(default_factory=list)  # calibrated steps not compared (no stored inputs, or --steps)
    cause: str | None = None  # a known reason for disagreement (integer kernels not exact on this CPU)

    @property
    def outliers(self) -> list[StepResult]:
        """Steps beyond their tolerance, the worst first."""
        return sorted((s for s in self.steps if not s.ok), key=lambda s: s.rel_err / s.tolerance, reverse=True)

    @property
    def ok(self) -> bool:
        """No step beyond ``OUTLIER_RATIO`` x its tolerance, at most one in ``OUTLIER_EVERY`` beyond 1x."""
        bad = self.outliers
        return (len(bad) <= len(self.steps) // OUTLIER_EVERY
                and all(s.rel_err <= OUTLIER_RATIO * s.tolerance for s in bad))

    def verdict(self) -> str:
        """One line: how many steps are beyond tolerance and what the rule allows."""
        bad, allowed = self.outliers, len(self.steps) // OUTLIER_EVERY
        if not bad:
            return "every step within tolerance"
        worst = bad[0]
        return (f"{len(bad)} of {len(self.steps)} time steps out of tolerance (worst: t={worst.timestep:g}, rel err "
                f"{worst.rel_err:.3e} = {worst.rel_err / worst.tolerance:.2f}x {worst.tolerance:.3e}); a correct graph "
                f"may have up to {allowed} (rounding ties), none beyond {OUTLIER_RATIO:g}x")

    def table(self) -> str:
        lines = [f"{'timestep':>9} {'n':>3} {'rel err':>9} {'cosine':>9} {'quant err':>9} {'tolerance':>9}  ok"]
        for s in self.steps:
            lines.append(f"{s.timestep:9.4g} {s.samples:3d} {s.rel_err:9.2e} {s.cosine:9.6f} {s.quant_err:9.2e} "
                         f"{s.tolerance:9.2e}  {'yes' if s.ok else 'NO'}")
        if self.layers:
            worst = max(self.layers, key=lambda r: r.mismatch)
            lines.append(f"per layer: {len(self.layers)} layer inputs compared; worst {worst.name} "
                         f"({worst.mismatch:.2%} integers differ, max |diff| {worst.max_diff})")
            lines.append(f"first divergent layer: {self.first_divergent or 'none'}")
        total = len(self.steps) + len(self.unchecked)
        lines.append(f"{len(self.steps)} of {total} calibrated time steps checked"
                     + (f" (not checked: {', '.join(f'{t:g}' for t in self.unchecked[:12])}"
                        f"{' ...' if len(self.unchecked) > 12 else ''})" if self.unchecked else ""))
        lines.append(self.verdict())
        lines.append(f"{self.runtime} ({self.target}) vs PyTorch simulation: {'PASS' if self.ok else 'FAIL'}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"runtime": self.runtime, "target": self.target, "ok": self.ok, "verdict": self.verdict(),
                "first_divergent": self.first_divergent, "steps": [asdict(s) | {"ok": s.ok} for s in self.steps],
                "layers": [asdict(r) for r in self.layers], "unchecked": self.unchecked}

    def raise_if_failed(self) -> None:
        if not self.ok:
            raise CheckFailedError(
                self.verdict() + (f"; likely cause: {self.cause}" if self.cause else ""),
                hint="re-export with --cpu portable" if self.cause
                else "run `dqdeploy check --per-layer` to find the first layer that diverges",
            )


def _run_feed(model: QuantizedDenoiser, feed) -> torch.Tensor:
    """The simulation's whole output for one feed (graph input names are the model's keywords; the LoRA slots'
    inputs are the graph's only: the simulation carries its branches itself)."""
    return spec_of(model).inputs_from_dict({k: v for k, v in feed.items() if not k.startswith(LORA_PREFIX)}).call(model)


def _with_lora(model: QuantizedDenoiser, spec: ExportSpec, lora: Any, feeds: list[dict[str, np.ndarray]]
               ) -> tuple[list[dict[str, np.ndarray]], list[TensorSpec]]:
    """``lora`` as branches on the simulation and as the graph's slot inputs (zeros without an adapter), added to
    every feed; and the slot inputs' specs."""
    if not spec.lora_slots:
        if lora is not None:
            raise ArtifactError("this export has no LoRA slots to check an adapter with",
                                hint="export with `--lora-slots LORA_FILE`")
        return feeds, []
    from ..io.lora import apply_lora, lora_list, read_lora
    from ..runtimes.lora_feeds import lora_feeds

    adapters = [(read_lora(path, model.denoiser).layers, scale) for path, scale in lora_list(lora)] if lora else []
    if lora is not None:
        model.lora_branches = apply_lora(model, lora)
    dtype = np.float16 if spec.precision == "fp16" else np.float32
    extra = lora_feeds(spec, adapters, dtype)
    return [{**f, **extra} for f in feeds], [TensorSpec(name, [-1] * a.ndim, np.dtype(dtype).name)
                                            for name, a in extra.items()]


def _simulation_runner(model: QuantizedDenoiser, inputs: list, output: str = OUTPUT, name: str = "pytorch-simulation"):
    """A Polygraphy runner around the simulated denoiser (Polygraphy's PytRunner assumes CUDA)."""
    from polygraphy.backend.base import BaseRunner

    class SimulationRunner(BaseRunner):
        def __init__(self) -> None:
            super().__init__(name=name, prefix="dqdeploy-sim")

        def activate_impl(self) -> None:
            pass

        def get_input_metadata_impl(self):
            from polygraphy.common import TensorMetadata

            meta = TensorMetadata()
            for t in inputs:
                meta.add(t.name, np.dtype(t.dtype), [d if isinstance(d, int) else -1 for d in t.shape])
            return meta

        def infer_impl(self, feed_dict):
            start = time.time()
            with torch.no_grad():
                out = _run_feed(model, feed_dict)
            self.inference_time = time.time() - start
            return OrderedDict([(output, out.numpy())])

        def deactivate_impl(self) -> None:
            pass

    return SimulationRunner()


def _feeds(calib: DenoiserInputs, samples: int, input_dtypes: dict[str, np.dtype],
           steps: int | None = None) -> tuple[list[dict[str, np.ndarray]], list[float]]:
    """One feed per calibrated step present in the artifact's calibration inputs (``steps``: at
    most that many, spread evenly from the first step to the last), and those steps."""
    present = calib.timestep.unique(sorted=True).flip(0)
    if steps is not None and steps < len(present):
        present = present[torch.linspace(0, len(present) - 1, steps).round().long().unique()]
    feeds = [calib.slice((calib.timestep == t).nonzero().flatten()[:samples]).numpy(input_dtypes) for t in present]
    return feeds, [float(t) for t in present]


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    """Relative error of the whole batch (one vector), in float64."""
    out, ref = (torch.from_numpy(x).double().reshape(1, -1) for x in (a, b))
    return float(relative_error(out, ref))


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-30))


@torch.no_grad()
def _quant_errors(model: QuantizedDenoiser, feeds: list[dict[str, np.ndarray]],
                  sim_outs: list[np.ndarray]) -> list[float]:
    """Per feed: the simulation's relative error against its own full-precision twin (the
    dilated float weights with every quantizer off; dilation itself is exact in float)."""
    set_act_quant(model, False)
    set_weight_quant(model, False)
    try:
        errs = []
        for feed, sim in zip(feeds, sim_outs):
            errs.append(_rel(sim, _run_feed(model, feed).numpy()))
        return errs
    finally:
        set_act_quant(model, True)
        set_weight_quant(model, True)


def _graph_runner(export_dir: Path, runtime: GraphRuntime, extra_outputs: list[str] | None = None, output: str = OUTPUT,
                  inexact: Inexact = "refuse"):
    if runtime == "trt":
        require_tensorrt()
        from polygraphy.backend.common import BytesFromPath
        from polygraphy.backend.trt import EngineFromBytes, TrtRunner

        return TrtRunner(EngineFromBytes(BytesFromPath(str(export_dir / read_spec(export_dir).engine_file))),
                         name="tensorrt")
    ort = require("onnxruntime", "ort", "checking with ONNX Runtime")
    from polygraphy.backend.onnx import BytesFromOnnx, ModifyOutputs, OnnxFromPath
    from polygraphy.backend.onnxrt import OnnxrtRunner

    from ..runtimes.session import CPU, exactness_entries, session_options

    spec = read_spec(export_dir)
    options = session_options(1, None, exactness_entries(spec, inexact))  # the runtime's own session, on this CPU
    model: Any = str(export_dir / spec.onnx_file)
    if extra_outputs:  # only the named layer inputs: marking every tensor of a big graph is unusable
        model = BytesFromOnnx(ModifyOutputs(OnnxFromPath(model), outputs=[output, *extra_outputs]))
    return OnnxrtRunner(lambda: ort.InferenceSession(model() if callable(model) else model, options, providers=[CPU]),
                        name="onnxruntime")


def check_export(
    quant_dir: str | Path,
    export_dir: str | Path,
    *,
    runtime: GraphRuntime = "ort",
    per_layer: bool = False,
    samples: int = 4,
    steps: int | None = None,
    tolerance_ratio: float | None = None,
    tolerance_floor: float = 1e-3,
    inexact: Inexact = "refuse",
    lora: Any = None,
) -> CheckResult:
    """Compare the simulation of ``quant_dir`` with the graph in ``export_dir`` at every calibrated time step the
    artifact stores inputs for (``steps``: at most that many, spread over the trajectory), ``samples`` inputs each.

    ``tolerance_ratio`` (default 1; 2 for FP16 graphs and for an ORT-layout graph made from an artifact whose
    simulation does not model the output rounding, i.e. not quantized with ``layout="ort"``) times the simulation's
    own quantization error. ``inexact``: as for the ORT runtime, when the graph's int8 format is not exact on this
    CPU (:func:`dqdeploy.runtimes.session.exactness_entries`). ``lora``: adapters (``FILE``, ``(FILE, scale)`` or a
    list) for an export with LoRA slots, on both sides."""
    from polygraphy.comparator import Comparator

    spec = read_spec(export_dir)
    if spec.source != manifest_seal(quant_dir):
        raise ArtifactError(
            f"{export_dir} was not exported from {quant_dir}"
            + (" (it is a float export)" if not spec.source else " (another artifact, or an older version of it)"),
            hint=f"check the export against the artifact it came from, or re-run `dqdeploy export {quant_dir}`",
        )
    if tolerance_ratio is None:
        tolerance_ratio = _default_tolerance_ratio(spec)
    model = load_quantized(quant_dir)
    calib = spec_for(spec.model_class).inputs_from_dict(load_calibration_inputs(quant_dir))
    dtypes = {t.name: np.dtype(t.dtype) for t in spec.inputs}
    output = spec.outputs[0].name
    feeds, checked = _feeds(calib, samples, dtypes, steps)
    feeds, slot_specs = _with_lora(model, spec, lora, feeds)
    points = quantized_inputs(model) if per_layer else {}
    q_outputs = [graph_name for _, graph_name in points.values()]
    from polygraphy.logger import G_LOGGER

    G_LOGGER.module_severity = G_LOGGER.WARNING
    runners = [_simulation_runner(model, spec.inputs + slot_specs, output),
               _graph_runner(Path(export_dir), runtime, q_outputs, output, inexact)]
    (_, sim_iters), (_, graph_iters) = Comparator.run(runners, data_loader=feeds)
    sim_outs = [np.asarray(it[output], np.float32) for it in sim_iters]
    graph_outs = [np.asarray(it[output], np.float32) for it in graph_iters]
    quant_errs = _quant_errors(model, feeds, sim_outs)
    results = [
        StepResult(float(feed["timestep"][0]), int(feed["timestep"].shape[0]), _rel(g, s), _cos(g, s), qe,
                   max(tolerance_floor, tolerance_ratio * qe))
        for feed, s, g, qe in zip(feeds, sim_outs, graph_outs, quant_errs)
    ]
    result = CheckResult(runtime, spec.target, results, unchecked=[t for t in model.table.tolist() if t not in checked],
                         cause=_kernel_cause(spec, runtime, inexact))
    if per_layer:
        result.layers = _layer_agreement(model, feeds, graph_iters, points)
        result.first_divergent = next((r.name for r in result.layers if r.mismatch > 0.01 or r.max_diff > 1), None)
    return result


def _default_tolerance_ratio(spec: ExportSpec) -> float:
    """The tolerance ratio ``check_export`` uses when none is given (see its docstring)."""
    unmodelled = spec.layout == "ort" and (spec.recipe is None or spec.recipe.layout != "ort")
    # FP16 graphs round every activation to 11 bits on top of the quantization
    return EXTRA_ROUNDING_RATIO if unmodelled or spec.precision == "fp16" else 1.0


def _kernel_cause(spec, runtime: GraphRuntime, inexact: Inexact) -> str | None:
    """Why the graph may disagree whatever its quality: it ran (``inexact="allow"``) on kernels that saturate here."""
    fmt, cpu = spec.weight_format, cpu_info()
    if runtime == "ort" and fmt is not None and not cpu.exact(fmt) and inexact == "allow":
        return (f"the graph's int8 format {fmt!r} saturates ONNX Runtime's u8s8 kernels "
                f"on this CPU ({cpu.model}, no VNNI)")
    return None


def quantized_inputs(model: QuantizedDenoiser) -> dict[str, tuple[ActQuantizer, str]]:
    """Every per-step quantizer the graph reproduces, by display name: each layer's input (``<layer>``) and, with
    quantized attention, ``<attention> query|key|value``; with the graph tensor holding its integers."""
    points = {n: (layer.input_quantizer, input_q_name(n)) for n, layer in quant_layers(model.denoiser).items()}
    for name, quant in attention_quants(model.denoiser).items():
        for role, q in quant.quantizers().items():
            points[f"{name} {role}"] = (q, attention_q_name(name, role))
    return points


@torch.no_grad()
def _layer_agreement(model: QuantizedDenoiser, feeds, graph_iters,
                     points: dict[str, tuple[ActQuantizer, str]]) -> list[LayerResult]:
    """Integers at each quantized input, simulation vs graph, in execution order (a graph's uint8 integers
    carry zero point 128; the key of an attention is compared transposed, as the graph holds k^T)."""
    order: list[str] = []
    stats = {n: [0, 0, 0] for n in points}  # differing, total, max diff

    for feed, graph in zip(feeds, graph_iters):
        sim_ints: dict[str, np.ndarray] = {}

        def make_hook(name: str, q: ActQuantizer):
            def hook(mod, args):
                if name not in order:
                    order.append(name)
                x = args[0]
                rows = q.rows_for(x)
                shape = (-1,) + (1,) * (x.dim() - 1)
                zp = q.zero_point.detach()[rows].view(shape)
                sim_ints[name] = (quantize(x, q.scale.detach().abs()[rows].view(shape), zp, q.qmin, q.qmax)
                                  - zp).numpy()

            return hook

        with forward_hooks((q, "pre", make_hook(n, q)) for n, (q, _) in points.items()):
            _run_feed(model, feed)
        for n, (_, graph_name) in points.items():
            found = np.asarray(graph[graph_name])
            g = found.astype(np.int32) - (UINT8_ZERO_POINT if found.dtype == np.uint8 else 0)
            sim = sim_ints[n]
            if sim.ndim == g.ndim and sim.shape != g.shape and sim.swapaxes(-1, -2).shape == g.shape:
                sim = sim.swapaxes(-1, -2)
            s = sim.astype(np.int32).reshape(g.shape) if sim.size == g.size else None
            if s is None:
                stats[n][0] += g.size
                stats[n][1] += g.size
                continue
            diff = np.abs(g - s)
            stats[n][0] += int((diff > 0).sum())
            stats[n][1] += diff.size
            stats[n][2] = max(stats[n][2], int(diff.max()))
    return [LayerResult(n, stats[n][0] / max(stats[n][1], 1), stats[n][2]) for n in order]
