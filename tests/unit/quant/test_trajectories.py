"""Calibration trajectories of diffusion transformers: the conditioning file with pooled projections,
flow-matching float timesteps, classifier-free guidance pairs, Flux's guidance input and position ids."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from dqdeploy.core.errors import CalibrationError
from dqdeploy.core.recipe import CalibrationConfig
from dqdeploy.quant.trajectories import collect, load_conditioning
from tests.helpers import (
    POOLED_DIM,
    SEQ_LEN,
    TEXT_DIM,
    tiny_flux,
    tiny_sd3,
    transformer_scheduler,
    write_transformer_cond,
)

CALIB = CalibrationConfig(steps=3, samples=12, trajectories=2, batch_size=2, guidance=2.0)


def test_pooled_conditioning_round_robin_and_unconditional_rows(tmp_path):
    cond = load_conditioning(write_transformer_cond(tmp_path / "c.safetensors", prompts=3))
    batch = cond.for_batch(2, 3)  # rows 2, 0, 1
    assert (batch["encoder_hidden_states"].shape == (3, SEQ_LEN, TEXT_DIM)
            and batch["pooled_projections"].shape == (3, POOLED_DIM))
    torch.testing.assert_close(batch["pooled_projections"][1], cond.pooled[0])
    uncond = cond.unconditional()
    assert uncond["pooled_projections"].shape == (1, POOLED_DIM)
    assert load_conditioning(write_transformer_cond(tmp_path / "n.safetensors", uncond=False)).unconditional() is None


@pytest.mark.parametrize("tensors,needle", [
    ({"pooled_projections": torch.zeros(3, 2, POOLED_DIM)}, "pooled_projections must be \\[P, D2\\]"),
    ({"pooled_projections": torch.zeros(2, POOLED_DIM)}, "pooled_projections has 2 rows"),
    ({"pooled_projections": torch.zeros(3, POOLED_DIM), "uncond_pooled_projections": torch.zeros(1, 5)},
     "uncond_pooled_projections"),
])
def test_malformed_pooled_conditioning_is_refused(tmp_path, tensors, needle):
    path = tmp_path / "bad.safetensors"
    save_file({"encoder_hidden_states": torch.zeros(3, SEQ_LEN, TEXT_DIM), **tensors}, str(path))
    with pytest.raises(CalibrationError, match=needle):
        load_conditioning(path)


def test_cfg_without_the_unconditional_pooled_row_is_refused(tmp_path):
    path = tmp_path / "half.safetensors"
    save_file({"encoder_hidden_states": torch.zeros(2, SEQ_LEN, TEXT_DIM),
               "pooled_projections": torch.zeros(2, POOLED_DIM),
               "uncond_encoder_hidden_states": torch.zeros(1, SEQ_LEN, TEXT_DIM)}, str(path))
    with pytest.raises(CalibrationError, match="uncond_pooled_projections"):
        load_conditioning(path).unconditional()


def test_sd3_flow_matching_trajectories_keep_float_timesteps_and_cfg_pairs(tmp_path):
    cond = load_conditioning(write_transformer_cond(tmp_path / "c.safetensors"))
    calib = collect(tiny_sd3(), transformer_scheduler("sd3"), CALIB, cond)
    assert len(calib.timesteps) == 3 and any(t != round(t) for t in calib.timesteps)
    inputs = calib.inputs
    assert inputs.sample_name == "hidden_states"
    assert set(inputs.timestep.tolist()) <= set(torch.tensor(calib.timesteps).tolist())
    assert torch.equal(torch.tensor(calib.timesteps)[calib.rows], inputs.timestep)
    pooled = inputs.conditioning["pooled_projections"]
    assert len(calib) == CALIB.samples and pooled.shape == (len(calib), POOLED_DIM)
    # CFG: every recorded (trajectory, step) appears twice: once with the unconditional rows, once with a prompt's
    is_uncond = (pooled == cond.uncond_pooled).all(1)
    assert int(is_uncond.sum()) == len(calib) // 2
    assert torch.equal((inputs.context == cond.uncond).flatten(1).all(1), is_uncond)
    paired = {tuple(x.flatten()[:4].tolist()) for x in inputs.sample[is_uncond]}
    assert paired == {tuple(x.flatten()[:4].tolist()) for x in inputs.sample[~is_uncond]}


def test_flux_trajectories_carry_guidance_and_position_ids(tmp_path):
    cond = load_conditioning(write_transformer_cond(tmp_path / "c.safetensors"))
    config = CalibrationConfig(steps=3, samples=6, trajectories=2, batch_size=2, guidance=3.5, resolution=8)
    calib = collect(tiny_flux(), transformer_scheduler("flux"), config, cond)
    inputs = calib.inputs
    assert inputs.sample.shape[1:] == (16, 16)  # packed tokens
    assert max(calib.timesteps) <= 1.0  # the transformer sees sigma
    assert torch.all(inputs.conditioning["guidance"] == 3.5)  # guidance is an input, not a CFG pair
    assert (len(calib) == 6 and inputs.shared["img_ids"].shape == (16, 3)
            and inputs.shared["txt_ids"].shape == (SEQ_LEN, 3))
    batch = calib.batch(torch.arange(2))  # slicing leaves the unbatched ids whole
    assert batch.shared["img_ids"] is inputs.shared["img_ids"] and batch.conditioning["guidance"].shape == (2,)
