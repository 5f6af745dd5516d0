"""What kind of model folder a path is: a diffusers folder, a quantized artifact or an export folder.

Below both stages (it only reads marker file names), so ``sources`` and the exporters can ask it
without importing each other.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from ..core.errors import ModelLoadError

FolderKind = Literal["fp", "quantized", "export"]
MANIFEST = "manifest.json"  # marks a quantized artifact (dqdeploy.io.artifact)
SPEC_FILE = "dqdeploy_export.json"  # marks an export folder (dqdeploy.runtimes.spec)


def detect(path: str | Path) -> FolderKind:
    """``"quantized"``, ``"export"`` or ``"fp"`` (a diffusers folder) for ``path``."""
    path = Path(path)
    if not path.is_dir():
        raise ModelLoadError(f"{path} does not exist or is not a folder")
    if (path / MANIFEST).is_file():
        return "quantized"
    if (path / SPEC_FILE).is_file():
        return "export"
    return "fp"
