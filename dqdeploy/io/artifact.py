"""The quantized artifact: a folder with ``manifest.json`` and ``model.safetensors`` (no pickles;
integer weights plus scales, see ``storage.py``).

The manifest records the format version, dqdeploy version, recipe, calibration settings, the base
model class and config, the scheduler config and calibrated time steps, per-layer quantizer
metadata, per-block distillation losses and the sha256 of every data file, and is itself sealed by
a sha256 of its canonical body (``integrity``). Reading validates the schema, the seal, the file
names (confined to the folder) and the hashes; ``load_quantized`` cross-checks the model the config
describes (on the meta device, before allocating) and the tensors. Written atomically.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from ..core.arguments import as_path, public
from ..core.errors import ArtifactError, check_format
from ..core.recipe import Recipe
from ..core.version import __version__
from ..quant.attention import install_attention_quant
from ..quant.distill import BlockReport
from ..quant.modules import QuantizedDenoiser, QuantLayer, replace_module
from ..quant.timestep import StepIndex, TimestepTable
from ..system.progress import Progress
from .atomic import atomic_dir
from .folders import MANIFEST
from .integrity import confined, file_sha256, read_json_object, seal, verify_file, verify_seal
from .models import denoiser_class
from .storage import Header, expected_header, file_header, simulation_state, stored_state
from .tensor_checks import (
    check_calibrated_size,
    check_calibration_inputs,
    check_header,
    check_model_layers,
    check_state,
    meta_model,
)
from .tensorfile import read_tensors
from .validation import check_manifest

FORMAT = "dqdeploy-quantized"
FORMAT_VERSION = 2  # 2: integer weights (storage.py); 1: float weights, still read
READABLE_VERSIONS = (1, 2)
WEIGHTS = "model.safetensors"
CALIB_INPUTS = "calibration_inputs.safetensors"  # a small seeded subset of (x_t, t, cond), for export and checks


@dataclass
class QuantizeResult:
    """What ``quantize`` produced: the simulated model, its metadata and the distillation record."""

    model: QuantizedDenoiser
    manifest: Manifest
    reports: list[BlockReport]
    calib_inputs: dict[str, torch.Tensor]
    path: Path | None = None


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

    recipe: Recipe
    calibration: dict[str, Any]
    model_class: str
    model_config: dict[str, Any]
    scheduler_config: dict[str, Any]
    timesteps: list[float]
    layers: dict[str, LayerMeta]
    blocks: list[dict[str, Any]] = field(default_factory=list)
    fallback: list[str] = field(default_factory=list)  # layers the recipe selected but kept in float
    lora: list[dict[str, Any]] = field(default_factory=list)  # LoRA files folded in: file, sha256, scale, layers
    attention: list[str] = field(default_factory=list)  # attention modules with quantized matmul inputs
    # per-step denoiser error vs FP on held trajectories, and the zoo reference it was compared with
    # (stages/quality.py); absent in artifacts made before it existed or with the check off
    quality: dict[str, Any] | None = None
    files: dict[str, str] = field(default_factory=dict)
    dqdeploy_version: str = __version__
    format: str = FORMAT
    format_version: int = FORMAT_VERSION
    integrity: str = ""  # sha256 of the canonical JSON of everything else (integrity.seal)

    def to_json(self) -> str:
        """The manifest as JSON text, sealed."""
        data = asdict(self)
        if self.recipe.fallback_time is None:  # a later recipe field: left out at its default, as before it existed
            del data["recipe"]["fallback_time"]
        if self.recipe.fallback_candidates is None:  # likewise
            del data["recipe"]["fallback_candidates"]
        if not self.lora:  # likewise
            del data["lora"]
        if not self.attention:  # likewise
            del data["attention"]
        if self.recipe.attention == "float":
            del data["recipe"]["attention"]
        if self.quality is None:  # likewise
            del data["quality"]
        return json.dumps(seal(data), indent=2)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: Path) -> "Manifest":
        """Validate (format, schema, recipe, seal) and build; every problem is an :class:`ArtifactError`."""
        check_format(data, FORMAT, READABLE_VERSIONS, f"quantized artifact ({where})", "dqdeploy quantize")
        check_manifest(data, where, {f.name for f in fields(cls)}, {f.name for f in fields(LayerMeta)})
        verify_seal(data, where / MANIFEST, "dqdeploy quantize")
        data = dict(data)
        data["layers"] = {k: LayerMeta(**v) for k, v in data["layers"].items()}
        data["recipe"] = Recipe.from_dict(data["recipe"])
        return cls(**data)


def sha256(path: Path) -> str:
    """Hex sha256 of a file (cached by size and modification time)."""
    return file_sha256(Path(path))


def save_artifact(
    out_dir: str | Path,
    manifest: Manifest,
    tensors: dict[str, dict[str, torch.Tensor]],
    extras: dict[str, bytes] | None = None,
    *,
    overwrite: bool = False,
    sources: Iterable[str | Path] = (),
) -> Path:
    """Write the artifact folder atomically: ``tensors`` maps file names to safetensors contents
    (hashed in the manifest); ``extras`` are additional files (reports, plots). ``sources`` (the
    model folder it came from) are never replaced."""
    from safetensors.torch import save_file

    with atomic_dir(out_dir, overwrite=overwrite, kind="quantized", sources=sources) as tmp:
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
    data = read_json_object(path, "quantized artifact manifest", "re-run `dqdeploy quantize` to recreate the artifact")
    return Manifest.from_dict(data, quant_dir)


def manifest_seal(quant_dir: str | Path) -> str:
    """The integrity seal of an artifact's manifest: identifies exactly this artifact."""
    return read_manifest(quant_dir).integrity


def load_state(quant_dir: str | Path, manifest: Manifest, fname: str = WEIGHTS) -> dict[str, torch.Tensor]:
    """Load one safetensors file of the artifact after checking its sha256 against the manifest."""
    quant_dir = Path(quant_dir)
    if fname not in manifest.files:
        raise ArtifactError(f"{MANIFEST} lists no {fname}", hint="re-run `dqdeploy quantize` with this version")
    verify_files(quant_dir, manifest, [fname])
    try:
        # read, not mapped: the float weights built from it replace it
        return read_tensors(confined(quant_dir, fname, "artifact"))
    except Exception as exc:  # OSError, TensorFileError (a malformed header), RecursionError (JSON nesting)
        raise ArtifactError(f"{quant_dir / fname} is not a readable safetensors file ({str(exc)[:200]})",
                            hint="re-run `dqdeploy quantize` to recreate the artifact") from None


def verify_files(quant_dir: str | Path, manifest: Manifest, names: list[str] | None = None) -> None:
    """Check that the data files the manifest lists (or only ``names``) exist and match their sha256."""
    quant_dir = Path(quant_dir)
    for name, digest in manifest.files.items():
        if names is None or name in names:
            verify_file(quant_dir, name, digest, None, "artifact", "dqdeploy quantize")


def install_quant_layers(
    denoiser: nn.Module,
    layers: dict[str, LayerMeta],
    table: TimestepTable,
    dilations: dict[str, torch.Tensor | None] | None = None,
    weight_scales: Mapping[str, torch.Tensor] | None = None,
    replaced: Callable[[str, nn.Module], None] | None = None,
) -> QuantizedDenoiser:
    """Replace each layer named in ``layers`` of ``denoiser`` (in place) by a QuantLayer as its meta says,
    handing each replaced layer to ``replaced`` (else it is freed at once).

    When quantizing (with the dilation vectors) each layer's weight-scale search runs here, with a
    progress bar; loading an artifact passes its stored ``weight_scales`` and searches nothing."""
    step_index = StepIndex()
    modules: dict[str, nn.Conv2d | nn.Linear] = {}
    for name in layers:
        try:
            modules[name] = cast(nn.Conv2d | nn.Linear, denoiser.get_submodule(name))
        except AttributeError:
            raise ArtifactError(f"manifest layer {name!r} does not exist in {type(denoiser).__name__}") from None
    with Progress(len(layers), "weight scales", unit="layer", enabled=weight_scales is None) as bar:
        for name, meta in layers.items():
            layer = modules.pop(name)  # the replaced layer is freed as soon as its QuantLayer is in place
            q = QuantLayer(
                layer, weight_bits=meta.weight_bits, act_bits=meta.act_bits, act_symmetric=meta.act_symmetric,
                n_steps=table.n_rows, step_index=step_index, dilation=None if dilations is None else dilations[name],
                output_quant=meta.output_quant, weight_scale=None if weight_scales is None else weight_scales[name],
            )
            replace_module(denoiser, name, q)
            bar.update()
            if replaced is not None:
                replaced(name, layer)
    return QuantizedDenoiser(denoiser, table, step_index)


def timestep_table(manifest: Manifest) -> TimestepTable:
    """The calibrated-step table of an artifact (one row, when its recipe collapses time steps)."""
    return TimestepTable(manifest.timesteps, collapsed=manifest.recipe.timestep_scales == "collapsed")


@public
def load_quantized(quant_dir: str | Path, lora: Any = None) -> QuantizedDenoiser:
    """Rebuild the simulated quantized model from an artifact (no calibration data needed); ``lora``: LoRA
    files to run beside it as float branches (``FILE``, ``(FILE, scale)`` or a list of them; the model's
    ``lora_branches.remove()`` takes them off again, bit for bit).

    The layers are built straight from the stored integers and scales: nothing is searched or
    recomputed. The model the manifest describes is first built on the meta device and the weights
    file's header checked against it (names, dtypes, shapes), so a tampered artifact allocates
    nothing; the loaded tensors then become the model's own (no second copy)."""
    quant_dir = as_path(quant_dir, "quant_dir", "load_quantized")
    manifest = read_manifest(quant_dir)
    verify_files(quant_dir, manifest, [WEIGHTS, CALIB_INPUTS])
    if CALIB_INPUTS in manifest.files:  # a resealed sample_size shows in the stored inputs' shape
        check_calibrated_size(manifest, _file_header(quant_dir / CALIB_INPUTS), quant_dir)
    cls = denoiser_class({"_class_name": manifest.model_class}, quant_dir)
    skeleton = meta_model(cls, manifest.model_config, quant_dir)
    check_model_layers(skeleton, manifest, quant_dir)
    table = timestep_table(manifest)
    model = _installed(skeleton, manifest, table, _placeholder_scales(skeleton, manifest.layers))
    bits = {n: m.weight_bits for n, m in manifest.layers.items()} if manifest.format_version >= 2 else {}
    shapes = {k: tuple(t.shape) for k, t in skeleton.state_dict().items()}
    check_header(expected_header(skeleton.state_dict(), bits), _file_header(quant_dir / WEIGHTS), quant_dir)
    stored = load_state(quant_dir, manifest)
    check_state(stored, manifest, quant_dir, shapes)
    state = simulation_state(stored, bits, shapes)
    if set(dict(skeleton.named_buffers())) - set(shapes):  # buffers computed at construction (PixArt's pos_embed)
        denoiser = cls.from_config(manifest.model_config)
        scales = {n: state[f"{n}.weight_quantizer.scale"] for n in manifest.layers}
        model = _installed(denoiser, manifest, table, scales)
    try:
        model.denoiser.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise ArtifactError(f"{quant_dir}: weights do not match the manifest ({str(exc)[:300]})") from None
    if lora is not None:
        from .lora import apply_lora

        model.lora_branches = apply_lora(model, lora)
    return model.eval()


def _installed(denoiser: nn.Module, manifest: Manifest, table: TimestepTable,
               weight_scales: Mapping[str, torch.Tensor]) -> QuantizedDenoiser:
    """``denoiser`` with the manifest's quantized layers and attentions in place (their tensors still to load)."""
    model = install_quant_layers(denoiser, manifest.layers, table, weight_scales=weight_scales)
    install_attention_quant(model.denoiser, manifest.attention, table.n_rows, manifest.recipe.act_bits,
                            model.step_index)
    return model


def _placeholder_scales(denoiser: nn.Module, layers: Mapping[str, LayerMeta]) -> dict[str, torch.Tensor]:
    """Per layer an uninitialised weight-scale vector of the right size on the meta device."""
    return {n: torch.empty(cast(torch.Tensor, denoiser.get_submodule(n).weight).shape[0], device="meta")
            for n in layers}


def _file_header(path: Path) -> Header:
    try:
        return file_header(path)
    except Exception as exc:  # safetensors raises its own error types
        raise ArtifactError(f"{path} is not a readable safetensors file ({str(exc)[:200]})",
                            hint="re-run `dqdeploy quantize`") from None


def load_calibration_inputs(quant_dir: str | Path) -> dict[str, torch.Tensor]:
    """The calibration inputs saved with an artifact, keyed by the model's keyword names: ``sample``
    or ``hidden_states``, ``timestep`` and the conditioning (``encoder_hidden_states``, ...)."""
    manifest = read_manifest(quant_dir)
    calib = load_state(quant_dir, manifest, CALIB_INPUTS)
    check_calibration_inputs(calib, manifest, Path(quant_dir))
    return calib


def save_quantized(
    result: QuantizeResult, out_dir: str | Path, *, overwrite: bool = False, sources: Iterable[str | Path] = ()
) -> Path:
    """Write the artifact (manifest, safetensors, distillation losses and their plot)."""
    extras = {"distill_report.json": json.dumps([asdict(r) for r in result.reports], indent=1).encode()}
    if result.reports:
        extras["distill_loss.png"] = _loss_plot(result.reports)
    tensors = {WEIGHTS: stored_state(result.model.denoiser), CALIB_INPUTS: result.calib_inputs}
    return save_artifact(out_dir, result.manifest, tensors, extras, overwrite=overwrite, sources=sources)


def _loss_plot(reports: list[BlockReport]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4))
    names = [r.name for r in reports]
    a.semilogy(range(len(reports)), [max(r.loss_before, 1e-12) for r in reports], "o-", label="before")
    a.semilogy(range(len(reports)), [max(r.loss_after, 1e-12) for r in reports], "o-", label="after")
    a.set_xticks(range(len(reports)), names, rotation=90, fontsize=6)
    a.set_title("block MSE vs full precision")
    a.legend()
    for r in reports:
        if r.curve:
            b.semilogy(r.curve, lw=0.6)
    b.set_title("distillation loss per block")
    b.set_xlabel("iteration")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()
