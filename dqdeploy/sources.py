"""Open any model folder a user may point at -- a diffusers folder (full precision), a quantized
artifact, or an export folder -- as a callable UNet plus its scheduler config."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ModelLoadError


@dataclass
class OpenedModel:
    """A drop-in UNet callable, the scheduler config it was made for, and what it is."""

    unet: Any
    scheduler_config: dict[str, Any]
    kind: str  # "fp" | "quantized" | "export"
    conditional: bool
    timesteps: list[float]


def detect(path: str | Path) -> str:
    """``"quantized"``, ``"export"`` or ``"fp"`` (a diffusers folder) for ``path``."""
    from .artifact import MANIFEST
    from .exporters.spec import SPEC_FILE

    path = Path(path)
    if not path.is_dir():
        raise ModelLoadError(f"{path} does not exist or is not a folder")
    if (path / MANIFEST).is_file():
        return "quantized"
    if (path / SPEC_FILE).is_file():
        return "export"
    return "fp"


def open_model(path: str | Path, runtime: str = "auto", scheduler_dir: str | Path | None = None, **runtime_kw: Any) -> OpenedModel:
    """Open ``path`` for sampling. ``runtime``: torch | ort | trt | auto (torch, or ort for exports).

    A quantized artifact with ``runtime="ort"``/``"trt"`` is exported to a temporary folder first.
    """
    kind = detect(path)
    if kind == "fp":
        from .models import load_model

        loaded = load_model(path, scheduler_dir)
        if runtime not in ("auto", "torch"):
            raise ModelLoadError(f"--runtime {runtime} needs an export folder; {path} is a diffusers folder",
                                 hint="run `dqdeploy export` first, or use --runtime torch")
        return OpenedModel(loaded.unet, loaded.scheduler_config, "fp", loaded.conditional, [])
    if kind == "quantized":
        if runtime in ("ort", "trt"):
            import tempfile

            from .exporters.export import export_quantized

            if runtime == "trt":
                from .exporters.trt import require_tensorrt

                require_tensorrt("sampling with TensorRT")
            out = Path(tempfile.mkdtemp(prefix="dqdeploy-export-")) / "export"
            export_quantized(path, out, target="ort" if runtime == "ort" else "onnx", fp16=runtime == "trt")
            if runtime == "trt":
                from .exporters.trt import build_engine

                build_engine(out)
            return open_model(out, runtime, **runtime_kw)
        from .api import load_quantized
        from .artifact import read_manifest

        manifest = read_manifest(path)
        model = load_quantized(path)
        conditional = manifest.model_config.get("cross_attention_dim") is not None
        return OpenedModel(model, manifest.scheduler_config, "quantized", conditional, manifest.timesteps)
    from .exporters.spec import read_spec
    from .runtimes import load_runtime

    spec = read_spec(path)
    unet = load_runtime(path, "ort" if runtime in ("auto", "torch") else runtime, **runtime_kw)
    return OpenedModel(unet, spec.scheduler_config or {}, "export", spec.conditional, spec.timesteps)
