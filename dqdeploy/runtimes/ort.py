"""ONNX Runtime drop-in: an exported denoiser on an ``onnxruntime.InferenceSession`` (CPU by default), guarded
against integer formats that are not exact on this CPU (:func:`exactness_entries`)."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..core.deprecation import renamed
from ..core.errors import ArtifactError, CpuFormatError, MissingDependencyError, RuntimeInputError, require
from ..core.vocab import INEXACT, Inexact
from ..system.cpu import cpu_info, exact_on
from .base import CONTEXT, OUTPUT, SAMPLE, DenoiserRuntime
from .spec import LORA_PREFIX, SPEC_FILE, ExportSpec, TensorSpec, read_spec

CPU = "CPUExecutionProvider"
GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")
ORT_TYPES = {
    "tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
    "tensor(bfloat16)": "bfloat16", "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(int8)": "int8",
    "tensor(uint8)": "uint8", "tensor(bool)": "bool",
}
Provider = str | tuple[str, dict[str, Any]]
QDQ_AS_FLOAT = {"session.disable_quant_qdq": "1"}  # ORT runs Q/DQ as float conversions: no integer kernels
CONFIG_PREFIXES = ("session.", "optimization.", "mlas.", "ep.", "kernel.")  # namespaces of ORT's session config keys
log = logging.getLogger(__name__)


def resolve_source(source: str | Path) -> tuple[Path, ExportSpec | None]:
    """``(onnx_path, spec)`` for an export folder, its ``unet/model.onnx`` (``transformer/model.onnx``),
    or any ONNX file (spec None)."""
    path = Path(source)
    if path.is_dir():
        spec = read_spec(path)
        return path / spec.onnx_file, spec
    if not path.is_file():
        raise ArtifactError(f"{path} does not exist",
                            hint="pass an export folder (the --out of `dqdeploy export`) or an .onnx file")
    folder = path.parent.parent
    if path.parent.name in ("unet", "transformer") and (folder / SPEC_FILE).is_file():
        return path, read_spec(folder)
    return path, None


def check_providers(providers: Sequence[Provider] | str) -> list[Provider]:
    """The requested execution providers (one name alone is a list of one), or :class:`MissingDependencyError`
    naming what is available."""
    ort = require("onnxruntime", "ort", "running an exported denoiser on ONNX Runtime")
    if isinstance(providers, str):
        providers = [providers]
    if not isinstance(providers, Sequence) or not all(isinstance(p, str) or (isinstance(p, tuple) and len(p) == 2
                                                                             and isinstance(p[0], str)
                                                                             and isinstance(p[1], dict))
                                                      for p in providers):
        raise ArtifactError(f"providers={providers!r}: expected provider names or (name, options) pairs",
                            hint=f"e.g. providers=('{CPU}',)")
    if not providers:
        raise ArtifactError("no execution provider requested", hint=f"pass providers=('{CPU}',)")
    available = ort.get_available_providers()
    names = [_name(p) for p in providers]
    missing = [n for n in names if n not in available]
    if missing:
        if any(n in GPU_PROVIDERS for n in missing):
            hint = ("pip uninstall -y onnxruntime && pip install 'dqdeploy[gpu]' (onnxruntime-gpu; "
                    "the two packages cannot share an environment) on a machine with an NVIDIA GPU and CUDA")
            if "TensorrtExecutionProvider" in missing:
                hint += "; TensorrtExecutionProvider also needs TensorRT's libraries"
        else:
            hint = f"use one of: {', '.join(available)}"
        raise MissingDependencyError(
            f"ONNX Runtime execution provider(s) {', '.join(missing)} requested, but this onnxruntime "
            f"{ort.__version__} only has {', '.join(available)}",
            hint=hint,
        )
    return list(providers)


def session_options(threads: int = 1, options: Any = None, entries: Mapping[str, str] | None = None):
    """Session options: graph optimization level ALL, ``threads`` intra-op threads, one inter-op thread.

    ``options`` is an ``onnxruntime.SessionOptions`` (used as given) or a mapping of session config
    entries added on top of the defaults (e.g. ``{"session.qdq_matmulnbits_accuracy_level": "4"}``).
    ``entries`` (:func:`exactness_entries`) are added in either case.
    """
    ort = require("onnxruntime", "ort", "running an exported denoiser on ONNX Runtime")
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 0:
        raise RuntimeInputError(f"threads={threads!r}: expected a whole number >= 0 (0: ONNX Runtime's default)",
                                hint="e.g. threads=1")
    if isinstance(options, ort.SessionOptions):
        for key, value in dict(entries or {}).items():
            options.add_session_config_entry(key, value)
        return options
    if options is not None and not isinstance(options, Mapping):
        raise RuntimeInputError(f"options={options!r}: expected an onnxruntime.SessionOptions or a mapping of session "
                                "config entries", hint='e.g. options={"session.intra_op.allow_spinning": "0"}')
    unknown = [k for k in (options or {}) if not (isinstance(k, str) and k.startswith(CONFIG_PREFIXES))]
    if unknown:  # ONNX Runtime accepts any key silently: a typo would change nothing, unnoticed
        raise RuntimeInputError(f"unknown session config entries {unknown}: ONNX Runtime's keys start with "
                                f"{', '.join(CONFIG_PREFIXES)}",
                                hint="see onnxruntime_session_options_config_keys.h for the keys")
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = int(threads)
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3  # errors only: ORT's warnings about unused initializers are noise here
    for key, value in {**dict(options or {}), **dict(entries or {})}.items():
        so.add_session_config_entry(str(key), str(value))
    return so


def exactness_entries(spec: ExportSpec | None, inexact: Inexact = "refuse") -> dict[str, str]:
    """The session config entries that run ``spec``'s graph exactly on this CPU, or :class:`CpuFormatError`.

    The TensorRT-layout graph (int8 weights over their full range, int8 activations) is TensorRT's: ONNX
    Runtime runs its Q/DQ as float math, exact on every CPU. An ORT-layout graph runs on ORT's integer
    kernels when its format is exact on this CPU (:mod:`dqdeploy.system.cpu`); otherwise ``inexact`` decides:
    ``refuse`` (the default), ``float`` (Q/DQ as float math: exact, at float speed) or ``allow`` (the
    saturating kernels, with a warning).
    """
    if inexact not in INEXACT:
        raise ArtifactError(f"inexact={inexact!r} (expected one of {', '.join(INEXACT)})")
    if spec is None or spec.layout is None:
        return {}
    if spec.layout == "trt":
        return dict(QDQ_AS_FLOAT)
    info, fmt = cpu_info(), spec.weight_format
    if fmt is None or info.exact(fmt):
        return {}
    what = (f"this graph's weights are int8 over their full range (int8 format '{fmt}', exact on {exact_on(fmt)}); "
            f"this CPU ({info.model}; {' '.join(info.flags) or 'no int8 flags'}) has no VNNI, so ONNX Runtime's u8s8 "
            "kernels add pairs of products in saturating int16 and the graph's outputs would be wrong")
    if inexact == "float":
        log.warning("%s: running its Q/DQ as float math instead (exact, float speed)", what)
        return dict(QDQ_AS_FLOAT)
    if inexact == "allow":
        log.warning("%s; running it anyway (inexact='allow')", what)
        return {}
    raise CpuFormatError(what, hint="re-export for this CPU: `dqdeploy export QUANT_DIR --target ort --cpu portable` "
                                    "(exact on every CPU); or run it exactly at float speed: --inexact float "
                                    "(Python: inexact='float')")


def _spec_from_session(session, path: Path) -> ExportSpec:
    """A minimal spec for a bare ONNX file with the denoiser I/O names (no calibrated steps, no recipe)."""
    def tensor(v) -> TensorSpec:
        dims = [d if isinstance(d, int) else str(d or "?") for d in v.shape]
        return TensorSpec(v.name, dims, ORT_TYPES.get(v.type, v.type))

    inputs = [tensor(v) for v in session.get_inputs()]
    outputs = [tensor(v) for v in session.get_outputs()]
    by_name = {t.name: t for t in inputs}
    if SAMPLE not in by_name or len(by_name[SAMPLE].shape) != 4:
        raise ArtifactError(f"{path}: expected an input 'sample' [B, C, H, W], found inputs {[t.name for t in inputs]}",
                            hint="export with `dqdeploy export`, which writes optimum's I/O names")
    _, c, h, w = by_name[SAMPLE].shape
    config: dict[str, Any] = {"in_channels": c,
                              "out_channels": outputs[0].shape[1] if len(outputs[0].shape) == 4 else c,
                              "sample_size": h if h == w else [h, w]}
    if CONTEXT in by_name:
        config["cross_attention_dim"] = by_name[CONTEXT].shape[-1]
        config["time_cond_proj_dim"] = None
    return ExportSpec(
        target="unknown", precision="fp16" if by_name[SAMPLE].dtype == "float16" else "fp32", opset=0,
        model_class="UNet2DConditionModel" if CONTEXT in by_name else "UNet2DModel", model_config=config,
        inputs=inputs, outputs=outputs,
    )


class _LayerShapes(torch.nn.Module):
    """What :func:`~dqdeploy.io.lora.read_lora` checks a LoRA file against, built from an export's slots: one Linear
    (on the meta device) per slot."""

    def __init__(self, spec: ExportSpec) -> None:
        super().__init__()
        for slot in spec.lora_slots:
            parent = self
            *path, leaf = slot["layer"].split(".")
            for part in path:
                if not hasattr(parent, part):
                    parent.add_module(part, torch.nn.Module())
                parent = getattr(parent, part)
            parent.add_module(leaf, torch.nn.Linear(slot["in"], slot["out"], bias=False, device="meta"))


def _name(provider: Provider) -> str:
    return provider if isinstance(provider, str) else provider[0]


def _static(shape) -> tuple:
    """A shape with symbolic dims (names, None) as None: what must match between graph and spec."""
    return tuple(d if isinstance(d, int) and d > 0 else None for d in shape)


class OrtDenoiser(DenoiserRuntime):
    """An exported denoiser on ONNX Runtime, callable like the diffusers UNet or transformer it came from.

    ``source``: an export folder, its ``unet/model.onnx``, or any ONNX file with optimum's I/O names.
    """

    backend = "onnxruntime"

    def __init__(
        self,
        source: str | Path,
        providers: Sequence[Provider] | str = (CPU,),
        threads: int = 1,
        options: Any = None,
        check_values: bool = True,
        inexact: Inexact = "refuse",
        lora: Any = None,
    ) -> None:
        """``check_values``: refuse NaN/Inf/out-of-range inputs (False skips the pass over the inputs).
        ``inexact``: what to do when the graph's int8 format is not exact on this CPU (:func:`exactness_entries`).
        ``lora``: adapters for an export with LoRA slots (``FILE``, ``(FILE, scale)`` or a list; :meth:`set_lora`)."""
        ort = require("onnxruntime", "ort", "running an exported denoiser on ONNX Runtime")
        path, spec = resolve_source(source)
        if not path.is_file():
            raise ArtifactError(f"{path} not found", hint="the export folder is incomplete; re-run `dqdeploy export`")
        requested = check_providers(providers)
        # the guard is about ORT's CPU kernels: a GPU provider list runs the integer nodes on the GPU
        entries = exactness_entries(spec if all(_name(p) == CPU for p in requested) else None, inexact)
        so = session_options(threads, options, entries)
        try:
            self.session = ort.InferenceSession(str(path), so, providers=requested)
        except Exception as exc:  # ORT raises its own exception types for unloadable graphs
            raise ArtifactError(f"ONNX Runtime cannot load {path}: {exc}",
                                hint="check the file (and model.onnx_data next to it), or re-export") from exc
        active = self.session.get_providers()
        dropped = [_name(p) for p in requested if _name(p) not in active]
        if dropped:  # ORT falls back to CPU silently when a provider fails to initialise (missing CUDA libraries)
            raise MissingDependencyError(
                f"ONNX Runtime could not initialise {', '.join(dropped)} "
                f"(the session runs on {', '.join(active)} only)",
                hint="install the CUDA/cuDNN versions this onnxruntime-gpu was built for; "
                     "ONNX Runtime's log says which library is missing",
            )
        spec = spec or _spec_from_session(self.session, path)
        super().__init__(spec, str(source))
        self.check_values = check_values
        self._lora_feeds: dict[str, np.ndarray] = {}
        self._check_session(path)
        self.onnx_path = path
        self.set_lora(lora)

    def set_lora(self, lora: Any = None) -> None:
        """Run the export's LoRA slots with ``lora`` (``FILE``, ``(FILE, scale)`` or a list of them; ``None``: no
        adapter, the graph computes what it computes without slots). No re-export, no new session."""
        from ..io.lora import lora_list, read_lora
        from .lora_feeds import lora_feeds, require_slots

        if lora is not None:
            require_slots(self.spec)
        if not self.spec.lora_slots:
            return

        skeleton = _LayerShapes(self.spec)
        adapters = [] if lora is None else [(read_lora(path, skeleton, slots_of=str(self.source)).layers, scale)
                                            for path, scale in lora_list(lora)]
        dtype = np.float16 if self.spec.precision == "fp16" else np.float32
        self._lora_feeds = lora_feeds(self.spec, adapters, dtype)

    def _check_session(self, path: Path) -> None:
        got = {v.name: (ORT_TYPES.get(v.type, v.type), _static(v.shape)) for v in self.session.get_inputs()
               if not v.name.startswith(LORA_PREFIX)}
        want = {t.name: (t.dtype, _static(t.shape)) for t in self.spec.inputs}
        if got != want:
            raise ArtifactError(
                f"{path} does not match its dqdeploy_export.json: the graph's inputs (dtype, static dims) are {got}, "
                f"the spec says {want}",
                hint="the folder was edited by hand or mixed from two exports; re-run `dqdeploy export`",
            )
        outputs = [v.name for v in self.session.get_outputs()]
        self._output = OUTPUT if OUTPUT in outputs else outputs[0]

    def _run(self, feeds: dict[str, torch.Tensor]) -> torch.Tensor:
        arrays: Mapping[str, np.ndarray] = {**{n: t.numpy() for n, t in feeds.items()}, **self._lora_feeds}
        try:
            (out,) = self.session.run([self._output], arrays)
        except Exception as exc:  # ORT's own error types (allocation failures, kernels refusing a shape)
            shapes = {n: tuple(a.shape) for n, a in arrays.items()}
            raise RuntimeInputError(f"ONNX Runtime could not run the graph on inputs {shapes}: "
                                    f"{str(exc).splitlines()[0][:300]}",
                                    hint="smaller inputs (batch, resolution) need less memory; inputs must match "
                                         "`dqdeploy inspect EXPORT_DIR`") from None
        return torch.from_numpy(out)


if not TYPE_CHECKING:  # old names, kept for one release (mypy sees only the new ones)
    __getattr__ = renamed(__name__, {"OrtUNet": "OrtDenoiser"})
