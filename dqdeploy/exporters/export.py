"""The export verb: quantized artifact (or diffusers folder, for ``float``) -> export folder.

Stages: rebuild the simulation -> float canvas UNet (dequantized weights, norms folded) -> float
ONNX (torch dynamo exporter) -> [ort: calibrate output scales] -> Q/DQ surgery -> simplify -> write
``unet/model.onnx`` + ``dqdeploy_export.json`` atomically.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import torch

from .. import __version__
from ..atomic import atomic_dir
from ..errors import ExportError, require
from ..quant.modules import QuantizedUNet, quant_layers
from .deploy import LayerTensors, deploy_unet, layer_tensors
from .onnx import (
    EXTERNAL_DATA_THRESHOLD, ExampleInputs, export_float_onnx,
)
from .qdq import SurgeryOptions, insert_qdq
from .spec import ONNX_DATA_FILE, ONNX_FILE, SPEC_FILE, ExportSpec, TensorSpec

log = logging.getLogger(__name__)
TARGETS = ("onnx", "ort", "float")


@torch.no_grad()
def input_ranks(unet: torch.nn.Module, names: list[str], inputs: ExampleInputs) -> dict[str, int]:
    """Rank of each named layer's input activation, from one forward."""
    ranks: dict[str, int] = {}

    def record(name: str):
        def hook(module, args) -> None:
            ranks.setdefault(name, args[0].dim())

        return hook

    handles = [unet.get_submodule(n).register_forward_pre_hook(record(n)) for n in names]
    try:
        kwargs = {} if inputs.encoder_hidden_states is None else {"encoder_hidden_states": inputs.encoder_hidden_states}
        unet(inputs.sample, inputs.timestep, return_dict=False, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return ranks


@torch.no_grad()
def calibrate_output_scales(
    model: QuantizedUNet, layers: dict[str, LayerTensors], calib: dict[str, torch.Tensor], qmax: int = 127, keep: int = 1 << 16
) -> dict[str, float]:
    """Constant scales of the output Q (ort flavour), one per layer: the clipping of the bias-free
    output in the rescaled (``s0``) domain that minimises the 8-bit rounding MSE over the artifact's
    calibration inputs."""
    from ..quant.primitives import search_tensor_scale

    values: dict[str, list[torch.Tensor]] = {n: [] for n in layers}
    modules = quant_layers(model.unet)
    gen = torch.Generator().manual_seed(0)

    def make_hook(name: str):
        layer, tensors = modules[name], layers[name]

        def hook(mod, args, out):
            y = out if layer.bias is None else out - (layer.bias.view(1, -1, 1, 1) if layer.kind == "conv" else layer.bias)
            rows = layer.input_quantizer.rows_for(y)
            ratio = torch.as_tensor(tensors.ref_scale / tensors.act_scale, dtype=y.dtype)[rows]
            flat = (y * ratio.view(-1, *([1] * (y.dim() - 1)))).flatten()
            pick = torch.randperm(flat.numel(), generator=gen)[:keep]
            values[name].append(torch.cat([flat[pick], flat.abs().max().view(1)]))

        return hook

    handles = [modules[n].register_forward_hook(make_hook(n)) for n in layers]
    try:
        kwargs = {} if "encoder_hidden_states" not in calib else {"encoder_hidden_states": calib["encoder_hidden_states"]}
        for idx in torch.arange(calib["sample"].shape[0]).split(16):
            model(calib["sample"][idx], calib["timestep"][idx], return_dict=False, **{k: v[idx] for k, v in kwargs.items()})
    finally:
        for h in handles:
            h.remove()
    return {name: search_tensor_scale(torch.cat(chunks), -qmax - 1, qmax) for name, chunks in values.items()}


def _example(calib: dict[str, torch.Tensor], batch: int = 2) -> ExampleInputs:
    cond = calib.get("encoder_hidden_states")
    return ExampleInputs(calib["sample"][:batch], calib["timestep"][:batch].float(), None if cond is None else cond[:batch])


def _tensor_specs(model) -> tuple[list[TensorSpec], list[TensorSpec]]:
    from onnx import helper

    def spec(v) -> TensorSpec:
        t = v.type.tensor_type
        dims = [d.dim_param or d.dim_value for d in t.shape.dim]
        return TensorSpec(v.name, dims, helper.tensor_dtype_to_np_dtype(t.elem_type).name)

    inits = {i.name for i in model.graph.initializer}
    return [spec(v) for v in model.graph.input if v.name not in inits], [spec(v) for v in model.graph.output]


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime

    return {"dqdeploy": __version__, "torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}


def save_export(model, out_dir: str | Path, spec: ExportSpec, *, overwrite: bool = False) -> Path:
    """Write ``unet/model.onnx`` (external ``model.onnx_data`` over 2 GB) and the spec, atomically."""
    onnx = require("onnx", "ort", "ONNX export")
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        path = tmp / ONNX_FILE
        path.parent.mkdir(parents=True)
        big = model.ByteSize() > EXTERNAL_DATA_THRESHOLD if _fits_proto(model) else True
        onnx.save_model(model, str(path), save_as_external_data=big, all_tensors_to_one_file=True,
                        location=ONNX_DATA_FILE, size_threshold=1024)
        (tmp / SPEC_FILE).write_text(spec.to_json())
    return Path(out_dir)


def _fits_proto(model) -> bool:
    try:
        model.ByteSize()
        return True
    except Exception:  # protobuf refuses to size messages over 2 GB
        return False


def export_quantized(
    source: str | Path,
    out_dir: str | Path,
    *,
    target: str = "ort",
    fp16: bool = False,
    int4_linear: bool = False,
    simplify: bool = True,
    overwrite: bool = False,
) -> Path:
    """Export a quantized artifact (``onnx``/``ort``) or any model folder (``float``) to ``out_dir``."""
    from ..api import load_calibration_inputs, load_quantized
    from ..artifact import read_manifest
    from ..recipe import Recipe
    from ..sources import detect

    if target not in TARGETS:
        raise ExportError(f"unknown target {target!r} (expected {', '.join(TARGETS)})")
    if fp16 and target == "ort":
        raise ExportError("--fp16 applies to the TensorRT layout (--target onnx/trt); ONNX Runtime on CPU runs the uint8 graph in FP32")
    kind = detect(source)
    if kind == "export":
        raise ExportError(f"{source} is already an export folder", hint="export from the quantized artifact (the --out of `dqdeploy quantize`)")
    if kind == "fp":
        if target != "float":
            raise ExportError(f"{source} is a full-precision diffusers folder: only --target float applies",
                              hint="run `dqdeploy quantize` first, then export the artifact")
        return _export_fp(source, out_dir, fp16=fp16, overwrite=overwrite)
    manifest = read_manifest(source)
    recipe = Recipe.from_dict(manifest.recipe)
    if target != "float" and not recipe.deployable:
        raise ExportError(
            f"recipe {recipe.name} has {recipe.act_bits}-bit {'symmetric' if recipe.act_symmetric else 'asymmetric'} "
            "activations: simulation-only, no runtime runs them (TensorRT and ONNX Runtime need symmetric 8-bit activations)",
            hint="quantize with w8a8 or w4a8 to deploy; see docs/SUPPORT_MATRIX.md",
        )
    model = load_quantized(source)
    calib = load_calibration_inputs(source)
    layers = layer_tensors(model, manifest)
    canvas = deploy_unet(model, manifest)
    example = _example(calib)
    ranks = input_ranks(canvas, list(layers), example)
    out_scales = None
    if target == "ort" and recipe.layout != "ort":
        # output Q (QLinear* fusion) where the compute is: convs and token matmuls. The simulation
        # does not model this rounding; `dqdeploy quantize --layout ort` makes the graph exact.
        log.warning("recipe layout %r: the ort graph adds output rounding the simulation lacks "
                    "(quantize with --layout ort for an exact match)", recipe.layout)
        fused = {n: t for n, t in layers.items() if ranks[n] > 2}
        out_scales = calibrate_output_scales(model, fused, calib)
    ftype = 1
    if fp16:
        canvas = canvas.half()
        example = ExampleInputs(example.sample.half(), example.timestep,
                                None if example.encoder_hidden_states is None else example.encoder_hidden_states.half())
        ftype = 10
    int4_layers = [n for n, t in layers.items() if int4_linear and t.kind == "linear" and t.weight_bits == 4
                   and ranks[n] > 2 and any(t.w_int.shape[1] % b == 0 for b in SurgeryOptions().int4_blocks)]
    if int4_linear and not int4_layers:
        log.warning("--int4-linear: no 4-bit Linear layer has a reduction size divisible by %s; exporting INT8 weights",
                    SurgeryOptions().int4_blocks)
    opset = 21 if int4_layers else 20
    with tempfile.TemporaryDirectory(prefix="dqdeploy-float-") as scratch:
        graph = export_float_onnx(canvas, Path(scratch) / "float.onnx", inputs=example, opset=opset)
    if target != "float":
        opts = SurgeryOptions(flavour=target, float_type=ftype, int4_linear=int4_linear)
        graph = insert_qdq(graph, layers, manifest.timesteps, ranks, opts, out_scales)
    if simplify:
        from .simplify import simplify as run_simplify

        graph = run_simplify(graph)
    _check_graph(graph)
    if target == "onnx":  # the graph TensorRT builds from must pass its rules, checked statically
        from .lint import lint_trt

        violations = lint_trt(graph)
        if violations:
            raise ExportError(f"the TensorRT-layout graph breaks {len(violations)} TensorRT rule(s): "
                              + "; ".join(str(v) for v in violations[:5]))
    inputs, outputs = _tensor_specs(graph)
    spec = ExportSpec(
        flavour=target, precision="fp16" if fp16 else "fp32", opset=opset, model_class=manifest.model_class,
        model_config=manifest.model_config, inputs=inputs, outputs=outputs, timesteps=manifest.timesteps,
        recipe=manifest.recipe, scheduler_config=manifest.scheduler_config, versions=_versions(),
    )
    return save_export(graph, out_dir, spec, overwrite=overwrite)


def _export_fp(source: str | Path, out_dir: str | Path, *, fp16: bool, overwrite: bool) -> Path:
    import json

    from ..models import load_model
    from .onnx import example_inputs

    loaded = load_model(source)
    unet = loaded.unet.half() if fp16 else loaded.unet
    example = example_inputs(loaded.unet)
    if fp16:
        example = ExampleInputs(example.sample.half(), example.timestep,
                                None if example.encoder_hidden_states is None else example.encoder_hidden_states.half())
    with tempfile.TemporaryDirectory(prefix="dqdeploy-float-") as scratch:
        graph = export_float_onnx(unet, Path(scratch) / "float.onnx", inputs=example)
    inputs, outputs = _tensor_specs(graph)
    spec = ExportSpec(
        flavour="float", precision="fp16" if fp16 else "fp32", opset=20, model_class=type(unet).__name__,
        model_config=json.loads(unet.to_json_string()), inputs=inputs, outputs=outputs,
        scheduler_config=loaded.scheduler_config, versions=_versions(),
    )
    return save_export(graph, out_dir, spec, overwrite=overwrite)


def _check_graph(graph) -> None:
    import onnx

    try:
        if _fits_proto(graph) and graph.ByteSize() < EXTERNAL_DATA_THRESHOLD:
            onnx.checker.check_model(graph, full_check=False)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"the exported graph fails onnx.checker: {str(exc)[:500]}") from None
