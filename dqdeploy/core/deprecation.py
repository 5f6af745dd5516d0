"""Old public names kept for one release: a module's ``__getattr__`` that answers each old name with
the object under its new name and a ``DeprecationWarning``.

The ``*UNet*`` names renamed ``*Denoiser*`` (the same objects run diffusion transformers too) resolve to the
very same classes and functions, so ``isinstance`` and subclassing keep working::

    from dqdeploy.quant.modules import QuantizedUNet   # DeprecationWarning; QuantizedUNet is QuantizedDenoiser

Modules that moved into the layers (``dqdeploy.artifact`` is now ``dqdeploy.io.artifact``) import under their
old path too, as the same module object, with a ``DeprecationWarning`` (:data:`MOVED`, :class:`MovedModules`).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from collections.abc import Callable, Mapping
from types import ModuleType
from typing import Any

WHEN = "kept for one release"


def renamed(module: str, names: Mapping[str, str], shims: Mapping[str, str] | None = None) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``module`` answering each old name of ``names`` (old -> new) with
    the new object, or with the module's attribute ``shims[old]`` (an adaptor for the old signature)."""

    def __getattr__(name: str) -> Any:
        if name not in names:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        new = names[name]
        warnings.warn(f"{module}.{name} is deprecated ({WHEN}): use {module}.{new}",
                      DeprecationWarning, stacklevel=2)
        return getattr(sys.modules[module], (shims or {}).get(name, new))

    return __getattr__


def deprecated_alias(owner: str, old: str, new: str) -> property:
    """A read-only attribute ``old`` of class ``owner`` that warns and returns attribute ``new``."""

    def get(self: Any) -> Any:
        warnings.warn(f"{owner}.{old} is deprecated ({WHEN}): use {owner}.{new}",
                      DeprecationWarning, stacklevel=2)
        return getattr(self, new)

    return property(get, doc=f"Deprecated alias of ``{new}``.")


MOVED = {  # old module path -> its place in the layers
    "dqdeploy.errors": "dqdeploy.core.errors",
    "dqdeploy.vocab": "dqdeploy.core.vocab",
    "dqdeploy.inputs": "dqdeploy.core.inputs",
    "dqdeploy.denoisers": "dqdeploy.core.denoisers",
    "dqdeploy.recipe": "dqdeploy.core.recipe",
    "dqdeploy.arguments": "dqdeploy.core.arguments",
    "dqdeploy.deprecation": "dqdeploy.core.deprecation",
    "dqdeploy.sampling": "dqdeploy.core.sampling",
    "dqdeploy.cpu": "dqdeploy.system.cpu",
    "dqdeploy.trt_gate": "dqdeploy.system.trt_gate",
    "dqdeploy.interrupts": "dqdeploy.system.interrupts",
    "dqdeploy.launch": "dqdeploy.system.launch",
    "dqdeploy.distributed": "dqdeploy.system.distributed",
    "dqdeploy.stages": "dqdeploy.system.progress",
    "dqdeploy.atomic": "dqdeploy.io.atomic",
    "dqdeploy.paths": "dqdeploy.io.paths",
    "dqdeploy.folders": "dqdeploy.io.folders",
    "dqdeploy.tensorfile": "dqdeploy.io.tensorfile",
    "dqdeploy.integrity": "dqdeploy.io.integrity",
    "dqdeploy.models": "dqdeploy.io.models",
    "dqdeploy.validation": "dqdeploy.io.validation",
    "dqdeploy.storage": "dqdeploy.io.storage",
    "dqdeploy.tensor_checks": "dqdeploy.io.tensor_checks",
    "dqdeploy.artifact": "dqdeploy.io.artifact",
    "dqdeploy.checkpoint": "dqdeploy.io.checkpoint",
    "dqdeploy.quant.float_layers": "dqdeploy.io.float_layers",
    "dqdeploy.quant.analysis": "dqdeploy.quant.input_sharing",
    "dqdeploy.exporters.spec": "dqdeploy.runtimes.spec",
    "dqdeploy.exporters.engine_spec": "dqdeploy.runtimes.engine_spec",
    "dqdeploy.exporters.dynamic": "dqdeploy.runtimes.dynamic",
    "dqdeploy.exporters.targets": "dqdeploy.runtimes.targets",
    "dqdeploy.quantize_stage": "dqdeploy.stages.quantize",
    "dqdeploy.layer_plan": "dqdeploy.stages.layer_plan",
    "dqdeploy.sources": "dqdeploy.stages.sources",
    "dqdeploy.generate": "dqdeploy.stages.generate",
    "dqdeploy.check": "dqdeploy.verify.check",
    "dqdeploy.analyze": "dqdeploy.verify.analyze",
    "dqdeploy.describe": "dqdeploy.verify.inspect",
    "dqdeploy.runtimes.int8_probe": "dqdeploy.verify.int8_probe",
}


class MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """An import hook answering each old module path of ``moved`` with the module at its new path."""

    def __init__(self, moved: Mapping[str, str]):
        self.moved = dict(moved)
        self.specs: dict[str, Any] = {}  # the moved modules' own specs, which the import system overwrites

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname not in self.moved:
            return None
        warnings.warn(f"{fullname} is deprecated ({WHEN}): import {self.moved[fullname]}",
                      DeprecationWarning, stacklevel=2)
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        module = importlib.import_module(self.moved[spec.name])
        self.specs[spec.name] = module.__spec__
        return module

    def exec_module(self, module: ModuleType) -> None:
        if module.__spec__ is not None and module.__spec__.name in self.specs:
            module.__spec__ = self.specs.pop(module.__spec__.name)  # the import system set the old path's spec


def install_moved_modules() -> None:
    """Make the old module paths of :data:`MOVED` importable (once per process)."""
    if not any(isinstance(f, MovedModules) for f in sys.meta_path):
        sys.meta_path.append(MovedModules(MOVED))
