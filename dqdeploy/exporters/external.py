"""ONNX graphs whose large initializers stay on disk: the export's memory bound.

The float graph is written by the exporter with its weights as external data in a scratch folder
and read back *without* the large tensors (:func:`load_graph`): the Q/DQ surgery, the simplifier
(on a skeleton, :mod:`.simplify`) and the rule checks work on the graph structure and the small
constants, and :func:`write_graph` streams every tensor -- those still in the scratch file and the
integer weights the surgery made in memory -- into the final ``model.onnx_data`` (or, under
``threshold`` bytes in all, one self-contained ``model.onnx``). No stage holds a second copy of the
weights.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from ..core.errors import require

log = logging.getLogger(__name__)

EXTERNAL = 1  # onnx.TensorProto.EXTERNAL
LOAD_BELOW = 1 << 20  # bytes: tensors smaller than this are read into memory (biases, norms, tables)
ALIGN = 4096  # offsets of large tensors in the data file: page-aligned, so runtimes can map them


def _info(tensor: Any) -> dict[str, str]:
    return {e.key: e.value for e in tensor.external_data}


def is_external(tensor: Any) -> bool:
    """True when ``tensor``'s data lives in an external file (not loaded)."""
    return tensor.data_location == EXTERNAL


def tensor_bytes(tensor: Any) -> int:
    """Bytes of ``tensor``'s data, in memory or external."""
    if is_external(tensor):
        return int(_info(tensor).get("length", 0))
    if tensor.raw_data:
        return len(tensor.raw_data)
    return int(np.prod(tensor.dims, dtype=np.int64)) * 4


def graph_bytes(model: Any) -> int:
    """Bytes of initializer data of ``model``, in memory and external."""
    return sum(tensor_bytes(t) for t in model.graph.initializer)


def external_bytes(model: Any) -> int:
    """Bytes of ``model``'s initializer data that stay in external files."""
    return sum(tensor_bytes(t) for t in model.graph.initializer if is_external(t))


def _read(tensor: Any, base_dir: Path) -> bytes:
    info = _info(tensor)
    with open(base_dir / info["location"], "rb") as f:
        f.seek(int(info.get("offset", 0)))
        return f.read(int(info["length"])) if "length" in info else f.read()


def load_into_memory(tensor: Any, base_dir: Path) -> None:
    """Read ``tensor``'s external data into ``raw_data`` (it is then an ordinary in-memory tensor)."""
    tensor.raw_data = _read(tensor, base_dir)
    tensor.data_location = 0
    del tensor.external_data[:]


def load_graph(path: str | Path, *, load_below: int | None = LOAD_BELOW) -> Any:
    """``path`` with its external tensors under ``load_below`` bytes read into memory (all when None);
    larger ones keep referring to their file next to ``path``."""
    onnx = require("onnx", "ort", "ONNX export")
    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    for t in model.graph.initializer:
        if is_external(t) and (load_below is None or tensor_bytes(t) < load_below):
            load_into_memory(t, path.parent)
    return model


def _copy_range(src: Path, offset: int, length: int, dst: Any) -> None:
    with open(src, "rb") as f:
        f.seek(offset)
        remaining = length
        while remaining:
            chunk = f.read(min(remaining, 64 << 20))
            if not chunk:
                raise OSError(f"{src} ends {remaining} bytes early")
            dst.write(chunk)
            remaining -= len(chunk)


def _externalize(tensor: Any, location: str, offset: int, length: int) -> None:
    from onnx import StringStringEntryProto

    tensor.ClearField("raw_data")
    tensor.data_location = EXTERNAL
    del tensor.external_data[:]
    tensor.external_data.extend([StringStringEntryProto(key="location", value=location),
                                 StringStringEntryProto(key="offset", value=str(offset)),
                                 StringStringEntryProto(key="length", value=str(length))])


def write_graph(model: Any, path: str | Path, *, base_dir: str | Path | None, data_file: str,
                threshold: int, size_threshold: int = 1024) -> None:
    """Write ``model`` to ``path``: one file when its data is under ``threshold`` bytes, else the
    graph plus ``data_file`` (next to it) holding every tensor of ``size_threshold`` bytes or more.

    Tensors still external are read from ``base_dir`` (where the graph was loaded from) in chunks;
    in-memory tensors are moved to the data file one at a time, so ``model`` keeps only references.
    ``model`` is modified (its tensors point at ``data_file`` afterwards)."""
    onnx = require("onnx", "ort", "ONNX export")
    path = Path(path)
    src = None if base_dir is None else Path(base_dir)
    if graph_bytes(model) < threshold:
        for t in model.graph.initializer:
            if is_external(t):
                assert src is not None, "external tensors need the folder they were loaded from"
                load_into_memory(t, src)
        onnx.save_model(model, str(path))
        return
    with open(path.parent / data_file, "wb") as out:
        for t in model.graph.initializer:
            size = tensor_bytes(t)
            if size < size_threshold and not is_external(t):
                continue
            offset = -(-out.tell() // ALIGN) * ALIGN if size >= ALIGN else out.tell()
            out.write(b"\0" * (offset - out.tell()))
            if is_external(t):
                assert src is not None, "external tensors need the folder they were loaded from"
                info = _info(t)
                _copy_range(src / info["location"], int(info.get("offset", 0)), size, out)
            else:
                if not t.raw_data:  # typed fields (float_data, ...): one tensor's worth of conversion
                    from onnx import numpy_helper

                    t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t), t.name))
                out.write(t.raw_data)
            _externalize(t, data_file, offset, size)
    onnx.save_model(model, str(path))
    log.info("wrote %s + %s (%.2f GB)", path.name, data_file, (path.parent / data_file).stat().st_size / 1e9)

