"""Graph simplification that keeps the Q/DQ structure, and folding of build-time weight quantization.

:func:`simplify` runs onnxsim (onnxslim if onnxsim fails or breaks the graph) and keeps the result
only if every QuantizeLinear/DequantizeLinear, every quantized weight and every integer constant
survived and no float weight appeared; otherwise it returns the input model and logs a warning.

:func:`fold_weight_quantize` turns ``QuantizeLinear(float initializer W, constant scale, zp)`` into an
integer initializer, which no off-the-shelf simplifier does (they leave the float weight and the Q
node in place, which TensorRT rejects as a run-time weight quantization).
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..core.errors import require
from .graph_index import COMPUTE_OPS, FLOAT_TYPES, GraphIndex, delete_where, skeleton

log = logging.getLogger(__name__)

QUANT_TYPES = frozenset({2, 3, 21, 22})  # uint8, int8, uint4, int4


# ---------------------------------------------------------------------------------------------
# structure fingerprint: what a simplifier must not change
# ---------------------------------------------------------------------------------------------
def _digest(tensor) -> tuple:
    from onnx import numpy_helper

    data = numpy_helper.to_array(tensor)
    return tensor.data_type, tuple(tensor.dims), hashlib.sha1(np.ascontiguousarray(data).tobytes()).hexdigest()


@dataclass(frozen=True)
class QDQStructure:
    """The parts of a QDQ graph a simplifier must keep."""

    quantize: int
    dequantize: int
    quantized_compute: int  # Conv/MatMul/Gemm nodes whose activation input comes from a DequantizeLinear
    weights: Counter  # (dtype, dims, digest) of each DQ's integer constant input, one per DQ
    int_constants: frozenset  # distinct (dtype, dims, digest) of 8/4-bit integer constants
    float_weights: int  # Conv/MatMul/Gemm weight inputs that are float constants
    io: tuple  # graph input and output names

    def differences(self, other: QDQStructure) -> list[str]:
        """What changed from ``self`` to ``other`` (empty: the structure is intact)."""
        found = []
        # identical Q/DQ pairs on one tensor (layers that share an input and its calibrated scales)
        # may be merged by common-subexpression elimination; every quantized input must survive
        if self.quantized_compute != other.quantized_compute:
            found.append(f"quantized compute nodes {self.quantized_compute} -> {other.quantized_compute}")
        if other.quantize > self.quantize or other.dequantize > self.dequantize:
            found.append(f"Q/DQ nodes {self.quantize}/{self.dequantize} -> {other.quantize}/{other.dequantize}")
        if self.weights != other.weights:
            found.append(f"{sum((self.weights - other.weights).values())} quantized weights changed or lost")
        if self.int_constants != other.int_constants:
            found.append(f"{len(self.int_constants - other.int_constants)} integer constants changed or lost")
        if other.float_weights > self.float_weights:
            found.append(f"float weights {self.float_weights} -> {other.float_weights}")
        if self.io != other.io:
            found.append("graph inputs/outputs renamed")
        return found


def qdq_structure(model) -> QDQStructure:
    """Fingerprint of ``model``'s Q/DQ nodes, quantized weights and integer constants."""
    ix = GraphIndex(model)
    weights: Counter = Counter()
    for n in ix.nodes("DequantizeLinear"):
        t = ix.constant(n.input[0])
        if t is not None and t.data_type in QUANT_TYPES:
            weights[_digest(t)] += 1
    consts = [t for t in ix.inits.values()] + [a.t for n in ix.nodes("Constant") for a in n.attribute
                                               if a.name == "value"]
    int_constants = frozenset(_digest(t) for t in consts if t.data_type in QUANT_TYPES)
    float_weights = 0
    for node in ix.nodes(*COMPUTE_OPS):
        for slot in ((0, 1) if node.op_type == "MatMul" else (1,)):
            t = ix.constant(node.input[slot]) if len(node.input) > slot else None
            float_weights += t is not None and t.data_type in FLOAT_TYPES
    io = (tuple(i.name for i in model.graph.input if i.name not in ix.inits), tuple(o.name for o in model.graph.output))
    quantized_compute = 0
    for node in ix.nodes(*COMPUTE_OPS):
        src = ix.source(node.input[0])
        quantized_compute += src is not None and src.op_type == "DequantizeLinear"
    return QDQStructure(
        quantize=sum(1 for _ in ix.nodes("QuantizeLinear")),
        dequantize=sum(1 for _ in ix.nodes("DequantizeLinear")),
        quantized_compute=quantized_compute,
        weights=weights, int_constants=int_constants, float_weights=float_weights, io=io,
    )


# ---------------------------------------------------------------------------------------------
# simplifiers
# ---------------------------------------------------------------------------------------------
def _onnxsim(model):
    onnxsim = require("onnxsim", "ort", "graph simplification")
    simplified, ok = onnxsim.simplify(model, check_n=0)
    if not ok:
        raise RuntimeError("onnxsim's own check failed")
    return simplified


def _onnxslim(model):
    onnxslim = require("onnxslim", "ort", "graph simplification")
    return onnxslim.slim(model)


BACKENDS: dict[str, Callable] = {"onnxsim": _onnxsim, "onnxslim": _onnxslim}


def _restore(simplified, large: dict[str, Any]):
    """Put the initializers the skeleton had turned into graph inputs back into ``simplified``."""
    g = simplified.graph
    used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    inputs = [i for i in g.input if i.name not in large]
    del g.input[:]
    g.input.extend(inputs)
    g.initializer.extend(t for name, t in large.items() if name in used)
    return simplified


def simplify(model, *, backends: tuple[str, ...] = ("onnxsim", "onnxslim")):
    """Simplify ``model`` (onnxsim, then onnxslim) without touching its Q/DQ structure.

    The simplifiers see a skeleton (:func:`~.graph_index.skeleton`: initializers over
    ``SMALL_INITIALIZER`` elements or held in external data become graph inputs), so their memory
    does not grow with the model and >2 GB graphs work; those initializers are put back untouched
    (as the same in-memory or external tensors). Returns the first simplified model whose
    :func:`qdq_structure` is intact, else ``model`` itself.
    """
    onnx = require("onnx", "ort", "graph simplification")
    skel = skeleton(model)
    small = {t.name for t in skel.graph.initializer}
    large = {t.name: t for t in model.graph.initializer if t.name not in small}
    before = qdq_structure(skel)
    for name in backends:
        work = onnx.ModelProto()
        work.CopyFrom(skel)
        try:
            simplified = BACKENDS[name](work)
        except Exception as exc:  # simplifiers raise anything from RuntimeError to protobuf errors
            log.info("%s failed (%s: %s)", name, type(exc).__name__, exc)
            continue
        changes = before.differences(qdq_structure(simplified))
        if not changes:
            log.info("simplified with %s: %d -> %d nodes (%d large initializers kept aside)",
                     name, len(model.graph.node), len(simplified.graph.node), len(large))
            return _restore(simplified, large)
        log.warning("%s broke the Q/DQ structure (%s); result discarded", name, "; ".join(changes))
    log.warning("simplify: no simplifier kept the Q/DQ structure; returning the model unchanged")
    return model


# ---------------------------------------------------------------------------------------------
# Q(W_float) -> integer initializer
# ---------------------------------------------------------------------------------------------
def _quantize(node, opset: int, arrays: list[np.ndarray]) -> np.ndarray:
    """Run one QuantizeLinear node with ONNX's reference implementation (its exact rounding)."""
    from onnx import helper
    from onnx.reference import ReferenceEvaluator

    names = [f"in{k}" for k in range(len(arrays))]
    q = helper.make_node("QuantizeLinear", names, ["out"], name="q")
    q.attribute.extend(node.attribute)
    graph = helper.make_graph([q], "fold", [helper.make_tensor_value_info(n, 0, None) for n in names],
                              [helper.make_tensor_value_info("out", 0, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    outputs: Any = ReferenceEvaluator(model).run(None, dict(zip(names, arrays)))
    return outputs[0]


def fold_weight_quantize(model):
    """Replace every ``QuantizeLinear(float constant W, constant scale[, zp])`` by an integer initializer.

    Identity nodes between W and the Q are looked through. Returns a new model; the input is unchanged.
    """
    onnx = require("onnx", "ort", "weight folding")
    from onnx import numpy_helper

    out = onnx.ModelProto()
    out.CopyFrom(model)
    ix = GraphIndex(out)
    graph = out.graph
    folded, orphans = [], set()
    for node in list(ix.nodes("QuantizeLinear")):
        w = ix.constant(node.input[0])
        if w is None or w.data_type not in FLOAT_TYPES or node.output[0] in ix.outputs:
            continue
        arrays = [ix.const_array(node.input[0]), ix.const_array(node.input[1])]
        if len(node.input) > 2 and node.input[2]:
            arrays.append(ix.const_array(node.input[2]))
        if any(a is None for a in arrays):
            log.info("fold_weight_quantize: %s has a non-constant scale/zero point or unloaded data; kept", node.name)
            continue
        q = _quantize(node, ix.opset or 21, arrays)
        graph.initializer.append(numpy_helper.from_array(q, node.output[0]))
        folded.append(node)
        orphans.update(i for i in node.input if i)
    if not folded:
        return out
    drop = {id(n) for n in folded}
    kept = [n for n in graph.node if id(n) not in drop]
    _prune(graph, kept, orphans)
    log.info("fold_weight_quantize: folded %d weight QuantizeLinear nodes into integer initializers", len(folded))
    return out


def _prune(graph, nodes: list, orphans: set[str]) -> None:
    """Keep ``nodes`` minus the Identity/Constant chains and initializers that only fed removed nodes."""
    keep_names = {o.name for o in graph.output} | {i.name for i in graph.input}
    todo = set(orphans)
    while todo:
        used = {i for n in nodes for i in n.input} | keep_names
        dead = {id(n) for n in nodes if n.op_type in ("Identity", "Constant") and n.output[0] in todo
                and n.output[0] not in used}
        todo = {i for n in nodes if id(n) in dead for i in n.input if i}
        orphans |= todo
        nodes = [n for n in nodes if id(n) not in dead]
    used = {i for n in nodes for i in n.input} | keep_names
    del graph.node[:]
    graph.node.extend(nodes)
    delete_where(graph.initializer, lambda t: t.name not in used and t.name in orphans)
