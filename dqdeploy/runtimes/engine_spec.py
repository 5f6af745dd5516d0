"""``unet/engine.json``: the record written next to a TensorRT engine (I/O, profile, versions, GPU).

The contract between the engine build (:mod:`.engine`), the TensorRT runtime and the Triton writer.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..core.errors import ArtifactError
from .spec import ENGINE_SPEC_FILE, SPEC_FILE, ExportSpec, read_spec

ENGINE_FORMAT = "dqdeploy-engine"
ENGINE_FORMAT_VERSION = 1
TRT_TYPES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT8": "int8", "INT32": "int32",
             "INT64": "int64", "BOOL": "bool", "UINT8": "uint8", "FP8": "float8_e4m3", "INT4": "int4"}

Range = tuple[int, int, int]


def dtype_name(dtype: Any) -> str:
    """Readable dtype name (numpy spelling) of a TensorRT ``DataType``."""
    name = getattr(dtype, "name", str(dtype).rsplit(".", 1)[-1])
    return TRT_TYPES.get(name, name.lower())



def tensor_records(count: int, get) -> list[dict[str, Any]]:
    """``[{name, shape, dtype}]`` of ``count`` network tensors read with ``get(i)``."""
    out = []
    for i in range(count):
        t = get(i)
        out.append({"name": t.name, "shape": [int(d) for d in t.shape], "dtype": dtype_name(t.dtype)})
    return out



def engine_info(
    spec: ExportSpec,
    *,
    inputs: list[dict[str, Any]],
    outputs: list[dict[str, Any]],
    profile: Mapping[str, tuple[list[int], list[int], list[int]]],
    tensorrt_version: str,
    gpu: str,
    compute_capability: str,
    batch: Range,
    cfg: bool,
    build_seconds: float | None = None,
    workspace_gb: float | None = None,
) -> dict[str, Any]:
    """The ``unet/engine.json`` record: I/O (``-1`` = dynamic), profile, versions, GPU, recipe."""
    return {
        "format": ENGINE_FORMAT,
        "format_version": ENGINE_FORMAT_VERSION,
        "tensorrt_version": tensorrt_version,
        "gpu": gpu,
        "compute_capability": compute_capability,
        "strongly_typed": True,
        "precision": spec.precision,
        "target": spec.target,
        "model_class": spec.model_class,
        "inputs": inputs,
        "outputs": outputs,
        "profile": {n: {"min": list(s[0]), "opt": list(s[1]), "max": list(s[2])} for n, s in profile.items()},
        "batch": list(batch),
        "cfg": cfg,
        "recipe": None if spec.recipe is None else spec.recipe.to_dict(),
        "timesteps": list(spec.timesteps),
        "workspace_gb": workspace_gb,
        "build_seconds": build_seconds,
    }


def read_engine_info(export_dir: str | Path) -> dict[str, Any]:
    """Read ``unet/engine.json`` (``transformer/engine.json``) with clear errors."""
    export_dir = Path(export_dir)
    path = export_dir / (read_spec(export_dir).engine_spec_file if (export_dir / SPEC_FILE).is_file()
                         else ENGINE_SPEC_FILE)
    if not path.is_file():
        raise ArtifactError(f"{path} not found: {export_dir} holds no TensorRT engine",
                            hint="build one with `dqdeploy export QUANT_DIR --target trt --out DIR` "
                                 "(or build_engine(DIR))")
    try:
        info = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{path} is not valid JSON: {exc}") from exc
    if info.get("format") != ENGINE_FORMAT or info.get("format_version") != ENGINE_FORMAT_VERSION:
        raise ArtifactError(f"{path}: format {info.get('format')!r} v{info.get('format_version')}, expected "
                            f"{ENGINE_FORMAT!r} v{ENGINE_FORMAT_VERSION}", hint="rebuild the engine with this dqdeploy")
    for key in ("inputs", "outputs"):
        if not isinstance(info.get(key), list) or not all("name" in t and "shape" in t and "dtype" in t
                                                          for t in info[key]):
            raise ArtifactError(f"{path}: '{key}' must be a list of {{name, shape, dtype}}")
    return info

