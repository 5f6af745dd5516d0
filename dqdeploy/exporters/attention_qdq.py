"""Q/DQ surgery for quantized attention (recipe ``attention="int8"``, :mod:`dqdeploy.quant.attention`).

The exporter writes each scaled dot-product attention as ``MatMul(q * r, k^T * r) -> Softmax -> MatMul(p, v)``.
For every quantized attention (found by the module-name scope of its first MatMul) both batched matmuls get
quantized inputs, with the simulation's integers::

    q*r -> Q -> DQ(s0q) ┐                                       p -> Q(1/127) -> DQ ┐
                        MatMul -> Mul(sq_t sk_t / (s0q s0k)) -> Softmax ...         MatMul -> Mul(sv_t / s0v)
    k^T*r -> Q -> DQ(s0k) ┘                                        v -> Q -> DQ(s0v) ┘

``s_t``: the per-step step size of the sample's time step (rows = argmin |timestep - table|, as for the layers).
TensorRT layout: ``Mul(s0 / s_t) -> Q(s0)``, every Q/DQ scale a build-time constant and int8 (its INT8 MHA
fusion takes Q/DQ in front of both batched matmuls). ORT layout: a Q whose per-sample scale is gathered (axis 0)
and a constant DQ, which ONNX Runtime fuses into ``MatMulIntegerToFloat``; the softmax output is uint8 in
``[0, 127]``, so ``p x v`` cannot saturate int16 pair sums with any int8 ``v``; ``q x k`` is u8 x s8 (format
``vnni``) or u8 x u8 (format ``portable``: ``k`` stored with zero point 128, exact on every CPU).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..core.errors import ExportError
from ..quant.attention import PROB_LEVELS, attention_quants
from .graph_index import GraphIndex
from .qdq import UINT8_ZERO_POINT, SurgeryOptions, _Graph, _np_float, _per_sample, _rows_subgraph, _scope, layer_prefix

THROUGH = ("Mul", "Add", "Where", "Div", "Sub")  # what may sit between the score MatMul and the Softmax (scale, mask)


@dataclass(frozen=True)
class AttentionTensors:
    """The per-step step sizes [T] of one quantized attention's query, key and value (T = 1: collapsed)."""

    name: str
    query: np.ndarray
    key: np.ndarray
    value: np.ndarray


def attention_tensors(model) -> dict[str, AttentionTensors]:
    """The step sizes of every quantized attention of a :class:`~dqdeploy.quant.modules.QuantizedDenoiser`."""
    return {name: AttentionTensors(name, *(q.scale.detach().abs().float().numpy().copy()
                                           for q in quant.quantizers().values()))
            for name, quant in attention_quants(model.denoiser).items()}


def attention_q_name(attention: str, role: str) -> str:
    """Output of the QuantizeLinear on ``role`` (query, key, probs, value) of ``attention``: integers checks compare."""
    return f"{layer_prefix(attention)}/{role}_q"


def find_attention_nodes(model, names: list[str], prefix: str) -> dict[str, tuple]:
    """For each attention module name: its (score MatMul, probs MatMul) nodes in the exported graph."""
    ix = GraphIndex(model)
    wanted = {prefix + n: n for n in names}
    found: dict[str, tuple] = {}
    for softmax in ix.nodes("Softmax"):
        node = ix.producer.get(softmax.input[0])
        while node is not None and node.op_type in THROUGH:
            node = next((p for p in (ix.producer.get(i) for i in node.input) if p is not None
                         and p.op_type in (*THROUGH, "MatMul")), None)
        users = ix.consumers.get(softmax.output[0], [])
        if node is None or node.op_type != "MatMul" or len(users) != 1 or users[0].op_type != "MatMul":
            continue
        name = wanted.get(_scope(node) or "")
        if name is not None and name not in found:
            _check_split(ix, node, name)
            found[name] = (node, users[0])
    missing = sorted(set(names) - set(found))
    if missing:
        raise ExportError(f"{len(missing)} quantized attentions have no MatMul -> Softmax -> MatMul in the exported "
                          f"graph (first: {missing[0]})",
                          hint="export with torch.onnx.export(dynamo=True) from torch >= 2.5")
    return found


def _check_split(ix: GraphIndex, scores, name: str) -> None:
    """The simulation quantizes ``q * r`` and ``k * r`` with ``r = sqrt(scale)``: the graph's score MatMul must read
    both through a Mul by the same constant (the exporter's split of the score scale)."""
    factors: list[float | None] = []
    for x in scores.input:
        mul = ix.producer.get(x)
        consts = [] if mul is None or mul.op_type != "Mul" else [c for c in map(ix.const_array, mul.input)
                                                                   if c is not None and c.size == 1]
        factors.append(float(consts[0].reshape(())) if consts else None)
    a, b = factors
    if a is None or b is None or not np.isclose(a, b, rtol=1e-6):
        raise ExportError(f"attention {name}: the exported score MatMul reads q and k^T scaled by {factors}, not by "
                          "one constant sqrt(scale) each as the simulation quantizes them",
                          hint="export with the torch version dqdeploy pins (its ONNX exporter splits the scale)")


def _quantized_input(gr: _Graph, node, slot: int, steps: np.ndarray, rows: str | None, role: str, name: str,
                     opts: SurgeryOptions, unsigned: bool) -> float:
    """``node.input[slot]`` -> [Mul] -> Q -> DQ(s0) -> node, with the integers ``round(x / s_t)``; returns ``s0``."""
    ftype = _np_float(opts.float_type)
    prefix = f"{layer_prefix(name)}/{role}"
    s0 = float(np.median(steps))
    zp = UINT8_ZERO_POINT if unsigned else 0
    zp_dtype = np.uint8 if unsigned else np.int8
    s0_name, zp_name = gr.const(prefix + "_scale", np.asarray(s0, ftype)), gr.const(prefix + "_zp", zp_dtype(zp))
    x = node.input[slot]
    if rows is not None and opts.layout == "ort":
        scale = _per_sample(gr, steps.astype(ftype), rows, prefix + "_step_scale", node)
        zps = _per_sample(gr, np.full(steps.size, zp, zp_dtype), rows, prefix + "_step_zp", node)
        xq = gr.node("QuantizeLinear", [x, scale, zps], attention_q_name(name, role), node, axis=0)
    else:
        if rows is not None:
            factor = _per_sample(gr, (s0 / steps).reshape(-1, 1, 1, 1).astype(ftype), rows, prefix + "_factor", node)
            x = gr.node("Mul", [x, factor], prefix + "_scaled", node)
        elif steps[0] != s0:
            x = gr.node("Mul", [x, gr.const(prefix + "_factor", np.asarray(s0 / steps[0], ftype))], prefix + "_scaled",
                        node)
        xq = gr.node("QuantizeLinear", [x, s0_name, zp_name], attention_q_name(name, role), node)
    node.input[slot] = gr.node("DequantizeLinear", [xq, s0_name, zp_name], prefix + "_dq", node)
    return s0


def _probs_input(gr: _Graph, node, name: str, opts: SurgeryOptions) -> None:
    """Softmax output -> Q(1/127, zero point 0) -> DQ -> node: the fixed grid of the simulation."""
    prefix = f"{layer_prefix(name)}/probs"
    step = gr.const(prefix + "_scale", np.asarray(np.float32(1.0 / PROB_LEVELS), _np_float(opts.float_type)))
    zp = gr.const(prefix + "_zp", (np.uint8 if opts.layout == "ort" else np.int8)(0))
    pq = gr.node("QuantizeLinear", [node.input[0], step, zp], attention_q_name(name, "probs"), node)
    node.input[0] = gr.node("DequantizeLinear", [pq, step, zp], prefix + "_dq", node)


def _rescaled_output(gr: _Graph, node, factor: np.ndarray, rows: str | None, name: str, role: str,
                     opts: SurgeryOptions) -> None:
    """node -> Mul(factor[rows]) -> its consumers (the output keeps its name)."""
    out = node.output[0]
    consumers = list(gr.consumers.get(out, []))
    anchor = consumers[0] if consumers else None
    ftype = _np_float(opts.float_type)
    prefix = f"{layer_prefix(name)}/{role}_out"
    f = (_per_sample(gr, factor.reshape(-1, 1, 1, 1).astype(ftype), rows, prefix + "_factor", anchor)
         if rows is not None else gr.const(prefix + "_factor", np.asarray(factor[0], ftype)))
    raw = gr.name(out + "_int")
    node.output[0] = raw
    gr.new_nodes.setdefault(None if anchor is None else id(anchor), []).append(
        gr.onnx.helper.make_node("Mul", [raw, f], [out], name=gr.name(prefix + "/Mul")))


def insert_attention_qdq(model, attentions: dict[str, AttentionTensors], timesteps: list[float],
                         opts: SurgeryOptions = SurgeryOptions()):
    """Quantize both batched matmuls of each attention in ``attentions`` (``model`` changed in place and returned)."""
    if not attentions:
        return model
    nodes = find_attention_nodes(model, list(attentions), opts.scope_prefix)
    gr = _Graph(model)
    per_step = any(a.query.size > 1 for a in attentions.values())
    produced = {o for n in model.graph.node for o in n.output}
    rows = None
    if per_step:
        rows = "dq/rows" if "dq/rows" in produced else _rows_subgraph(gr, timesteps, model.graph.node[0])
    ort = opts.layout == "ort"
    for name, a in attentions.items():
        scores, mix = nodes[name]
        s0q = _quantized_input(gr, scores, 0, a.query, rows, "query", name, opts, unsigned=ort)
        s0k = _quantized_input(gr, scores, 1, a.key, rows, "key", name, opts,
                               unsigned=ort and opts.int8_format == "portable")
        _rescaled_output(gr, scores, a.query * a.key / (s0q * s0k), rows, name, "scores", opts)
        _probs_input(gr, mix, name, opts)
        s0v = _quantized_input(gr, mix, 1, a.value, rows, "value", name, opts, unsigned=False)
        _rescaled_output(gr, mix, a.value / s0v, rows, name, "mix", opts)
    gr.finish()
    return model
