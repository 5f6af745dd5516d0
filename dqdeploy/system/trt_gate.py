"""The TensorRT dependency gate: import ``tensorrt`` (10.x or newer) and check for a CUDA device.

Small on purpose: the engine build (:mod:`dqdeploy.exporters.engine`), the TensorRT runtime
(:mod:`dqdeploy.runtimes.trt`), checks and sampling all call it first, before any expensive work.
"""

from __future__ import annotations

from typing import Any

from ..core.errors import MissingDependencyError, require

MIN_TRT_MAJOR = 10
TRT_HINT = ("pip install 'dqdeploy[trt]' on a machine with an NVIDIA GPU "
            "(TensorRT builds and runs engines only on NVIDIA GPUs)")


def require_tensorrt(purpose: str = "building a TensorRT engine") -> Any:
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



def gpu_description() -> tuple[str, str]:
    """(name, compute capability) of the current CUDA device."""
    import torch

    idx = torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(idx)
    return torch.cuda.get_device_name(idx), f"{major}.{minor}"

