"""Read-only index over an ONNX model's main graph: producers, consumers, constants, dtypes, shapes.

Shared by the TensorRT rule check (:mod:`.lint`), the Q/DQ-preserving simplifier (:mod:`.simplify`)
and the Q/DQ surgery (:mod:`.qdq`). Importing it does not need ``onnx``; using it on a model does.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

# onnx.TensorProto data types (numbers, so that importing this module does not need onnx)
FLOAT, UINT8, INT8, FLOAT16, DOUBLE, BFLOAT16, UINT4, INT4 = 1, 2, 3, 10, 11, 16, 21, 22
FLOAT_TYPES = frozenset({FLOAT, FLOAT16, DOUBLE, BFLOAT16})
INT4_TYPES = frozenset({INT4, UINT4})
TYPE_NAMES = {1: "float32", 2: "uint8", 3: "int8", 4: "uint16", 5: "int16", 6: "int32", 7: "int64",
              10: "float16", 11: "float64", 16: "bfloat16", 17: "float8e4m3fn", 21: "uint4", 22: "int4"}


QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
COMPUTE_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")
IDENTITY = ("Identity",)
CASTS = ("Identity", "Cast")
# ops that only move data: TensorRT propagates Q/DQ across them
DATA_MOVES = ("Identity", "Cast", "Transpose", "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Expand")
SMALL_INITIALIZER = 1024  # elements: larger ones become graph inputs in the shape-inference skeleton


def type_name(dtype: int | None) -> str:
    """Readable name of an onnx.TensorProto data type."""
    return "unknown" if dtype is None else TYPE_NAMES.get(dtype, f"dtype {dtype}")



def node_attr(node, name: str, default=None):
    """An attribute of ``node`` (int, float or bytes), or ``default``."""
    for a in node.attribute:
        if a.name == name:
            return a.i if a.type == 2 else a.f if a.type == 1 else a.s
    return default



def node_input(node, k: int) -> str:
    """Name of input ``k`` of ``node`` (empty when absent)."""
    return node.input[k] if len(node.input) > k else ""



class GraphIndex:
    """Read-only lookups over a model's main graph: producers, consumers, constants, dtypes."""

    def __init__(self, model) -> None:
        self.model = model
        self.graph = model.graph
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
        self.inits = {i.name: i for i in self.graph.initializer}
        self.producer = {o: n for n in self.graph.node for o in n.output if o}
        self.consumers: dict[str, list] = {}
        for n in self.graph.node:
            for i in n.input:
                if i:
                    self.consumers.setdefault(i, []).append(n)
        self.outputs = {o.name for o in self.graph.output}
        self._types: dict[str, int] | None = None
        self._shapes: dict[str, tuple | None] = {}
        self._const_derived: dict[str, bool] | None = None
        self._names = {id(n): n.name or f"{n.op_type}#{k}({n.output[0] if n.output else ''})"
                       for k, n in enumerate(self.graph.node)}

    # -- names and edges ------------------------------------------------------------------------
    def label(self, node) -> str:
        """A printable node name (the node's own, or op#index(output))."""
        return self._names[id(node)]

    def nodes(self, *ops: str) -> Iterator:
        """The main graph's nodes with one of the given op types."""
        return (n for n in self.graph.node if n.op_type in ops)

    def resolve(self, name: str, through: tuple[str, ...] = IDENTITY) -> str:
        """Follow ``name`` upwards through nodes of the ``through`` op types."""
        seen = 0
        while name in self.producer and self.producer[name].op_type in through and seen < 10_000:
            name = self.producer[name].input[0]
            seen += 1
        return name

    def source(self, name: str, through: tuple[str, ...] = IDENTITY):
        """The node producing ``name`` after looking through ``through`` ops (None: input/initializer)."""
        return self.producer.get(self.resolve(name, through))

    def users(self, name: str, through: tuple[str, ...] = IDENTITY) -> list[tuple[Any, int]]:
        """(node, input index) pairs consuming ``name``, looking down through ``through`` ops."""
        found: list[tuple[Any, int]] = []
        todo, seen = [name], set()
        while todo:
            t = todo.pop()
            if t in seen:
                continue
            seen.add(t)
            for n in self.consumers.get(t, []):
                if n.op_type in through:
                    todo.extend(o for o in n.output if o)
                else:
                    found.extend((n, k) for k, i in enumerate(n.input) if i == t)
        return found

    # -- constants -------------------------------------------------------------------------------
    def constant(self, name: str):
        """The TensorProto behind ``name`` if it is an initializer or Constant output (via Identity)."""
        name = self.resolve(name)
        if name in self.inits:
            return self.inits[name]
        node = self.producer.get(name)
        if node is None or node.op_type != "Constant":
            return None
        for a in node.attribute:
            if a.name == "value":
                return a.t
            if a.name in ("value_float", "value_int", "value_floats", "value_ints"):
                from onnx import helper

                value = getattr(a, {"value_float": "f", "value_int": "i", "value_floats": "floats",
                                    "value_ints": "ints"}[a.name])
                dtype = FLOAT if "float" in a.name else 7
                dims = [] if a.name in ("value_float", "value_int") else [len(value)]
                vals = [value] if not dims else list(value)
                return helper.make_tensor(name, dtype, dims, vals)
        return None

    def const_array(self, name: str) -> np.ndarray | None:
        """Values of a constant ``name`` (None if not constant or its external data is not loaded)."""
        t = self.constant(name)
        if t is None:
            return None
        from onnx import numpy_helper

        try:
            return numpy_helper.to_array(t)
        except Exception:  # external data not loaded, exotic dtype: values unknown
            return None

    def const_size(self, name: str) -> int | None:
        t = self.constant(name)
        return None if t is None else int(np.prod(t.dims, dtype=np.int64))

    def is_constant_derived(self, name: str) -> bool:
        """True if ``name`` is computed from initializers/Constants only (a weight, not an activation)."""
        if self._const_derived is None:
            graph_inputs = {i.name for i in self.graph.input} - set(self.inits)
            known: dict[str, bool] = {n: True for n in self.inits}
            known.update({n: False for n in graph_inputs})
            for node in self.graph.node:  # ONNX graphs are topologically sorted
                if node.op_type in ("Constant",):
                    value = True
                elif node.op_type in ("RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
                                      "Multinomial"):
                    value = False
                else:
                    value = all(known.get(i, False) for i in node.input if i)
                for o in node.output:
                    if o:
                        known[o] = value
            self._const_derived = known
        return self._const_derived.get(name, False)

    # -- types -----------------------------------------------------------------------------------
    def elem_type(self, name: str) -> int | None:
        """Element type of ``name``: declared, constant or inferred; None when unknown."""
        if not name:
            return None
        t = self.constant(name)
        if t is not None:
            return t.data_type
        return self._inferred()[0].get(name)

    def shape(self, name: str) -> tuple | None:
        """Static shape of ``name`` (dims may be None), or None when unknown."""
        t = self.constant(name)
        if t is not None:
            return tuple(t.dims)
        return self._inferred()[1].get(name)

    def _inferred(self) -> tuple[dict[str, int], dict[str, tuple | None]]:
        """Declared and inferred element types and shapes (computed once)."""
        if self._types is None:
            self._infer()
        return self._types or {}, self._shapes

    def _infer(self) -> None:
        types: dict[str, int] = {}
        shapes: dict[str, tuple | None] = {}

        def take(values) -> None:
            for vi in values:
                tt = vi.type.tensor_type
                if vi.type.HasField("tensor_type") and tt.elem_type:
                    types[vi.name] = tt.elem_type
                    if tt.HasField("shape"):
                        shapes[vi.name] = tuple(d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim)

        take(self.graph.input)
        take(self.graph.output)
        take(self.graph.value_info)
        try:
            from onnx import shape_inference

            inferred = shape_inference.infer_shapes(skeleton(self.model), check_type=False, strict_mode=False)
            take(inferred.graph.value_info)
            take(inferred.graph.output)
        except Exception as exc:  # a broken graph still gets the declared types
            log.info("shape inference failed (%s); using declared types only", exc)
        self._types, self._shapes = types, shapes


def delete_where(field, dead) -> int:
    """Delete the items of a protobuf repeated field (nodes, initializers) for which ``dead(item)`` holds,
    in place; how many. Re-adding the survivors instead (``del field[:]``, ``extend``) copies them: for
    initializers, every weight of the graph."""
    doomed = [i for i, item in enumerate(field) if dead(item)]
    for i in reversed(doomed):
        del field[i]
    return len(doomed)


def skeleton(model):
    """A copy of ``model`` without large initializer data (they become graph inputs): cheap to serialize."""
    from onnx import helper

    g = model.graph
    small, large = [], []
    for t in g.initializer:
        (large if np.prod(t.dims, dtype=np.int64) > SMALL_INITIALIZER or t.data_location == 1 else small).append(t)
    declared = {i.name for i in g.input}
    inputs = list(g.input) + [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                              for t in large if t.name not in declared]
    graph = helper.make_graph(list(g.node), g.name or "graph", inputs, list(g.output), small,
                              value_info=list(g.value_info))
    skeleton = helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=max(model.ir_version, 4))
    skeleton.functions.extend(model.functions)
    return skeleton

