"""LoRA adapter files read into per-layer low-rank factors, named as the denoiser's layers.

Formats (safetensors only: no pickles), as diffusers and peft write them:

* peft / diffusers >= 0.24: ``unet.<layer>.lora_A.weight`` [r, in], ``unet.<layer>.lora_B.weight`` [out, r]
  (``transformer.`` for diffusion transformers; ``.lora_A.default.weight`` too), alpha in ``<layer>.alpha``;
* older diffusers: ``<layer>.lora.down.weight`` / ``.lora.up.weight``, ``<layer>.lora_down.weight`` /
  ``.lora_up.weight``, and attention processors' ``<attn>.processor.to_q_lora.down.weight``;
* kohya / A1111 (``lora_unet_...``): converted by diffusers' own ``lora_state_dict`` of the model's pipeline
  (Stable Diffusion and SDXL UNets).

Each layer's update is ``scale * alpha / r * (up @ down)``; layers of a text encoder are not the denoiser's and
are left out (reported). Linear layers and plain convolutions (LoCon: ``down`` [r, in, kh, kw] with the conv's kernel,
``up`` [out, r, 1, 1]) take an adapter; grouped convolutions and other layers are refused.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Union, cast

import torch
from torch import nn

from ..core.errors import DQDeployError
from ..quant.lora import ConvGeometry, LoraBranches, LoraLayer, attach_lora
from .tensorfile import read_tensors

log = logging.getLogger(__name__)

_DOWN = r"(?:lora_A(?:\.default)?|lora\.down|lora_down)\.weight"
_UP = r"(?:lora_B(?:\.default)?|lora\.up|lora_up)\.weight"
_KEY = re.compile(rf"^(?P<layer>.+?)\.(?:(?P<down>{_DOWN})|(?P<up>{_UP})|(?P<alpha>alpha|{_DOWN}\.alpha))$")
_PROCESSOR = re.compile(r"\.processor\.(to_q|to_k|to_v|to_out|add_q_proj|add_k_proj|add_v_proj|to_add_out)_lora\.")
_DENOISER_PREFIXES = ("unet.", "transformer.")
_KOHYA_PIPELINES = {"UNet2DConditionModel": "StableDiffusionPipeline"}


class LoraError(DQDeployError):
    """A LoRA file that cannot be read or does not fit the model."""


@dataclass(frozen=True)
class LoraAdapter:
    """A LoRA file's layers for one denoiser, and the file's identity."""

    path: Path
    sha256: str
    layers: dict[str, LoraLayer]


def _raw_state(path: Path, model_class: str) -> dict[str, torch.Tensor]:
    if path.suffix != ".safetensors" or not path.is_file():
        raise LoraError(f"{path}: expected a LoRA .safetensors file, found "
                        + ("no such file" if not path.exists() else f"a {'folder' if path.is_dir() else 'file'} "
                           f"named {path.name}"),
                        hint="LoRA files are read as safetensors only (no pickles); convert a .bin/.pt file first")
    try:
        state = read_tensors(path)
    except Exception as exc:  # safetensors raises its own error types
        raise LoraError(f"{path} is not a readable safetensors file ({str(exc)[:200]})") from None
    if any(k.startswith("lora_unet_") for k in state):
        state = _from_kohya(path, model_class)
    return state


def _from_kohya(path: Path, model_class: str) -> dict[str, torch.Tensor]:
    """diffusers' own conversion of a kohya / A1111 file (old diffusers key names, alphas beside them)."""
    if model_class not in _KOHYA_PIPELINES:
        raise LoraError(f"{path}: a kohya-format LoRA (lora_unet_* keys) for a {model_class}",
                        hint="convert it to the diffusers/peft format first; kohya keys are read for "
                             f"{', '.join(_KOHYA_PIPELINES)} only")
    import diffusers

    state, alphas = getattr(diffusers, _KOHYA_PIPELINES[model_class]).lora_state_dict(str(path))
    return {**state, **{k: torch.tensor(float(v)) for k, v in (alphas or {}).items()}}


def _plain(key: str) -> str:
    """An attention processor's key (``attn1.processor.to_q_lora.down.weight``) as the layer's own
    (``attn1.to_q.lora.down.weight``)."""
    return _PROCESSOR.sub(lambda m: "." + ("to_out.0" if m.group(1) == "to_out" else m.group(1)) + ".lora.", key)


def _group(state: dict[str, torch.Tensor], path: Path) -> tuple[dict[str, dict[str, torch.Tensor]], list[str]]:
    """Keys grouped per layer of the denoiser (``down``, ``up``, ``alpha``); the keys of other models."""
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    others: list[str] = []
    unknown: list[str] = []
    for key, value in state.items():
        prefix = next((p for p in _DENOISER_PREFIXES if key.startswith(p)), None)
        if prefix is None:
            (others if key.split(".")[0].startswith(("text_encoder", "te")) else unknown).append(key)
            continue
        m = _KEY.match(_plain(key[len(prefix):]))
        if m is None:
            unknown.append(key)
            continue
        part = "down" if m.group("down") else "up" if m.group("up") else "alpha"
        grouped.setdefault(m.group("layer"), {})[part] = value
    if unknown:
        raise LoraError(f"{path}: {len(unknown)} key(s) of no known LoRA format, e.g. {unknown[:3]}",
                        hint="dqdeploy reads diffusers/peft LoRA files (unet.<layer>.lora_A.weight, ...) and "
                             "kohya files of Stable Diffusion UNets")
    return grouped, others


def read_lora(path: str | Path, denoiser: nn.Module, slots_of: str | None = None) -> LoraAdapter:
    """The adapter of ``denoiser`` (a diffusers UNet or transformer, quantized or not) in the LoRA file
    ``path``: every layer checked against the model (present, a Linear or a plain Conv2d, matching shapes).
    ``slots_of``: ``denoiser`` stands for the LoRA slots of that export (its layers are the slots only)."""
    path = Path(path)
    model_class = type(denoiser).__name__
    grouped, others = _group(_raw_state(path, model_class), path)
    if others:
        log.warning("%s: %d text-encoder key(s) left out: dqdeploy adapts the denoiser only (encode prompts with "
                    "the adapted text encoder)", path, len(others))
    if not grouped:
        raise LoraError(f"{path}: no layer of the denoiser in this LoRA file",
                        hint="the keys must start with 'unet.' or 'transformer.' (diffusers/peft format)")
    modules = dict(denoiser.named_modules())
    if slots_of is not None:
        missing = sorted(set(grouped) - set(modules))
        if missing:
            raise LoraError(f"{path}: {len(missing)} layer(s) have no LoRA slot in {slots_of} (first: {missing[0]})",
                            hint="export with `--lora-slots` naming this LoRA file (or `attention`)")
    layers = {name: _checked(path, name, parts, modules.get(name)) for name, parts in sorted(grouped.items())}
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return LoraAdapter(path, digest, layers)


def _geometry(path: Path, name: str, module: nn.Module) -> ConvGeometry | None:
    """A Conv2d's geometry (its ``down`` convolution takes it); None for a Linear; a LoraError for anything else."""
    weight = getattr(module, "weight", None)
    kind = getattr(module, "kind", "linear" if isinstance(module, nn.Linear) else
                   "conv" if isinstance(module, nn.Conv2d) else "other")
    if kind == "linear" and isinstance(weight, torch.Tensor) and weight.dim() == 2:
        return None
    if kind != "conv" or not isinstance(weight, torch.Tensor) or weight.dim() != 4:
        raise LoraError(f"{path}: layer {name} is a {type(module).__name__}, not a Linear or Conv2d",
                        hint="dqdeploy adapts Linear layers and 2-d convolutions only")
    args = getattr(module, "conv_args", None) or {k: getattr(module, k) for k in ("stride", "padding", "dilation",
                                                                                  "groups")}
    pairs = {k: tuple(args[k]) if isinstance(args[k], (tuple, list)) else args[k] for k in ("stride", "padding",
                                                                                             "dilation")}
    if args["groups"] != 1 or not all(isinstance(v, tuple) and len(v) == 2 for v in pairs.values()) \
            or getattr(module, "padding_mode", "zeros") != "zeros":
        raise LoraError(f"{path}: layer {name} is a convolution with groups={args['groups']}, padding="
                        f"{args['padding']!r}, padding_mode={getattr(module, 'padding_mode', 'zeros')!r}; a LoRA is "
                        "supported on plain convolutions only (groups=1, numeric zero padding)",
                        hint="use an adapter without this layer (grouped / depthwise convolutions are not adapted)")
    return ConvGeometry(pairs["stride"], pairs["padding"], pairs["dilation"])


def _checked(path: Path, name: str, parts: dict[str, torch.Tensor], module: nn.Module | None) -> LoraLayer:
    if "down" not in parts or "up" not in parts:
        raise LoraError(f"{path}: layer {name} has no {'down (lora_A)' if 'down' not in parts else 'up (lora_B)'} "
                        "matrix", hint="the file is incomplete; re-export the LoRA")
    if module is None:
        raise LoraError(f"{path}: layer {name} is not a layer of this model",
                        hint="the LoRA was trained for another model (check the base model it was made for)")
    conv = _geometry(path, name, module)
    weight = cast(torch.Tensor, module.weight)
    down, up = parts["down"].float(), parts["up"].float()
    if conv is not None and weight.shape[2:] == (1, 1) and down.dim() == 2:  # a 1x1 conv's LoRA stored as matrices
        down = down[:, :, None, None]
    if conv is not None and up.dim() == 4 and up.shape[2:] == (1, 1):
        up = up[:, :, 0, 0]
    want_down = (down.shape[0], *weight.shape[1:])
    if down.dim() != weight.dim() or up.dim() != 2 or tuple(down.shape) != want_down \
            or tuple(up.shape) != (weight.shape[0], down.shape[0]):
        kind = "conv" if conv is not None else "Linear"
        raise LoraError(f"{path}: layer {name}: down {tuple(parts['down'].shape)} and up {tuple(parts['up'].shape)} "
                        f"do not make an update of this {kind}'s {list(weight.shape)} weight"
                        + (" (expected down [r, in, kh, kw] with the conv's kernel and up [out, r, 1, 1])"
                           if conv is not None else ""), hint="the LoRA was made for another model")
    rank = down.shape[0]
    alpha = float(parts["alpha"]) if "alpha" in parts else float(rank)
    if not torch.isfinite(down).all() or not torch.isfinite(up).all() or not alpha == alpha:
        raise LoraError(f"{path}: layer {name} holds NaN or Inf", hint="the LoRA file is damaged")
    return LoraLayer(down.contiguous(), up.contiguous(), alpha / rank, conv)


LoraSpec = Union[str, PathLike, tuple[Union[str, PathLike], float], Sequence[tuple[Union[str, PathLike], float]]]


def lora_list(spec: LoraSpec) -> list[tuple[Path, float]]:
    """``FILE``, ``(FILE, scale)`` or a list of ``(FILE, scale)`` as a list of (path, scale)."""
    if isinstance(spec, (str, PathLike)):
        return [(Path(spec), 1.0)]
    items = [spec] if isinstance(spec, tuple) and len(spec) == 2 and not isinstance(spec[1], tuple) else spec
    out = []
    for item in items:
        ok = (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], (str, PathLike))
              and isinstance(item[1], (int, float)) and not isinstance(item[1], bool) and math.isfinite(item[1]))
        if not ok:
            raise LoraError(f"lora={spec!r}: expected FILE, (FILE, scale) or a list of (FILE, scale)",
                            hint='e.g. lora=[("style.safetensors", 0.8)]')
        out.append((Path(item[0]), float(item[1])))
    return out


def apply_lora(model: nn.Module, spec: LoraSpec) -> LoraBranches:
    """Read each LoRA file of ``spec`` for ``model`` and add its float branches (``.remove()`` takes them off)."""
    adapters = [(read_lora(path, getattr(model, "denoiser", model)).layers, scale) for path, scale in lora_list(spec)]
    return attach_lora(model, adapters)
