"""TensorRT engines from exported QDQ ONNX graphs (needs TensorRT and a GPU; see :mod:`dqdeploy.system.trt_gate`).

``build_engine(export_dir)`` parses ``unet/model.onnx`` (a transformer's ``transformer/model.onnx``)
into a *strongly typed* network (types come from the graph: build from an FP16 export with explicit
Q/DQ; no ``--int8``/``--fp16`` builder flags), adds one optimization profile over every graph input
(``sample`` or ``hidden_states``, ``timestep``, ``encoder_hidden_states``, ``pooled_projections``,
Flux's ``img_ids``/``txt_ids``/``guidance``), and writes ``model.plan`` plus ``engine.json`` (I/O,
profile, TensorRT version, GPU, recipe) next to the graph.

Batch profile: ``batch=(min, opt, max)`` counts denoiser calls' batch rows. Classifier-free guidance
runs the UNet on ``[uncond; cond]``, i.e. twice the number of images: pass ``cfg=True`` to double
the profile (``(1, 2, 8)`` images -> ``(2, 4, 16)`` rows).

The build runs through Polygraphy's TensorRT loaders (``NetworkFromOnnxPath``, ``CreateConfig`` with one
``Profile``, ``EngineBytesFromNetwork``), imported -- with ``tensorrt`` -- only once the gate has passed.
The profile shapes are a pure function; ``engine.json`` is :mod:`.engine_spec`, Triton :mod:`.triton`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

from ..core.denoisers import spec_for
from ..core.errors import ArtifactError, DQDeployError, ExportError, LintError, require
from ..core.inputs import CONTEXT
from ..io.atomic import atomic_write_bytes
from ..runtimes.engine_spec import engine_info, tensor_records
from ..runtimes.spec import ExportSpec, read_spec, slot_input_shapes
from ..system.trt_gate import gpu_description, require_tensorrt

log = logging.getLogger(__name__)

Range = tuple[int, int, int]
LORA_RANK: Range = (1, 16, 64)  # the rank dims of LoRA slots: min, opt, max
Resolution = int | tuple[int, int] | tuple[tuple[int, int], tuple[int, int], tuple[int, int]]


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
    res: tuple[Any, ...] = tuple(cast(Any, resolution))
    if len(res) == 2 and all(isinstance(v, int) for v in res):
        return _range(res[0], "resolution height"), _range(res[1], "resolution width")
    if len(res) == 3 and all(len(tuple(v)) == 2 for v in res):
        return _range([v[0] for v in res], "resolution height"), _range([v[1] for v in res], "resolution width")
    raise ExportError("resolution must be an int, (h, w) or ((h, w), (h, w), (h, w)) for min/opt/max, "
                      f"found {resolution!r}")


def _export_range(spec: ExportSpec) -> Resolution | None:
    """(min, opt, max) (h, w) of a ``--dynamic-resolution`` export (opt: the config's size, clamped)."""
    if not spec.resolution_range:
        return None
    lo, hi = spec.resolution_range
    sample_size = spec.model_config.get("sample_size")
    opt = min(max(sample_size, lo), hi) if isinstance(sample_size, int) else lo
    return ((lo, lo), (opt, opt), (hi, hi))


def _latent_ranges(spec: ExportSpec, sample: list[int | str], resolution: Resolution | None) -> dict[str, Range]:
    """Ranges of the image latent's dynamic H/W dims from ``resolution`` (packed latents: none)."""
    ranges: dict[str, Range] = {}
    hw = _resolution(resolution)
    if spec_for(spec.model_class).packed:
        if hw is not None:
            raise ExportError(f"{spec.model_class} graphs take packed latents of a fixed token count: resolution "
                              "cannot be chosen at build time",
                              hint="leave resolution unset, or re-export at that resolution")
        return ranges
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
    return ranges


def profile_shapes(
    spec: ExportSpec,
    *,
    batch: int | Sequence[int] = (1, 2, 8),
    cfg: bool = False,
    resolution: Resolution | None = None,
    seq_len: int | Sequence[int] | None = None,
    lora_rank: int | Sequence[int] = LORA_RANK,
) -> dict[str, tuple[list[int], list[int], list[int]]]:
    """``{input: (min, opt, max)}`` for the engine's optimization profile, from the export spec.

    Symbolic dims: the batch (``cfg`` doubles it), H/W of the image latent (``sample`` or
    ``hidden_states``; ``resolution``, default: the export's ``--dynamic-resolution``) and the sequence
    length of ``encoder_hidden_states`` (``seq_len``, default: the export's ``--dynamic-text-length``, opt its MAX).
    A fixed dim stays fixed; asking for another value
    there is an error (re-export instead). Inputs without a batch axis (Flux's position ids) must be fixed.
    An export with LoRA slots adds each slot's ``down``/``up`` inputs, their rank dim over ``lora_rank`` (the
    ranks of the adapters fed at once, added up; a slot without an adapter takes rank 1).
    """
    b = _range(batch, "batch")
    if cfg:
        b = (2 * b[0], 2 * b[1], 2 * b[2])
    kind = spec_for(spec.model_class, "the export")
    inputs = {t.name: t for t in spec.inputs}
    rank = 3 if kind.packed else 4  # Flux: packed tokens [B, N, C], fixed N
    if kind.sample not in inputs or len(inputs[kind.sample].shape) != rank:
        raise ExportError(f"the export has no {rank}-D {kind.sample!r} input", hint="export with `dqdeploy export`")
    sample = inputs[kind.sample].shape
    batch_sym = sample[0] if isinstance(sample[0], str) else None
    ranges = _latent_ranges(spec, sample, resolution if resolution is not None else _export_range(spec))
    if CONTEXT in inputs:
        ctx = inputs[CONTEXT].shape
        if len(ctx) == 3 and isinstance(ctx[1], str):
            if seq_len is None and spec.text_length_range:  # a --dynamic-text-length export: its range
                seq_len = (spec.text_length_range[0], spec.text_length_range[1], spec.text_length_range[1])
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
            elif t.name in kind.shared:
                raise ExportError(f"input {t.name} has no batch axis but a dynamic dim {dim!r} at axis {axis}",
                                  hint="re-export with only the batch dynamic (the dqdeploy default)")
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
    return shapes | slot_shapes(spec, lora_rank)


def slot_shapes(spec: ExportSpec, lora_rank: int | Sequence[int] = LORA_RANK
                ) -> dict[str, tuple[list[int], list[int], list[int]]]:
    """The profile of the LoRA slots' inputs (:mod:`.lora_slots`): a Linear's ``down`` [in, r] and ``up`` [r, out],
    a convolution's ``down`` [r, in, kh, kw] and ``up`` [out, r, 1, 1], ``r`` over ``lora_rank`` (min, opt, max)."""
    r = _range(lora_rank, "lora_rank")
    shapes = {}
    for slot in spec.lora_slots:
        for name, dims in slot_input_shapes(slot).items():
            shapes[name] = cast(tuple[list[int], list[int], list[int]],
                                tuple([r[k] if d is None else d for d in dims] for k in range(3)))
    return shapes



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



def _check_buildable(export_dir: Path, spec: ExportSpec, *, fp16: bool, overwrite: bool) -> tuple[Path, Path]:
    """The ONNX and plan paths, after checking the folder holds a TensorRT-layout graph of the asked precision."""
    onnx_path = export_dir / spec.onnx_file
    plan_path = export_dir / spec.engine_file
    if not onnx_path.is_file():
        raise ArtifactError(f"{onnx_path} not found", hint="re-run `dqdeploy export`")
    if plan_path.exists() and not overwrite:
        raise DQDeployError(f"{plan_path} already exists", hint="pass overwrite=True (--overwrite) to rebuild it")
    if spec.target == "ort":
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
    return onnx_path, plan_path


@contextmanager
def _polygraphy_step(what: str, onnx_path: Path, hint: str) -> Iterator[None]:
    """Polygraphy's loaders log TensorRT's reasons, then raise ``PolygraphyException``: an
    :class:`ExportError` naming the step and the graph instead."""
    from polygraphy.exception import PolygraphyException

    try:
        yield
    except PolygraphyException as exc:
        raise ExportError(f"{what} {onnx_path}: {exc} (TensorRT's log above says why)", hint=hint) from exc


def _parse_network(trt: Any, onnx_path: Path, shapes: dict[str, Any]) -> tuple[Any, Any, Any]:
    """``(builder, network, parser)`` from Polygraphy's ``NetworkFromOnnxPath``: a *strongly typed*
    network (types from the graph: the FP16 graph's float ops, its Q/DQ's INT8) whose inputs must be
    the profile's. The parser owns the weights the network points at, so the tuple must outlive the build."""
    from polygraphy.backend.trt import NetworkFromOnnxPath

    # TensorRT 10: an opt-in flag; TensorRT 11 drops the flag (every network is strongly typed)
    strongly_typed = hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED")
    with _polygraphy_step("TensorRT's ONNX parser rejected", onnx_path,
                          "run `dqdeploy lint` on the folder; check the opset (20, or 21 with INT4)"):
        builder, network, parser = NetworkFromOnnxPath(str(onnx_path), strongly_typed=strongly_typed)()
    names = [network.get_input(i).name for i in range(network.num_inputs)]
    if sorted(names) != sorted(shapes):
        raise ExportError(f"the parsed network's inputs {names} differ from the export spec's {sorted(shapes)}",
                          hint="re-run `dqdeploy export`: the folder's graph and spec do not belong together")
    return builder, network, parser


def _builder_config(trt: Any, shapes: dict[str, Any], workspace_gb: float | None, cache_path: Path | None) -> Any:
    """Polygraphy's ``CreateConfig``: the one optimization profile, the workspace limit, the timing cache
    (loaded if the file exists). No precision flags: a strongly typed network refuses them (its FP16 and
    INT8 come from the graph), so ``fp16``/``int8`` stay off; ``tf32`` stays on, TensorRT's default, which
    Polygraphy would otherwise clear."""
    from polygraphy.backend.trt import CreateConfig, Profile

    profile = Profile()
    for name, (lo, opt, hi) in shapes.items():
        profile.add(name, min=lo, opt=opt, max=hi)
    pools = None if workspace_gb is None else {trt.MemoryPoolType.WORKSPACE: int(workspace_gb * (1 << 30))}
    cache = str(cache_path) if cache_path is not None and cache_path.is_file() else None
    return CreateConfig(fp16=False, int8=False, tf32=True, profiles=[profile], memory_pool_limits=pools,
                        load_timing_cache=cache)


def _serialize(network: tuple[Any, Any, Any], config: Any, onnx_path: Path,
               cache_path: Path | None) -> tuple[bytes, float]:
    """The serialized engine (Polygraphy's ``EngineBytesFromNetwork``; it merges the timing cache into
    ``cache_path`` under a file lock) and the build time in seconds. The plan is written by the caller,
    atomically, rather than by ``SaveEngine``."""
    from polygraphy.backend.trt import EngineBytesFromNetwork

    start = time.perf_counter()
    with _polygraphy_step("TensorRT could not build an engine from", onnx_path,
                          "try a larger workspace_gb, or check the graph with `dqdeploy lint`"):
        serialized = EngineBytesFromNetwork(network, config=config,
                                            save_timing_cache=None if cache_path is None else str(cache_path))()
    return bytes(memoryview(serialized)), time.perf_counter() - start


def build_engine(
    export_dir: str | Path,
    *,
    fp16: bool = True,
    batch: int | Sequence[int] = (1, 2, 8),
    cfg: bool = False,
    resolution: Resolution | None = None,
    seq_len: int | Sequence[int] | None = None,
    lora_rank: int | Sequence[int] = LORA_RANK,
    timing_cache: str | Path | None = None,
    workspace_gb: float | None = None,
    overwrite: bool = False,
    lint: bool = True,
) -> Path:
    """Build ``unet/model.plan`` (+ ``unet/engine.json``; a transformer's in ``transformer/``) from the
    export folder's ONNX graph.

    ``fp16`` states the graph's precision: a strongly typed network takes its types from the graph,
    so an FP16 engine needs an FP16 export (``dqdeploy export --fp16``). ``batch`` is (min, opt, max)
    denoiser batch rows; ``cfg=True`` doubles it for classifier-free guidance. ``resolution``/``seq_len``
    are only needed where the graph has those dims dynamic; ``lora_rank``: the (min, opt, max) rank of the LoRA
    slots' inputs (an export with ``--lora-slots``; adapters fed at once add their ranks). ``timing_cache``
    is loaded if it exists and saved after the build, merged with what the file then holds (Polygraphy locks it
    through a ``.lock`` file next to it, so concurrent builds may share one). Returns the plan's path.
    """
    trt = require_tensorrt()  # before anything expensive
    export_dir = Path(export_dir)
    spec = read_spec(export_dir)
    onnx_path, plan_path = _check_buildable(export_dir, spec, fp16=fp16, overwrite=overwrite)
    shapes = profile_shapes(spec, batch=batch, cfg=cfg, resolution=resolution, seq_len=seq_len, lora_rank=lora_rank)
    if lint:
        _lint(onnx_path)
    network = _parse_network(trt, onnx_path, shapes)
    cache_path = None if timing_cache is None else Path(timing_cache)
    config = _builder_config(trt, shapes, workspace_gb, cache_path)
    serialized, seconds = _serialize(network, config, onnx_path, cache_path)
    gpu, capability = gpu_description()
    info = engine_info(
        spec,
        inputs=tensor_records(network[1].num_inputs, network[1].get_input),
        outputs=tensor_records(network[1].num_outputs, network[1].get_output),
        profile=shapes, tensorrt_version=str(trt.__version__), gpu=gpu, compute_capability=capability,
        batch=_range(batch, "batch"), cfg=cfg, build_seconds=round(seconds, 2), workspace_gb=workspace_gb,
    )
    atomic_write_bytes(plan_path, serialized)
    atomic_write_bytes(export_dir / spec.engine_spec_file, json.dumps(info, indent=2).encode())
    log.info("built %s in %.1f s (TensorRT %s, %s)", plan_path, seconds, trt.__version__, gpu)
    return plan_path
