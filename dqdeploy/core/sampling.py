"""The denoising loop shared by calibration-data collection, ``dqdeploy sample`` and benchmarks.

Works with any diffusers scheduler that has ``set_timesteps``/``step`` (``scale_model_input`` where
it has one: flow-matching schedulers do not) and any callable with the call signature of one of
the denoisers in :mod:`dqdeploy.core.denoisers` (the FP model, a quantized simulation, an ONNX Runtime
or TensorRT runner). Classifier-free guidance batches [uncond; cond] as diffusers pipelines do;
Flux's guidance embedding takes the guidance scale instead.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from .denoisers import CONTEXT, GUIDANCE, DenoiserSpec, flux_position_ids, spec_of
from .inputs import DenoiserInputs
from .terminal import bar as progress_bar

StepCallback = Callable[[int, torch.Tensor, torch.Tensor], None]  # (step, model timestep, model_input)
StepObserver = Callable[[int, float, dict[str, Any], torch.Tensor], None]  # (step, model timestep, call, output)
Cond = Mapping[str, torch.Tensor]


def output_of(model: Any, inputs: Mapping[str, Any]) -> torch.Tensor:
    """``model(**inputs, return_dict=False)``'s output tensor (a tuple's first element)."""
    out = model(**inputs, return_dict=False)
    return out[0] if isinstance(out, (tuple, list)) else out


def prediction(model: Any, spec: DenoiserSpec, inputs: DenoiserInputs) -> torch.Tensor:
    """What the scheduler takes from ``model``'s output: PixArt's learned-sigma models also predict
    the variance, and only the mean half is the prediction."""
    out = inputs.call(model)
    return out.chunk(2, dim=1)[0] if spec.learned_sigma(model.config) else out


def as_cond(cond: torch.Tensor | Cond | None) -> dict[str, torch.Tensor]:
    """Conditioning keywords: a bare tensor is ``encoder_hidden_states``."""
    if cond is None:
        return {}
    if isinstance(cond, torch.Tensor):
        return {CONTEXT: cond}
    return dict(cond)


def set_timesteps(scheduler: Any, spec: DenoiserSpec, steps: int, tokens: int) -> None:
    """``scheduler.set_timesteps`` as the diffusers pipeline of ``spec`` calls it: Flux pipelines pass
    ``sigmas = linspace(1, 1/steps)``; schedulers with dynamic shifting get ``mu`` from the token count."""
    kwargs: dict[str, Any] = {}
    config = scheduler.config
    if config.get("use_dynamic_shifting"):
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        kwargs["mu"] = calculate_shift(
            tokens, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5), config.get("max_shift", 1.15),
        )
    if spec.packed:
        import numpy as np

        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps).tolist(), **kwargs)
    else:
        scheduler.set_timesteps(steps, **kwargs)


def shared_inputs(spec: DenoiserSpec, noise: torch.Tensor, cond: Cond) -> dict[str, torch.Tensor]:
    """Inputs without a batch axis that a sampling loop makes itself (Flux position ids)."""
    if not spec.shared:
        return {}
    return flux_position_ids(noise.shape[1], cond[CONTEXT].shape[1])


def model_tokens(spec: DenoiserSpec, noise: torch.Tensor) -> int:
    """Tokens the denoiser sees for ``noise`` (dynamic-shift schedulers depend on it)."""
    return noise.shape[1] if spec.packed else noise.shape[-1] * noise.shape[-2]


@torch.no_grad()
def denoise(
    denoiser: Any,
    scheduler: Any,
    noise: torch.Tensor,
    steps: int,
    *,
    cond: torch.Tensor | Cond | None = None,
    uncond: torch.Tensor | Cond | None = None,
    guidance: float = 1.0,
    generator: torch.Generator | None = None,
    callback: StepCallback | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Run the sampler from ``noise`` for ``steps`` steps and return the final sample.

    ``cond``: per-sample conditioning keywords ([B, ...]; a bare tensor is ``encoder_hidden_states``);
    ``uncond``: the unconditional ones ([1, ...]), enabling classifier-free guidance when
    ``guidance != 1`` (Flux with a guidance embedding takes ``guidance`` as that input instead).
    ``callback(i, t, model_input)`` sees every model input and model timestep (before guidance
    duplication), which is what calibration records.
    """
    spec = spec_of(denoiser)
    cond_kw, uncond_kw = as_cond(cond), as_cond(uncond)
    embedded = GUIDANCE in spec.input_names(denoiser.config)
    if embedded:
        cond_kw[GUIDANCE] = torch.full((noise.shape[0],), float(guidance))
    set_timesteps(scheduler, spec, steps, model_tokens(spec, noise))
    shared = shared_inputs(spec, noise, cond_kw)
    step_kw = {"generator": generator} if _accepts(scheduler.step, "generator") else {}  # PNDM, LMS, ... take none
    x = noise * getattr(scheduler, "init_noise_sigma", 1.0)
    use_cfg = bool(cond_kw) and bool(uncond_kw) and guidance != 1.0 and not embedded
    for i, t in enumerate(progress_bar(scheduler.timesteps, desc="sampling", disable=not progress, leave=False)):
        model_input = scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x
        # transformers get one timestep per sample (as their pipelines pass it); UNets the scheduler's own
        t_model = spec.model_timestep(t).expand(x.shape[0]) if spec.is_transformer else t
        if callback is not None:
            callback(i, spec.model_timestep(t), model_input)
        if use_cfg:
            both = {k: torch.cat([uncond_kw[k].expand_as(v), v]) for k, v in cond_kw.items()}
            t_pair = torch.cat([t_model, t_model]) if t_model.dim() else t_model
            pair = DenoiserInputs(torch.cat([model_input, model_input]), t_pair, both, spec.sample, shared)
            eps_u, eps_c = prediction(denoiser, spec, pair).chunk(2)
            eps = eps_u + guidance * (eps_c - eps_u)
        else:
            eps = prediction(denoiser, spec, DenoiserInputs(model_input, t_model, cond_kw, spec.sample, shared))
        x = scheduler.step(eps, t, x, return_dict=False, **step_kw)[0]
    return x


class _Observed:
    """Drop-in denoiser that calls ``inner`` and shows every call (its step, keywords and output) to ``observe``."""

    def __init__(self, inner: Any, observe: StepObserver) -> None:
        self.inner, self.observe, self.config = inner, observe, inner.config
        self.denoiser = getattr(inner, "denoiser", inner)  # the model kind (denoisers.spec_of) is the inner model's
        self.spec = getattr(inner, "spec", None)
        self.step, self.t = 0, 0.0

    def __call__(self, return_dict: bool = False, **inputs: Any) -> tuple[torch.Tensor]:
        out = output_of(self.inner, inputs)
        self.observe(self.step, self.t, inputs, out)
        return (out,)


@torch.no_grad()
def observe_denoise(denoiser: Any, scheduler: Any, noise: torch.Tensor, steps: int, observe: StepObserver,
                    **kwargs: Any) -> torch.Tensor:
    """:func:`denoise` (``kwargs``: its keywords but ``callback``) with every denoiser call -- under classifier-free
    guidance the [uncond; cond] pair -- shown to ``observe(step, model timestep, keywords, output)``."""
    observed = _Observed(denoiser, observe)

    def on_step(i: int, t: torch.Tensor, _x: torch.Tensor) -> None:
        observed.step, observed.t = i, float(t)

    return denoise(observed, scheduler, noise, steps, callback=on_step, **kwargs)


def advance(scheduler: Any, spec: DenoiserSpec, noise: torch.Tensor, steps: int, generator: torch.Generator) -> None:
    """Draw from ``generator`` what :func:`denoise` from ``noise`` would draw, without the model: the
    scheduler steps on zero predictions (with the variance channels of ``learned`` / ``learned_range``
    schedulers). Exact when the scheduler's draws depend on shapes and steps only, as diffusers'
    schedulers' do; schedulers whose ``step`` takes no generator draw nothing here."""
    if not _accepts(scheduler.step, "generator"):
        return
    set_timesteps(scheduler, spec, steps, model_tokens(spec, noise))
    x = noise * getattr(scheduler, "init_noise_sigma", 1.0)
    shape = list(x.shape)
    if getattr(scheduler.config, "variance_type", None) in ("learned", "learned_range"):
        shape[1] *= 2  # DDPM-style schedulers split the predicted variance off the model output
    eps = torch.zeros(shape, dtype=x.dtype)
    for t in scheduler.timesteps:
        if hasattr(scheduler, "scale_model_input"):
            scheduler.scale_model_input(x, t)  # (some schedulers keep their step index here)
        x = scheduler.step(eps, t, x, return_dict=False, generator=generator)[0]


def _accepts(fn: Callable, name: str) -> bool:
    import inspect

    params = inspect.signature(fn).parameters
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
