"""The rest of a diffusers pipeline beside an exported denoiser, in optimum's ONNX layout (``dqdeploy export Q
--pipeline MODEL_DIR``), every graph in float (FP32)::

    OUT/model_index.json                 the pipeline's, the components not exported set to null
    OUT/scheduler/, OUT/tokenizer*/      copied (a tokenizer.json written where the folder has only vocab and merges)
    OUT/text_encoder*/model.onnx         input_ids -> last_hidden_state, pooler_output (CLIPTextModel);
                                         text_embeds, last_hidden_state, hidden_states.0..N
                                         (CLIPTextModelWithProjection, SD3); last_hidden_state (T5EncoderModel:
                                         SD3, Flux)
    OUT/vae_decoder/model.onnx           latent_sample -> sample
    OUT/vae_encoder/model.onnx           sample -> latent_parameters (mean and log-variance: optimum's current name)
    OUT/<graph folder>/config.json       the component's config; unet/ or transformer/config.json the denoiser's

:func:`plan_pipeline` checks the folder before any work; :func:`write_pipeline` writes into the export's open atomic
folder, so the pipeline and the denoiser appear together or not at all.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..core.denoisers import spec_for
from ..core.errors import PipelineError, require
from ..core.vocab import CONTEXT
from ..io.artifact import load_calibration_inputs, read_manifest
from ..io.folders import detect
from ..io.models import denoiser_config, read_config
from ..runtimes.spec import ONNX_DATA_FILE
from ..runtimes.text import FAMILIES, family_parts, supported_pipelines
from ..system.progress import PROGRESS, stage
from .external import load_graph, write_graph
from .folder import check_graph
from .onnx import EXTERNAL_DATA_THRESHOLD, export_module

log = logging.getLogger(__name__)

INDEX = "model_index.json"
# text encoder class -> graph outputs, optimum's names (SD3's CLIPs add every layer's hidden_states.<i>)
TEXT_OUTPUTS = {"CLIPTextModel": ("last_hidden_state", "pooler_output"),
                "CLIPTextModelWithProjection": ("text_embeds", "last_hidden_state"),
                "T5EncoderModel": ("last_hidden_state",)}
ALL_HIDDEN_STATES = ("CLIPTextModelWithProjection",)
T5_MAX_LENGTH = 4096  # the text length range of encoders without position embeddings (T5's are relative)
VAE_CLASSES = ("AutoencoderKL",)
CONFIG_FILES = {"vae": "config.json", "text_encoder": "config.json", "scheduler": "scheduler_config.json"}
NOT_EXPORTED = ("safety_checker", "feature_extractor", "image_encoder")  # left out: null in the written index
LAYOUT_HINT = ("pass the folder DiffusionPipeline.save_pretrained wrote (model_index.json, unet/ or transformer/, "
               "vae/, text_encoder/, tokenizer/, scheduler/)")


@dataclass(frozen=True)
class PipelinePlan:
    """A checked pipeline folder: its index and the components to write, by their model_index.json names."""

    model_dir: Path
    index: dict[str, Any]
    denoiser: str  # "unet" | "transformer"
    components: dict[str, str]  # name -> class name, denoiser excluded
    clip_length: int | None = None  # CLIP's tokens at the start of the conditioning (0: CLIP pools only, Flux)
    t5_length: int | None = None  # T5's default tokens after them (None: no T5); any T5 length runs

    @property
    def text_length(self) -> int | None:
        """The conditioning length the pipeline's text encoders make (with diffusers' default T5 length)."""
        return None if self.clip_length is None else self.clip_length + (self.t5_length or 0)

    def check_length(self, found: int, where: str, text_range: tuple[int, int] | None = None) -> None:
        """Refuse a denoiser whose conditioning has ``found`` tokens where the text encoders cannot make them (with
        ``text_range``, the graph's ``--dynamic-text-length``: where they make no count in it)."""
        if self.clip_length is None:
            return
        clip, t5 = self.clip_length, self.t5_length is not None
        lo, hi = (found, found) if text_range is None else text_range
        if (hi > clip) if t5 else (lo <= clip <= hi):  # T5 makes any length after CLIP's tokens
            return
        makes = (f"text encoders make {clip} CLIP tokens followed by T5's" if t5
                 else f"text encoder makes {clip} tokens")
        dynamic = "" if t5 else f"export with --dynamic-text-length {min(found, clip)}:{max(found, clip)}, or "
        raise PipelineError(f"{where} has {found}-token conditioning; {self.model_dir}'s {makes}, so the exported "
                            "pipeline could not run it",
                            hint=f"{dynamic}quantize with --prompts (encoded by the folder's own text encoders), or "
                                 f"with a --cond file of {self.text_length}-token embeddings")


def _entries(index: dict[str, Any]) -> dict[str, str]:
    """``name -> class`` of the components model_index.json lists (``[library, class]``, not null)."""
    return {k: v[1] for k, v in index.items() if not k.startswith("_") and isinstance(v, list) and len(v) == 2
            and all(isinstance(x, str) for x in v)}


def plan_pipeline(model_dir: str | Path, model_class: str, model_config: dict[str, Any]) -> PipelinePlan:
    """Check ``model_dir`` as the pipeline of an exported ``model_class`` denoiser before any work: a pipeline
    folder, its denoiser's config equal to the export's where both set a value, a VAE, a scheduler, and every text
    encoder and tokenizer present and of a class dqdeploy exports. Every problem is a :class:`PipelineError`."""
    model_dir = Path(model_dir)
    if not (model_dir / INDEX).is_file():
        raise PipelineError(f"--pipeline {model_dir}: expected a diffusers pipeline folder, found "
                            + ("no model_index.json in it" if model_dir.is_dir() else "no such folder"),
                            hint=LAYOUT_HINT)
    index = read_config(model_dir / INDEX)
    entries = _entries(index)
    denoiser = spec_for(model_class).subfolder
    _check_family(model_dir, model_class, entries)
    _check_denoiser(model_dir, denoiser, model_class, model_config)
    for name in ("vae", "scheduler"):
        if name not in entries or not (model_dir / name).is_dir():
            raise PipelineError(f"--pipeline {model_dir}: expected a {name}/ component, found "
                                + (f"no {name}/ folder" if name in entries else f"no {name!r} in {INDEX}"),
                                hint=f"a text-to-image pipeline needs its {name}; {LAYOUT_HINT}")
    components: dict[str, str] = {}
    for name, cls in entries.items():
        if name == denoiser or name in NOT_EXPORTED:
            continue
        kind = _kind(name)
        supported = {"vae": VAE_CLASSES, "text_encoder": tuple(TEXT_OUTPUTS)}.get(kind or "")
        if kind is None or (supported is not None and cls not in supported):
            raise PipelineError(f"--pipeline {model_dir}: component {name!r} ({cls}) is not one dqdeploy exports "
                                f"(text encoders: {', '.join(TEXT_OUTPUTS)}; VAE: {', '.join(VAE_CLASSES)})",
                                hint="export a Stable Diffusion, SD3 or Flux pipeline, or export the denoiser alone "
                                     "(without --pipeline)")
        needed = CONFIG_FILES.get(kind)
        if not (model_dir / name).is_dir() or (needed and not (model_dir / name / needed).is_file()):
            raise PipelineError(f"--pipeline {model_dir}: {INDEX} lists {name!r} ({cls}), but {name}/ "
                                + (f"has no {needed}" if (model_dir / name).is_dir() else "is missing"),
                                hint=f"restore {name}/ from the pipeline's save_pretrained")
        components[name] = cls
    length = read_config(model_dir / "text_encoder/config.json").get("max_position_embeddings") \
        if "text_encoder" in components else None
    family = FAMILIES[model_class]
    clip = (length if isinstance(length, int) else None) if family.clip_in_context else 0
    return PipelinePlan(model_dir, index, denoiser, components, clip, family.t5_length)


def plan_for(source: str | Path, pipeline: str | Path, text_range: tuple[int, int] | None = None) -> PipelinePlan:
    """:func:`plan_pipeline` for the denoiser of ``source`` (a quantized artifact or a diffusers folder);
    ``text_range``: the text lengths the graph will take besides its calibration's (``--dynamic-text-length``)."""
    if detect(source) == "fp":
        config = denoiser_config(source)
        return plan_pipeline(pipeline, str(config.get("_class_name")), config)
    manifest = read_manifest(source)
    plan = plan_pipeline(pipeline, manifest.model_class, manifest.model_config)
    context = load_calibration_inputs(source).get(CONTEXT)
    if context is not None:
        plan.check_length(int(context.shape[1]), f"the artifact {source} (its calibration inputs)", text_range)
    return plan


def _kind(name: str) -> str | None:
    for kind in ("text_encoder", "tokenizer", "scheduler", "vae"):
        if name == kind or (kind in ("text_encoder", "tokenizer") and name.startswith(kind + "_")):
            return kind
    return None


def _check_family(model_dir: Path, model_class: str, entries: dict[str, str]) -> None:
    """Refuse a family whose pipeline :mod:`dqdeploy.runtimes.pipeline` does not run (naming those it runs), and a
    folder without the text encoders and tokenizers its family's runtime reads."""
    if model_class not in FAMILIES:
        raise PipelineError(f"--pipeline {model_dir}: its denoiser is a {model_class}; pipelines export for "
                            f"{supported_pipelines()}",
                            hint="export the denoiser alone (without --pipeline) and run it inside its diffusers "
                                 "pipeline with pipe.transformer = dqdeploy.load_runtime(EXPORT_DIR)")
    missing = sorted({part.split("/")[0] for part in family_parts(model_class)} - set(entries))
    if missing:
        raise PipelineError(f"--pipeline {model_dir}: a {model_class} pipeline runs with {', '.join(missing)}, "
                            f"found none in {INDEX}",
                            hint="pass the folder with all its text encoders and tokenizers (SD3 without T5 is not "
                                 "supported)")


def _check_denoiser(model_dir: Path, folder: str, model_class: str, model_config: dict[str, Any]) -> None:
    path = model_dir / folder / "config.json"
    if not path.is_file():
        raise PipelineError(f"--pipeline {model_dir}: expected the denoiser's {folder}/config.json, found none",
                            hint="pass the pipeline folder the artifact was quantized from")
    found = read_config(path)
    if found.get("_class_name") != model_class:
        raise PipelineError(f"--pipeline {model_dir}: its denoiser is a {found.get('_class_name')}, the exported one "
                            f"a {model_class}", hint="pass the pipeline folder the artifact was quantized from")
    differ = sorted(k for k in found.keys() & model_config.keys() if not k.startswith("_")
                    and found[k] != model_config[k])
    if differ:
        shown = "; ".join(f"{k}: {found[k]!r} there, {model_config[k]!r} exported" for k in differ[:4])
        raise PipelineError(f"--pipeline {model_dir}: {path.relative_to(model_dir)} does not match the exported "
                            f"denoiser ({shown})", hint="pass the pipeline folder the artifact was quantized from")


def write_pipeline(plan: PipelinePlan, folder: Path, scratch: Path, model_config: dict[str, Any]) -> list[str]:
    """Write the pipeline's components into ``folder`` (the export's open atomic folder; graphs pass through
    ``scratch``) and the denoiser's ``config.json``; returns the files written, relative to ``folder``."""
    for name, cls in plan.components.items():
        kind = _kind(name)
        with stage(PROGRESS, f"pipeline component {name} ({cls})"):
            if kind in ("scheduler", "tokenizer"):
                _copy_files(plan.model_dir / name, folder / name)
                if kind == "tokenizer":
                    _ensure_tokenizer_json(plan.model_dir / name, folder / name, cls)
                    _ensure_vocab_files(folder / name)
            elif kind == "text_encoder":
                _export_text_encoder(plan.model_dir / name, cls, folder / name, scratch)
            else:
                _export_vae(plan.model_dir / name, cls, folder, scratch)
    (folder / plan.denoiser).mkdir(parents=True, exist_ok=True)
    (folder / plan.denoiser / "config.json").write_text(json.dumps(model_config, indent=2, sort_keys=True))
    written = set(plan.components) | {plan.denoiser}
    index = {k: (v if k.startswith("_") or k in written or not isinstance(v, list) else [None, None])
             for k, v in plan.index.items()}
    (folder / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True))
    names = [INDEX, *(n for n in ("vae_decoder", "vae_encoder", *plan.components) if (folder / n).is_dir())]
    return sorted({p.relative_to(folder).as_posix() for n in names
                   for p in ([folder / n] if (folder / n).is_file() else (folder / n).rglob("*")) if p.is_file()})


def _copy_files(src: Path, dest: Path) -> None:
    """The regular files of ``src`` (not its subfolders), copied into ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    for path in sorted(src.iterdir()):
        if path.is_file():
            shutil.copyfile(path, dest / path.name)


def _ensure_tokenizer_json(src: Path, dest: Path, cls: str) -> None:
    """A fast tokenizer's ``tokenizer.json`` in ``dest`` (what the runtime reads, with the ``tokenizers`` package
    alone), converted by transformers where the folder holds only vocab and merges files."""
    if (dest / "tokenizer.json").is_file():
        return
    transformers = require("transformers", "sd", "converting a pipeline's tokenizer")
    try:
        tokenizer = getattr(transformers, cls).from_pretrained(str(src))
        tokenizer.backend_tokenizer.save(str(dest / "tokenizer.json"))
    except Exception as exc:  # transformers raises many types for tokenizer folders it cannot read
        raise PipelineError(f"{src}: the {cls} tokenizer cannot be converted to a tokenizer.json "
                            f"({type(exc).__name__}: {str(exc)[:200]})",
                            hint="save the tokenizer with a recent transformers (it writes tokenizer.json)") from None


def _ensure_vocab_files(dest: Path) -> None:
    """``vocab.json`` + ``merges.txt`` from a BPE ``tokenizer.json`` where the folder lacks them (transformers 5 saves
    only the former; transformers 4's slow ``CLIPTokenizer``, which optimum's pipelines load, reads only the latter)."""
    if (dest / "vocab.json").is_file() or (dest / "merges.txt").is_file():
        return
    model = json.loads((dest / "tokenizer.json").read_text(encoding="utf-8")).get("model", {})
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        return
    merges = [" ".join(m) if isinstance(m, list) else str(m) for m in model.get("merges", [])]
    (dest / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False), encoding="utf-8")
    (dest / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{m}\n" for m in merges), encoding="utf-8")


def text_outputs(cls: str, layers: int) -> tuple[str, ...]:
    """The graph outputs of a ``cls`` text encoder of ``layers`` layers: :data:`TEXT_OUTPUTS`, then for
    :data:`ALL_HIDDEN_STATES` classes optimum's ``hidden_states.0`` (the embeddings) .. ``hidden_states.<layers>``."""
    hidden = tuple(f"hidden_states.{i}" for i in range(layers + 1)) if cls in ALL_HIDDEN_STATES else ()
    return TEXT_OUTPUTS[cls] + hidden


class _TextEncoderGraph(torch.nn.Module):
    """``input_ids`` -> the text encoder's outputs named in ``outputs``, in that order (``hidden_states.<i>``: the
    i-th entry of ``hidden_states``)."""

    def __init__(self, encoder: torch.nn.Module, outputs: tuple[str, ...]) -> None:
        super().__init__()
        self.encoder, self.outputs = encoder, outputs
        self.hidden = any(name.startswith("hidden_states.") for name in outputs)

    def forward(self, input_ids):  # noqa: D102
        out = self.encoder(input_ids=input_ids, output_hidden_states=self.hidden, return_dict=True)
        return tuple(out.hidden_states[int(name.split(".")[1])] if name.startswith("hidden_states.") else out[name]
                     for name in self.outputs)


def _export_text_encoder(src: Path, cls: str, dest: Path, scratch: Path) -> None:
    transformers = require("transformers", "sd", "exporting a pipeline's text encoder")
    try:
        encoder = getattr(transformers, cls).from_pretrained(str(src), use_safetensors=True).float().eval()
    except Exception as exc:  # transformers raises OSError/ValueError/... for folders it cannot load
        raise PipelineError(f"could not load the {cls} text encoder of {src}: {type(exc).__name__}: {str(exc)[:300]}",
                            hint="its weights must be safetensors; restore the folder from save_pretrained") from None
    config = encoder.config
    length = int(getattr(config, "max_position_embeddings", None) or T5_MAX_LENGTH)
    example = length if length < T5_MAX_LENGTH else 16  # encoders without a position table: a short example
    ids = torch.randint(0, int(config.vocab_size), (2, example), generator=torch.Generator().manual_seed(0))
    dims = {0: torch.export.Dim("batch", min=1, max=4096), 1: torch.export.Dim("sequence", min=1, max=length)}
    outputs = text_outputs(cls, int(getattr(config, "num_hidden_layers", 0)))
    _export_graph(_TextEncoderGraph(encoder, outputs), dest, scratch, {"input_ids": ids}, list(outputs),
                  {"input_ids": dims}, f"the text encoder {src.name} ({cls})")
    shutil.copyfile(src / "config.json", dest / "config.json")


class _VaeDecoder(torch.nn.Module):
    """AutoencoderKL's decoder: ``latent_sample`` (scaled back by the pipeline) -> ``sample`` (the image)."""

    def __init__(self, vae: torch.nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample):  # noqa: D102
        return self.vae.decode(latent_sample, return_dict=False)[0]


class _VaeEncoder(_VaeDecoder):
    """AutoencoderKL's encoder: ``sample`` (an image) -> ``latent_parameters`` (mean and log-variance)."""

    def forward(self, sample):  # noqa: D102
        return self.vae.encode(sample).latent_dist.parameters


def _export_vae(src: Path, cls: str, folder: Path, scratch: Path) -> None:
    import diffusers

    try:
        vae = getattr(diffusers, cls).from_pretrained(str(src), use_safetensors=True, torch_dtype=torch.float32).eval()
    except Exception as exc:  # diffusers raises OSError/ValueError/... for folders it cannot load
        raise PipelineError(f"could not load the {cls} of {src}: {type(exc).__name__}: {str(exc)[:300]}",
                            hint="its weights must be safetensors; restore the folder from save_pretrained") from None
    cfg = vae.config
    factor = 2 ** (len(cfg.block_out_channels) - 1)
    batch = torch.export.Dim("batch", min=1, max=4096)
    height, width = torch.export.Dim("height", min=1, max=1024), torch.export.Dim("width", min=1, max=1024)
    gen = torch.Generator().manual_seed(0)
    latent = torch.randn(2, cfg.latent_channels, 8, 8, generator=gen)
    image = torch.randn(2, cfg.in_channels, 8 * factor, 8 * factor, generator=gen)
    _export_graph(_VaeDecoder(vae), folder / "vae_decoder", scratch, {"latent_sample": latent}, ["sample"],
                  {"latent_sample": {0: batch, 2: height, 3: width}}, f"the VAE decoder ({cls})")
    _export_graph(_VaeEncoder(vae), folder / "vae_encoder", scratch, {"sample": image}, ["latent_parameters"],
                  {"sample": {0: batch, 2: height * factor, 3: width * factor}}, f"the VAE encoder ({cls})")
    for part in ("vae_decoder", "vae_encoder"):
        shutil.copyfile(src / "config.json", folder / part / "config.json")


def _export_graph(module: torch.nn.Module, dest: Path, scratch: Path, inputs: dict[str, torch.Tensor],
                  outputs: list[str], dynamic: dict[str, Any], what: str) -> None:
    """``module`` -> ``dest/model.onnx`` (+ ``model.onnx_data`` over 2 GB), through a scratch file."""
    tmp = scratch / dest.name / "model.onnx"
    export_module(module, tmp, inputs=inputs, outputs=outputs, dynamic=dynamic, what=what)
    graph = load_graph(tmp)
    check_graph(graph)
    dest.mkdir(parents=True, exist_ok=True)
    write_graph(graph, dest / "model.onnx", base_dir=tmp.parent, data_file=ONNX_DATA_FILE,
                threshold=EXTERNAL_DATA_THRESHOLD)
