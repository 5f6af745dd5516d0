"""dqdeploy: ship low-bit diffusion denoisers (UNets and diffusion transformers) with DilateQuant.

The public verbs (imported on first use, so ``import dqdeploy`` stays light)::

    import dqdeploy

    result = dqdeploy.quantize("model_dir", dqdeploy.W8A8, out_dir="q")  # diffusers folder -> artifact
    dqdeploy.export("q", "e", target="ort")                              # artifact -> export folder
    model = dqdeploy.load_quantized("q")                                 # the PyTorch simulation
    model = dqdeploy.load_runtime("e")                                   # the exported graph, drop-in
    pipe = dqdeploy.load_pipeline("e")       # export --pipeline MODEL_DIR: prompt to image, ONNX Runtime, no torch
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from .core.deprecation import install_moved_modules
from .core.version import __version__

install_moved_modules()  # dqdeploy.artifact etc. still import, as their new modules, for one release

if TYPE_CHECKING:
    from .core.recipe import PRESETS, W4A4, W4A8, W7A8, W8A8, CalibrationConfig, Recipe
    from .exporters.export import export
    from .io.artifact import load_quantized
    from .runtimes import load_runtime
    from .runtimes.pipeline import load_pipeline
    from .stages.quantize import quantize

__all__ = [
    "quantize", "export", "load_quantized", "load_runtime", "load_pipeline",
    "Recipe", "CalibrationConfig", "PRESETS", "W8A8", "W7A8", "W4A8", "W4A4", "__version__",
]

_WHERE = {
    "quantize": ".stages.quantize",
    "export": ".exporters.export",
    "load_quantized": ".io.artifact",
    "load_runtime": ".runtimes",
    "load_pipeline": ".runtimes.pipeline",
    **{name: ".core.recipe" for name in ("Recipe", "CalibrationConfig", "PRESETS", "W8A8", "W7A8", "W4A8", "W4A4")},
}


def __getattr__(name: str) -> Any:
    """Import a public name from the module that defines it, on first access."""
    if name not in _WHERE:
        raise AttributeError(f"module 'dqdeploy' has no attribute {name!r}")
    value = getattr(import_module(_WHERE[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
