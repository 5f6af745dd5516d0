"""Q/DQ graph surgery on the float ONNX graph, keyed on module names (the export verb is :mod:`.export`).

For every quantized layer (module name -> the Conv/MatMul/Gemm node the exporter made for it)::

    x -> Mul(f_in[rows]) -> Q(s0) -> DQ(s0) -> Conv/MatMul(W: int8 -> DQ(per channel), no bias)
      [ort: -> Q(out) -> DQ(out)] -> Mul(f_out[rows]) -> Add(bias)

``rows`` = ArgMin |timestep - calibrated steps| (one Gather per table), ``f_in = (1/s) * s0 / s_t``,
``f_out = s_t / s0``: ``round(x / s_t) == round(x * s0 / s_t / s0)``, so the integers are exactly the
per-step quantizer's while every Q/DQ scale is a build-time constant (TensorRT's explicit
quantization requires constant scales; DilateQuant, arXiv 2409.14307, has one scale per step). Layouts:
``trt`` (target ``onnx``; TensorRT: int8, zero point 0, input-only Q/DQ) and ``ort`` (uint8 / zero point 128 plus an
output Q, the pattern ONNX Runtime fuses into QLinearConv / QLinearMatMul).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

import numpy as np

from ..core.errors import ExportError
from ..core.inputs import TIMESTEP
from ..core.vocab import LAYOUTS, Int8Format, Layout
from ..system.cpu import s8_exact_anywhere
from .dequantize import LayerTensors
from .graph_index import GraphIndex, delete_where

log = logging.getLogger(__name__)

SCOPE_KEY = "pkg.torch.onnx.name_scopes"
UINT8_ZERO_POINT = 128  # ORT layout: uint8 activations, q_uint8 = q_int8 + 128


def layer_prefix(layer: str) -> str:
    """Name prefix of every node and initializer the surgery adds for quantized layer ``layer``."""
    return f"dq/{layer}"


def input_q_name(layer: str) -> str:
    """Output of the QuantizeLinear on ``layer``'s input: the integers checks compare per layer."""
    return layer_prefix(layer) + "/input_q"


@dataclass(frozen=True)
class SurgeryOptions:
    """How the Q/DQ nodes are written."""

    layout: Layout = "trt"  # "trt": int8, input-only Q/DQ | "ort": uint8 + output Q (ONNX Runtime fusion)
    float_type: int = 1  # onnx.TensorProto.FLOAT or FLOAT16
    int4_linear: bool = False  # 4-bit Linear weights as packed INT4 blocks, weight-only (W4A16, opset 21)
    int4_blocks: tuple[int, ...] = (128, 64)  # the block sizes TensorRT's INT4 weight-only GEMM takes
    scope_prefix: str = "unet."
    # ORT layout: "vnni" keeps int8 weights over their full range (exact on CPUs with VNNI, ARM64);
    # "portable" stores a layer whose weights leave [-64, 64] as uint8 (u8u8: exact on every CPU)
    int8_format: Int8Format = "vnni"


class _Graph:
    """Small helpers over an onnx GraphProto: unique names, initializers, node insertion."""

    def __init__(self, model) -> None:
        import onnx

        self.onnx = onnx
        self.model = model
        self.g = model.graph
        index = GraphIndex(model)
        self.inits, self.consumers = index.inits, index.consumers
        self._names: set[str] = ({n.name for n in self.g.node} | set(self.inits)
                                 | {o for n in self.g.node for o in n.output})
        self.new_nodes: dict[int | None, list] = {}  # id(anchor node) -> nodes to insert before it; None: at the end

    def name(self, base: str) -> str:
        name, k = base, 0
        while name in self._names:
            k += 1
            name = f"{base}_{k}"
        self._names.add(name)
        return name

    def const(self, base: str, array: np.ndarray) -> str:
        name = self.name(base)
        self.g.initializer.append(self.onnx.numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def node(self, op: str, inputs: list[str], base: str, anchor, **attrs) -> str:
        out = self.name(base)
        n = self.onnx.helper.make_node(op, inputs, [out], name=self.name(f"{base}/{op}"), **attrs)
        self.new_nodes.setdefault(None if anchor is None else id(anchor), []).append(n)
        return out

    def finish(self) -> None:
        """Insert the new nodes in front of their anchors (keeps a topological order)."""
        nodes = list(self.g.node)
        del self.g.node[:]
        for n in nodes:
            self.g.node.extend(self.new_nodes.get(id(n), []))
            self.g.node.append(n)
        self.g.node.extend(self.new_nodes.get(None, []))
        used = {i for n in self.g.node for i in n.input} | {o.name for o in self.g.output}
        delete_where(self.g.initializer, lambda t: t.name not in used)


def _scope(node) -> str | None:
    for p in node.metadata_props:
        if p.key == SCOPE_KEY:
            scopes = json.loads(p.value.replace("'", '"'))
            return scopes[-2] if len(scopes) >= 2 else None
    return None


def find_compute_nodes(model, names: list[str], prefix: str = "unet.") -> dict[str, object]:
    """The Conv / MatMul / Gemm node the exporter made for each module name."""
    wanted = {prefix + n: n for n in names}
    found: dict[str, object] = {}
    for node in model.graph.node:
        if node.op_type in ("Conv", "MatMul", "Gemm"):
            scope = _scope(node)
            if scope in wanted and wanted[scope] not in found:
                found[wanted[scope]] = node
    missing = sorted(set(names) - set(found))
    if missing:
        raise ExportError(
            f"{len(missing)} quantized layers have no Conv/MatMul/Gemm node in the exported graph "
            f"(first: {missing[0]}); the exporter's module-name metadata ({SCOPE_KEY}) is missing or changed",
            hint="export with torch.onnx.export(dynamo=True) from torch >= 2.5",
        )
    return found


def _np_float(float_type: int):
    return np.float16 if float_type == 10 else np.float32


def _rows_subgraph(gr: _Graph, timesteps: list[float], anchor) -> str:
    """rows [B] (int64) = argmin |timestep - table| : the nearest calibrated step of each sample."""
    table = gr.const("dq/timestep_table", np.asarray(timesteps, np.float32)[None, :])
    t = gr.node("Cast", [TIMESTEP], "dq/timestep_f32", anchor, to=1)
    t2 = gr.node("Unsqueeze", [t, gr.const("dq/axis1", np.asarray([1], np.int64))], "dq/timestep_col", anchor)
    diff = gr.node("Abs", [gr.node("Sub", [t2, table], "dq/timestep_diff", anchor)], "dq/timestep_dist", anchor)
    return gr.node("ArgMin", [diff], "dq/rows", anchor, axis=1, keepdims=0)


def int4_block(layer: LayerTensors, node, opts: SurgeryOptions) -> int | None:
    """The INT4 block size for a weight-only 4-bit Linear (MatMul over W^T [K, N]), or None."""
    if not (opts.int4_linear and layer.kind == "linear" and layer.weight_bits == 4 and node.op_type == "MatMul"):
        return None
    k = layer.w_int.shape[1]
    return next((b for b in opts.int4_blocks if k % b == 0), None)


def _weight_edge(gr: _Graph, node, layer: LayerTensors, opts: SurgeryOptions) -> None:
    """Replace the float weight input with int8 (or packed int4) initializer -> DequantizeLinear."""
    onnx = gr.onnx
    w_name = node.input[1]
    if w_name not in gr.inits:
        raise ExportError(f"{layer.name}: weight input {w_name!r} of {node.op_type} is not an initializer")
    w_int = layer.w_int
    axis = 0
    if node.op_type == "MatMul":  # the exporter stores W^T [in, out]
        w_int, axis = np.ascontiguousarray(w_int.T), 1
    elif node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        if not trans_b:
            w_int, axis = np.ascontiguousarray(w_int.T), 1
    expected = tuple(gr.inits[w_name].dims)
    if tuple(w_int.shape) != expected:
        raise ExportError(f"{layer.name}: int weight {w_int.shape} does not match the graph's {expected}")
    ftype = _np_float(opts.float_type)
    prefix = f"dq/{layer.name}/weight"
    block = int4_block(layer, node, opts)
    if block is not None:
        # blocked INT4 along the reduction axis (0 for W^T [K, N]); every block of a column shares the scale
        blocks = w_int.shape[0] // block
        scale = np.repeat(layer.w_scale[None, :], blocks, axis=0).astype(ftype)
        q = onnx.helper.make_tensor(gr.name(prefix + "_int4"), onnx.TensorProto.INT4, w_int.shape,
                                    w_int.flatten().tolist())
        gr.g.initializer.append(q)
        zp = onnx.helper.make_tensor(gr.name(prefix + "_zp"), onnx.TensorProto.INT4, scale.shape, [0] * scale.size)
        gr.g.initializer.append(zp)
        dq = gr.node("DequantizeLinear", [q.name, gr.const(prefix + "_scale", scale), zp.name], prefix + "_dq", node,
                     axis=0, block_size=block)
    else:
        w_stored, w_zp = stored_weight(w_int, opts)
        q = gr.const(prefix + ("_uint8" if w_stored.dtype == np.uint8 else "_int8"), w_stored)
        zp = gr.const(prefix + "_zp", np.full(layer.w_scale.shape, w_zp, w_stored.dtype))
        dq = gr.node("DequantizeLinear", [q, gr.const(prefix + "_scale", layer.w_scale.astype(ftype)), zp],
                     prefix + "_dq", node, axis=axis)
    node.input[1] = dq


def stored_weight(w_int: np.ndarray, opts: SurgeryOptions) -> tuple[np.ndarray, int]:
    """The weight integers as the graph stores them, and their zero point: int8 with zero point 0, or --
    ORT layout, ``portable`` format, weights outside [-64, 64] -- uint8 with zero point 128 (the same values:
    ``w + 128``), which ONNX Runtime multiplies without the saturating int16 pair sums of x86 without VNNI."""
    if opts.layout == "ort" and opts.int8_format == "portable" and not s8_exact_anywhere(w_int):
        return (w_int.astype(np.int16) + UINT8_ZERO_POINT).astype(np.uint8), UINT8_ZERO_POINT
    return w_int.astype(np.int8), 0


def _factor_shape(kind: str, rank: int, channels: int) -> tuple[int, ...]:
    if kind == "conv":
        return (channels, 1, 1)
    return (1,) * (rank - 2) + (channels,)


def _per_sample(gr: _Graph, table: np.ndarray, rows: str | None, base: str, anchor) -> str:
    """Gather(table, rows): one row of a per-step table per sample."""
    assert rows is not None, "per-step tables need the rows subgraph"
    return gr.node("Gather", [gr.const(base + "_table", table), rows], base, anchor, axis=0)


def _input_side(gr: _Graph, node, layer: LayerTensors, rows: str | None, rank: int, opts: SurgeryOptions) -> None:
    """x -> [Mul] -> Q -> DQ(s0) -> node. The DQ feeding the node always has the constant scale s0.

    TensorRT layout: Mul by ``(1/s) * s0 / s_t`` (gathered per sample) then Q(s0): Q/DQ scales stay
    build-time constants. ORT layout: Mul by the constant ``1/s`` only, then a Q whose per-sample
    scale ``s_t`` is gathered (axis 0): one pass fewer, and the fused DQ->node->Q keeps constants.
    """
    ftype = _np_float(opts.float_type)
    prefix = layer_prefix(layer.name)
    per_step = rows is not None and layer.act_scale.size > 1
    s0 = layer.ref_scale
    fshape = (1,) + _factor_shape(layer.kind, rank, layer.in_factor.size)
    ort = opts.layout == "ort"
    zp_dtype = np.uint8 if ort else np.int8
    zp0 = zp_dtype(UINT8_ZERO_POINT if ort else 0)
    s0_name = gr.const(prefix + "/act_scale", np.asarray(s0, ftype))
    zp_name = gr.const(prefix + "/act_zp", np.asarray(zp0))
    x = node.input[0]
    if per_step and ort:
        if not np.all(layer.in_factor == 1):
            x = gr.node("Mul", [x, gr.const(prefix + "/in_factor", layer.in_factor.reshape(fshape).astype(ftype))],
                        prefix + "/input_scaled", node)
        scale = _per_sample(gr, layer.act_scale.astype(ftype), rows, prefix + "/step_scale", node)
        zps = _per_sample(gr, np.full(layer.act_scale.size, zp0, zp_dtype), rows, prefix + "/step_zp", node)
        xq = gr.node("QuantizeLinear", [x, scale, zps], input_q_name(layer.name), node, axis=0)
    else:
        factor: str | None
        if per_step:
            f_in = ((layer.in_factor[None, :] * (s0 / layer.act_scale)[:, None])
                    .reshape((-1,) + fshape[1:]).astype(ftype))
            factor = _per_sample(gr, f_in, rows, prefix + "/in_factor", node)
        else:
            f_const = (layer.in_factor * (s0 / layer.act_scale[0])).reshape(fshape).astype(ftype)
            factor = None if np.all(f_const == 1) else gr.const(prefix + "/in_factor", f_const)
        if factor is not None:
            x = gr.node("Mul", [x, factor], prefix + "/input_scaled", node)
        xq = gr.node("QuantizeLinear", [x, s0_name, zp_name], input_q_name(layer.name), node)
    node.input[0] = gr.node("DequantizeLinear", [xq, s0_name, zp_name], prefix + "/input_dq", node)


def _weight_only_input(gr: _Graph, node, layer: LayerTensors, rank: int, opts: SurgeryOptions) -> None:
    """W4A16 Linear: no activation Q/DQ; the unfolded ``1/s`` of Weight Dilation is the only Mul."""
    if np.all(layer.in_factor == 1):
        return
    shape = (1,) + _factor_shape(layer.kind, rank, layer.in_factor.size)
    factor = gr.const(layer_prefix(layer.name) + "/in_factor",
                      layer.in_factor.reshape(shape).astype(_np_float(opts.float_type)))
    node.input[0] = gr.node("Mul", [node.input[0], factor], layer_prefix(layer.name) + "/input_scaled", node)


def _output_side(gr: _Graph, node, layer: LayerTensors, rows: str | None, rank: int, opts: SurgeryOptions,
                 out_scale: float | None) -> None:
    """node (bias removed) -> [Q(out) -> DQ] -> rescale by ``s_t / s0`` -> + bias -> consumers.

    With an output Q (ORT layout) the rescale rides on the output DQ's per-sample scale (axis 0);
    otherwise it is a Mul by a gathered factor. The bias is added after the rescale.
    """
    ftype = _np_float(opts.float_type)
    prefix = layer_prefix(layer.name)
    per_step = rows is not None and layer.act_scale.size > 1
    s0 = layer.ref_scale
    step_ratio = (layer.act_scale / s0).astype(np.float64)  # [T] (T = 1: constant)
    bias_name = None
    if node.op_type in ("Conv", "Gemm") and len(node.input) > 2 and node.input[2]:
        bias_name = node.input[2]
        del node.input[2]
    # (a 3D linear's bias is the exporter's own Add after the MatMul: it stays after the rescale)
    out = node.output[0]
    consumers = list(gr.consumers.get(out, []))
    anchor = consumers[0] if consumers else None  # None: the output is a graph output
    y = gr.name(out + "_nobias")
    node.output[0] = y
    rescaled = False
    if out_scale is not None:
        ort = opts.layout == "ort"
        zp_value, zp_dtype = (UINT8_ZERO_POINT, np.uint8) if ort else (0, np.int8)
        oscale = gr.const(prefix + "/out_scale", np.asarray(out_scale, ftype))
        ozp = gr.const(prefix + "/out_zp", np.asarray(zp_value, zp_dtype))
        yq = gr.node("QuantizeLinear", [y, oscale, ozp], prefix + "/out_q", anchor)
        if ort and per_step:  # the rescale rides on the DQ's per-sample scale
            dq_scale = _per_sample(gr, (out_scale * step_ratio).astype(ftype), rows, prefix + "/out_step_scale", anchor)
            dq_zp = _per_sample(gr, np.full(step_ratio.size, zp_value, zp_dtype), rows, prefix + "/out_step_zp", anchor)
            y = gr.node("DequantizeLinear", [yq, dq_scale, dq_zp], prefix + "/out_dq", anchor, axis=0)
            rescaled = True
        elif ort:
            dq_scale = gr.const(prefix + "/out_dq_scale", np.asarray(out_scale * step_ratio[0], ftype))
            y = gr.node("DequantizeLinear", [yq, dq_scale, ozp], prefix + "/out_dq", anchor)
            rescaled = True
        else:  # TensorRT: constant Q/DQ scales, the rescale stays a Mul
            y = gr.node("DequantizeLinear", [yq, oscale, ozp], prefix + "/out_dq", anchor)
    if not rescaled and per_step:
        f_out = step_ratio.reshape((-1,) + (1,) * (rank - 1)).astype(ftype)
        y = gr.node("Mul", [y, _per_sample(gr, f_out, rows, prefix + "/out_factor", anchor)],
                    prefix + "/rescaled", anchor)
    elif not rescaled and step_ratio[0] != 1.0:
        y = gr.node("Mul", [y, gr.const(prefix + "/out_factor", np.asarray(step_ratio[0], ftype))],
                    prefix + "/rescaled", anchor)
    if bias_name is not None:
        bias = gr.onnx.numpy_helper.to_array(gr.inits[bias_name]).astype(ftype)
        bshape = (1, -1, 1, 1) if node.op_type == "Conv" else (-1,)
        y = gr.node("Add", [y, gr.const(prefix + "/bias", bias.reshape(bshape))], prefix + "/biased", anchor)
    if y == node.output[0]:  # nothing was added after the node
        node.output[0] = out
        return
    key = None if anchor is None else id(anchor)
    gr.new_nodes[key].append(gr.onnx.helper.make_node("Identity", [y], [out], name=gr.name(prefix + "/out")))


def insert_qdq(
    model,
    layers: dict[str, LayerTensors],
    timesteps: list[float],
    ranks: dict[str, int],
    opts: SurgeryOptions = SurgeryOptions(),
    out_scales: dict[str, float] | None = None,
):
    """Rewrite the float ``model`` (onnx.ModelProto, modified in place and returned)."""
    if opts.layout not in LAYOUTS:
        raise ExportError(f"unknown layout {opts.layout!r} (expected {', '.join(LAYOUTS)})")
    for layer in layers.values():
        if np.any(layer.act_zero_point != 0):
            raise ExportError(
                f"{layer.name}: asymmetric activation quantization (nonzero zero point) cannot be exported: "
                "TensorRT needs zero point 0",
                hint="quantize with a recipe whose act_symmetric is true (the presets are)",
            )
        if layer.act_bits != 8:
            raise ExportError(
                f"{layer.name}: {layer.act_bits}-bit activations are simulation-only (no runtime runs them)",
                hint="export w8a8 or w4a8 recipes; w4a4 is for accuracy studies",
            )
    gr = _Graph(model)
    nodes = find_compute_nodes(model, list(layers), opts.scope_prefix)
    per_step = any(layer.act_scale.size > 1 for layer in layers.values())
    first = model.graph.node[0]
    rows = _rows_subgraph(gr, timesteps, first) if per_step else None
    for name, layer in layers.items():
        node = nodes[name]
        _weight_edge(gr, node, layer, opts)
        scale = None if out_scales is None else out_scales.get(name)
        if layer.out_c is not None:  # the simulation quantizes this output: step c * s_t = (c * s0) * s_t / s0
            scale = layer.out_c * layer.ref_scale
        if int4_block(layer, node, opts) is not None:  # weight-only: float activations, only 1/s stays
            _weight_only_input(gr, node, layer, ranks[name], opts)
            continue
        _input_side(gr, node, layer, rows, ranks[name], opts)
        _output_side(gr, node, layer, rows, ranks[name], opts, scale)
    gr.finish()
    return model


def int4_linear_layers(layers: dict[str, LayerTensors], ranks: dict[str, int]) -> list[str]:
    """4-bit token Linears whose reduction size fits one of TensorRT's INT4 block sizes."""
    blocks = SurgeryOptions().int4_blocks
    found = [n for n, t in layers.items() if t.kind == "linear" and t.weight_bits == 4 and ranks[n] > 2
             and any(t.w_int.shape[1] % b == 0 for b in blocks)]
    if not found:
        log.warning("--int4-linear: no 4-bit Linear layer has a reduction size divisible by %s; "
                    "exporting INT8 weights", blocks)
    return found
