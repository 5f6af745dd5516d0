"""Open any model folder a user may point at -- a diffusers folder (full precision), a quantized
artifact, or an export folder -- as a callable denoiser plus its scheduler config."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.deprecation import deprecated_alias
from ..core.errors import ModelLoadError
from ..core.vocab import GraphRuntime, Runtime
from ..exporters.export import export
from ..io.artifact import load_quantized, read_manifest
from ..io.folders import FolderKind, detect
from ..io.models import load_model
from ..runtimes import load_runtime
from ..runtimes.spec import read_spec


@dataclass
class OpenedModel:
    """A drop-in denoiser callable, the scheduler config it was made for, and what it is."""

    denoiser: Any
    scheduler_config: dict[str, Any]
    kind: FolderKind
    conditional: bool
    timesteps: list[float]
    # removed by close() or with this object
    scratch: tempfile.TemporaryDirectory | None = field(default=None, repr=False)

    unet = deprecated_alias("OpenedModel", "unet", "denoiser")

    def close(self) -> None:
        """Remove the temporary export (if any) now; ``with open_model(...)`` does it on exit."""
        if self.scratch is not None:
            self.scratch.cleanup()
            self.scratch = None

    def __enter__(self) -> "OpenedModel":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_model(path: str | Path, runtime: Runtime = "auto", scheduler_dir: str | Path | None = None,
               **runtime_kw: Any) -> OpenedModel:
    """Open ``path`` for sampling. ``runtime``: torch | ort | trt | auto (torch, or ort for exports).

    A quantized artifact with ``runtime="ort"``/``"trt"`` is exported to a temporary folder first,
    removed by :meth:`OpenedModel.close` (use the result in a ``with`` block), on any failure or
    interruption, or at the latest when the returned object is.
    """
    kind = detect(path)
    if kind == "fp":
        loaded = load_model(path, scheduler_dir)
        if runtime not in ("auto", "torch"):
            raise ModelLoadError(f"--runtime {runtime} needs an export folder; {path} is a diffusers folder",
                                 hint="run `dqdeploy export` first, or use --runtime torch")
        return OpenedModel(loaded.denoiser, loaded.scheduler_config, "fp", loaded.conditional, [])
    if kind == "quantized" and runtime in ("ort", "trt"):
        scratch = tempfile.TemporaryDirectory(prefix="dqdeploy-export-")
        try:
            out = Path(scratch.name) / "export"
            export(path, out, target=runtime)
            opened = open_model(out, runtime, **runtime_kw)
        except BaseException:  # failures and interruptions (SIGINT, SIGTERM) leave no temporary export
            scratch.cleanup()
            raise
        opened.scratch = scratch
        return opened
    if kind == "quantized":
        manifest = read_manifest(path)
        model = load_quantized(path)
        from ..core.denoisers import conditional as takes_text
        from ..core.denoisers import spec_for

        conditional = takes_text(spec_for(manifest.model_class), manifest.model_config)
        return OpenedModel(model, manifest.scheduler_config, "quantized", conditional, manifest.timesteps)
    spec = read_spec(path)
    backend: GraphRuntime = "trt" if runtime == "trt" else "ort"  # auto/torch: ONNX Runtime
    denoiser = load_runtime(path, backend, **runtime_kw)
    return OpenedModel(denoiser, spec.scheduler_config or {}, "export", spec.conditional, spec.timesteps)
