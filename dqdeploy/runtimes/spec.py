"""The exported-model folder: layout and JSON sidecar (the contract between exporters and runtimes).

Layout (optimum's)::

    OUT_DIR/
      dqdeploy_export.json      # ExportSpec below
      unet/model.onnx           # + unet/model.onnx_data (external weights); transformer/ for DiTs
      unet/model.plan           # TensorRT engine (trt target only) + unet/engine.json

I/O (UNets): ``sample`` [B, C, H, W], ``timestep`` [B], ``encoder_hidden_states`` [B, S, D]
(conditional models only) -> ``out_sample`` [B, C_out, H, W]. Diffusion transformers:
``hidden_states``, ``encoder_hidden_states``, ``pooled_projections``, ``timestep`` [, ``img_ids``,
``txt_ids``, ``guidance``] -> ``out_hidden_states`` (:mod:`dqdeploy.core.denoisers`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from ..core.denoisers import SPECS
from ..core.errors import ArtifactError, RecipeError, check_format
from ..core.recipe import Recipe
from ..core.vocab import CONTEXT, GraphTarget, Int8Format, Layout
from ..io.folders import SPEC_FILE
from ..io.integrity import SEAL_KEY, read_json_object, seal, verify_file, verify_seal
from .targets import layout_of

ONNX_FILE = "unet/model.onnx"  # UNets; transformers: onnx_file()
ONNX_DATA_FILE = "model.onnx_data"
ENGINE_FILE = "unet/model.plan"  # UNets; transformers: engine_files()
ENGINE_SPEC_FILE = "unet/engine.json"
FORMAT = "dqdeploy-export"
FORMAT_VERSION = 1
LEGACY_KEYS = {"flavour": "target"}  # specs written before the rename


LORA_PREFIX = "lora/"  # graph inputs of the LoRA slots: lora/<layer>/down and lora/<layer>/up (exporters/lora_slots)


def lora_inputs(layer: str) -> tuple[str, str]:
    """The graph inputs of ``layer``'s LoRA slot: a Linear's ``down`` [in, r] (A transposed) and ``up`` [r, out] (B
    transposed, times the adapter's scale); a convolution's ``down`` [r, in, kh, kw] and ``up`` [out, r, 1, 1]."""
    return f"{LORA_PREFIX}{layer}/down", f"{LORA_PREFIX}{layer}/up"


def slot_input_shapes(slot: dict[str, Any]) -> dict[str, list[int | None]]:
    """The shapes of a LoRA slot's graph inputs (an export spec's ``lora_slots`` entry), ``None`` at the rank dim:
    a Linear's ``down`` [in, r] and ``up`` [r, out], a convolution's ``down`` [r, in, kh, kw] and ``up``
    [out, r, 1, 1]."""
    conv = slot.get("conv")
    if conv is None:
        return {slot["down"]: [slot["in"], None], slot["up"]: [None, slot["out"]]}
    return {slot["down"]: [None, slot["in"], *conv["kernel"]], slot["up"]: [slot["out"], None, 1, 1]}


def onnx_file(model_class: str) -> str:
    """The graph's path inside an export folder: ``unet/model.onnx`` or ``transformer/model.onnx``."""
    spec = SPECS.get(model_class)
    return ONNX_FILE if spec is None else f"{spec.subfolder}/model.onnx"


def model_folder(model_class: str) -> str:
    """The denoiser's folder in an export folder, as in optimum's ONNX layout (``unet`` or ``transformer``);
    also the name of its Triton model."""
    return onnx_file(model_class).rsplit("/", 1)[0]


def engine_files(model_class: str) -> tuple[str, str]:
    """The TensorRT engine and its ``engine.json`` next to the graph (``unet/`` or ``transformer/``)."""
    folder = model_folder(model_class)
    return f"{folder}/model.plan", f"{folder}/engine.json"


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape (ints or symbolic strings) and dtype of one graph input or output."""

    name: str
    shape: list[int | str]
    dtype: str


@dataclass(frozen=True)
class ExportSpec:
    """Everything a runtime needs to know about an exported denoiser, stored as JSON next to it."""

    target: GraphTarget | Literal["unknown"]  # the export target that wrote the graph ("unknown": a bare ONNX file)
    precision: str  # "fp32" | "fp16"
    opset: int
    model_class: str
    model_config: dict[str, Any]
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    timesteps: list[float] = field(default_factory=list)  # calibrated steps, descending
    recipe: Recipe | None = None
    scheduler_config: dict[str, Any] | None = None
    versions: dict[str, str] = field(default_factory=dict)
    files: dict[str, dict[str, Any]] = field(default_factory=dict)  # relative path -> {sha256, size}
    source: str = ""  # integrity seal of the artifact manifest it was exported from ("" for float exports)
    resolution_range: list[int] | None = None  # [MIN, MAX] latent height/width of a dynamic-resolution graph
    # LoRA slots: per adapted Linear or Conv2d, {layer, down, up, in, out[, conv]}: the inputs of its float branch
    lora_slots: list[dict[str, Any]] = field(default_factory=list)
    # ORT layout: the integer format of the weights, which decides the CPUs its int8 kernels are exact on
    # (:mod:`dqdeploy.system.cpu`); None for other targets, and for ORT graphs exported before it was recorded (int8)
    int8_format: Int8Format | None = None
    text_length_range: list[int] | None = None  # [MIN, MAX] text tokens of a dynamic-text-length graph
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    @property
    def conditional(self) -> bool:
        """Whether the graph takes ``encoder_hidden_states``."""
        return any(t.name == CONTEXT for t in self.inputs)

    @property
    def layout(self) -> Layout | None:
        """The deployment layout of the graph (``None``: float or unknown)."""
        return layout_of(self.target)

    @property
    def weight_format(self) -> Int8Format | None:
        """The ORT-layout graph's integer format (``vnni`` for ORT graphs that predate the record); None otherwise."""
        return (self.int8_format or "vnni") if self.layout == "ort" else None

    @property
    def onnx_file(self) -> str:
        """The graph's path inside the export folder."""
        return onnx_file(self.model_class)

    @property
    def pipeline_parts(self) -> list[str]:
        """The folders of the pipeline components exported beside the graph (``--pipeline``); [] for a denoiser."""
        return sorted({name.split("/")[0] for name in self.files if "/" in name} - {self.onnx_file.split("/")[0]})

    @property
    def engine_file(self) -> str:
        """The TensorRT engine's path inside the export folder."""
        return engine_files(self.model_class)[0]

    @property
    def engine_spec_file(self) -> str:
        """The engine description's path inside the export folder."""
        return engine_files(self.model_class)[1]

    def to_json(self) -> str:
        """The spec as JSON text, sealed (``integrity``: sha256 of the canonical body)."""
        data = asdict(self)
        for later in ("lora_slots", "text_length_range"):  # later fields: left out when empty, as before they existed
            if not data[later]:
                del data[later]
        if isinstance(data.get("recipe"), dict) and data["recipe"].get("attention") == "float":  # likewise
            del data["recipe"]["attention"]
        return json.dumps(seal(data), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ExportSpec":
        """Parse a spec (format and version checked; old key names read; the seal is not kept)."""
        check_format(data, FORMAT, FORMAT_VERSION, "export", "dqdeploy export")
        data = {LEGACY_KEYS.get(k, k): v for k, v in data.items() if k != SEAL_KEY}
        data["inputs"] = [TensorSpec(**t) for t in data["inputs"]]
        data["outputs"] = [TensorSpec(**t) for t in data["outputs"]]
        try:
            if data.get("recipe") is not None:
                data["recipe"] = Recipe.from_dict(data["recipe"])
            return cls(**data)
        except TypeError as exc:
            raise ArtifactError(f"malformed {SPEC_FILE}: {exc}") from exc
        except RecipeError as exc:
            raise ArtifactError(f"{SPEC_FILE}: the recipe is invalid ({exc})",
                                hint="re-run `dqdeploy export`") from None


def read_spec(export_dir: str | Path, *, verify: bool = True) -> ExportSpec:
    """Read and validate ``dqdeploy_export.json``; with ``verify``, also check every file it lists
    (size and sha256, hashed once per process while size and mtime stay the same)."""
    export_dir = Path(export_dir)
    path = export_dir / SPEC_FILE
    if not path.is_file():
        raise ArtifactError(
            f"{path} not found: {export_dir} is not a dqdeploy export folder",
            hint="create one with `dqdeploy export QUANT_DIR --out OUT_DIR`",
        )
    from ..io.validation import check_spec

    data = read_json_object(path, "export spec", "re-run `dqdeploy export`")
    check_format(data, FORMAT, FORMAT_VERSION, "export", "dqdeploy export")
    check_spec({LEGACY_KEYS.get(k, k): v for k, v in data.items()}, path,
               {f.name for f in fields(ExportSpec)} | {SEAL_KEY})
    verify_seal(data, path, "dqdeploy export")
    spec = ExportSpec.from_dict(data)
    if verify:
        for name, rec in spec.files.items():
            verify_file(export_dir, name, rec["sha256"], rec["size"], "export", "dqdeploy export", nested=True)
    return spec
