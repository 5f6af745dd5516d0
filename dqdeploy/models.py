"""Loading diffusers model folders: a pipeline folder (``model_index.json`` with ``unet/`` and
``scheduler/``) or a bare UNet folder plus a scheduler folder. Supported UNets:
``UNet2DModel`` (DDPM/LDM) and ``UNet2DConditionModel`` (Stable-Diffusion style).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import ModelLoadError

SUPPORTED_UNETS = ("UNet2DModel", "UNet2DConditionModel")
SCHEDULER_ALIASES = {
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "pndm": "PNDMScheduler",
    "euler": "EulerDiscreteScheduler",
    "dpm": "DPMSolverMultistepScheduler",
}


@dataclass
class LoadedModel:
    """A UNet with the scheduler config it came with and (for full pipelines) the text stack."""

    unet: torch.nn.Module
    scheduler_config: dict[str, Any]
    model_dir: Path
    text_encoder: Any = None
    tokenizer: Any = None

    @property
    def conditional(self) -> bool:
        return getattr(self.unet.config, "cross_attention_dim", None) is not None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{path} is not valid JSON: {exc}") from None


def _unet_dir(model_dir: Path) -> Path:
    if (model_dir / "unet" / "config.json").is_file():
        return model_dir / "unet"
    if (model_dir / "config.json").is_file():
        return model_dir
    raise ModelLoadError(
        f"{model_dir} holds neither unet/config.json (a pipeline folder) nor config.json (a UNet folder)",
        hint="pass a diffusers folder written by save_pretrained",
    )


def unet_class(config: dict[str, Any], where: Path) -> Any:
    """The diffusers class named by a UNet config, refusing unsupported ones."""
    import diffusers

    name = config.get("_class_name")
    if name not in SUPPORTED_UNETS:
        raise ModelLoadError(
            f"{where}: unsupported model class {name!r}; dqdeploy quantizes {', '.join(SUPPORTED_UNETS)}",
            hint="point at the UNet of a DDPM/LDM or Stable-Diffusion-style pipeline",
        )
    return getattr(diffusers, name)


def load_unet(model_dir: str | Path) -> torch.nn.Module:
    """Load the UNet of a pipeline folder or a bare UNet folder, in FP32 eval mode."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ModelLoadError(f"model folder {model_dir} does not exist", hint="check the path")
    udir = _unet_dir(model_dir)
    cls = unet_class(_read_json(udir / "config.json"), udir)
    try:
        unet = cls.from_pretrained(str(udir), torch_dtype=torch.float32, low_cpu_mem_usage=False)
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelLoadError(f"could not load {cls.__name__} from {udir}: {exc}") from exc
    return unet.eval()


def load_scheduler_config(model_dir: Path, scheduler_dir: str | Path | None = None) -> dict[str, Any]:
    """The scheduler config of a pipeline folder, or of ``scheduler_dir`` when given."""
    candidates = [Path(scheduler_dir)] if scheduler_dir else [model_dir / "scheduler"]
    for d in candidates:
        for name in ("scheduler_config.json", "config.json"):
            if (d / name).is_file():
                return _read_json(d / name)
    raise ModelLoadError(
        f"no scheduler config found in {candidates[0]}",
        hint="pass a pipeline folder with scheduler/, or --scheduler-dir pointing at a scheduler folder",
    )


def load_model(model_dir: str | Path, scheduler_dir: str | Path | None = None) -> LoadedModel:
    """Load UNet, scheduler config and, when present, the text encoder and tokenizer."""
    model_dir = Path(model_dir)
    unet = load_unet(model_dir)
    loaded = LoadedModel(unet, load_scheduler_config(model_dir, scheduler_dir), model_dir)
    if (model_dir / "text_encoder").is_dir() and (model_dir / "tokenizer").is_dir():
        loaded.text_encoder, loaded.tokenizer = _load_text_stack(model_dir)
    return loaded


def _load_text_stack(model_dir: Path) -> tuple[Any, Any]:
    from .errors import require

    transformers = require("transformers", "sd", "encoding prompts of a Stable Diffusion pipeline")
    encoder = transformers.CLIPTextModel.from_pretrained(str(model_dir / "text_encoder")).eval()
    tokenizer = transformers.CLIPTokenizer.from_pretrained(str(model_dir / "tokenizer"))
    return encoder, tokenizer


def make_scheduler(name: str, config: dict[str, Any]) -> Any:
    """A diffusers scheduler by alias (ddim, ddpm, pndm, euler, dpm) or class name, from ``config``."""
    import diffusers

    cls_name = SCHEDULER_ALIASES.get(name.lower(), name)
    cls = getattr(diffusers, cls_name, None)
    if cls is None or not hasattr(cls, "set_timesteps"):
        raise ModelLoadError(
            f"unknown scheduler {name!r}",
            hint=f"use one of {', '.join(SCHEDULER_ALIASES)} or a diffusers scheduler class name",
        )
    return cls.from_config(config)


@torch.no_grad()
def encode_prompts(loaded: LoadedModel, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP text embeddings [N, S, D] of ``prompts`` and of the empty prompt [1, S, D]."""
    if loaded.text_encoder is None:
        raise ModelLoadError(
            f"{loaded.model_dir} has no text_encoder/ and tokenizer/, so --prompts cannot be encoded",
            hint="pass precomputed embeddings with --cond FILE.safetensors instead",
        )
    tok = loaded.tokenizer

    def encode(texts: list[str]) -> torch.Tensor:
        ids = tok(texts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt")
        return loaded.text_encoder(ids.input_ids)[0].float()

    return encode(prompts), encode([""])


def latent_shape(unet: Any) -> tuple[int, int, int]:
    """``(channels, height, width)`` of one noise sample for a diffusers denoiser, from its config."""
    cfg = unet.config
    size = cfg.sample_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return int(cfg.in_channels), int(h), int(w)
