"""The float layers a conversion replaces, kept so that fallback can put any of them back exactly.

Quantize converts the float model in place (one copy of the weights in memory): each Conv2d /
Linear it replaces by a QuantLayer is handed here, and its module moves to the meta device (no
memory). Its tensors are read back, bit for bit, from the safetensors file the model was loaded
from when every one of them came from there (``sources``: nothing written), else from a file this
class writes in ``folder``. Without a folder the module stays as it is (the caller converted a
copy, so the float layers exist anyway).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from .tensorfile import read_tensors

PREFIX = "float-"  # the file names: float-NNNNN.safetensors (checkpoint.py's own data files)


class FloatLayers:
    """Replaced float layers by name; only those in ``names`` are kept. ``sources``: the file each
    tensor of the model was read from, by tensor name (``models.own_weights``)."""

    def __init__(self, names: Collection[str], folder: Path | None = None,
                 sources: Mapping[str, Path] | None = None) -> None:
        self.names = set(names)
        self.folder = folder
        self.sources = dict(sources or {})
        self.modules: dict[str, nn.Module] = {}
        self.files: dict[str, dict[str, Path]] = {}  # layer -> its tensors' full names -> the file holding them
        self.written: list[Path] = []

    def keep(self, name: str, module: nn.Module) -> None:
        """Keep ``module`` (just replaced at ``name``) if fallback may want it back."""
        if name not in self.names:
            return
        keys = [f"{name}.{k}" for k in module.state_dict()]
        if all(k in self.sources for k in keys):
            self.files[name] = {k: self.sources[k] for k in keys}
            module.to("meta")
        elif self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
            path = self.folder / f"{PREFIX}{len(self.written):05d}.safetensors"
            save_file({f"{name}.{k}": v.detach().contiguous() for k, v in module.state_dict().items()}, str(path))
            self.written.append(path)
            self.files[name] = {k: path for k in keys}
            module.to("meta")
        self.modules[name] = module

    def restore(self, name: str) -> nn.Module:
        """The float layer that was at ``name``, with its original tensors."""
        module = self.modules.pop(name)
        if name in self.files:
            where = self.files.pop(name)
            state: dict[str, torch.Tensor] = {}
            for path in set(where.values()):
                state |= read_tensors(path, lambda key, _entry: key in where)
            module.to_empty(device="cpu")
            module.load_state_dict({k[len(name) + 1:]: v for k, v in state.items()}, strict=True, assign=True)
        return module

    def clear(self) -> None:
        """Forget the kept layers and delete the files written."""
        for path in self.written:
            path.unlink(missing_ok=True)
        self.written.clear()
        self.files.clear()
        self.modules.clear()
