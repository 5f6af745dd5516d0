"""LoRA slots: per adapted Linear or Conv2d of the float graph, a float branch whose low-rank weights are graph inputs,
so a runtime swaps adapters without re-exporting (:mod:`dqdeploy.runtimes.lora_feeds` feeds them).

Run on the float graph before the Q/DQ surgery, for each slot layer with input ``x`` (as the graph holds it: ``x / s``
where Weight Dilation's ``1/s`` is folded into a norm) and output ``y`` (after the exporter's bias Add)::

    Linear:  y' = y + MatMul(MatMul(x, down * g), up)      down [in, r], up [r, out]
    Conv2d:  y' = y + Conv(Conv(x, down * g), up)          down [r, in, kh, kw] (the layer's strides, pads,
                                                            dilations), up [out, r, 1, 1]
    g = s * in_factor per input channel (ones where 1/s is not folded)

``down`` and ``up`` are the inputs ``lora/<layer>/down`` and ``lora/<layer>/up``, the rank ``r`` a symbolic dim; the
branch sees the layer's own float input, as the simulation's (:func:`dqdeploy.quant.lora.attach_lora`). The surgery
then quantizes the layer as before; the branch stays float.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from ..core.errors import ExportError
from ..io.lora import read_lora
from ..quant.lora import ConvGeometry
from ..runtimes.spec import lora_inputs, slot_input_shapes
from .dequantize import LayerTensors
from .qdq import _Graph, find_compute_nodes


@dataclass(frozen=True)
class Slot:
    """One Linear or Conv2d to carry a branch: its widths, the factor ``g`` [in] turning its graph input into its
    float input (``None``: ones), and a convolution's geometry (``kernel``, ``stride``, ``padding``, ``dilation``)."""

    layer: str
    in_features: int
    out_features: int
    factor: np.ndarray | None = None
    conv: dict[str, list[int]] | None = None


ATTENTION = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


def plan_slots(denoiser: nn.Module, layers: Mapping[str, LayerTensors], which: str | Path) -> list[Slot]:
    """The slots of ``which``: the layers of a LoRA file (checked against ``denoiser``), or ``"attention"`` (every
    attention projection); ``layers``: the quantized layers' tensors (their dilation and unfolded ``1/s``)."""
    if str(which) == "attention":
        geometry: dict[str, ConvGeometry | None] = {n: None for n, m in denoiser.named_modules()
                                                    if isinstance(m, nn.Linear) and n.endswith(ATTENTION)}
    else:
        geometry = {name: layer.conv for name, layer in read_lora(which, denoiser).layers.items()}
    if not geometry:
        raise ExportError(f"lora slots {str(which)!r}: no Linear layer to adapt in this model")
    slots = []
    for name, conv in geometry.items():
        weight = cast(torch.Tensor, denoiser.get_submodule(name).weight)
        t = layers.get(name)
        factor = None if t is None or t.dilation is None else (t.dilation * t.in_factor).astype(np.float32)
        slots.append(Slot(name, int(weight.shape[1]), int(weight.shape[0]), factor,
                          None if conv is None else conv_entry(conv, tuple(weight.shape[2:]))))
    return slots


def conv_entry(conv: ConvGeometry, kernel: tuple[int, ...]) -> dict[str, list[int]]:
    """A conv slot's geometry as the export spec records it."""
    return {"kernel": [int(k) for k in kernel], "stride": list(conv.stride), "padding": list(conv.padding),
            "dilation": list(conv.dilation)}


def _conv_branch(gr: _Graph, node: Any, slot: Slot, d: str, up: str, prefix: str, anchor: Any) -> str:
    """``Conv(Conv(x, d), up)`` with the base Conv's strides, pads and dilations on the down convolution."""
    attrs = {a.name: a for a in node.attribute}
    group = attrs["group"].i if "group" in attrs else 1
    if group != 1 or ("auto_pad" in attrs and attrs["auto_pad"].s not in (b"", b"NOTSET")):
        raise ExportError(f"{slot.layer}: its Conv node has group={group} or auto_pad; a LoRA slot needs a plain "
                          "convolution", hint="export with slots for other layers only")
    geometry = {k: [int(v) for v in attrs[k].ints] for k in ("strides", "pads", "dilations") if k in attrs}
    h = gr.node("Conv", [node.input[0], d], prefix + "/h", anchor, **geometry)
    return gr.node("Conv", [h, up], prefix + "/branch", anchor)


def _output_of(gr: _Graph, node: Any) -> str:
    """The layer's output: the MatMul's, or that of the bias Add the exporter put right after it."""
    out = node.output[0]
    consumers = gr.consumers.get(out, [])
    if node.op_type == "MatMul" and len(consumers) == 1 and consumers[0].op_type == "Add" \
            and any(i in gr.inits for i in consumers[0].input):
        return consumers[0].output[0]
    return out


def add_lora_slots(model: Any, slots: list[Slot], scope_prefix: str, elem_type: int = 1) -> list[dict[str, Any]]:
    """Add a branch to each slot's layer in the float ``model`` (onnx.ModelProto, modified in place); returns the
    spec's ``lora_slots`` entries. ``elem_type``: the graph's float type (1 float32, 10 float16)."""
    import onnx

    gr = _Graph(model)
    nodes = find_compute_nodes(model, [s.layer for s in slots], scope_prefix)
    producers = {o: n for n in model.graph.node for o in n.output}
    entries = []
    for i, slot in enumerate(slots):
        node = cast(Any, nodes[slot.layer])
        if (node.op_type == "Conv") != (slot.conv is not None):
            raise ExportError(f"{slot.layer}: the graph computes it with {node.op_type}, the model holds a "
                              f"{'Conv2d' if slot.conv is not None else 'Linear'}",
                              hint="export with slots for other layers only")
        down, up = lora_inputs(slot.layer)
        entry = {"layer": slot.layer, "down": down, "up": up, "in": slot.in_features, "out": slot.out_features,
                 **({} if slot.conv is None else {"conv": slot.conv})}
        rank = f"lora_rank_{i}"
        model.graph.input.extend([onnx.helper.make_tensor_value_info(name, elem_type, [rank if d is None else d
                                                                                       for d in dims])
                                  for name, dims in slot_input_shapes(entry).items()])
        y = _output_of(gr, node)
        consumers = gr.consumers.get(y, [])
        anchor = consumers[0] if consumers else None
        prefix = f"lora/{slot.layer}"
        d = down
        if slot.factor is not None and not np.all(slot.factor == 1):
            dtype = np.float16 if elem_type == 10 else np.float32
            shape = (-1, 1) if slot.conv is None else (1, -1, 1, 1)  # the input-channel axis of down
            d = gr.node("Mul", [down, gr.const(prefix + "/factor", slot.factor.reshape(shape).astype(dtype))],
                        prefix + "/down_scaled", anchor)
        if slot.conv is None:
            h = gr.node("MatMul", [node.input[0], d], prefix + "/h", anchor)
            branch = gr.node("MatMul", [h, up], prefix + "/branch", anchor)
        else:
            branch = _conv_branch(gr, node, slot, d, up, prefix, anchor)
        base = gr.name(y + "_base")
        _rename_output(producers[y], y, base)
        gr.new_nodes.setdefault(None if anchor is None else id(anchor), []).append(
            onnx.helper.make_node("Add", [base, branch], [y], name=gr.name(prefix + "/Add")))
        entries.append(entry)
    gr.finish()
    return entries


def _rename_output(node: Any, old: str, new: str) -> None:
    node.output[list(node.output).index(old)] = new
