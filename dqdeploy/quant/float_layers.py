"""The float layers a conversion replaces, kept so that fallback can put any of them back exactly.

Quantize converts the float model in place (one copy of the weights in memory): each Conv2d /
Linear it replaces by a QuantLayer is handed here. With a folder, the layer's tensors go to a
safetensors file there and the module itself moves to the meta device (no memory); without one,
the module stays as it is (the caller converted a copy, so the float layers exist anyway).
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path

from safetensors.torch import save_file
from torch import nn

from ..tensorfile import read_tensors

PREFIX = "float-"  # the file names: float-NNNNN.safetensors (checkpoint.py's own data files)


class FloatLayers:
    """Replaced float layers by name; only those in ``names`` are kept."""

    def __init__(self, names: Collection[str], folder: Path | None = None) -> None:
        self.names = set(names)
        self.folder = folder
        self.modules: dict[str, nn.Module] = {}
        self.files: dict[str, Path] = {}

    def keep(self, name: str, module: nn.Module) -> None:
        """Keep ``module`` (just replaced at ``name``) if fallback may want it back."""
        if name not in self.names:
            return
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
            path = self.folder / f"{PREFIX}{len(self.files):05d}.safetensors"
            save_file({k: v.detach().contiguous() for k, v in module.state_dict().items()}, str(path))
            self.files[name] = path
            module.to("meta")
        self.modules[name] = module

    def restore(self, name: str) -> nn.Module:
        """The float layer that was at ``name``, with its original tensors."""
        module = self.modules.pop(name)
        if name in self.files:
            path = self.files.pop(name)
            module.to_empty(device="cpu")
            module.load_state_dict(read_tensors(path), strict=True, assign=True)
            path.unlink()
        return module

    def clear(self) -> None:
        """Forget the kept layers and delete the files written."""
        for path in self.files.values():
            path.unlink(missing_ok=True)
        self.files.clear()
        self.modules.clear()
