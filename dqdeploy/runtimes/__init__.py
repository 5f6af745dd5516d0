"""Runtimes that execute exported UNets as drop-in replacements for diffusers UNets."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import DQDeployError
from ..vocab import GRAPH_RUNTIMES, GraphRuntime

if TYPE_CHECKING:
    from .base import UNetRuntime


def load_runtime(export_dir: str | Path, runtime: GraphRuntime = "ort", **kwargs: Any) -> "UNetRuntime":
    """Open an export folder as a drop-in UNet: ``"ort"`` (:class:`~dqdeploy.runtimes.ort.OrtUNet`, keyword
    arguments ``providers``, ``threads``, ``options``) or ``"trt"`` (:class:`~dqdeploy.runtimes.trt.TrtUNet`)."""
    if runtime == "ort":
        from .ort import OrtUNet

        return OrtUNet(export_dir, **kwargs)
    if runtime == "trt":
        from .trt import TrtUNet

        return TrtUNet(export_dir, **kwargs)
    raise DQDeployError(f"unknown runtime {runtime!r} (expected one of {', '.join(GRAPH_RUNTIMES)})",
                        hint="use 'ort' (ONNX Runtime, CPU by default) or 'trt' (TensorRT engine, NVIDIA GPU)")
