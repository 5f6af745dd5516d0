"""Writing an export folder: the checked graph (external data over 2 GB) and its spec, atomically."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..atomic import atomic_dir
from ..errors import ExportError, require
from ..integrity import file_record
from .onnx import EXTERNAL_DATA_THRESHOLD
from .spec import ONNX_DATA_FILE, SPEC_FILE, ExportSpec, TensorSpec


def tensor_specs(model: Any) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Graph inputs (initializers excluded) and outputs of an onnx.ModelProto as TensorSpecs."""
    from onnx import helper

    def spec(v) -> TensorSpec:
        t = v.type.tensor_type
        dims = [d.dim_param or d.dim_value for d in t.shape.dim]
        return TensorSpec(v.name, dims, helper.tensor_dtype_to_np_dtype(t.elem_type).name)

    inits = {i.name for i in model.graph.initializer}
    return [spec(v) for v in model.graph.input if v.name not in inits], [spec(v) for v in model.graph.output]


def versions() -> dict[str, str]:
    """Versions of the packages that made the graph (recorded in the spec)."""
    import onnx
    import onnxruntime

    return {"dqdeploy": __version__, "torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}


def _fits_proto(model: Any) -> bool:
    try:
        model.ByteSize()
        return True
    except Exception:  # protobuf refuses to size messages over 2 GB
        return False


def check_graph(graph: Any) -> None:
    """onnx.checker on graphs small enough to serialize in memory."""
    import onnx

    try:
        if _fits_proto(graph) and graph.ByteSize() < EXTERNAL_DATA_THRESHOLD:
            onnx.checker.check_model(graph, full_check=False)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"the exported graph fails onnx.checker: {str(exc)[:500]}") from None


def save_export(
    model: Any, out_dir: str | Path, spec: ExportSpec, *, overwrite: bool = False, sources: Iterable[str | Path] = ()
) -> Path:
    """Write ``unet/model.onnx`` or ``transformer/model.onnx`` (external ``model.onnx_data`` over 2 GB) and the spec, atomically;
    the spec records the sha256 and size of every file. ``sources`` (the folder exported from) are
    never replaced."""
    onnx = require("onnx", "ort", "ONNX export")
    with atomic_dir(out_dir, overwrite=overwrite, kind="export", sources=sources) as tmp:
        path = tmp / spec.onnx_file
        path.parent.mkdir(parents=True)
        big = model.ByteSize() > EXTERNAL_DATA_THRESHOLD if _fits_proto(model) else True
        onnx.save_model(model, str(path), save_as_external_data=big, all_tensors_to_one_file=True,
                        location=ONNX_DATA_FILE, size_threshold=1024)
        files = {p.relative_to(tmp).as_posix(): file_record(p) for p in sorted(path.parent.iterdir()) if p.is_file()}
        (tmp / SPEC_FILE).write_text(dataclasses.replace(spec, files=files).to_json())
    return Path(out_dir)
