"""Runtimes that execute exported denoisers as drop-in replacements for diffusers UNets and transformers."""

from __future__ import annotations

from importlib import import_module
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..core.errors import DQDeployError
from ..core.vocab import GRAPH_RUNTIMES, GraphRuntime

if TYPE_CHECKING:
    from .base import DenoiserRuntime


def load_runtime(export_dir: str | Path, runtime: GraphRuntime = "ort", **kwargs: Any) -> "DenoiserRuntime":
    """Open an export folder as a drop-in denoiser: ``"ort"`` (:class:`~dqdeploy.runtimes.ort.OrtDenoiser`, keyword
    arguments ``providers``, ``threads``, ``options``) or ``"trt"`` (:class:`~dqdeploy.runtimes.trt.TrtDenoiser`)."""
    if runtime in ("ort", "trt"):
        import inspect

        from ..core.arguments import as_path

        cls = getattr(import_module(f".{runtime}", __name__), "OrtDenoiser" if runtime == "ort" else "TrtDenoiser")
        path = as_path(export_dir, "export_dir", "load_runtime")
        try:
            inspect.signature(cls).bind(path, **kwargs)
        except TypeError as exc:
            raise DQDeployError(f"dqdeploy.load_runtime(..., {runtime!r}): {exc}",
                                hint=f"keyword arguments of {cls.__name__}: "
                                     f"{', '.join(list(inspect.signature(cls).parameters)[1:])}") from None
        return cls(path, **kwargs)
    raise DQDeployError(f"unknown runtime {runtime!r} (expected one of {', '.join(GRAPH_RUNTIMES)})",
                        hint="use 'ort' (ONNX Runtime, CPU by default) or 'trt' (TensorRT engine, NVIDIA GPU)")
