"""The denoising loop shared by calibration-data collection, ``dqdeploy sample`` and benchmarks.

Works with any diffusers scheduler that has ``set_timesteps``/``scale_model_input``/``step`` and any
callable with the diffusers UNet signature (the FP UNet, a QuantizedUNet, an ONNX Runtime or
TensorRT runner). Classifier-free guidance batches [uncond; cond] as diffusers pipelines do.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from tqdm.auto import tqdm

from .inputs import DenoiserInputs

StepCallback = Callable[[int, torch.Tensor, torch.Tensor], None]  # (step, t, model_input)


def _call_unet(unet: Any, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
    return DenoiserInputs.create(x, t, encoder_hidden_states=context).call(unet)


@torch.no_grad()
def denoise(
    unet: Any,
    scheduler: Any,
    noise: torch.Tensor,
    steps: int,
    *,
    cond: torch.Tensor | None = None,
    uncond: torch.Tensor | None = None,
    guidance: float = 1.0,
    generator: torch.Generator | None = None,
    callback: StepCallback | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Run the sampler from ``noise`` for ``steps`` steps and return the final sample.

    ``callback(i, t, model_input)`` sees every UNet input (after ``scale_model_input``, before
    guidance duplication), which is what calibration records.
    """
    scheduler.set_timesteps(steps)
    x = noise * getattr(scheduler, "init_noise_sigma", 1.0)
    use_cfg = cond is not None and uncond is not None and guidance != 1.0
    for i, t in enumerate(tqdm(scheduler.timesteps, desc="sampling", disable=not progress, leave=False)):
        model_input = scheduler.scale_model_input(x, t)
        if callback is not None:
            callback(i, t, model_input)
        if use_cfg and cond is not None and uncond is not None:
            both = torch.cat([model_input, model_input])
            context = torch.cat([uncond.expand_as(cond), cond])
            eps_u, eps_c = _call_unet(unet, both, t, context).chunk(2)
            eps = eps_u + guidance * (eps_c - eps_u)
        else:
            eps = _call_unet(unet, model_input, t, cond)
        x = scheduler.step(eps, t, x, generator=generator, return_dict=False)[0]
    return x
