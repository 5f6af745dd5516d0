"""ONNX Runtime sessions without PyTorch: execution providers, session options, and the guard against int8 formats
that are not exact on this CPU (:func:`exactness_entries`). :mod:`.ort` (the drop-in denoiser) and :mod:`.pipeline`
(prompt to image) build their sessions here."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..core.errors import ArtifactError, CpuFormatError, MissingDependencyError, RuntimeInputError, require
from ..core.vocab import INEXACT, Inexact
from ..system.cpu import cpu_info, exact_on
from .spec import ExportSpec

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
    names = [provider_name(p) for p in providers]
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


def provider_name(provider: Provider) -> str:
    """The name of an execution provider given by name or as ``(name, options)``."""
    return provider if isinstance(provider, str) else provider[0]


def open_session(path: str | Path, spec: ExportSpec | None, providers: Sequence[Provider] | str = (CPU,),
                 threads: int = 1, options: Any = None, inexact: Inexact = "refuse") -> Any:
    """An ``onnxruntime.InferenceSession`` of ``path`` (the graph of ``spec``, whose int8 format is checked against this
    CPU when every provider is the CPU's), or a typed error: a graph ORT cannot load, a provider that did not start."""
    ort = require("onnxruntime", "ort", "running an exported graph on ONNX Runtime")
    requested = check_providers(providers)
    # the guard is about ORT's CPU kernels: a GPU provider list runs the integer nodes on the GPU
    entries = exactness_entries(spec if all(provider_name(p) == CPU for p in requested) else None, inexact)
    so = session_options(threads, options, entries)
    try:
        session = ort.InferenceSession(str(path), so, providers=requested)
    except Exception as exc:  # ORT raises its own exception types for unloadable graphs
        raise ArtifactError(f"ONNX Runtime cannot load {path}: {exc}",
                            hint="check the file (and model.onnx_data next to it), or re-export") from exc
    active = session.get_providers()
    dropped = [provider_name(p) for p in requested if provider_name(p) not in active]
    if dropped:  # ORT falls back to CPU silently when a provider fails to initialise (missing CUDA libraries)
        raise MissingDependencyError(
            f"ONNX Runtime could not initialise {', '.join(dropped)} (the session runs on {', '.join(active)} only)",
            hint="install the CUDA/cuDNN versions this onnxruntime-gpu was built for; "
                 "ONNX Runtime's log says which library is missing",
        )
    return session
