"""Loading diffusers model folders: a pipeline folder (``model_index.json`` with ``unet/`` or
``transformer/``, and ``scheduler/``) or a bare denoiser folder plus a scheduler folder. Supported
denoisers (:mod:`dqdeploy.denoisers`): ``UNet2DModel`` (DDPM/LDM), ``UNet2DConditionModel``
(Stable-Diffusion style), ``SD3Transformer2DModel``, ``PixArtTransformer2DModel`` and
``FluxTransformer2DModel``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .denoisers import conditional, spec_for, spec_of
from .denoisers import latent_shape as spec_latent_shape
from .errors import ModelLoadError

SCHEDULER_ALIASES = {
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "pndm": "PNDMScheduler",
    "euler": "EulerDiscreteScheduler",
    "dpm": "DPMSolverMultistepScheduler",
    "flow": "FlowMatchEulerDiscreteScheduler",
}


@dataclass
class LoadedModel:
    """A denoiser (``unet``: a UNet or a diffusion transformer) with the scheduler config it came
    with and (for full Stable Diffusion pipelines) the text stack."""

    unet: torch.nn.Module
    scheduler_config: dict[str, Any]
    model_dir: Path
    text_encoder: Any = None
    tokenizer: Any = None

    @property
    def conditional(self) -> bool:
        return conditional(spec_for(type(self.unet).__name__), self.unet.config)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{path} is not valid JSON: {exc}") from None


def _unet_dir(model_dir: Path) -> Path:
    for sub in ("unet", "transformer"):
        if (model_dir / sub / "config.json").is_file():
            return model_dir / sub
    if (model_dir / "config.json").is_file():
        return model_dir
    raise ModelLoadError(
        f"{model_dir} holds neither unet/config.json nor transformer/config.json (a pipeline folder) "
        "nor config.json (a bare denoiser folder)",
        hint="pass a diffusers folder written by save_pretrained",
    )


def unet_class(config: dict[str, Any], where: Path) -> Any:
    """The diffusers class named by a denoiser config, refusing unsupported ones."""
    import diffusers

    return getattr(diffusers, spec_for(config.get("_class_name"), where).class_name)


def load_unet(model_dir: str | Path) -> torch.nn.Module:
    """Load the denoiser (UNet or transformer) of a pipeline folder or a bare folder, in FP32 eval mode."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ModelLoadError(f"model folder {model_dir} does not exist", hint="check the path")
    udir = _unet_dir(model_dir)
    config = _read_json(udir / "config.json")
    cls = unet_class(config, udir)
    spec_for(config.get("_class_name"), udir).check_supported(config, udir)
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


def make_scheduler(name: str | None, config: dict[str, Any]) -> Any:
    """A diffusers scheduler by alias (ddim, ddpm, pndm, euler, dpm, flow) or class name, from
    ``config``; ``None`` means the class the config names (the model folder's own scheduler)."""
    import diffusers

    if name is None:
        name = config.get("_class_name") or "DDIMScheduler"
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


def latent_shape(unet: Any) -> tuple[int, ...]:
    """The shape of one noise sample for a diffusers denoiser (``(C, H, W)``; Flux: ``(N, C)``)."""
    return spec_latent_shape(spec_of(unet), unet.config, 1)[1:]
