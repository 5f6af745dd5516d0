"""Prompt to image on ONNX Runtime without PyTorch: an export folder written with ``--pipeline`` (optimum's ONNX
layout) run as its diffusers pipeline's text-to-image loop (``StableDiffusionPipeline``,
``StableDiffusion3Pipeline``, ``FluxPipeline``) -- the tokenizers (the ``tokenizers`` package) and text encoders
(:mod:`.text`), the quantized denoiser and the VAE decoder as ONNX Runtime sessions, the sampler in numpy
(:mod:`.schedulers`), classifier-free guidance (Flux: its guidance input, packed latents and position ids) as
diffusers does it. Nothing here imports torch.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..core.denoisers import GUIDANCE, IMG_IDS, SPECS, TXT_IDS
from ..core.errors import PipelineError, RuntimeInputError
from ..core.vocab import CONTEXT, TIMESTEP, Inexact
from .schedulers import HINT, FlowMatchEuler, NumpyScheduler, calibrated_steps, numpy_scheduler
from .session import CPU, Provider, open_session
from .spec import ExportSpec, read_spec
from .text import EXPORT_HINT, FAMILIES, Tokenizer, family_parts, json_config

__all__ = ["OrtPipeline", "PipelineOutput", "Tokenizer", "load_pipeline", "to_pil"]

PARTS = ("vae_decoder/model.onnx", "vae_decoder/config.json", "scheduler/scheduler_config.json", "model_index.json")


@dataclass
class PipelineOutput:
    """What a call returns: ``images`` (PIL images, or a float array [N, H, W, 3] in [0, 1] for ``output_type="np"``)
    and the seconds each stage took."""

    images: Any
    timings: dict[str, float] = field(default_factory=dict)


class OrtPipeline:
    """A text-to-image pipeline from an export folder with ``--pipeline``: ``pipe("a cat").images[0]``. Stable
    Diffusion (UNet2DConditionModel), SD3 (SD3Transformer2DModel) and Flux (FluxTransformer2DModel) pipelines; the
    prompts are encoded by the
    family's :class:`~.text.PromptEncoder`.

    ``providers``/``threads``/``options``/``inexact``: as :class:`~.ort.OrtDenoiser` (every session gets them)."""

    def __init__(self, export_dir: str | Path, providers: Sequence[Provider] | str = (CPU,), threads: int = 1,
                 options: Any = None, inexact: Inexact = "refuse") -> None:
        self.folder = Path(export_dir)
        self.spec: ExportSpec = read_spec(self.folder)  # verifies every recorded file, the pipeline's too
        if not self.spec.conditional:
            raise PipelineError(f"{self.folder}: the pipeline without PyTorch runs prompts, found an unconditional "
                                f"{self.spec.model_class}", hint="sample it from noise: dqdeploy serve EXPORT_DIR")
        parts = (*PARTS, *family_parts(self.spec.model_class))
        missing = [p for p in parts if not (self.folder / p).is_file()]
        if missing:
            raise PipelineError(f"{self.folder} holds no whole pipeline: expected {', '.join(parts)}, found "
                                f"{', '.join(missing)} missing", hint=EXPORT_HINT)
        self.scheduler_config = json_config(self.folder / "scheduler" / "scheduler_config.json")
        numpy_scheduler(self.scheduler_config)  # refused now, not at the first call
        self.vae_config = json_config(self.folder / "vae_decoder" / "config.json")
        session = dict(providers=providers, threads=threads, options=options)
        self.inputs = {t.name: t for t in self.spec.inputs}
        self.prompt_encoder = FAMILIES[self.spec.model_class](self.folder, session, self.inputs[CONTEXT].shape[1])
        self.denoiser = open_session(self.folder / self.spec.onnx_file, self.spec, inexact=inexact, **session)
        self.vae_decoder = open_session(self.folder / "vae_decoder/model.onnx", None, **session)
        config, self.denoiser_spec = self.spec.model_config, SPECS[self.spec.model_class]
        self.vae_scale = 2 ** (len(self.vae_config.get("block_out_channels", [0])) - 1)
        self.packed = self.denoiser_spec.packed  # Flux: 2x2 patches of the latent image as tokens
        self.latent_channels = int(config["in_channels"]) // (4 if self.packed else 1)
        self.sample_size = config.get("sample_size") or self.prompt_encoder.sample_size

    @property
    def default_steps(self) -> int:
        """The calibrated step count of the quantized UNet (the one whose sampler calls it once per calibrated
        timestep), else 50."""
        return calibrated_steps(self.scheduler_config, len(self.spec.timesteps))

    def encode(self, prompts: list[str]) -> dict[str, np.ndarray]:
        """The denoiser's conditioning inputs for ``prompts`` by graph name (``encoder_hidden_states`` [N, S, D];
        SD3 and Flux also ``pooled_projections`` [N, D2]), as the family's diffusers ``encode_prompt`` makes them."""
        return self.prompt_encoder(prompts)

    def __call__(self, prompt: str | list[str], negative_prompt: str | list[str] | None = None, *,
                 num_inference_steps: int | None = None, guidance_scale: float | Sequence[float] | None = None,
                 height: int | None = None, width: int | None = None, seed: int | Sequence[int] | None = None,
                 latents: np.ndarray | None = None, output_type: str = "pil") -> PipelineOutput:
        """Images for ``prompt`` (the arguments of the family's diffusers pipeline; ``seed`` or ``latents`` [N, C,
        h, w] for the initial noise). Default steps: the calibrated count (:attr:`default_steps`); default guidance:
        the diffusers pipeline's (7.5 for Stable Diffusion, 7.0 for SD3, 3.5 for Flux: its graph's guidance input).
        ``latents`` are [N, C, h, w] for every family (Flux's are packed into 2x2 patches here, not by the caller).

        A list of seeds and one of guidance scales give each prompt its own: image ``i`` is then the image prompt
        ``i`` gets alone with ``seed[i]`` and ``guidance_scale[i]`` (scales all above 1, or all at most 1)."""
        prompts = _texts(prompt, "prompt")
        negatives = _texts(negative_prompt if negative_prompt is not None else "", "negative_prompt", len(prompts))
        if any(negatives) and not self.prompt_encoder.cfg:
            raise RuntimeInputError(f"negative_prompt={negative_prompt!r}: a {self.spec.model_class} pipeline is "
                                    "guidance-distilled (guidance_scale is its graph's input), it takes no negative "
                                    "prompt", hint="leave out negative_prompt (diffusers' true_cfg_scale is not "
                                                   "supported)")
        steps = self.default_steps if num_inference_steps is None else num_inference_steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise RuntimeInputError(f"num_inference_steps={steps!r}: expected a whole number >= 1")
        if output_type not in ("pil", "np"):
            raise RuntimeInputError(f"output_type={output_type!r} (expected 'pil' or 'np')")
        scales = _scales(self.prompt_encoder.guidance if guidance_scale is None else guidance_scale, len(prompts),
                         self.prompt_encoder.cfg)
        guided = bool(scales[0] > 1.0) and self.prompt_encoder.cfg
        clock = time.perf_counter()
        context = self.encode(prompts)
        if guided:
            negative = self.encode(negatives)
            context = {k: np.concatenate([negative[k], v]) for k, v in context.items()}
        timings = {"text encoder": time.perf_counter() - clock}
        noise = self._noise(len(prompts), height, width, seed, latents)
        scheduler = self._scheduler(steps, noise)
        x = noise * np.float32(scheduler.init_noise_sigma)
        context |= self._position_ids(noise, context)
        clock = time.perf_counter()
        for t in scheduler.timesteps:
            x = scheduler.step(self._guided(scheduler, x, float(t), context, scales, guided), t, x)
        timings["denoiser"], clock = time.perf_counter() - clock, time.perf_counter()
        image = self.decode(x)
        timings["vae decoder"] = time.perf_counter() - clock
        return PipelineOutput(image if output_type == "np" else to_pil(image), timings)

    def _scheduler(self, steps: int, latents: np.ndarray) -> NumpyScheduler:
        """The numpy sampler set to ``steps`` steps as the family's pipeline sets it: Flux passes sigmas
        ``linspace(1, 1/steps)``; dynamic shifting reads the image tokens (patches of a transformer)."""
        scheduler = numpy_scheduler(self.scheduler_config)
        patch = 2 if self.packed else int(self.spec.model_config.get("patch_size") or 1)
        tokens = (latents.shape[-2] // patch) * (latents.shape[-1] // patch)
        if not self.packed:
            scheduler.set_timesteps(steps, tokens=tokens)
        elif isinstance(scheduler, FlowMatchEuler):
            scheduler.set_sigmas(np.linspace(1.0, 1 / steps, steps), tokens=tokens)
        else:
            raise PipelineError(f"a {self.spec.model_class} pipeline samples with FlowMatchEulerDiscreteScheduler, "
                                f"found {self.scheduler_config.get('_class_name')}", hint=HINT)
        return scheduler

    def _position_ids(self, latents: np.ndarray, context: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Flux's position ids (no batch axis): the text's all zeros, the image's (0, row, column) of each patch."""
        if not self.packed:
            return {}
        rows, cols = latents.shape[-2] // 2, latents.shape[-1] // 2
        image = np.zeros((rows, cols, 3), np.float32)
        image[..., 1], image[..., 2] = np.arange(rows)[:, None], np.arange(cols)[None, :]
        return {TXT_IDS: np.zeros((context[CONTEXT].shape[1], 3), np.float32), IMG_IDS: image.reshape(-1, 3)}

    def _guided(self, scheduler: NumpyScheduler, x: np.ndarray, t: float, context: dict[str, np.ndarray],
                scales: np.ndarray, guided: bool) -> np.ndarray:
        """The guided prediction at ``t`` (unconditional and conditional rows in one batch; Flux: the guidance scale
        is an input of the graph instead)."""
        batch = np.concatenate([x, x]) if guided else x
        batch = scheduler.scale_model_input(batch, t)
        scale = self.denoiser_spec.timestep_scale  # Flux pipelines call the transformer with t / 1000
        timestep = np.float32(t) / np.float32(1 / scale) if scale != 1 else np.float32(t)
        feeds = {self.denoiser_spec.sample: pack(batch) if self.packed else batch,
                 TIMESTEP: np.full(len(batch), timestep), GUIDANCE: scales, **context}
        feeds = {k: np.asarray(v, dtype=self.inputs[k].dtype) for k, v in feeds.items() if k in self.inputs}
        (noise,) = self.denoiser.run(None, feeds)
        noise = unpack(noise, *x.shape[-2:]) if self.packed else noise
        if not guided:
            return noise
        uncond, cond = np.split(noise, 2)
        return uncond + scales.reshape(-1, 1, 1, 1) * (cond - uncond)

    def _latent_size(self) -> tuple[int, int]:
        """The default latent height and width: the graph's where it is static (Flux: a square of its tokens), else
        the denoiser config's ``sample_size`` (the family's default where it has none)."""
        shape = self.inputs[self.denoiser_spec.sample].shape
        if self.packed and isinstance(shape[1], int) and math.isqrt(shape[1]) ** 2 == shape[1]:
            return 2 * math.isqrt(shape[1]), 2 * math.isqrt(shape[1])
        if not self.packed and all(isinstance(d, int) for d in shape[2:]):
            return int(shape[2]), int(shape[3])
        size = self.sample_size
        return (int(size[0]), int(size[1])) if isinstance(size, list) else (int(size), int(size))

    def _noise(self, n: int, height: int | None, width: int | None, seed: int | Sequence[int] | None,
               latents: np.ndarray | None) -> np.ndarray:
        if latents is not None:
            latents = np.asarray(latents, dtype=np.float32)
            if latents.ndim != 4 or latents.shape[:2] != (n, self.latent_channels):
                raise RuntimeInputError(f"latents of shape {latents.shape}: expected [{n}, {self.latent_channels}, "
                                        "h, w] (one per prompt)")
            return latents
        size = self._latent_size()
        h, w = (height or size[0] * self.vae_scale), (width or size[1] * self.vae_scale)
        multiple = self.vae_scale * (2 if self.packed else 1)  # Flux packs 2x2 latent patches
        if h % multiple or w % multiple:
            raise RuntimeInputError(f"height={h}, width={w}: expected multiples of {multiple} (the VAE's scale"
                                    + (" times Flux's 2x2 packing)" if self.packed else ")"))
        shape = (self.latent_channels, h // self.vae_scale, w // self.vae_scale)
        if isinstance(seed, Sequence):
            if len(seed) != n:
                raise RuntimeInputError(f"{len(seed)} seeds for {n} prompts", hint="give one seed, or one per prompt")
            return np.concatenate([np.random.default_rng(s).standard_normal((1, *shape), np.float32) for s in seed])
        return np.random.default_rng(seed).standard_normal((n, *shape), np.float32)

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """Images [N, H, W, 3] in [0, 1] from latents (scaled back by the VAE's ``scaling_factor``, then moved by its
        ``shift_factor`` where it has one: SD3, Flux)."""
        scaled = latents / np.float32(self.vae_config.get("scaling_factor", 0.18215))
        scaled = scaled + np.float32(self.vae_config.get("shift_factor") or 0.0)
        (image,) = self.vae_decoder.run(["sample"], {"latent_sample": scaled.astype(np.float32)})
        return np.clip(image / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1)


def pack(latents: np.ndarray) -> np.ndarray:
    """[N, C, h, w] latents as Flux's tokens [N, h/2 * w/2, 4C] (diffusers' ``FluxPipeline._pack_latents``)."""
    n, c, h, w = latents.shape
    return latents.reshape(n, c, h // 2, 2, w // 2, 2).transpose(0, 2, 4, 1, 3, 5).reshape(n, h * w // 4, c * 4)


def unpack(tokens: np.ndarray, h: int, w: int) -> np.ndarray:
    """Flux's tokens [N, h/2 * w/2, 4C] back to [N, C, h, w] latents (``FluxPipeline._unpack_latents``)."""
    n, _, c4 = tokens.shape
    return tokens.reshape(n, h // 2, w // 2, c4 // 4, 2, 2).transpose(0, 3, 1, 4, 2, 5).reshape(n, c4 // 4, h, w)


def _texts(value: Any, name: str, count: int | None = None) -> list[str]:
    texts = [value] if isinstance(value, str) else value
    if not isinstance(texts, (list, tuple)) or not texts or not all(isinstance(t, str) for t in texts):
        raise RuntimeInputError(f"{name}={value!r}: expected a string or a non-empty list of strings")
    if count is not None and len(texts) == 1:
        texts = list(texts) * count
    if count is not None and len(texts) != count:
        raise RuntimeInputError(f"{len(texts)} negative prompts for {count} prompts",
                                hint="give one, or one per prompt")
    return list(texts)


def _scales(value: Any, count: int, cfg: bool = True) -> np.ndarray:
    """Per-prompt guidance scales [N] (float32) of one scale or one per prompt; with classifier-free guidance
    (``cfg``) all above 1 (guided) or all at most 1."""
    try:
        scales = np.asarray([value] * count if np.ndim(value) == 0 else value, dtype=np.float32)
    except (TypeError, ValueError):
        scales = np.zeros(0, np.float32)
    if scales.shape != (count,) or not np.isfinite(scales).all():
        raise RuntimeInputError(f"guidance_scale={value!r}: expected a finite number, or one per prompt ({count})")
    if cfg and len(set((scales > 1.0).tolist())) > 1:
        raise RuntimeInputError(f"guidance_scale={value!r} mixes scales above 1 (guided) and at most 1 (unguided)",
                                hint="call the pipeline once per kind")
    return scales


def to_pil(images: np.ndarray) -> list[Any]:
    """PIL images of [N, H, W, 3] arrays in [0, 1] (rounded as diffusers rounds them)."""
    from PIL import Image

    return [Image.fromarray(img) for img in (images * 255).round().astype(np.uint8)]


def load_pipeline(export_dir: str | Path, **kwargs: Any) -> OrtPipeline:
    """Open an export folder written with ``--pipeline`` as a prompt-to-image pipeline on ONNX Runtime, without
    PyTorch (keyword arguments: ``providers``, ``threads``, ``options``, ``inexact``; see :class:`OrtPipeline`)."""
    import inspect

    from ..core.arguments import as_path

    export_dir = as_path(export_dir, "export_dir", "load_pipeline")
    try:
        inspect.signature(OrtPipeline).bind(export_dir, **kwargs)
    except TypeError as exc:
        raise PipelineError(f"dqdeploy.load_pipeline: {exc}", hint="keyword arguments: providers, threads, options, "
                                                                    "inexact") from None
    return OrtPipeline(export_dir, **kwargs)

