"""Calibration trajectories draw what they drew before many processes existed.

Artifacts and the cached zoo quality rows depend on every random draw of ``collect``: one seeded
generator gives the subset of (trajectory, step) pairs, then each chunk's noise and the sampler's own
noise, chunk after chunk. ``_sequential`` below is that loop as it was written for one process (main
before issue 9 part 3); ``collect`` must keep giving exactly its tensors. Under torchrun a rank skips
the other ranks' chunks with ``sampling.advance``, which must leave the generator where running the
chunk leaves it.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, EulerAncestralDiscreteScheduler, UNet2DModel

from dqdeploy.core.denoisers import latent_shape, spec_of
from dqdeploy.core.recipe import CalibrationConfig
from dqdeploy.core.sampling import advance, denoise
from dqdeploy.quant.trajectories import Conditioning, collect
from tests.helpers import CROSS_DIM, SEQ_LEN, tiny_cond_unet

SCHEDULERS = {
    "ddim": lambda: DDIMScheduler(num_train_timesteps=1000),  # draws nothing
    "ddpm": lambda: DDPMScheduler(num_train_timesteps=1000),  # draws at every step but the last
    "euler_a": lambda: EulerAncestralDiscreteScheduler(num_train_timesteps=1000),  # draws at every step
}


def _sequential(unet, scheduler, config: CalibrationConfig, conditioning: Conditioning, guidance: float):
    """The one-process loop of main before sharding (CFG on, conditioning given)."""
    spec = spec_of(unet)
    uncond = conditioning.unconditional()
    gen = torch.Generator().manual_seed(config.seed)
    calls = config.steps
    n_pairs = config.trajectories * calls
    chosen = torch.zeros(n_pairs, dtype=torch.bool)
    chosen[torch.randperm(n_pairs, generator=gen)[: min(n_pairs, -(-config.samples // 2))]] = True
    chosen = chosen.view(config.trajectories, calls)
    xs, ts, rows, conds = [], [], [], []
    for first in range(0, config.trajectories, config.batch_size):
        n = min(config.batch_size, config.trajectories - first)
        noise = torch.randn(*latent_shape(spec, unet.config, n, config.resolution), generator=gen)
        cond = conditioning.for_batch(first, n)
        keep = chosen[first : first + n]

        def record(i, t, model_input, cond=cond, keep=keep):
            sel = keep[:, i].nonzero().flatten()
            if sel.numel() == 0:
                return
            picked = {k: v[sel] for k, v in cond.items()}
            for context in ({k: uncond[k].expand_as(v) for k, v in picked.items()}, picked):
                xs.append(model_input[sel].clone())
                ts.append(torch.full((sel.numel(),), float(t)))
                rows.append(torch.full((sel.numel(),), i, dtype=torch.long))
                conds.append(context)

        denoise(unet, scheduler, noise, config.steps, cond=cond, uncond=uncond, guidance=guidance, generator=gen,
                callback=record)
    return torch.cat(xs), torch.cat(ts), torch.cat(rows), torch.cat([c["encoder_hidden_states"] for c in conds])


@pytest.mark.parametrize("kind", list(SCHEDULERS))
def test_one_process_collect_draws_what_the_sequential_loop_drew(kind):
    torch.set_num_threads(1)
    unet = tiny_cond_unet()
    g = torch.Generator().manual_seed(3)
    conditioning = Conditioning(torch.randn(3, SEQ_LEN, CROSS_DIM, generator=g),
                                torch.randn(1, SEQ_LEN, CROSS_DIM, generator=g))
    # 3 chunks, the last short
    config = CalibrationConfig(steps=3, samples=14, trajectories=5, batch_size=2, guidance=3.0, seed=7)
    calib = collect(unet, SCHEDULERS[kind](), config, conditioning)
    x, t, rows, cond = _sequential(unet, SCHEDULERS[kind](), config, conditioning, 3.0)
    assert torch.equal(calib.inputs.sample, x) and torch.equal(calib.inputs.timestep, t)
    assert torch.equal(calib.rows, rows) and torch.equal(calib.inputs.conditioning["encoder_hidden_states"], cond)


@pytest.mark.parametrize("kind", [*SCHEDULERS, "ddpm_learned_range"])
def test_advance_draws_what_the_sampler_draws(kind):
    torch.set_num_threads(1)
    if kind == "ddpm_learned_range":  # the model predicts the variance too: 2x the output channels
        torch.manual_seed(0)
        unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=2, block_out_channels=(8, 16), layers_per_block=1,
                           norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"),
                           up_block_types=("UpBlock2D", "UpBlock2D")).eval()
        scheduler = DDPMScheduler(num_train_timesteps=1000, variance_type="learned_range")
        cond = None
    else:
        unet, scheduler = tiny_cond_unet(), SCHEDULERS[kind]()
        cond = torch.randn(2, SEQ_LEN, CROSS_DIM)
    noise = torch.randn(2, unet.config.in_channels, 8, 8)
    ran, skipped = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    with torch.no_grad():
        denoise(unet, scheduler, noise, 4, cond=cond, generator=ran)
    advance(scheduler, spec_of(unet), noise, 4, skipped)
    assert torch.equal(ran.get_state(), skipped.get_state())
    if kind != "ddim":  # (the test sees the draws: a sampler that draws moves the generator)
        assert not torch.equal(ran.get_state(), torch.Generator().manual_seed(1).get_state())
