"""The text conditioning of calibration and sampling: the ``--cond`` file's names and checks.

A conditioning file holds prompt embeddings ``encoder_hidden_states`` [P, S, D], SD3's and Flux's
``pooled_projections`` [P, D2], PixArt's text attention mask ``encoder_attention_mask`` [P, S], and the
unconditional (empty prompt) rows of each for classifier-free guidance; diffusers' ``encode_prompt`` names are read
as the same tensors. :class:`Conditioning` hands them to a sampling loop as denoiser keywords.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..core.denoisers import GUIDANCE, spec_of
from ..core.errors import CalibrationError
from ..core.inputs import CONTEXT
from ..core.vocab import TEXT_MASK

COND_KEY = CONTEXT
UNCOND_KEY = "uncond_encoder_hidden_states"
POOLED_KEY = "pooled_projections"
UNCOND_POOLED_KEY = "uncond_pooled_projections"
MASK_KEY = TEXT_MASK  # PixArt's text attention mask [P, S]: 1 for tokens, 0 for padding
UNCOND_MASK_KEY = "uncond_encoder_attention_mask"
# what diffusers' encode_prompt calls the same tensors (accepted in a --cond file)
ALIASES = {"prompt_embeds": COND_KEY, "negative_prompt_embeds": UNCOND_KEY, "pooled_prompt_embeds": POOLED_KEY,
           "negative_pooled_prompt_embeds": UNCOND_POOLED_KEY, "prompt_attention_mask": MASK_KEY,
           "negative_prompt_attention_mask": UNCOND_MASK_KEY}


@dataclass
class Conditioning:
    """Text conditioning for calibration: ``cond`` [P, S, D] and, for SD3/Flux, ``pooled`` [P, D2], for PixArt
    optionally its text attention ``mask`` [P, S]; optional unconditional rows ``uncond`` [1, S, D] /
    ``uncond_pooled`` [1, D2] / ``uncond_mask`` [1, S]."""

    cond: torch.Tensor
    uncond: torch.Tensor | None = None
    pooled: torch.Tensor | None = None
    uncond_pooled: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    uncond_mask: torch.Tensor | None = None

    def for_batch(self, first: int, n: int) -> dict[str, torch.Tensor]:
        """Conditioning keywords of trajectories ``first .. first + n - 1`` (rows used round-robin)."""
        idx = torch.arange(first, first + n) % self.cond.shape[0]
        out = {COND_KEY: self.cond[idx]}
        if self.pooled is not None:
            out[POOLED_KEY] = self.pooled[idx]
        if self.mask is not None:
            out[MASK_KEY] = self.mask[idx]
        return out

    def unconditional(self) -> dict[str, torch.Tensor] | None:
        """The unconditional keywords ([1, ...]), or None without ``uncond``."""
        if self.uncond is None:
            return None
        out = {COND_KEY: self.uncond}
        if self.pooled is not None:
            if self.uncond_pooled is None:
                raise CalibrationError(
                    f"the conditioning has {POOLED_KEY} and {UNCOND_KEY} but no {UNCOND_POOLED_KEY}",
                    hint=f"add {UNCOND_POOLED_KEY} [1, D2] (the pooled embedding of the empty prompt)",
                )
            out[POOLED_KEY] = self.uncond_pooled
        if self.mask is not None:
            if self.uncond_mask is None:
                raise CalibrationError(
                    f"the conditioning has {MASK_KEY} and {UNCOND_KEY} but no {UNCOND_MASK_KEY}",
                    hint=f"add {UNCOND_MASK_KEY} [1, S] (the empty prompt's mask: diffusers' "
                         "negative_prompt_attention_mask)",
                )
            out[MASK_KEY] = self.uncond_mask
        return out


def _check_rows(path: Path, name: str, tensor: torch.Tensor | None, rank: int, width: int | None = None) -> None:
    if tensor is None:
        return
    dims = "[P, S, D]" if rank == 3 else "[P, D2]"
    if tensor.dim() != rank or (width is not None and tensor.shape[-1] != width) or tensor.numel() == 0:
        raise CalibrationError(f"{path}: {name} must be {dims} (rank {rank}) with P, S, D >= 1, "
                               f"found shape {tuple(tensor.shape)}",
                               hint="save one row per prompt; the unconditional entries hold one row")
    if name.startswith("uncond") and tensor.shape[0] != 1:
        raise CalibrationError(f"{path}: {name} must hold one row, found shape {tuple(tensor.shape)}",
                               hint="save the empty prompt's embeddings as [1, ...]")
    if not tensor.is_floating_point():
        raise CalibrationError(f"{path}: {name} has dtype {tensor.dtype}; expected floating-point embeddings",
                               hint="save the text encoder's float output, not token ids or masks")
    if not torch.isfinite(tensor).all():
        raise CalibrationError(f"{path}: {name} holds NaN or Inf values", hint="recompute the embeddings")


def _check_mask(path: Path, name: str, mask: torch.Tensor | None, cond: torch.Tensor | None) -> None:
    """A text attention mask is [rows, S] of 0/1, with the rows and the sequence of its embeddings."""
    if mask is None:
        return
    if cond is None:
        raise CalibrationError(f"{path} has {name} but not the embeddings it masks",
                               hint=f"save {name} beside {COND_KEY} / {UNCOND_KEY}, or leave it out")
    want = (cond.shape[0], cond.shape[1])
    if mask.dim() != 2 or tuple(mask.shape) != want:
        raise CalibrationError(f"{path}: {name} must be [{want[0]}, {want[1]}] (one row per embedding row, one "
                               f"entry per token), found shape {tuple(mask.shape)}",
                               hint="save the tokenizer's attention_mask of the same prompts "
                                    "(diffusers: prompt_attention_mask)")
    if mask.is_complex() or not bool(((mask == 0) | (mask == 1)).all()):
        raise CalibrationError(f"{path}: {name} holds values other than 0 and 1",
                               hint="1 marks a text token, 0 padding: save the tokenizer's attention_mask")


def _renamed(path: Path, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` with diffusers' ``encode_prompt`` names (``prompt_embeds``, ``negative_prompt_embeds``,
    ``pooled_prompt_embeds``, ``negative_pooled_prompt_embeds``) renamed to this file's; the negative rows, one per
    prompt in diffusers, must all be one negative prompt's, and one row of it is kept."""
    out = dict(tensors)
    for alias, name in ALIASES.items():
        if alias not in tensors:
            continue
        if name in tensors:
            raise CalibrationError(f"{path} has both {alias!r} and {name!r}", hint="keep one of the two names")
        value = out.pop(alias)
        if name.startswith("uncond") and value.dim() >= 1 and value.shape[0] > 1:
            if not torch.equal(value, value[:1].expand_as(value)):
                raise CalibrationError(f"{path}: the {value.shape[0]} rows of {alias} differ; dqdeploy guides with "
                                       "one negative prompt",
                                       hint=f"save one negative prompt's embeddings as {alias} [1, ...]")
            value = value[:1]
        out[name] = value
    return out


def load_conditioning(path: str | Path) -> Conditioning:
    """Read ``--cond FILE.safetensors``: ``encoder_hidden_states`` [P, S, D] (required),
    ``pooled_projections`` [P, D2] (SD3 and Flux), PixArt's ``encoder_attention_mask`` [P, S] (optional), and
    optionally ``uncond_encoder_hidden_states`` [1, S, D] / ``uncond_pooled_projections`` [1, D2] /
    ``uncond_encoder_attention_mask`` [1, S] (enable classifier-free guidance). diffusers' ``encode_prompt`` names are
    accepted for the same tensors (``prompt_embeds``, ``negative_prompt_embeds``, ``pooled_prompt_embeds``,
    ``negative_pooled_prompt_embeds``, ``prompt_attention_mask``, ``negative_prompt_attention_mask``)."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise CalibrationError(f"conditioning file {path} not found")
    try:
        tensors = load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types
        raise CalibrationError(f"{path} is not a readable safetensors file: {exc}") from None
    return conditioning_from(tensors, path)


def conditioning_from(tensors: dict[str, torch.Tensor], path: str | Path) -> Conditioning:
    """:class:`Conditioning` from named tensors (a ``--cond`` file's, or :func:`dqdeploy.io.prompts.encode`'s),
    checked; ``path`` names their source in errors."""
    path = Path(path)
    tensors = _renamed(path, tensors)
    if COND_KEY not in tensors:
        raise CalibrationError(
            f"{path} has keys {sorted(tensors)}; expected {COND_KEY!r} [P, S, D]",
            hint=f"save prompt embeddings under {COND_KEY!r} (and optionally {UNCOND_KEY!r})",
        )
    cond = tensors[COND_KEY]
    uncond, pooled, uncond_pooled = (tensors.get(k) for k in (UNCOND_KEY, POOLED_KEY, UNCOND_POOLED_KEY))
    _check_rows(path, COND_KEY, cond, 3)
    _check_rows(path, UNCOND_KEY, uncond, 3)
    if uncond is not None and uncond.shape[-2:] != cond.shape[-2:]:
        raise CalibrationError(f"{path}: {UNCOND_KEY} {tuple(uncond.shape)} must match "
                               f"{COND_KEY} {tuple(cond.shape)} in [S, D]")
    _check_rows(path, POOLED_KEY, pooled, 2)
    _check_rows(path, UNCOND_POOLED_KEY, uncond_pooled, 2, None if pooled is None else pooled.shape[-1])
    if pooled is not None and pooled.shape[0] != cond.shape[0]:
        raise CalibrationError(f"{path}: {POOLED_KEY} has {pooled.shape[0]} rows, {COND_KEY} {cond.shape[0]}",
                               hint="one pooled row per prompt")
    mask, uncond_mask = tensors.get(MASK_KEY), tensors.get(UNCOND_MASK_KEY)
    _check_mask(path, MASK_KEY, mask, cond)
    _check_mask(path, UNCOND_MASK_KEY, uncond_mask, uncond)

    def first(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t[:1].float()

    return Conditioning(cond.float(), first(uncond), None if pooled is None else pooled.float(), first(uncond_pooled),
                        None if mask is None else mask.float(), first(uncond_mask))


def check_conditioning(conditioning: Conditioning | None, guidance: float, denoiser,
                       source: str | Path | None = None) -> None:
    """Refuse conditioning ``denoiser`` cannot take: a text attention mask for a model without one
    (:func:`check_text_mask`), guidance without unconditional rows (:func:`check_guidance`)."""
    check_text_mask(conditioning, denoiser, source)
    check_guidance(conditioning, guidance, denoiser, source)


def check_text_mask(conditioning: Conditioning | None, denoiser, source: str | Path | None = None) -> None:
    """Refuse a text attention mask for a model that takes none (every family but PixArt)."""
    if conditioning is None or conditioning.mask is None and conditioning.uncond_mask is None:
        return
    spec = spec_of(denoiser)
    if MASK_KEY not in spec.inputs:
        raise CalibrationError(f"{source or 'the conditioning'} has a text attention mask ({MASK_KEY}); "
                               f"{spec.class_name} takes none",
                               hint=f"leave {MASK_KEY} / {UNCOND_MASK_KEY} out of the --cond file (only PixArt "
                                    "takes a text mask)")


def check_guidance(conditioning: Conditioning | None, guidance: float, denoiser, source: str | Path | None = None
                   ) -> None:
    """Refuse classifier-free guidance (``guidance != 1``) without unconditional embeddings, which would
    otherwise be ignored in silence; Flux's guidance is an input of the model and needs none."""
    if conditioning is None or guidance == 1.0 or conditioning.uncond is not None:
        return
    if GUIDANCE in spec_of(denoiser).input_names(denoiser.config):
        return
    raise CalibrationError(
        f"--guidance {guidance:g} asks for classifier-free guidance, which needs the unconditional (empty prompt) "
        f"embeddings; {source or 'the conditioning'} has no {UNCOND_KEY!r}",
        hint=f"add {UNCOND_KEY!r} [1, S, D] (SD3: and {UNCOND_POOLED_KEY!r} [1, D2]) to the --cond file, "
             "or use --guidance 1 (no guidance)")


def read_prompts(path: Path) -> list[str]:
    """One prompt per non-empty line of a UTF-8 text file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CalibrationError(f"--prompts file {path} not found",
                               hint="pass a text file, one prompt per line") from None
    except IsADirectoryError:
        raise CalibrationError(f"--prompts {path} is a folder",
                               hint="pass a text file, one prompt per line") from None
    except UnicodeDecodeError:
        raise CalibrationError(f"--prompts file {path} is not UTF-8 text",
                               hint="pass a text file, one prompt per line") from None
    except OSError as exc:
        raise CalibrationError(f"--prompts file {path} cannot be read: {exc.strerror or exc}") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts or "\x00" in text:
        raise CalibrationError(f"--prompts file {path} holds no prompts" if not prompts
                               else f"--prompts file {path} is binary",
                               hint="pass a text file, one prompt per line")
    return prompts
