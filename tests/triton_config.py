"""Reading Triton's ``config.pbtxt`` (protobuf text format, the subset model configs use) in tests,
and checking a model config's I/O against an ONNX graph's own inputs and outputs.

A small parser rather than ``tritonclient``/``protobuf`` descriptors: neither ships Triton's
``ModelConfig`` message without the client package.
"""

from __future__ import annotations

import re
from typing import Any

TOKEN = re.compile(r'\s*(?:#[^\n]*|("(?:[^"\\]|\\.)*")|([\[\]{}:,])|([A-Za-z_][\w.]*)|(-?\d+(?:\.\d+)?))')
ONNX_TO_TRITON = {1: "TYPE_FP32", 10: "TYPE_FP16", 16: "TYPE_BF16", 11: "TYPE_FP64", 7: "TYPE_INT64",
                  6: "TYPE_INT32", 3: "TYPE_INT8", 2: "TYPE_UINT8", 9: "TYPE_BOOL"}  # onnx.TensorProto values


def _tokens(text: str) -> list[str]:
    out, pos = [], 0
    text = text.rstrip()
    while pos < len(text):
        m = TOKEN.match(text, pos)
        if m is None or m.end() == pos:
            raise ValueError(f"config.pbtxt: cannot read {text[pos:pos + 30]!r}")
        pos = m.end()
        if m.group(0).strip() and not m.group(0).strip().startswith("#"):
            out.append(m.group(0).strip())
    return out


def _scalar(tok: str) -> Any:
    if tok.startswith('"'):
        return tok[1:-1].encode().decode("unicode_escape")
    if re.fullmatch(r"-?\d+", tok):
        return int(tok)
    if re.fullmatch(r"-?\d+\.\d+", tok):
        return float(tok)
    return tok  # an enum value such as TYPE_FP16 or KIND_GPU


def _value(toks: list[str], i: int) -> tuple[Any, int]:
    if toks[i] == "{":
        return _message(toks, i + 1, "}")
    if toks[i] == "[":
        items, i = [], i + 1
        while toks[i] != "]":
            item, i = _value(toks, i)
            items.append(item)
            if toks[i] == ",":
                i += 1
        return items, i + 1
    return _scalar(toks[i]), i + 1


def _message(toks: list[str], i: int, end: str | None) -> tuple[dict[str, Any], int]:
    fields: dict[str, Any] = {}
    while i < len(toks) and toks[i] != end:
        name, i = toks[i], i + 1
        if toks[i] == ":":
            i += 1
        value, i = _value(toks, i)
        if name in fields:  # a repeated field written once per element
            prev = fields[name]
            fields[name] = ((prev if isinstance(prev, list) else [prev])
                            + (value if isinstance(value, list) else [value]))
        else:
            fields[name] = value
    return fields, i + 1


def parse_pbtxt(text: str) -> dict[str, Any]:
    """The fields of a protobuf text-format message as dicts, lists and scalars (enums as names)."""
    fields, _ = _message(_tokens(text), 0, None)
    return fields


def graph_io(model: Any) -> dict[str, list[dict[str, Any]]]:
    """``{"input": [...], "output": [...]}`` of an ``onnx.ModelProto`` (initializers excluded) in the
    shape of a Triton config's entries: name, ``TYPE_*`` data type, dims (``-1`` where symbolic)."""
    inits = {t.name for t in model.graph.initializer}

    def entry(v: Any) -> dict[str, Any]:
        t = v.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim]
        return {"name": v.name, "data_type": ONNX_TO_TRITON[t.elem_type], "dims": dims}

    return {"input": [entry(v) for v in model.graph.input if v.name not in inits],
            "output": [entry(v) for v in model.graph.output]}


def config_io(config: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """The ``input``/``output`` entries of a parsed config (one entry or a list) as :func:`graph_io` gives them."""
    def entries(key: str) -> list[dict[str, Any]]:
        value = config.get(key, [])
        return [{"name": e["name"], "data_type": e["data_type"], "dims": list(e["dims"])}
                for e in (value if isinstance(value, list) else [value])]

    return {"input": entries("input"), "output": entries("output")}
