"""Triton model repositories of export folders: ``config.pbtxt`` text (pure) and the folder.

A folder holding a TensorRT engine (``--target trt``) becomes a ``tensorrt_plan`` model (``1/model.plan``;
I/O from ``engine.json``, i.e. the built network). A folder without one (``--target onnx``/``ort``/``float``,
or any export made where TensorRT is missing) becomes an ``onnxruntime_onnx`` model: ``1/model.onnx`` plus
its external weights file, if any, with the I/O of the graph as the export spec records it.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..core.errors import ArtifactError, ExportError
from ..io.atomic import atomic_dir
from ..runtimes.engine_spec import read_engine_info
from ..runtimes.spec import SPEC_FILE, engine_files, model_folder, read_spec, slot_input_shapes

PLATFORMS = {"tensorrt_plan": ("model.plan", "KIND_GPU"), "onnxruntime_onnx": ("model.onnx", "KIND_AUTO")}
TRITON_TYPES = {
    "float32": "TYPE_FP32", "float16": "TYPE_FP16", "bfloat16": "TYPE_BF16", "float64": "TYPE_FP64",
    "int64": "TYPE_INT64", "int32": "TYPE_INT32", "int8": "TYPE_INT8", "uint8": "TYPE_UINT8", "bool": "TYPE_BOOL",
}


def triton_config(info: Mapping[str, Any], model_name: str | None = None, *, instances: int = 1,
                  platform: str = "tensorrt_plan") -> str:
    """``config.pbtxt`` text of a Triton model whose I/O ``info["inputs"]``/``info["outputs"]`` lists
    (``{name, shape, dtype}``; a dim that is not a positive int is dynamic, ``-1``): by default a
    ``tensorrt_plan`` (``info``: ``engine.json``) on GPUs, or an ``onnxruntime_onnx`` model, placed by
    Triton (``KIND_AUTO``: GPUs where it has them). ``model_name`` by default: the graph's folder for
    ``info["model_class"]`` (``unet`` or ``transformer``, as in optimum's ONNX layout).

    ``max_batch_size: 0``: the batch is an explicit (dynamic, ``-1``) dim of every tensor, as in
    the graph; Triton checks request shapes against the engine's optimization profile.
    """
    def tensor(t: Mapping[str, Any]) -> str:
        dtype = TRITON_TYPES.get(str(t["dtype"]))
        if dtype is None:
            raise ExportError(f"engine tensor {t['name']} has dtype {t['dtype']!r}, which Triton cannot serve "
                              f"(expected one of {', '.join(TRITON_TYPES)})")
        dims = ", ".join(str(d if isinstance(d, int) and d > 0 else -1) for d in t["shape"])
        return f'  {{\n    name: "{t["name"]}"\n    data_type: {dtype}\n    dims: [ {dims} ]\n  }}'

    model_name = model_folder(str(info.get("model_class"))) if model_name is None else model_name
    if not model_name or "/" in model_name or model_name.startswith("."):
        raise ExportError(f"invalid Triton model name {model_name!r}", hint="use a plain folder name such as 'unet'")
    if instances < 1:
        raise ExportError(f"instances must be >= 1, found {instances}")
    if platform not in PLATFORMS:
        raise ExportError(f"unknown Triton platform {platform!r} (expected one of {', '.join(PLATFORMS)})")
    return "\n".join([
        f'name: "{model_name}"',
        f'platform: "{platform}"',
        "max_batch_size: 0",
        "input [\n" + ",\n".join(tensor(t) for t in info["inputs"]) + "\n]",
        "output [\n" + ",\n".join(tensor(t) for t in info["outputs"]) + "\n]",
        f"instance_group [\n  {{\n    count: {instances}\n    kind: {PLATFORMS[platform][1]}\n  }}\n]",
        "",
    ])


def is_triton_model(folder: Path) -> bool:
    """A Triton model folder as :func:`write_triton_repo` writes it (config.pbtxt + 1/model.plan or 1/model.onnx)."""
    return (folder / "config.pbtxt").is_file() and any((folder / "1" / f).is_file() for f, _ in PLATFORMS.values())


def _model_files(export_dir: Path) -> tuple[str, dict[str, Any], list[tuple[Path, str]]]:
    """``(platform, I/O info, [(file, name in 1/)])`` of what the export folder serves: its engine if
    it has one (``engine.json`` written by the build), else its ONNX graph and the graph's own files."""
    spec = read_spec(export_dir) if (export_dir / SPEC_FILE).is_file() else None
    if spec is None or (export_dir / spec.engine_spec_file).is_file():
        info = read_engine_info(export_dir)
        plan_file, info_file = engine_files(str(info.get("model_class")))
        plan = export_dir / plan_file
        if not plan.is_file():
            raise ArtifactError(f"{plan} not found although {info_file} exists", hint="rebuild the engine")
        return "tensorrt_plan", dict(info), [(plan, "model.plan")]
    graph = export_dir / spec.onnx_file
    folder = graph.parent.relative_to(export_dir).as_posix()
    files = [export_dir / f for f in spec.files if f.rsplit("/", 1)[0] == folder]
    if graph not in files:
        raise ArtifactError(f"{graph} is not among the files recorded in {export_dir / SPEC_FILE}",
                            hint="re-run `dqdeploy export`")
    io = {key: [{"name": t.name, "shape": t.shape, "dtype": t.dtype} for t in tensors]
          for key, tensors in (("inputs", spec.inputs), ("outputs", spec.outputs))}
    slot_dtype = "float16" if spec.precision == "fp16" else "float32"
    io["inputs"] += [{"name": name, "shape": [-1 if d is None else d for d in dims], "dtype": slot_dtype}
                     for slot in spec.lora_slots for name, dims in slot_input_shapes(slot).items()]
    return "onnxruntime_onnx", io, [(f, "model.onnx" if f == graph else f.name) for f in files]


def write_triton_repo(
    engine_dir: str | Path,
    repo_dir: str | Path,
    model_name: str | None = None,
    *,
    instances: int = 1,
    overwrite: bool = False,
) -> Path:
    """Write ``<repo>/<model_name>/config.pbtxt`` and ``<repo>/<model_name>/1/`` from an export folder;
    returns the model folder. Other models in the repo are kept. ``model_name`` by default: the folder
    the served files are in (``unet`` or ``transformer``, as in optimum's ONNX layout).

    A folder with a TensorRT engine gives a ``tensorrt_plan`` model (``1/model.plan``); one without gives
    an ``onnxruntime_onnx`` model (``1/model.onnx`` and its external weights file) of the folder's graph.
    """
    engine_dir = Path(engine_dir)
    platform, info, files = _model_files(engine_dir)
    model_name = files[0][0].parent.name if model_name is None else model_name  # all in the graph's folder
    text = triton_config(info, model_name, instances=instances, platform=platform)
    target = Path(repo_dir) / model_name
    with atomic_dir(target, overwrite=overwrite, sources=[engine_dir], owned=is_triton_model) as tmp:
        (tmp / "1").mkdir()
        for source, name in files:
            shutil.copyfile(source, tmp / "1" / name)
        (tmp / "config.pbtxt").write_text(text)
    return target
