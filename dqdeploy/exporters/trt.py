"""TensorRT engines from exported QDQ ONNX graphs, and Triton model repositories for them.

``build_engine(export_dir)`` parses ``unet/model.onnx`` into a *strongly typed* network (types come
from the graph: build from an FP16 export with explicit Q/DQ; no ``--int8``/``--fp16`` builder
flags), adds one optimization profile for ``sample``/``timestep``/``encoder_hidden_states``, and
writes ``unet/model.plan`` plus ``unet/engine.json`` (I/O, profile, TensorRT version, GPU, recipe).

Batch profile: ``batch=(min, opt, max)`` counts UNet calls' batch rows. Classifier-free guidance
runs the UNet on ``[uncond; cond]``, i.e. twice the number of images: pass ``cfg=True`` to double
the profile (``(1, 2, 8)`` images -> ``(2, 4, 16)`` rows).

Everything that needs no GPU (profile shapes, engine.json, Triton config text) is a pure function.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..atomic import atomic_dir, atomic_write_bytes
from ..errors import ArtifactError, DQDeployError, ExportError, LintError, MissingDependencyError, require
from .spec import ENGINE_FILE, ENGINE_SPEC_FILE, ONNX_FILE, ExportSpec, read_spec

log = logging.getLogger(__name__)

ENGINE_FORMAT = "dqdeploy-engine"
ENGINE_FORMAT_VERSION = 1
MIN_TRT_MAJOR = 10
TRT_HINT = "pip install 'dqdeploy[trt]' on a machine with an NVIDIA GPU (TensorRT builds and runs engines only on NVIDIA GPUs)"
TRITON_TYPES = {
    "float32": "TYPE_FP32", "float16": "TYPE_FP16", "bfloat16": "TYPE_BF16", "float64": "TYPE_FP64",
    "int64": "TYPE_INT64", "int32": "TYPE_INT32", "int8": "TYPE_INT8", "uint8": "TYPE_UINT8", "bool": "TYPE_BOOL",
}
TRT_TYPES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT8": "int8", "INT32": "int32",
             "INT64": "int64", "BOOL": "bool", "UINT8": "uint8", "FP8": "float8_e4m3", "INT4": "int4"}

Range = tuple[int, int, int]
Resolution = int | tuple[int, int] | tuple[tuple[int, int], tuple[int, int], tuple[int, int]]


# ---------------------------------------------------------------------------------------------
# dependencies
# ---------------------------------------------------------------------------------------------
def require_tensorrt(purpose: str = "building a TensorRT engine"):
    """Import ``tensorrt`` (10.x or newer) and check for a CUDA device; fail fast with the fix."""
    try:
        trt = require("tensorrt", "trt", purpose)
    except MissingDependencyError as exc:
        raise MissingDependencyError(
            f"{purpose} needs TensorRT's Python package 'tensorrt' (10.x or newer), which is not installed",
            hint=TRT_HINT,
        ) from exc
    if not hasattr(trt, "Builder") or not hasattr(trt, "Runtime"):  # PyPI's placeholder package
        raise MissingDependencyError(
            f"the installed 'tensorrt' package ({getattr(trt, '__file__', '?')}) is not a working TensorRT "
            "(no Builder/Runtime): the PyPI placeholder downloads the real wheels at install time",
            hint=TRT_HINT,
        )
    version = str(getattr(trt, "__version__", "0"))
    if int(version.split(".")[0] or 0) < MIN_TRT_MAJOR:
        raise MissingDependencyError(f"TensorRT {version} is too old: dqdeploy needs {MIN_TRT_MAJOR}.x or newer "
                                     "(strongly typed networks, enqueueV3)", hint=TRT_HINT)
    import torch

    if not torch.cuda.is_available():
        raise MissingDependencyError(
            f"{purpose} needs an NVIDIA GPU, but no CUDA device is visible (torch.cuda.is_available() is False; "
            f"torch {torch.__version__})",
            hint="run on a machine with an NVIDIA GPU and driver, with a CUDA build of torch "
                 "(see https://pytorch.org/get-started/locally/)",
        )
    return trt


# ---------------------------------------------------------------------------------------------
# profile shapes (pure)
# ---------------------------------------------------------------------------------------------
def _range(value: int | Sequence[int], what: str) -> Range:
    vals = (value, value, value) if isinstance(value, int) else tuple(int(v) for v in value)
    if len(vals) != 3 or not (1 <= vals[0] <= vals[1] <= vals[2]):
        raise ExportError(f"{what} must be one int or (min, opt, max) with 1 <= min <= opt <= max, found {value!r}")
    return vals  # type: ignore[return-value]


def _resolution(resolution: Resolution | None) -> tuple[Range, Range] | None:
    """``(H range, W range)`` from an int, ``(h, w)`` or ``((h, w), (h, w), (h, w))`` (min/opt/max)."""
    if resolution is None:
        return None
    if isinstance(resolution, int):
        return _range(resolution, "resolution"), _range(resolution, "resolution")
    res = tuple(resolution)
    if len(res) == 2 and all(isinstance(v, int) for v in res):
        return _range(res[0], "resolution height"), _range(res[1], "resolution width")
    if len(res) == 3 and all(len(tuple(v)) == 2 for v in res):
        return _range([v[0] for v in res], "resolution height"), _range([v[1] for v in res], "resolution width")
    raise ExportError(f"resolution must be an int, (h, w) or ((h, w), (h, w), (h, w)) for min/opt/max, found {resolution!r}")


def profile_shapes(
    spec: ExportSpec,
    *,
    batch: int | Sequence[int] = (1, 2, 8),
    cfg: bool = False,
    resolution: Resolution | None = None,
    seq_len: int | Sequence[int] | None = None,
) -> dict[str, tuple[list[int], list[int], list[int]]]:
    """``{input: (min, opt, max)}`` for the engine's optimization profile, from the export spec.

    Symbolic dims: the batch (``cfg`` doubles it), H/W of ``sample`` (``resolution``) and the
    sequence length of ``encoder_hidden_states`` (``seq_len``). A fixed dim stays fixed; asking
    for another value there is an error (re-export instead).
    """
    b = _range(batch, "batch")
    if cfg:
        b = (2 * b[0], 2 * b[1], 2 * b[2])
    inputs = {t.name: t for t in spec.inputs}
    if "sample" not in inputs or len(inputs["sample"].shape) != 4:
        raise ExportError("the export has no 4-D 'sample' input", hint="export with `dqdeploy export`")
    ranges: dict[str, Range] = {}
    sample = inputs["sample"].shape
    batch_sym = sample[0] if isinstance(sample[0], str) else None
    hw = _resolution(resolution)
    for axis, label in ((2, "height"), (3, "width")):
        dim = sample[axis]
        asked = None if hw is None else hw[axis - 2]
        if isinstance(dim, str):
            if asked is None:
                raise ExportError(f"the graph's sample {label} is dynamic ({dim!r}): the profile needs it",
                                  hint="pass resolution=(h, w) or ((h, w), (h, w), (h, w)) for min/opt/max")
            ranges[dim] = asked
        elif asked is not None and asked != (dim, dim, dim):
            raise ExportError(f"resolution asks for {label} {asked}, but the graph's sample {label} is fixed at {dim}",
                              hint="leave resolution unset, or re-export the ONNX graph at that resolution")
    if "encoder_hidden_states" in inputs:
        ctx = inputs["encoder_hidden_states"].shape
        if len(ctx) == 3 and isinstance(ctx[1], str):
            if seq_len is None:
                raise ExportError(f"the graph's encoder_hidden_states sequence length is dynamic ({ctx[1]!r})",
                                  hint="pass seq_len=77 (or (min, opt, max))")
            ranges[ctx[1]] = _range(seq_len, "seq_len")
    shapes = {}
    for t in spec.inputs:
        lo, opt, hi = [], [], []
        for axis, dim in enumerate(t.shape):
            if isinstance(dim, int) and dim > 0:
                r = (dim, dim, dim)
            elif dim == batch_sym or (axis == 0 and isinstance(dim, str) and dim not in ranges):
                r = b
            elif dim in ranges:
                r = ranges[dim]
            else:
                raise ExportError(f"input {t.name} has an unknown dynamic dim {dim!r} at axis {axis}",
                                  hint="re-export with only the batch dynamic (the dqdeploy default)")
            lo.append(r[0])
            opt.append(r[1])
            hi.append(r[2])
        shapes[t.name] = (lo, opt, hi)
    return shapes


# ---------------------------------------------------------------------------------------------
# engine.json (pure)
# ---------------------------------------------------------------------------------------------
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
        "flavour": spec.flavour,
        "model_class": spec.model_class,
        "inputs": inputs,
        "outputs": outputs,
        "profile": {n: {"min": list(s[0]), "opt": list(s[1]), "max": list(s[2])} for n, s in profile.items()},
        "batch": list(batch),
        "cfg": cfg,
        "recipe": spec.recipe,
        "timesteps": list(spec.timesteps),
        "workspace_gb": workspace_gb,
        "build_seconds": build_seconds,
    }


def read_engine_info(export_dir: str | Path) -> dict[str, Any]:
    """Read ``unet/engine.json`` with clear errors."""
    path = Path(export_dir) / ENGINE_SPEC_FILE
    if not path.is_file():
        raise ArtifactError(f"{path} not found: {export_dir} holds no TensorRT engine",
                            hint="build one with `dqdeploy export QUANT_DIR --target trt --out DIR` (or build_engine(DIR))")
    try:
        info = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{path} is not valid JSON: {exc}") from exc
    if info.get("format") != ENGINE_FORMAT or info.get("format_version") != ENGINE_FORMAT_VERSION:
        raise ArtifactError(f"{path}: format {info.get('format')!r} v{info.get('format_version')}, expected "
                            f"{ENGINE_FORMAT!r} v{ENGINE_FORMAT_VERSION}", hint="rebuild the engine with this dqdeploy")
    for key in ("inputs", "outputs"):
        if not isinstance(info.get(key), list) or not all("name" in t and "shape" in t and "dtype" in t for t in info[key]):
            raise ArtifactError(f"{path}: '{key}' must be a list of {{name, shape, dtype}}")
    return info


# ---------------------------------------------------------------------------------------------
# Triton (pure text + file copy)
# ---------------------------------------------------------------------------------------------
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
    plan = engine_dir / ENGINE_FILE
    if not plan.is_file():
        raise ArtifactError(f"{plan} not found although {ENGINE_SPEC_FILE} exists", hint="rebuild the engine")
    text = triton_config(info, model_name, instances=instances)
    target = Path(repo_dir) / model_name
    with atomic_dir(target, overwrite=overwrite) as tmp:
        (tmp / "1").mkdir()
        shutil.copyfile(plan, tmp / "1" / "model.plan")
        (tmp / "config.pbtxt").write_text(text)
    return target


# ---------------------------------------------------------------------------------------------
# the build (needs TensorRT and a GPU)
# ---------------------------------------------------------------------------------------------
def _lint(onnx_path: Path) -> None:
    """The static TensorRT rule check (``dqdeploy.exporters.lint``); refuses to build on violations."""
    try:
        from .lint import lint_trt
    except ImportError:  # pragma: no cover - lint ships with dqdeploy
        log.warning("dqdeploy.exporters.lint is not available: building without the static rule check")
        return
    onnx = require("onnx", "ort", "the TensorRT rule check")
    violations = lint_trt(onnx.load(str(onnx_path), load_external_data=True))
    if violations:
        lines = "\n".join(f"  {v}" for v in violations[:20])
        more = f"\n  ... and {len(violations) - 20} more" if len(violations) > 20 else ""
        raise LintError(
            f"{onnx_path} breaks {len(violations)} TensorRT rule(s); not building:\n{lines}{more}",
            hint="re-export with `dqdeploy export QUANT_DIR --target onnx --fp16` (the TensorRT layout); "
                 "`dqdeploy lint EXPORT_DIR` lists the same violations",
        )


def _dtype_name(dtype: Any) -> str:
    name = getattr(dtype, "name", str(dtype).rsplit(".", 1)[-1])
    return TRT_TYPES.get(name, name.lower())


def _tensors(count: int, get) -> list[dict[str, Any]]:
    out = []
    for i in range(count):
        t = get(i)
        out.append({"name": t.name, "shape": [int(d) for d in t.shape], "dtype": _dtype_name(t.dtype)})
    return out


def gpu_description() -> tuple[str, str]:
    """(name, compute capability) of the current CUDA device."""
    import torch

    idx = torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(idx)
    return torch.cuda.get_device_name(idx), f"{major}.{minor}"


def build_engine(
    export_dir: str | Path,
    *,
    fp16: bool = True,
    batch: int | Sequence[int] = (1, 2, 8),
    cfg: bool = False,
    resolution: Resolution | None = None,
    seq_len: int | Sequence[int] | None = None,
    timing_cache: str | Path | None = None,
    workspace_gb: float | None = None,
    overwrite: bool = False,
    lint: bool = True,
) -> Path:
    """Build ``unet/model.plan`` (+ ``unet/engine.json``) from the export folder's ONNX graph.

    ``fp16`` states the graph's precision: a strongly typed network takes its types from the graph,
    so an FP16 engine needs an FP16 export (``dqdeploy export --fp16``). ``batch`` is (min, opt, max)
    UNet batch rows; ``cfg=True`` doubles it for classifier-free guidance. ``resolution``/``seq_len``
    are only needed where the graph has those dims dynamic. ``timing_cache`` is loaded if it exists
    and saved after the build. Returns the plan's path.
    """
    trt = require_tensorrt()  # before anything expensive
    export_dir = Path(export_dir)
    spec = read_spec(export_dir)
    onnx_path = export_dir / ONNX_FILE
    plan_path = export_dir / ENGINE_FILE
    if not onnx_path.is_file():
        raise ArtifactError(f"{onnx_path} not found", hint="re-run `dqdeploy export`")
    if plan_path.exists() and not overwrite:
        raise DQDeployError(f"{plan_path} already exists", hint="pass overwrite=True (--overwrite) to rebuild it")
    if spec.flavour == "ort":
        raise ExportError(
            f"{export_dir} holds the ONNX Runtime layout (uint8, zero point 128, output Q/DQ); TensorRT needs the "
            "TensorRT layout (int8, zero point 0)",
            hint="export with `dqdeploy export QUANT_DIR --target trt` (or --target onnx --fp16)",
        )
    want = "fp16" if fp16 else "fp32"
    if spec.precision != want:
        raise ExportError(
            f"fp16={fp16} asks for a {want} engine, but {onnx_path} is {spec.precision}: a strongly typed "
            "network takes its types from the graph",
            hint="re-export with --fp16 for an FP16 engine" if fp16 else "pass fp16=True for this FP16 graph",
        )
    shapes = profile_shapes(spec, batch=batch, cfg=cfg, resolution=resolution, seq_len=seq_len)
    if lint:
        _lint(onnx_path)

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    strongly_typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)  # always on in TensorRT 11
    network = builder.create_network(0 if strongly_typed is None else 1 << int(strongly_typed))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise ExportError(f"TensorRT's ONNX parser rejected {onnx_path}:\n  " + "\n  ".join(errors[:10]),
                          hint="run `dqdeploy lint` on the folder; check the opset (20, or 21 with INT4)")
    names = [network.get_input(i).name for i in range(network.num_inputs)]
    if sorted(names) != sorted(shapes):
        raise ExportError(f"the parsed network's inputs {names} differ from the export spec's {sorted(shapes)}",
                          hint="re-run `dqdeploy export`: the folder's graph and spec do not belong together")

    config = builder.create_builder_config()
    if workspace_gb is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in shapes.items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
    cache_path = None if timing_cache is None else Path(timing_cache)
    cache_bytes = cache_path.read_bytes() if cache_path is not None and cache_path.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        log.warning("timing cache %s does not match this TensorRT/GPU; starting a fresh one", cache_path)
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)

    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - start
    if serialized is None:
        raise ExportError(f"TensorRT could not build an engine from {onnx_path} (its log above says why)",
                          hint="try a larger workspace_gb, or check the graph with `dqdeploy lint`")
    if cache_path is not None:
        atomic_write_bytes(cache_path, bytes(memoryview(config.get_timing_cache().serialize())))
    gpu, capability = gpu_description()
    info = engine_info(
        spec,
        inputs=_tensors(network.num_inputs, network.get_input),
        outputs=_tensors(network.num_outputs, network.get_output),
        profile=shapes, tensorrt_version=str(trt.__version__), gpu=gpu, compute_capability=capability,
        batch=_range(batch, "batch"), cfg=cfg, build_seconds=round(seconds, 2), workspace_gb=workspace_gb,
    )
    atomic_write_bytes(plan_path, bytes(memoryview(serialized)))
    atomic_write_bytes(export_dir / ENGINE_SPEC_FILE, json.dumps(info, indent=2).encode())
    log.info("built %s in %.1f s (TensorRT %s, %s)", plan_path, seconds, trt.__version__, gpu)
    return plan_path
