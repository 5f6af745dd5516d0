"""Writing an export folder: the checked graph (external data over 2 GB) and its spec, atomically."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from ..core.errors import ExportError
from ..core.version import __version__
from ..io.atomic import atomic_dir
from ..io.integrity import file_record
from ..runtimes.spec import LORA_PREFIX, ONNX_DATA_FILE, SPEC_FILE, ExportSpec, TensorSpec
from .external import write_graph
from .graph_index import skeleton
from .onnx import EXTERNAL_DATA_THRESHOLD


def tensor_specs(model: Any) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Graph inputs (initializers and LoRA slots excluded) and outputs of an onnx.ModelProto as TensorSpecs."""
    from onnx import helper

    def spec(v) -> TensorSpec:
        t = v.type.tensor_type
        dims = [d.dim_param or d.dim_value for d in t.shape.dim]
        return TensorSpec(v.name, dims, helper.tensor_dtype_to_np_dtype(t.elem_type).name)

    inits = {i.name for i in model.graph.initializer}
    return ([spec(v) for v in model.graph.input if v.name not in inits and not v.name.startswith(LORA_PREFIX)],
            [spec(v) for v in model.graph.output])


def versions() -> dict[str, str]:
    """Versions of the packages that made the graph (recorded in the spec)."""
    import onnx
    import onnxruntime

    return {"dqdeploy": __version__, "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__}


def check_graph(graph: Any) -> None:
    """onnx.checker on the graph's structure: large initializers, and those still in external data
    (whose file the checker would look for in the working directory), are checked as typed inputs."""
    import onnx

    try:
        onnx.checker.check_model(skeleton(graph), full_check=False)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"the exported graph fails onnx.checker: {str(exc)[:500]}") from None


def write_export(model: Any, folder: Path, spec: ExportSpec, *, base_dir: str | Path | None = None,
                 external_threshold: int | None = None, extra_files: Iterable[str] = ()) -> None:
    """Write ``unet/model.onnx`` or ``transformer/model.onnx`` (external ``model.onnx_data`` when the
    weights reach ``external_threshold`` bytes, default :data:`EXTERNAL_DATA_THRESHOLD`) and the spec
    into ``folder`` (an open atomic folder); the spec records the sha256 and size of every file of the graph's
    folder and of ``extra_files`` (paths in ``folder``: a pipeline's other components).
    Tensors of ``model`` still in external data are streamed from ``base_dir``
    (:func:`~.external.write_graph`)."""
    path = folder / spec.onnx_file
    path.parent.mkdir(parents=True, exist_ok=True)
    threshold = EXTERNAL_DATA_THRESHOLD if external_threshold is None else external_threshold
    write_graph(model, path, base_dir=base_dir, data_file=ONNX_DATA_FILE, threshold=threshold)
    files = {p.relative_to(folder).as_posix(): file_record(p) for p in sorted(path.parent.iterdir()) if p.is_file()}
    files |= {name: file_record(folder / name) for name in extra_files}
    (folder / SPEC_FILE).write_text(dataclasses.replace(spec, files=files).to_json())


def save_export(
    model: Any, out_dir: str | Path, spec: ExportSpec, *, overwrite: bool = False, sources: Iterable[str | Path] = ()
) -> Path:
    """:func:`write_export` of an in-memory ``model`` into ``out_dir``, atomically. ``sources`` (the
    folder exported from) are never replaced."""
    with atomic_dir(out_dir, overwrite=overwrite, kind="export", sources=sources) as tmp:
        write_export(model, tmp, spec)
    return Path(out_dir)
