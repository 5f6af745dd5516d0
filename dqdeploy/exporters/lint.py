"""Static TensorRT rule check for QDQ ONNX graphs; runs without TensorRT.

TensorRT's explicit quantization (its developer guide, "Explicit Quantization") accepts only part of
what ONNX allows: build-time constant scales, zero-points equal to zero in int8 (int4 for weights),
per-tensor activations, per-channel or blocked weights, INT4 only behind MatMul/Gemm, opset 13..20
(21 with INT4). Each rule is one function registered in :data:`RULES`; adding a rule touches nothing else.

Only the main graph is checked (subgraphs of If/Loop and model-local functions are not).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..core.errors import LintError, require
from .graph_index import (
    CASTS,
    COMPUTE_OPS,
    DATA_MOVES,
    FLOAT_TYPES,
    INT4,
    INT4_TYPES,
    INT8,
    QDQ_OPS,
    GraphIndex,
    node_attr,
    node_input,
    type_name,
)

log = logging.getLogger(__name__)

MIN_OPSET, MAX_OPSET, INT4_OPSET = 13, 20, 21


@dataclass(frozen=True)
class Violation:
    """One broken rule: rule id, node name and a message saying found / expected / fix."""

    rule: str
    node: str
    message: str

    def __str__(self) -> str:
        return f"[{self.rule}] {self.node}: {self.message}"


@dataclass(frozen=True)
class LintOptions:
    """Switches of the rule set."""

    allow_attention_qdq: bool = False


def _is_weight_dq(ix: GraphIndex, node) -> bool:
    """A DequantizeLinear whose input 0 is an integer constant (initializer / Constant)."""
    t = ix.constant(node.input[0])
    return node.op_type == "DequantizeLinear" and t is not None and t.data_type not in FLOAT_TYPES


def _is_weight_q(ix: GraphIndex, node) -> bool:
    """A QuantizeLinear applied at run time to a float constant (a weight left in float)."""
    t = ix.constant(node.input[0])
    return node.op_type == "QuantizeLinear" and t is not None and t.data_type in FLOAT_TYPES


def _is_activation(ix: GraphIndex, node) -> bool:
    """A Q/DQ node on an activation (its input is computed from graph inputs)."""
    return not ix.is_constant_derived(node.input[0])


def _same_constant(ix: GraphIndex, a: str, b: str) -> bool | None:
    """Whether two tensors hold the same constant (None: cannot tell)."""
    if not a and not b:
        return True
    if ix.resolve(a) == ix.resolve(b):
        return True
    va, vb = ix.const_array(a) if a else None, ix.const_array(b) if b else None
    if a and b and va is not None and vb is not None:
        return va.shape == vb.shape and bool(np.array_equal(va.astype(np.float64), vb.astype(np.float64)))
    if (not a and vb is not None) or (not b and va is not None):  # absent zero point == 0
        v = va if va is not None else vb
        return v is not None and bool(np.all(v.astype(np.float64) == 0))
    return None


def _expected_weight_axis(ix: GraphIndex, node, slot: int, rank: int) -> int | None:
    """The output-channel axis TensorRT expects for a per-channel weight feeding ``node`` at ``slot``."""
    if slot != 1:
        return None
    if node.op_type == "Gemm":
        return 0 if node_attr(node, "transB", 0) else 1
    return {"Conv": 0, "ConvTranspose": 1, "MatMul": rank - 1}.get(node.op_type)


# ---------------------------------------------------------------------------------------------
# rules
# ---------------------------------------------------------------------------------------------
Rule = Callable[[GraphIndex, LintOptions], Iterable[Violation]]
RULES: dict[str, Rule] = {}


def rule(rule_id: str) -> Callable[[Rule], Rule]:
    """Register a rule function under ``rule_id``."""

    def register(fn: Rule) -> Rule:
        RULES[rule_id] = fn
        return fn

    return register


def _has_int4(ix: GraphIndex) -> bool:
    return (any(t.data_type in INT4_TYPES for t in ix.inits.values())
            or any(ix.elem_type(n.input[0]) in INT4_TYPES for n in ix.nodes("DequantizeLinear")))


@rule("opset")
def _opset(ix: GraphIndex, opts: LintOptions) -> Iterator[Violation]:
    """Default-domain opset 13..20 (TensorRT 10's parser), 21 only where INT4 weights need it."""
    v, int4 = ix.opset, _has_int4(ix)
    top = INT4_OPSET if int4 else MAX_OPSET
    where = "<model>"
    if v is None:
        yield Violation("opset", where, "found no default-domain opset import; expected 13..20; "
                        "fix: export with opset_version=20")
    elif int4 and v < INT4_OPSET:
        yield Violation("opset", where, f"found opset {v} with INT4 tensors; INT4 needs opset 21; "
                        "fix: export at opset 21 (onnx.version_converter) or store the 4-bit weights as int8")
    elif v < MIN_OPSET or v > top:
        extra = "" if int4 or v != INT4_OPSET else " (21 is only for blocked INT4 weights, and none are here)"
        yield Violation("opset", where, f"found default-domain opset {v}; expected {MIN_OPSET}..{top}{extra}; "
                        f"fix: export with opset_version={top} or convert with onnx.version_converter")


@rule("qdq-constant-scale")
def _constant_scale(ix: GraphIndex, opts: LintOptions) -> Iterator[Violation]:
    """Q/DQ scales and zero points are initializers or Constant outputs (through Identity)."""
    for n in ix.nodes(*QDQ_OPS):
        for k, what in ((1, "scale"), (2, "zero point")):
            name = node_input(n, k)
            if name and ix.constant(name) is None:
                src = ix.source(name)
                found = f"{src.op_type} node '{ix.label(src)}'" if src is not None else "a graph input"
                yield Violation("qdq-constant-scale", ix.label(n),
                                f"{what} '{name}' comes from {found} at run time; expected an initializer or "
                                "Constant; fix: use a constant Q/DQ scale s0 and move the per-step factor into "
                                "Mul nodes around the Q/DQ pair (per-step scales as a build-time-constant rescale)")


@rule("qdq-zero-point")
def _zero_point(ix: GraphIndex, opts: LintOptions) -> Iterator[Violation]:
    """Zero points absent or all zero, int8 (int4 allowed for weight DQ)."""
    for n in ix.nodes(*QDQ_OPS):
        weight = _is_weight_dq(ix, n)
        allowed = {INT8, INT4} if weight else {INT8}
        expected = "int8 or int4" if weight else "int8"
        zp = node_input(n, 2)
        if zp:
            dtype = ix.elem_type(zp)
        elif n.op_type == "DequantizeLinear":
            dtype = ix.elem_type(n.input[0])
        else:
            dtype = node_attr(n, "output_dtype", 0) or None  # absent zero point: TensorRT reads int8
        if dtype is not None and dtype not in allowed:
            yield Violation("qdq-zero-point", ix.label(n),
                            f"found {type_name(dtype)} quantized data "
                            f"({'zero point ' + repr(zp) if zp else 'no zero point'}); "
                            f"expected {expected} with zero point 0 (TensorRT is symmetric signed); "
                            "fix: map to int8 (q_int8 = q_uint8 - 128, zero point 0)")
            continue
        values = ix.const_array(zp) if zp else None
        if values is not None and np.any(values.astype(np.int64) != 0):
            nz = values.astype(np.int64)
            yield Violation("qdq-zero-point", ix.label(n),
                            f"found nonzero zero point '{zp}' (values in [{nz.min()}, {nz.max()}]); expected all 0; "
                            "fix: quantize symmetrically (zero point 0)")


@rule("qdq-scale-dtype")
def _scale_dtype(ix: GraphIndex, opts: LintOptions) -> Iterator[Violation]:
    """Scale dtype equals the dtype of the float tensor quantized / produced (fp16 graph -> fp16 scale)."""
    for n in ix.nodes(*QDQ_OPS):
        scale_t = ix.elem_type(node_input(n, 1))
        if scale_t is None:
            continue
        float_t = None
        if n.op_type == "QuantizeLinear":
            float_t = ix.elem_type(n.input[0])
        else:
            q = ix.source(n.input[0])
            if q is not None and q.op_type == "QuantizeLinear":
                float_t = ix.elem_type(q.input[0])
            else:  # a weight DQ: the other float inputs of the node it feeds
                for user, slot in ix.users(n.output[0]):
                    others = [ix.elem_type(i) for k, i in enumerate(user.input) if k != slot and i]
                    float_t = next((t for t in others if t in FLOAT_TYPES), None)
                    if float_t is not None:
                        break
        if float_t in FLOAT_TYPES and scale_t != float_t:
            note = " (QuantizeLinear/DequantizeLinear take fp16 scales from opset 19)" if (ix.opset or 0) < 19 else ""
            yield Violation("qdq-scale-dtype", ix.label(n),
                            f"found {type_name(scale_t)} scale '{node_input(n, 1)}' on a {type_name(float_t)} tensor; "
                            f"expected a {type_name(float_t)} scale (strongly typed TensorRT); "
                            f"fix: store the scale as {type_name(float_t)}{note}")


@rule("activation-per-tensor")
def _per_tensor(ix: GraphIndex, opts: LintOptions) -> Iterator[Violation]:
    """Activations per-tensor; weights per-tensor, per-channel on the output axis, or blocked (MatMul/Gemm)."""
    for n in ix.nodes(*QDQ_OPS):
        scale = node_input(n, 1)
        size = ix.const_size(scale)
        shape = ix.shape(scale)
        if _is_weight_q(ix, n):
            continue  # a float weight: reported by int8-weights
        if not _is_weight_dq(ix, n):
            if not _is_activation(ix, n):
                continue
            per_tensor = size == 1 if size is not None else (shape is None or all(d == 1 for d in shape))
            if not per_tensor:
                found = f"{size} scales" if size is not None else f"scale of shape {shape}"
                yield Violation("activation-per-tensor", ix.label(n),
                                f"found {found} on an activation (axis {node_attr(n, 'axis', 1)}); expected one scalar "
                                "scale; fix: use a per-tensor scale (per-channel factors go into a Mul before Q)")
            continue
        if size is None or size == 1:
            continue
        weight = ix.constant(n.input[0])
        rank = len(weight.dims)
        users = ix.users(n.output[0], CASTS)
        block = node_attr(n, "block_size", 0)
        if block:
            bad = [u for u, _ in users if u.op_type not in ("MatMul", "Gemm")]
            if bad or len(ix.constant(scale).dims) != rank:
                yield Violation("activation-per-tensor", ix.label(n),
                                f"found blocked weight quantization (block_size={block}) feeding "
                                f"{', '.join(sorted({u.op_type for u, _ in users}))} with scale shape "
                                f"{tuple(ix.constant(scale).dims)}; expected blocks only on MatMul/Gemm weights with a "
                                "scale of the weight's rank; fix: quantize this weight per channel")
            continue
        axis = node_attr(n, "axis", 1)
        axis = axis + rank if axis < 0 else axis
        for user, slot in users:
            expected = _expected_weight_axis(ix, user, slot, rank)
            if expected is None:
                continue
            if axis != expected or (axis < rank and weight.dims[axis] != size):
                yield Violation("activation-per-tensor", ix.label(n),
                                f"found {size} weight scales on axis {axis} of a {tuple(weight.dims)} weight feeding "
                                f"{user.op_type} '{ix.label(user)}'; expected per-channel scales on axis {expected} "
                                "(output channels); fix: quantize per output channel and set axis accordingly")
                break


@rule("int8-weights")
def _int8_weights(ix: GraphIndex, opts: LintOptions) -> Iterator[Violation]:
    """Quantized weights are int8/int4 initializers behind DQ, never Q(float weight) at run time."""
    for n in ix.nodes("QuantizeLinear"):
        if _is_weight_q(ix, n):
            w = ix.resolve(n.input[0])
            yield Violation("int8-weights", ix.label(n),
                            f"found QuantizeLinear on the {type_name(ix.elem_type(w))} initializer '{w}'; expected an "
                            "int8 initializer feeding DequantizeLinear; fix: fold it into an int8 initializer "
                            "(dqdeploy.exporters.simplify.fold_weight_quantize)")
    for node in ix.nodes(*COMPUTE_OPS):
        slots = (0, 1) if node.op_type == "MatMul" else (1,)
        for slot in slots:
            dq = ix.source(node_input(node, slot), CASTS)
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            src = ix.source(dq.input[0])
            if src is not None and src.op_type == "QuantizeLinear":
                continue  # Q(float weight) is reported above; Q(activation) is an activation
            if node.op_type == "MatMul" and not ix.is_constant_derived(dq.input[0]):
                continue  # a MatMul input computed at run time is an activation, not a weight
            t = ix.constant(dq.input[0])
            if t is None or t.data_type not in (INT8, INT4):
                found = f"{type_name(t.data_type)} initializer" if t is not None else "a tensor computed at run time"
                yield Violation("int8-weights", ix.label(node),
                                f"weight input {slot} comes from DequantizeLinear '{ix.label(dq)}' of {found} "
                                f"'{dq.input[0]}'; expected an int8 (or int4) initializer; "
                                "fix: store the quantized weight as an int8 initializer with zero point 0")


@rule("no-int4-conv")
def _no_int4_conv(ix: GraphIndex, opts: LintOptions) -> Iterator[Violation]:
    """INT4 dequantization feeds MatMul/Gemm only (TensorRT INT4 is weight-only for linear layers)."""
    for n in ix.nodes("DequantizeLinear"):
        dtype = ix.elem_type(n.input[0])
        if dtype not in INT4_TYPES:
            continue
        for user, _ in ix.users(n.output[0], CASTS):
            if user.op_type in ("Conv", "ConvTranspose"):
                yield Violation("no-int4-conv", ix.label(n),
                                f"found {type_name(dtype)} weights dequantized into {user.op_type} '{ix.label(user)}'; "
                                "expected INT4 only on MatMul/Gemm weights; fix: store this conv's 4-bit weights "
                                "as an int8 initializer (lossless) and run it on INT8 kernels")


def _attention_inputs(ix: GraphIndex) -> Iterator[tuple[object, list[object | None]]]:
    """Each attention batched matmul (both inputs activations) with the DequantizeLinear feeding each input, if any."""
    for node in ix.nodes("MatMul"):
        a, b = node_input(node, 0), node_input(node, 1)
        if not (ix.is_constant_derived(a) or ix.is_constant_derived(b)):
            yield node, [s if (s := ix.source(n, DATA_MOVES)) is not None and s.op_type == "DequantizeLinear"
                         else None for n in (a, b)]


@rule("attention-unquantized")
def _attention(ix: GraphIndex, opts: LintOptions) -> Iterator[Violation]:
    """Attention batched matmuls carry no DQ unless allowed (INT8 attention: ``quantize --attention int8``)."""
    for node, dqs in ([] if opts.allow_attention_qdq else _attention_inputs(ix)):
        for slot, src in [(k, d) for k, d in enumerate(dqs) if d is not None]:
            yield Violation("attention-unquantized", ix.label(node),
                            f"found DequantizeLinear '{ix.label(src)}' on input {slot} of an attention batched "
                            "matmul (both inputs are activations); expected no Q/DQ there: it disables "
                            "TensorRT's fused FP16 attention kernel; fix: remove the Q/DQ pair, or pass "
                            "allow_attention_qdq=True if INT8 attention is intended")


@rule("attention-partial")
def _attention_partial(ix: GraphIndex, opts: LintOptions) -> Iterator[Violation]:
    """With INT8 attention, a DQ on one input of an attention matmul only (TensorRT's INT8 MHA needs both)."""
    for node, dqs in (_attention_inputs(ix) if opts.allow_attention_qdq else []):
        if (dqs[0] is None) != (dqs[1] is None):
            yield Violation("attention-partial", ix.label(node),
                            f"found DequantizeLinear on input {0 if dqs[0] is not None else 1} of an attention "
                            "batched matmul only; expected Q/DQ on both inputs (q and k^T, softmax output and v) "
                            "or on neither; fix: quantize both inputs (quantize --attention int8), or remove it")


@rule("qdq-pairing")
def _pairing(ix: GraphIndex, opts: LintOptions) -> Iterator[Violation]:
    """Every activation QuantizeLinear is followed only by DequantizeLinear with the same scale."""
    for n in ix.nodes("QuantizeLinear"):
        if not _is_activation(ix, n):
            continue
        out = n.output[0]
        users = ix.users(out)
        if not users or out in ix.outputs:
            where = "is a graph output" if out in ix.outputs else "has no consumer"
            yield Violation("qdq-pairing", ix.label(n),
                            f"found a dangling QuantizeLinear: its output '{out}' {where}; expected a "
                            "DequantizeLinear with the same scale after it; fix: add the DQ or remove the Q")
            continue
        for user, slot in users:
            if user.op_type != "DequantizeLinear" or slot != 0:
                yield Violation("qdq-pairing", ix.label(n),
                                f"found QuantizeLinear output feeding {user.op_type} '{ix.label(user)}'; expected "
                                "only DequantizeLinear consumers; fix: insert the matching DequantizeLinear")
                continue
            same_scale = _same_constant(ix, node_input(n, 1), node_input(user, 1))
            same_zp = _same_constant(ix, node_input(n, 2), node_input(user, 2))
            if same_scale is False or same_zp is False:
                what = "scale" if same_scale is False else "zero point"
                yield Violation("qdq-pairing", ix.label(n),
                                f"found DequantizeLinear '{ix.label(user)}' with a different {what} than its "
                                f"QuantizeLinear; expected the same {what} on both; fix: share one constant")


# ---------------------------------------------------------------------------------------------
# entry points
# ---------------------------------------------------------------------------------------------
def lint_trt(model, *, allow_attention_qdq: bool = False) -> list[Violation]:
    """All TensorRT rule violations of ``model`` (an onnx.ModelProto), in rule order."""
    ix = GraphIndex(model)
    opts = LintOptions(allow_attention_qdq=allow_attention_qdq)
    return [v for fn in RULES.values() for v in fn(ix, opts)]


def check_trt(model, *, allow_attention_qdq: bool = False) -> None:
    """Raise :class:`LintError` listing every TensorRT rule violation of ``model``."""
    violations = lint_trt(model, allow_attention_qdq=allow_attention_qdq)
    if violations:
        rules = sorted({v.rule for v in violations})
        lines = "\n".join(f"  {v}" for v in violations)
        raise LintError(
            f"the graph breaks {len(violations)} TensorRT rule(s) ({', '.join(rules)}):\n{lines}",
            hint="export with --target onnx (the TensorRT layout), or fix each node as its message says",
        )


def lint_path(onnx_path: str | Path, *, allow_attention_qdq: bool = False) -> list[Violation]:
    """Load an ONNX file (with its external data) and lint it for TensorRT."""
    onnx = require("onnx", "ort", "TensorRT lint")
    path = Path(onnx_path)
    if not path.is_file():
        raise LintError(f"no ONNX file at {path}", hint="pass the path of an exported model.onnx")
    try:
        model = onnx.load(str(path), load_external_data=True)
    except Exception as exc:
        raise LintError(f"cannot load {path}: {exc}", hint="check the file and its external data next to it") from exc
    return lint_trt(model, allow_attention_qdq=allow_attention_qdq)
