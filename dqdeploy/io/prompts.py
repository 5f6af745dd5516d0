"""Prompt embeddings from a pipeline folder's own text encoders, in the conditioning file's names.

The folder's pipeline class (``model_index.json``) is loaded without its denoiser and VAE, and its own
``encode_prompt`` encodes the prompts, so every family gets exactly what its diffusers pipeline would feed the
denoiser: Stable Diffusion (CLIP), SD3 (two CLIPs and T5), PixArt (T5) and Flux (CLIP and T5). The result uses
the names of a ``--cond`` file (:mod:`dqdeploy.quant.trajectories`): ``encoder_hidden_states`` [P, S, D],
``pooled_projections`` [P, D2] (SD3, Flux), PixArt's text attention mask ``encoder_attention_mask`` [P, S] (its
pipeline masks T5's padding) and, for families with classifier-free guidance, the negative prompt's
``uncond_encoder_hidden_states`` [1, S, D] / ``uncond_pooled_projections`` [1, D2] / ``uncond_encoder_attention_mask``
[1, S].
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from ..core.errors import ModelLoadError, require
from ..quant.conditioning import COND_KEY as COND
from ..quant.conditioning import MASK_KEY as MASK
from ..quant.conditioning import POOLED_KEY as POOLED
from ..quant.conditioning import UNCOND_KEY as UNCOND
from ..quant.conditioning import UNCOND_MASK_KEY as UNCOND_MASK
from ..quant.conditioning import UNCOND_POOLED_KEY as UNCOND_POOLED

CONDITIONING_FORMAT = "dqdeploy-conditioning"  # the metadata of the files write_conditioning writes


def _sd(pipe, prompts: list[str], negative: str, length: int | None) -> dict[str, torch.Tensor]:
    cond, uncond = pipe.encode_prompt(prompts, torch.device("cpu"), 1, True, negative_prompt=[negative] * len(prompts))
    return {COND: cond, UNCOND: uncond[:1]}


def _sd3(pipe, prompts: list[str], negative: str, length: int | None) -> dict[str, torch.Tensor]:
    extra = {} if length is None else {"max_sequence_length": length}
    cond, uncond, pooled, uncond_pooled = pipe.encode_prompt(
        prompts, None, None, device=torch.device("cpu"), do_classifier_free_guidance=True, negative_prompt=negative,
        **extra)
    return {COND: cond, UNCOND: uncond[:1], POOLED: pooled, UNCOND_POOLED: uncond_pooled[:1]}


def _pixart(pipe, prompts: list[str], negative: str, length: int | None) -> dict[str, torch.Tensor]:
    extra = {} if length is None else {"max_sequence_length": length}
    cond, mask, uncond, uncond_mask = pipe.encode_prompt(prompts, True, negative_prompt=negative,
                                                         device=torch.device("cpu"), clean_caption=False, **extra)
    return {COND: cond, UNCOND: uncond[:1], MASK: mask, UNCOND_MASK: uncond_mask[:1]}  # the T5 padding mask too


def _flux(pipe, prompts: list[str], negative: str, length: int | None) -> dict[str, torch.Tensor]:
    extra = {} if length is None else {"max_sequence_length": length}
    cond, pooled, _ = pipe.encode_prompt(prompts, None, device=torch.device("cpu"), **extra)
    return {COND: cond, POOLED: pooled}  # Flux is guidance-distilled: no unconditional rows


FAMILIES: dict[str, Callable[..., dict[str, torch.Tensor]]] = {
    "StableDiffusionPipeline": _sd, "StableDiffusion3Pipeline": _sd3, "PixArtAlphaPipeline": _pixart,
    "PixArtSigmaPipeline": _pixart, "FluxPipeline": _flux,
}


def pipeline_class(model_dir: Path) -> str:
    """The ``_class_name`` of ``model_dir/model_index.json`` (a typed error when there is none)."""
    index = model_dir / "model_index.json"
    try:
        name = json.loads(index.read_text())["_class_name"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelLoadError(f"{model_dir} is not a diffusers pipeline folder: {index} is missing or unreadable "
                             f"({type(exc).__name__})",
                             hint="pass the pipeline folder (model_index.json, text_encoder*/, tokenizer*/), or "
                                  "precomputed embeddings with --cond FILE.safetensors") from None
    if name not in FAMILIES:
        raise ModelLoadError(f"{model_dir} is a {name}; prompts are encoded for {', '.join(FAMILIES)}",
                             hint="encode the prompts with that pipeline's encode_prompt and save them with "
                                  "--cond FILE.safetensors (its names are accepted)")
    return str(name)


def _quiet_loading() -> None:
    """No per-component progress bars from diffusers' and transformers' loaders (they are fast, and would fill a
    log file with carriage returns)."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


def encode(model_dir: str | Path, prompts: list[str], *, negative_prompt: str = "",
           max_sequence_length: int | None = None, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Embeddings of ``prompts`` (and of ``negative_prompt``, where the family uses guidance) by the text encoders
    of the pipeline folder ``model_dir``, float32, in the ``--cond`` file's names. ``max_sequence_length``: the
    T5 text length of SD3, PixArt and Flux (their pipeline's default when None)."""
    model_dir = Path(model_dir)
    name = pipeline_class(model_dir)
    if not prompts:
        raise ModelLoadError("no prompts to encode", hint="give one prompt per line")
    diffusers = require("diffusers", "sd", "encoding prompts")
    cls = getattr(diffusers, name)
    # every component but the text encoders and tokenizers left out (the denoiser, VAE, scheduler, ...)
    skip: dict[str, Any] = {k: None for k in inspect.signature(cls.__init__).parameters
                            if k != "self" and not k.startswith(("text_encoder", "tokenizer"))}
    _quiet_loading()
    try:
        pipe = cls.from_pretrained(str(model_dir), use_safetensors=None if allow_pickle else True, **skip)
    except Exception as exc:  # diffusers and transformers raise many types for a broken folder
        raise ModelLoadError(f"could not load the text encoders of {model_dir}: {type(exc).__name__}: "
                             f"{str(exc)[:300]}",
                             hint="the folder needs its text_encoder*/ and tokenizer*/ (safetensors weights unless "
                                  "--allow-pickle)") from None
    with torch.no_grad():
        out = FAMILIES[name](pipe, list(prompts), negative_prompt, max_sequence_length)
    return {k: v.detach().float().contiguous() for k, v in out.items()}


def write_conditioning(tensors: dict[str, torch.Tensor], path: str | Path) -> Path:
    """Write ``tensors`` as a ``--cond`` safetensors file, atomically (tagged as dqdeploy's, so ``--overwrite`` may
    replace it)."""
    from safetensors.torch import save

    from .atomic import atomic_write_bytes

    data = save({k: v.contiguous() for k, v in tensors.items()}, metadata={"format": CONDITIONING_FORMAT})
    return atomic_write_bytes(Path(path), data)


def text_folder(*candidates: str | Path | None) -> Path | None:
    """The first of ``candidates`` that is a pipeline folder (``model_index.json``), else None."""
    return next((Path(c) for c in candidates if c is not None and (Path(c) / "model_index.json").is_file()), None)


@contextmanager
def prompts_file_as_cond(prompts_file: str | Path | None, cond_file: str | Path | None,
                         folder: str | Path | None) -> Iterator[Path | None]:
    """The ``--cond`` file a sampling command uses: ``cond_file``, or ``prompts_file`` encoded by the text encoders of
    the pipeline ``folder`` into a temporary file (removed on exit)."""
    from ..quant.conditioning import read_prompts
    from .atomic import own_tempdir

    if prompts_file is None:
        yield None if cond_file is None else Path(cond_file)
        return
    if cond_file is not None:
        raise ModelLoadError("--prompts and --cond both give the conditioning", hint="pass one of the two")
    if folder is None:
        raise ModelLoadError("--prompts needs a pipeline folder whose text encoders encode them",
                             hint="sample: PATH or --vae naming the pipeline folder (model_index.json); eval: --fp "
                                  "MODEL_DIR; or encode them once: dqdeploy encode-prompts MODEL_DIR FILE --out C")
    prompts = read_prompts(Path(prompts_file))
    with own_tempdir("dqdeploy-prompts") as tmp:
        yield write_conditioning(encode(folder, prompts), tmp / "cond.safetensors")
