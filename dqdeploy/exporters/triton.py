"""Triton model repositories for TensorRT engines: ``config.pbtxt`` text (pure) and the folder."""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..atomic import atomic_dir
from ..errors import ArtifactError, ExportError
from .engine_spec import read_engine_info
from .spec import engine_files

TRITON_TYPES = {
    "float32": "TYPE_FP32", "float16": "TYPE_FP16", "bfloat16": "TYPE_BF16", "float64": "TYPE_FP64",
    "int64": "TYPE_INT64", "int32": "TYPE_INT32", "int8": "TYPE_INT8", "uint8": "TYPE_UINT8", "bool": "TYPE_BOOL",
}


def triton_config(info: Mapping[str, Any], model_name: str = "unet", *, instances: int = 1) -> str:
    """``config.pbtxt`` text of a Triton ``tensorrt_plan`` model for the engine described by ``info``.

    ``max_batch_size: 0``: the batch is an explicit (dynamic, ``-1``) dim of every tensor, as in
    the engine; Triton checks request shapes against the engine's optimization profile.
    """
    def tensor(t: Mapping[str, Any]) -> str:
        dtype = TRITON_TYPES.get(str(t["dtype"]))
        if dtype is None:
            raise ExportError(f"engine tensor {t['name']} has dtype {t['dtype']!r}, which Triton cannot serve "
                              f"(expected one of {', '.join(TRITON_TYPES)})")
        dims = ", ".join(str(d if isinstance(d, int) and d > 0 else -1) for d in t["shape"])
        return f'  {{\n    name: "{t["name"]}"\n    data_type: {dtype}\n    dims: [ {dims} ]\n  }}'

    if not model_name or "/" in model_name or model_name.startswith("."):
        raise ExportError(f"invalid Triton model name {model_name!r}", hint="use a plain folder name such as 'unet'")
    if instances < 1:
        raise ExportError(f"instances must be >= 1, found {instances}")
    return "\n".join([
        f'name: "{model_name}"',
        'platform: "tensorrt_plan"',
        "max_batch_size: 0",
        "input [\n" + ",\n".join(tensor(t) for t in info["inputs"]) + "\n]",
        "output [\n" + ",\n".join(tensor(t) for t in info["outputs"]) + "\n]",
        f"instance_group [\n  {{\n    count: {instances}\n    kind: KIND_GPU\n  }}\n]",
        "",
    ])


def is_triton_model(folder: Path) -> bool:
    """A Triton model folder as :func:`write_triton_repo` writes it (config.pbtxt + 1/model.plan)."""
    return (folder / "config.pbtxt").is_file() and (folder / "1" / "model.plan").is_file()


def write_triton_repo(
    engine_dir: str | Path,
    repo_dir: str | Path,
    model_name: str = "unet",
    *,
    instances: int = 1,
    overwrite: bool = False,
) -> Path:
    """Write ``<repo>/<model_name>/config.pbtxt`` and ``<repo>/<model_name>/1/model.plan`` from an
    export folder holding an engine; returns the model folder. Other models in the repo are kept."""
    engine_dir = Path(engine_dir)
    info = read_engine_info(engine_dir)
    plan_file, info_file = engine_files(str(info.get("model_class")))
    plan = engine_dir / plan_file
    if not plan.is_file():
        raise ArtifactError(f"{plan} not found although {info_file} exists", hint="rebuild the engine")
    text = triton_config(info, model_name, instances=instances)
    target = Path(repo_dir) / model_name
    with atomic_dir(target, overwrite=overwrite, sources=[engine_dir], owned=is_triton_model) as tmp:
        (tmp / "1").mkdir()
        shutil.copyfile(plan, tmp / "1" / "model.plan")
        (tmp / "config.pbtxt").write_text(text)
    return target

