"""The export stage (``dqdeploy.export``): a quantized artifact (or a diffusers folder, for ``float``)
-> an export folder, for every target.

Steps: rebuild the simulation -> float copy of the denoiser (dequantized weights, ``1/s`` folded into
norms) -> float ONNX (torch dynamo exporter) -> [ort: calibrate output scales] -> Q/DQ surgery ->
simplify -> checks -> write ``unet/model.onnx`` (``transformer/model.onnx``) + ``dqdeploy_export.json``
atomically -> [trt: build the engine, optionally a Triton repository].
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..core.arguments import as_path, public
from ..core.denoisers import spec_for
from ..core.errors import DQDeployError, ExportError
from ..core.inputs import DenoiserInputs
from ..core.recipe import Recipe
from ..core.vocab import CPU_CHOICES, CpuChoice, GraphTarget, Int8Format, Target
from ..io.artifact import Manifest, load_calibration_inputs, load_quantized, read_manifest
from ..io.atomic import atomic_dir, check_target
from ..io.folders import detect
from ..io.models import denoiser_class_name, load_model, portable_config
from ..io.paths import check_output_dir, check_output_file
from ..runtimes.dynamic import DynamicAxes, range_arg
from ..runtimes.spec import ExportSpec, model_folder
from ..runtimes.targets import TargetSpec, layout_of, target_spec
from ..system.cpu import cpu_info, exact_on, s8_exact_anywhere
from ..system.progress import PROGRESS, release_memory, stage
from ..system.trt_gate import require_tensorrt
from .attention_qdq import AttentionTensors, attention_tensors, insert_attention_qdq
from .dequantize import LayerTensors, dequantized_denoiser, layer_tensors
from .engine import build_engine
from .folder import check_graph, tensor_specs, versions, write_export
from .lora_slots import add_lora_slots, plan_slots
from .measure import input_ranks, ort_output_scales
from .onnx import example_inputs, export_float_onnx
from .pipeline import PipelinePlan, plan_for, write_pipeline
from .qdq import SurgeryOptions, insert_qdq, int4_linear_layers
from .triton import is_triton_model, write_triton_repo

log = logging.getLogger(__name__)
TEXT = "dynamic_text_length"
FLOAT16 = 10  # onnx.TensorProto.FLOAT16 (FLOAT is 1)
SCRATCH = ".float-graph"  # inside the atomic output folder; removed before it is renamed into place


@public
def export(
    source: str | Path,
    out_dir: str | Path,
    *,
    target: Target = "ort",
    fp16: bool = False,
    int4_linear: bool = False,
    simplify: bool = True,
    overwrite: bool = False,
    batch: int | Sequence[int] = (1, 2, 8),
    cfg: bool = False,
    timing_cache: str | Path | None = None,
    workspace_gb: float | None = None,
    triton_repo: str | Path | None = None,
    dynamic_resolution: tuple[int, int] | None = None,
    cpu: CpuChoice = "auto",
    lora_slots: str | Path | None = None,
    pipeline: str | Path | None = None, dynamic_text_length: tuple[int, int] | None = None,
) -> Path:
    """Export ``source`` to ``out_dir`` for ``target`` (``onnx``, ``ort``, ``trt`` or ``float``); ``pipeline``: a
    diffusers pipeline folder whose other parts are written beside the denoiser (:mod:`.pipeline`).

    ``lora_slots``: a LoRA file whose layers (or ``"attention"``: every attention projection) get a float branch whose
    matrices are graph inputs (:mod:`.lora_slots`): ``load_runtime(E, lora=...)`` swaps adapters, no re-export.

    ``cpu`` (``ort`` only): the CPUs the int8 graph must be exact on -- ``vnni`` (full-range int8 weights:
    fastest, exact on x86 with VNNI/AMX and ARM64, wrong on x86 without VNNI), ``portable`` (exact on every
    CPU; the layers whose weights leave [-64, 64] multiply u8 x u8, slower) or ``auto`` (this machine's:
    ``portable`` where it lacks VNNI, else ``vnni``). Recorded in the spec; runtimes refuse a graph that is
    not exact on their CPU (:mod:`dqdeploy.system.cpu`).

    ``dynamic_resolution=(MIN, MAX)``: dynamic latent height and width, multiples of the model's step in [MIN, MAX];
    ``dynamic_text_length=(MIN, MAX)``: dynamic text tokens (by default only the calibration conditioning's count);
    :mod:`.dynamic`. ``trt`` profiles both ranges.

    ``trt`` writes the FP16 TensorRT-layout graph (:func:`trt_graph`), then builds ``unet/model.plan``
    (``transformer/model.plan``) with the batch profile ``batch`` (doubled by ``cfg``); it needs TensorRT
    and a GPU, checked first. ``triton_repo``: also write a Triton model repository there
    (:func:`~.triton.write_triton_repo`): a ``tensorrt_plan`` model of the engine for ``trt``, an
    ``onnxruntime_onnx`` model of the graph for the other targets. Returns ``out_dir``.
    """
    source, out_dir = as_path(source, "source", "export"), as_path(out_dir, "out_dir", "export")
    pipeline = None if pipeline is None else as_path(pipeline, "pipeline", "export")
    dynamic = {"dynamic_resolution": _resolution_range(dynamic_resolution),
               TEXT: range_arg(dynamic_text_length, TEXT, "text tokens", "(64, 333)")}
    spec = target_spec(target)
    if spec.engine:
        require_tensorrt()  # fail fast, before anything else
        _check_request(source, spec.graph, fp16, cpu)
    _check_outputs(source, out_dir, overwrite, triton_repo, timing_cache, pipeline, text_range=dynamic[TEXT])
    if not spec.engine:
        export_graph(source, out_dir, target=spec.graph, fp16=fp16, int4_linear=int4_linear, simplify=simplify,
                     overwrite=overwrite, cpu=cpu, lora_slots=lora_slots, pipeline=pipeline, **dynamic)
    else:
        trt_graph(source, out_dir, int4_linear=int4_linear, simplify=simplify, overwrite=overwrite,
                  lora_slots=lora_slots, pipeline=pipeline, **dynamic)
        build_engine(out_dir, batch=batch, cfg=cfg, timing_cache=timing_cache, workspace_gb=workspace_gb)
    if triton_repo is not None:  # the engine for trt; the ONNX graph (ONNX Runtime backend) for the other targets
        write_triton_repo(out_dir, triton_repo)
    return Path(out_dir)


def _check_outputs(source: str | Path, out_dir: str | Path, overwrite: bool, triton_repo: str | Path | None = None,
                   timing_cache: str | Path | None = None, pipeline: str | Path | None = None,
                   lora_slots: str | Path | None = None, text_range: tuple[int, int] | None = None
                   ) -> PipelinePlan | None:
    """Before any work, refuse outputs that may not be written (the inputs, ``source`` and ``pipeline``, are never
    replaced) and options that do not fit ``source``; returns the checked pipeline folder (None without one)."""
    check_target(out_dir, overwrite=overwrite, kind="export", sources=_sources(source, pipeline))
    if triton_repo is not None:
        check_output_dir(Path(triton_repo) / _triton_model(source), owned=is_triton_model, sources=[source, out_dir])
    if timing_cache is not None:
        check_output_file(timing_cache, "--timing-cache", sources=[source])
    if lora_slots is not None and detect(source) != "quantized":
        raise ExportError("--lora-slots needs a quantized artifact", hint="quantize the model first")
    return None if pipeline is None else plan_for(source, pipeline, text_range)


def _sources(source: str | Path, pipeline: str | Path | None) -> list[str | Path]:
    return [source] if pipeline is None else [source, pipeline]


def _triton_model(source: str | Path) -> str:
    """The Triton model :func:`write_triton_repo` will write for ``source``: the graph's folder (``unet`` or
    ``transformer``). A source that cannot be read is reported by the export itself: ``unet`` here."""
    try:
        name = denoiser_class_name(source) if detect(source) == "fp" else read_manifest(source).model_class
    except DQDeployError:
        name = None
    return model_folder(str(name))


def trt_graph(
    source: str | Path,
    out_dir: str | Path,
    *,
    int4_linear: bool = False,
    simplify: bool = True,
    overwrite: bool = False,
    dynamic_resolution: tuple[int, int] | None = None,
    lora_slots: str | Path | None = None,
    pipeline: str | Path | None = None,
    dynamic_text_length: tuple[int, int] | None = None,
) -> Path:
    """The graph step of ``--target trt``, which needs no TensorRT: the FP16 TensorRT-layout graph that
    :func:`~.engine.build_engine` builds from (``export_graph(target="onnx", fp16=True)``, checked against
    TensorRT's rules on the way). :func:`export` runs it, then the engine build."""
    return export_graph(source, out_dir, target="onnx", fp16=True, int4_linear=int4_linear, simplify=simplify,
                        overwrite=overwrite, dynamic_resolution=dynamic_resolution, lora_slots=lora_slots,
                        pipeline=pipeline, dynamic_text_length=dynamic_text_length)


def export_graph(
    source: str | Path,
    out_dir: str | Path,
    *,
    target: GraphTarget = "ort",
    fp16: bool = False,
    int4_linear: bool = False,
    simplify: bool = True,
    overwrite: bool = False,
    dynamic_resolution: tuple[int, int] | None = None,
    cpu: CpuChoice = "auto",
    lora_slots: str | Path | None = None,
    pipeline: str | Path | None = None, dynamic_text_length: tuple[int, int] | None = None,
) -> Path:
    """The ONNX graph of an artifact (``onnx``/``ort``) or any model folder (``float``) [, and ``pipeline``'s parts]."""
    spec = _check_request(source, target, fp16, cpu)
    int8_format = resolve_format(cpu) if spec.cpu_format else None
    dynamic = DynamicAxes(dynamic_resolution, dynamic_text_length)
    plan = _check_outputs(source, out_dir, overwrite, pipeline=pipeline, lora_slots=lora_slots,
                          text_range=dynamic.text_length)  # before any work
    if detect(source) == "fp":
        return _export_fp(source, out_dir, fp16, overwrite, dynamic, plan)
    manifest = read_manifest(source)
    if spec.quantized:
        _check_deployable(manifest.recipe)
    with atomic_dir(out_dir, overwrite=overwrite, kind="export", sources=_sources(source, pipeline)) as folder:
        scratch = folder / SCRATCH  # the float graph's weights: on the output's disk, swept if the run dies
        canvas, parts = _prepare(source, manifest, manifest.recipe, target, fp16)
        int4_layers = int4_linear_layers(parts.layers, parts.ranks) if int4_linear else []
        opset = 21 if int4_layers else 20
        slots = None if lora_slots is None else plan_slots(canvas, parts.layers, lora_slots)
        graph = _float_graph(canvas, parts.example, scratch, opset, dynamic)
        del canvas
        entries = [] if slots is None else add_lora_slots(graph, slots, SurgeryOptions().scope_prefix,
                                                          FLOAT16 if fp16 else 1)
        release_memory()  # the float denoiser is not needed any more: its weights are in the scratch file
        if spec.layout is not None:
            opts = SurgeryOptions(layout=spec.layout, float_type=FLOAT16 if fp16 else 1,
                                  int4_linear=int4_linear, int8_format=int8_format or "vnni")
            with stage(PROGRESS, "Q/DQ surgery"):
                graph = insert_qdq(graph, parts.layers, manifest.timesteps, parts.ranks, opts, parts.out_scales)
                graph = insert_attention_qdq(graph, parts.attentions, manifest.timesteps, opts)
            wide = sum(not s8_exact_anywhere(t.w_int) for t in parts.layers.values())
            if int8_format == "vnni" and not wide:
                # every weight within [-64, 64] (w7a8, 4-bit layers): exact on every CPU as it is
                int8_format = "portable"
            elif int8_format == "portable" and wide and cpu_info().int8_class == "avx2":
                log.warning("%d of %d layers have weights beyond [-64, 64] and run u8u8 kernels, about float speed "
                            "on this CPU (no VNNI); quantize with --recipe w7a8 for exact int8 at full speed here",
                            wide, len(parts.layers))
        int8_attention = bool(parts.attentions) and spec.layout is not None
        del parts
        graph = _finish_graph(graph, target, simplify, int8_attention)
        with stage(PROGRESS, "write the graph"):
            _write(graph, folder, _spec(
                graph, target, fp16, opset, dynamic, model_class=manifest.model_class,
                model_config=manifest.model_config, timesteps=manifest.timesteps, recipe=manifest.recipe,
                scheduler_config=manifest.scheduler_config, source=manifest.integrity, int8_format=int8_format,
                lora_slots=entries), plan)
    return Path(out_dir)


def _write(graph: Any, folder: Path, spec: ExportSpec, plan: PipelinePlan | None = None) -> None:
    """Write the export (and the pipeline of ``plan``) into ``folder`` (atomic_dir's own temporary folder), then
    remove the graphs' scratch files there: the only folder export ever deletes, and one it created."""
    extra = [] if plan is None else write_pipeline(plan, folder, folder / SCRATCH, spec.model_config)
    write_export(graph, folder, spec, base_dir=folder / SCRATCH, extra_files=extra)
    shutil.rmtree(folder / SCRATCH)


def _resolution_range(value: Any) -> tuple[int, int] | None:
    """``dynamic_resolution`` as ``(MIN, MAX)``: a pair of ints or a ``"MIN:MAX"`` string."""
    return range_arg(value, "dynamic_resolution", "latent sizes", "(32, 96)")


def resolve_format(cpu: str) -> Int8Format:
    """The integer format for ``--cpu`` (``auto``: ``portable`` on a CPU whose u8s8 kernel saturates, else ``vnni``)."""
    if cpu != "auto":
        return cpu  # type: ignore[return-value]
    info = cpu_info()
    fmt: Int8Format = "vnni" if info.exact("vnni") else "portable"
    log.info("--cpu auto: %s (%s, int8 class %s): int8 format %s, exact on %s",
             info.model, " ".join(info.flags) or "no int8 flags", info.int8_class, fmt, exact_on(fmt))
    return fmt


def _check_request(source: str | Path, target: str, fp16: bool, cpu: str = "auto") -> TargetSpec:
    """Target, precision, CPU format and source kind go together (errors say how to fix them); the
    record of ``target``, a graph target."""
    spec = target_spec(target)
    if spec.engine:
        raise ExportError(f"target {target!r} builds an engine; its graph step is target {spec.graph!r}")
    if cpu not in CPU_CHOICES:
        raise ExportError(f"unknown --cpu {cpu!r} (expected one of {', '.join(CPU_CHOICES)})")
    if cpu != "auto" and not spec.cpu_format:
        raise ExportError(f"--cpu {cpu} applies to --target ort (the int8 graph for ONNX Runtime on CPU); "
                          f"--target {target} has no CPU integer format", hint="drop --cpu, or export --target ort")
    if fp16 and spec.fp16 == "never":
        raise ExportError("--fp16 applies to the TensorRT layout (--target onnx/trt); "
                          "ONNX Runtime on CPU runs the uint8 graph in FP32")
    kind = detect(source)
    if kind == "export":
        raise ExportError(f"{source} is already an export folder",
                          hint="export from the quantized artifact (the --out of `dqdeploy quantize`)")
    if kind == "fp" and spec.quantized:
        raise ExportError(f"{source} is a full-precision diffusers folder: only --target float applies",
                          hint="run `dqdeploy quantize` first, then export the artifact")
    return spec


def _check_deployable(recipe: Recipe) -> None:
    if not recipe.deployable:
        raise ExportError(
            f"recipe {recipe.name} has {recipe.act_bits}-bit {'symmetric' if recipe.act_symmetric else 'asymmetric'} "
            "activations: simulation-only, no runtime runs them "
            "(TensorRT and ONNX Runtime need symmetric 8-bit activations)",
            hint="quantize with w8a8 or w4a8 to deploy; see docs/SUPPORT_MATRIX.md",
        )


@dataclass
class _Parts:
    """What the Q/DQ surgery needs besides the float graph: example inputs, per-layer tensors and ranks."""

    example: DenoiserInputs
    layers: dict[str, LayerTensors]
    ranks: dict[str, int]
    out_scales: dict[str, float] | None
    attentions: dict[str, AttentionTensors]


def _prepare(source: str | Path, manifest: Manifest, recipe: Recipe, target: GraphTarget, fp16: bool
             ) -> tuple[torch.nn.Module, _Parts]:
    """The float canvas (the simulation's own denoiser, converted in place) and the surgery's inputs."""
    with stage(PROGRESS, "load the artifact"):
        model = load_quantized(source)
    release_memory()  # what loading allocated on the way (the state dict) leaves the process
    calib = spec_for(manifest.model_class).inputs_from_dict(load_calibration_inputs(source))
    example = calib.slice(slice(0, 2))
    with stage(PROGRESS, "measure layers"):
        layers = layer_tensors(model, manifest)
        ranks = input_ranks(model, list(layers), example, root=model.denoiser)
        out_scales = ort_output_scales(model, recipe, layers, ranks, calib) if layout_of(target) == "ort" else None
        attentions = attention_tensors(model)
    canvas = dequantized_denoiser(model, manifest, inplace=True)
    del model
    if fp16:
        canvas, example = canvas.half(), example.half()
    return canvas, _Parts(example, layers, ranks, out_scales, attentions)


def _float_graph(denoiser: torch.nn.Module, example: DenoiserInputs, scratch: Path, opset: int = 20,
                 dynamic: DynamicAxes = DynamicAxes()) -> Any:
    """The float ONNX graph, its large weights left in ``scratch`` (which must outlive it)."""
    with stage(PROGRESS, "float ONNX export"):
        return export_float_onnx(denoiser, scratch / "float.onnx", inputs=example, opset=opset, large_external=True,
                                 resolution_range=dynamic.resolution, text_length_range=dynamic.text_length)


def _finish_graph(graph: Any, target: GraphTarget, simplify: bool, int8_attention: bool = False) -> Any:
    """Simplify (keeping Q/DQ), for the ORT layout fuse the float attentions, onnx.checker, and for the TensorRT
    layout its static rule check (Q/DQ in front of attention matmuls allowed with ``int8_attention``)."""
    if simplify:
        from .simplify import simplify as run_simplify

        with stage(PROGRESS, "simplify"):
            graph = run_simplify(graph)
    if layout_of(target) == "ort" and int8_attention:
        log.warning("int8 attention on ONNX Runtime CPU: each attention's products run as MatMulIntegerToFloat "
                    "with the float score matrix in memory (ORT has no fused int8 attention kernel), slower "
                    "than float attention at long token counts (BENCHMARKS.md, attention micro); the graph "
                    "reproduces the simulation, for speed quantize with --attention float")
    if layout_of(target) == "ort":  # ONNX Runtime's own attention kernel instead of the float score matrix
        from .ort_attention import fuse_attention

        with stage(PROGRESS, "attention fusion"):
            fuse_attention(graph)
    check_graph(graph)
    if layout_of(target) == "trt":  # the graph TensorRT builds from must pass its rules, checked statically
        from .lint import lint_trt

        violations = lint_trt(graph, allow_attention_qdq=int8_attention)
        if violations:
            raise ExportError(f"the TensorRT-layout graph breaks {len(violations)} TensorRT rule(s): "
                              + "; ".join(str(v) for v in violations[:5]))
    return graph


def _spec(graph: Any, target: GraphTarget, fp16: bool, opset: int, dynamic: DynamicAxes, **fields: Any) -> ExportSpec:
    """The spec of ``graph`` (its I/O read from the graph); ``fields``: what the source adds (model, recipe...)."""
    inputs, outputs = tensor_specs(graph)

    def listed(value: tuple[int, int] | None) -> list[int] | None:
        return None if value is None else list(value)

    return ExportSpec(target=target, precision="fp16" if fp16 else "fp32", opset=opset, inputs=inputs,
                      outputs=outputs, versions=versions(), resolution_range=listed(dynamic.resolution),
                      text_length_range=listed(dynamic.text_length), **fields)


def _export_fp(source: str | Path, out_dir: str | Path, fp16: bool, overwrite: bool, dynamic: DynamicAxes,
               plan: PipelinePlan | None) -> Path:
    sources = _sources(source, None if plan is None else plan.model_dir)
    with atomic_dir(out_dir, overwrite=overwrite, kind="export", sources=sources) as folder:
        loaded = load_model(source)
        example = example_inputs(loaded.denoiser, seq_len=None if plan is None else plan.text_length)
        denoiser = loaded.denoiser.half() if fp16 else loaded.denoiser
        graph = _float_graph(denoiser, example.half() if fp16 else example, folder / SCRATCH, 20, dynamic)
        spec = _spec(graph, "float", fp16, 20, dynamic, model_class=type(denoiser).__name__,
                     model_config=portable_config(denoiser), scheduler_config=loaded.scheduler_config)
        del loaded, denoiser
        check_graph(graph)
        _write(graph, folder, spec, plan)
    return Path(out_dir)
