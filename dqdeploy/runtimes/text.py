"""Prompts to a denoiser's conditioning on ONNX Runtime without PyTorch: the tokenizers and text encoder graphs of
a ``--pipeline`` export (optimum's layout), assembled per pipeline family exactly as the family's diffusers
``encode_prompt`` assembles them.

- Stable Diffusion (``UNet2DConditionModel``): CLIP's ``last_hidden_state`` is ``encoder_hidden_states``.
- SD3 (``SD3Transformer2DModel``): the penultimate hidden states of both CLIPs (``hidden_states[-2]``) side by side
  on the feature axis, zero-padded to T5's width, then T5's ``last_hidden_state`` after them on the token axis;
  ``pooled_projections`` is both CLIPs' projected ``text_embeds`` side by side.
- Flux (``FluxTransformer2DModel``): T5's ``last_hidden_state`` is ``encoder_hidden_states``, CLIP's
  ``pooler_output`` is ``pooled_projections``.

Nothing here imports torch.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from ..core.denoisers import POOLED
from ..core.errors import PipelineError, require
from ..core.vocab import CONTEXT
from ..io.integrity import read_json_object
from .session import open_session

EXPORT_HINT = "export with the pipeline: `dqdeploy export QUANT_DIR --out OUT --target ort --pipeline MODEL_DIR`"
T5_DEFAULT_LENGTH = 256  # diffusers' max_sequence_length of SD3 (a graph with a fixed text length sets its own)
FLUX_T5_LENGTH = 512  # ... and of Flux
HIDDEN = re.compile(r"hidden_states\.(\d+)$")  # optimum's names of a text encoder's per-layer outputs


class Tokenizer:
    """A pipeline's tokenizer folder (``tokenizer.json`` + ``tokenizer_config.json``) on the ``tokenizers`` package:
    ids padded and truncated to ``length`` (default: the tokenizer's ``model_max_length``), as diffusers' pipelines
    ask for them."""

    def __init__(self, folder: Path, length: int | None = None) -> None:
        tokenizers = require("tokenizers", "sd", "tokenizing prompts without PyTorch")
        config = json_config(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").is_file() else {}
        self.tokenizer = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.length = int(length or config.get("model_max_length") or 77)
        pad = config.get("pad_token") or config.get("eos_token") or "<|endoftext|>"
        pad = pad.get("content") if isinstance(pad, dict) else pad
        pad_id = self.tokenizer.token_to_id(str(pad))
        if pad_id is None:
            raise PipelineError(f"{folder}: the padding token {pad!r} is not in the tokenizer's vocabulary",
                                hint="re-export the pipeline from its original folder")
        self.tokenizer.enable_truncation(self.length)
        self.tokenizer.enable_padding(length=self.length, pad_id=pad_id, pad_token=str(pad))

    def __call__(self, texts: list[str]) -> np.ndarray:
        """Token ids [N, length] (int64)."""
        return np.array([e.ids for e in self.tokenizer.encode_batch(texts)], dtype=np.int64)


def json_config(path: Path) -> dict[str, Any]:
    """A JSON object file of the export (a typed error naming the fix where it is not one)."""
    return read_json_object(path, "pipeline config", EXPORT_HINT)


class TextEncoder:
    """One tokenizer and its text encoder graph: ``encoder(prompts)`` -> the graph's outputs by name (float32)."""

    def __init__(self, folder: Path, tokenizer: str, encoder: str, session: dict[str, Any],
                 length: int | None = None) -> None:
        self.tokenizer = Tokenizer(folder / tokenizer, length)
        self.session = open_session(folder / encoder / "model.onnx", None, **session)
        self.outputs = [o.name for o in self.session.get_outputs()]

    def __call__(self, prompts: list[str]) -> dict[str, np.ndarray]:  # noqa: D102
        values = self.session.run(self.outputs, {"input_ids": self.tokenizer(prompts)})
        return {name: np.asarray(v, dtype=np.float32) for name, v in zip(self.outputs, values)}

    def penultimate(self, out: dict[str, np.ndarray]) -> np.ndarray:
        """``hidden_states[-2]`` of ``out`` (optimum's ``hidden_states.<i>`` outputs): what SD3 conditions on."""
        layers = sorted(int(m.group(1)) for m in map(HIDDEN.match, out) if m)
        if len(layers) < 2:
            raise PipelineError(f"the text encoder graph has outputs {', '.join(out)}; SD3 reads its per-layer "
                                "hidden states (hidden_states.0 .. hidden_states.N)",
                                hint=f"re-export with this dqdeploy: {EXPORT_HINT}")
        return out[f"hidden_states.{layers[-2]}"]


class PromptEncoder:
    """A family's prompt encoding: ``encoder(prompts)`` -> the denoiser's conditioning inputs by graph name."""

    parts: tuple[str, ...] = ()  # the files of the export it reads
    guidance = 7.5  # the guidance scale the family's diffusers pipeline defaults to
    cfg = True  # classifier-free guidance with a negative prompt (Flux: the scale is the graph's guidance input)
    clip_in_context = True  # CLIP's tokens are (the start of) encoder_hidden_states
    t5_length: int | None = None  # T5's default tokens after them (None: no T5)
    sample_size = 64  # the latent size where the denoiser's config has none (diffusers' default_sample_size)

    def __init__(self, folder: Path, session: dict[str, Any], context_length: int | str | None = None) -> None:
        """Open the encoders of the export ``folder`` (``session``: :func:`~.session.open_session`'s options) for a
        denoiser taking ``context_length`` text tokens (a name where the graph's length is dynamic)."""

    def __call__(self, prompts: list[str]) -> dict[str, np.ndarray]:  # noqa: D102
        raise NotImplementedError


class ClipPrompts(PromptEncoder):
    """Stable Diffusion: CLIP's ``last_hidden_state`` -> ``encoder_hidden_states``."""

    parts = ("text_encoder/model.onnx", "tokenizer/tokenizer.json")

    def __init__(self, folder: Path, session: dict[str, Any], context_length: int | str | None = None) -> None:
        self.clip = TextEncoder(folder, "tokenizer", "text_encoder", session)

    def __call__(self, prompts: list[str]) -> dict[str, np.ndarray]:  # noqa: D102
        return {CONTEXT: self.clip(prompts)["last_hidden_state"]}


class Sd3Prompts(PromptEncoder):
    """SD3: two CLIPs with projections and T5, as ``StableDiffusion3Pipeline.encode_prompt`` joins them. The T5
    length is the graph's text length less CLIP's tokens (:data:`T5_DEFAULT_LENGTH` for a dynamic text length)."""

    parts = tuple(f"{kind}{suffix}/{file}" for suffix in ("", "_2", "_3")
                  for kind, file in (("text_encoder", "model.onnx"), ("tokenizer", "tokenizer.json")))
    guidance = 7.0
    t5_length = T5_DEFAULT_LENGTH

    def __init__(self, folder: Path, session: dict[str, Any], context_length: int | str | None = None) -> None:
        self.clips = [TextEncoder(folder, f"tokenizer{s}", f"text_encoder{s}", session) for s in ("", "_2")]
        clip_length = self.clips[0].tokenizer.length  # diffusers pads both CLIPs to the first tokenizer's length
        self.clips[1].tokenizer = Tokenizer(folder / "tokenizer_2", clip_length)
        t5_length = context_length - clip_length if isinstance(context_length, int) else T5_DEFAULT_LENGTH
        if t5_length < 1:
            raise PipelineError(f"{folder}: the denoiser takes {context_length} text tokens, CLIP alone makes "
                                f"{clip_length}; SD3 appends T5's tokens after CLIP's",
                                hint="quantize with --prompts (the folder's own text encoders), then re-export")
        self.t5 = TextEncoder(folder, "tokenizer_3", "text_encoder_3", session, t5_length)

    def __call__(self, prompts: list[str]) -> dict[str, np.ndarray]:  # noqa: D102
        outs = [clip(prompts) for clip in self.clips]
        t5 = self.t5(prompts)["last_hidden_state"]
        clip = np.concatenate([c.penultimate(o) for c, o in zip(self.clips, outs)], axis=-1)
        if clip.shape[-1] > t5.shape[-1]:
            raise PipelineError(f"the CLIP hidden states ({clip.shape[-1]} features) are wider than T5's "
                                f"({t5.shape[-1]}); SD3 pads CLIP's to T5's width", hint=EXPORT_HINT)
        clip = np.pad(clip, ((0, 0), (0, 0), (0, t5.shape[-1] - clip.shape[-1])))
        pooled = np.concatenate([o["text_embeds"] for o in outs], axis=-1)
        return {CONTEXT: np.concatenate([clip, t5], axis=1), POOLED: pooled}


class FluxPrompts(PromptEncoder):
    """Flux: CLIP's ``pooler_output`` -> ``pooled_projections``, T5's ``last_hidden_state`` (the graph's text length,
    :data:`FLUX_T5_LENGTH` for a dynamic one) -> ``encoder_hidden_states``, as ``FluxPipeline.encode_prompt``."""

    parts = tuple(f"{kind}{suffix}/{file}" for suffix in ("", "_2")
                  for kind, file in (("text_encoder", "model.onnx"), ("tokenizer", "tokenizer.json")))
    guidance, cfg = 3.5, False  # guidance-distilled: the scale is the transformer's guidance input
    clip_in_context, t5_length, sample_size = False, FLUX_T5_LENGTH, 128

    def __init__(self, folder: Path, session: dict[str, Any], context_length: int | str | None = None) -> None:
        self.clip = TextEncoder(folder, "tokenizer", "text_encoder", session)
        length = context_length if isinstance(context_length, int) else FLUX_T5_LENGTH
        self.t5 = TextEncoder(folder, "tokenizer_2", "text_encoder_2", session, length)

    def __call__(self, prompts: list[str]) -> dict[str, np.ndarray]:  # noqa: D102
        return {CONTEXT: self.t5(prompts)["last_hidden_state"], POOLED: self.clip(prompts)["pooler_output"]}


FAMILIES: dict[str, type[PromptEncoder]] = {"UNet2DConditionModel": ClipPrompts, "SD3Transformer2DModel": Sd3Prompts,
                                            "FluxTransformer2DModel": FluxPrompts}
PIPELINES = {"UNet2DConditionModel": "StableDiffusionPipeline", "SD3Transformer2DModel": "StableDiffusion3Pipeline",
             "FluxTransformer2DModel": "FluxPipeline"}


def supported_pipelines() -> str:
    """The pipelines run without PyTorch, in words: ``StableDiffusionPipeline (UNet2DConditionModel), ...``."""
    return ", ".join(f"{PIPELINES[c]} ({c})" for c in FAMILIES)


def family_parts(model_class: str) -> tuple[str, ...]:
    """The text files of ``model_class``'s pipeline export (a :class:`PipelineError` for a family not run here)."""
    family = FAMILIES.get(model_class)
    if family is None:
        raise PipelineError(f"the pipeline without PyTorch runs {supported_pipelines()}; found a {model_class}",
                            hint="run other families through diffusers with pipe.transformer = "
                                 "dqdeploy.load_runtime(EXPORT_DIR)")
    return family.parts
