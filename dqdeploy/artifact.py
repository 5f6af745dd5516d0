"""The quantized artifact: a folder with ``manifest.json`` and ``model.safetensors`` (no pickles).

The manifest records the format version, dqdeploy version, recipe, calibration settings, the base
model class and config, the scheduler config and calibrated time steps, per-layer quantizer
metadata, per-block distillation losses and the sha256 of every data file. Written atomically.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .atomic import atomic_dir
from .errors import ArtifactError, check_format

FORMAT = "dqdeploy-quantized"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
WEIGHTS = "model.safetensors"
CALIB_INPUTS = "calibration_inputs.safetensors"  # a small seeded subset of (x_t, t, cond), for export and checks


@dataclass(frozen=True)
class LayerMeta:
    """What rebuilding and exporting one quantized layer needs to know."""

    kind: str  # "conv" | "linear"
    weight_bits: int
    act_bits: int
    act_symmetric: bool
    group: str  # layers with the same group read the same tensor and share the dilation vector
    fold: str  # "norm:<module>" (1/s folded into that affine norm at export) | "mul"
    output_quant: bool = False  # the layer's output is quantized too (layout "ort")


@dataclass
class Manifest:
    """Everything in ``manifest.json``."""

    recipe: dict[str, Any]
    calibration: dict[str, Any]
    model_class: str
    model_config: dict[str, Any]
    scheduler_config: dict[str, Any]
    timesteps: list[float]
    layers: dict[str, LayerMeta]
    blocks: list[dict[str, Any]] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)
    dqdeploy_version: str = __version__
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: Path) -> "Manifest":
        check_format(data, FORMAT, FORMAT_VERSION, f"quantized artifact ({where})", "dqdeploy quantize")
        try:
            data = dict(data)
            data["layers"] = {k: LayerMeta(**v) for k, v in data["layers"].items()}
            return cls(**data)
        except (TypeError, KeyError, AttributeError) as exc:
            raise ArtifactError(f"{where}: malformed manifest ({exc})") from None


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_artifact(
    out_dir: str | Path,
    manifest: Manifest,
    tensors: dict[str, dict[str, torch.Tensor]],
    extras: dict[str, bytes] | None = None,
    *,
    overwrite: bool = False,
) -> Path:
    """Write the artifact folder atomically: ``tensors`` maps file names to safetensors contents
    (hashed in the manifest); ``extras`` are additional files (reports, plots)."""
    from safetensors.torch import save_file

    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        manifest.files = {}
        for fname, state in tensors.items():
            save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(tmp / fname))
            manifest.files[fname] = sha256(tmp / fname)
        for name, data in (extras or {}).items():
            (tmp / name).write_bytes(data)
        (tmp / MANIFEST).write_text(manifest.to_json())
    return Path(out_dir)


def read_manifest(quant_dir: str | Path) -> Manifest:
    """Read and validate ``manifest.json`` (format, version, structure)."""
    quant_dir = Path(quant_dir)
    path = quant_dir / MANIFEST
    if not path.is_file():
        raise ArtifactError(
            f"{quant_dir} is not a quantized artifact: {MANIFEST} is missing",
            hint="create one with `dqdeploy quantize MODEL_DIR --out QUANT_DIR` (an interrupted run leaves none)",
        )
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{path} is not valid JSON ({exc}): the artifact is corrupted") from None
    return Manifest.from_dict(data, quant_dir)


def load_state(quant_dir: str | Path, manifest: Manifest, fname: str = WEIGHTS) -> dict[str, torch.Tensor]:
    """Load one safetensors file of the artifact after checking its sha256 against the manifest."""
    from safetensors.torch import load_file

    quant_dir = Path(quant_dir)
    if fname not in manifest.files:
        raise ArtifactError(f"{MANIFEST} lists no {fname}", hint="re-run `dqdeploy quantize` with this version")
    verify_files(quant_dir, manifest, [fname])
    return load_file(str(quant_dir / fname))


def verify_files(quant_dir: str | Path, manifest: Manifest, names: list[str] | None = None) -> None:
    """Check that the data files the manifest lists (or only ``names``) exist and match their sha256."""
    quant_dir = Path(quant_dir)
    for name, digest in manifest.files.items():
        if names is not None and name not in names:
            continue
        path = quant_dir / name
        if not path.is_file():
            raise ArtifactError(f"{path} is missing from the artifact")
        if sha256(path) != digest:
            raise ArtifactError(
                f"{path} does not match the sha256 in {MANIFEST}: the file is corrupted or was modified",
                hint="re-run `dqdeploy quantize` to recreate the artifact",
            )
