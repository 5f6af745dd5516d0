"""The digits diffusion transformer of ``scripts/train_digits.py --transformer`` (used by the model zoo).

An SD3-style ``SD3Transformer2DModel`` (16x16x1 latent = the digit image, patch 2 -> 64 tokens,
joint attention blocks) trained with rectified flow: ``x_s = (1 - s) x0 + s n``, target ``n - x0``,
``s`` logit-normal, model timestep ``1000 s`` -- the convention of diffusers'
``FlowMatchEulerDiscreteScheduler`` (shift 1), which is saved in the folder and samples it.

The class "prompt" of digit ``k`` is fixed (seeded, not learned, like a frozen text encoder's
output): 2 tokens ``encoder_hidden_states`` [2, D] plus a pooled vector ``pooled_projections`` [D2];
a null prompt replaces the class with probability ``p_uncond`` so classifier-free guidance works.
All of it is saved as ``class_cond.safetensors`` in the ``--cond`` file format (``encoder_hidden_states``
[10, 2, D], ``pooled_projections`` [10, D2], ``uncond_encoder_hidden_states`` [1, 2, D],
``uncond_pooled_projections`` [1, D2]); sample ``i`` of a seeded run is digit ``i % 10``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

DIT_CONFIG = dict(
    sample_size=16, patch_size=2, in_channels=1, out_channels=1, num_layers=4,
    attention_head_dim=32, num_attention_heads=3, joint_attention_dim=64, caption_projection_dim=96,
    pooled_projection_dim=32, pos_embed_max_size=8,
)
FLOW_SCHEDULER_CONFIG = dict(num_train_timesteps=1000, shift=1.0)
PROMPT_TOKENS = 2
NUM_CLASSES = 10


def build_dit(seed: int, overrides: dict | None = None) -> torch.nn.Module:
    """The seeded digits ``SD3Transformer2DModel`` (``overrides`` merged over :data:`DIT_CONFIG`)."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(**{**DIT_CONFIG, **(overrides or {})})


def class_prompts(config, seed: int) -> dict[str, torch.Tensor]:
    """Fixed class prompts: rows 0-9 the digits, row 10 the null prompt (``tokens`` [11, 2, D], ``pooled`` [11, D2])."""
    gen = torch.Generator().manual_seed(seed + 3)
    tokens = torch.randn(NUM_CLASSES + 1, PROMPT_TOKENS, config.joint_attention_dim, generator=gen)
    pooled = torch.randn(NUM_CLASSES + 1, config.pooled_projection_dim, generator=gen)
    return {"tokens": tokens, "pooled": pooled}


def flow_loss(model: torch.nn.Module, prompts: dict[str, torch.Tensor], x0: torch.Tensor, labels: torch.Tensor,
              gen: torch.Generator, p_uncond: float) -> torch.Tensor:
    """Rectified-flow velocity MSE of one batch (null prompt with probability ``p_uncond``)."""
    noise = torch.randn(x0.shape, generator=gen)
    s = torch.sigmoid(torch.randn(x0.shape[0], generator=gen))  # logit-normal(0, 1), as SD3
    xs = (1 - s[:, None, None, None]) * x0 + s[:, None, None, None] * noise
    drop = torch.rand(x0.shape[0], generator=gen) < p_uncond
    classes = torch.where(drop, torch.full_like(labels, NUM_CLASSES), labels)
    pred = model(xs, encoder_hidden_states=prompts["tokens"][classes], pooled_projections=prompts["pooled"][classes],
                 timestep=s * 1000).sample
    return torch.nn.functional.mse_loss(pred, noise - x0)


def save_dit_pipeline(model: torch.nn.Module, prompts: dict[str, torch.Tensor], path: Path, cond_file: str) -> None:
    """Write ``transformer/``, ``scheduler/`` (FlowMatchEulerDiscreteScheduler), ``model_index.json`` and the class
    prompts."""
    import diffusers
    from diffusers import FlowMatchEulerDiscreteScheduler
    from safetensors.torch import save_file

    from dqdeploy.quant.trajectories import COND_KEY, POOLED_KEY, UNCOND_KEY, UNCOND_POOLED_KEY

    model.save_pretrained(path / "transformer", safe_serialization=True)
    FlowMatchEulerDiscreteScheduler(**FLOW_SCHEDULER_CONFIG).save_pretrained(path / "scheduler")
    index = {"_class_name": "DiffusionPipeline", "_diffusers_version": diffusers.__version__,
             "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
             "transformer": ["diffusers", type(model).__name__]}
    (path / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    tokens, pooled = prompts["tokens"].float(), prompts["pooled"].float()
    save_file({COND_KEY: tokens[:NUM_CLASSES].contiguous(), POOLED_KEY: pooled[:NUM_CLASSES].contiguous(),
               UNCOND_KEY: tokens[NUM_CLASSES:].contiguous(), UNCOND_POOLED_KEY: pooled[NUM_CLASSES:].contiguous()},
              str(path / cond_file))
