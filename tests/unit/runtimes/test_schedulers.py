"""The numpy samplers of the pipeline without PyTorch against diffusers' own schedulers: the same timesteps, the
same samples (to float32 rounding), the options they do not implement refused."""

from __future__ import annotations

import diffusers
import numpy as np
import pytest
import torch

from dqdeploy.core.errors import PipelineError
from dqdeploy.runtimes.schedulers import numpy_scheduler

SCHEDULERS = [
    diffusers.DDIMScheduler(),
    diffusers.DDIMScheduler(beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                            timestep_spacing="trailing", prediction_type="v_prediction"),
    diffusers.DDIMScheduler(beta_schedule="squaredcos_cap_v2", timestep_spacing="linspace"),
    diffusers.PNDMScheduler(skip_prk_steps=True, steps_offset=1, beta_schedule="scaled_linear"),
    diffusers.PNDMScheduler(skip_prk_steps=True, timestep_spacing="linspace", prediction_type="v_prediction"),
    diffusers.EulerDiscreteScheduler(),
    diffusers.EulerDiscreteScheduler(timestep_spacing="leading", steps_offset=1, beta_schedule="scaled_linear",
                                     prediction_type="v_prediction"),
]


def _config(scheduler) -> dict:
    return {**scheduler.config, "_class_name": type(scheduler).__name__}


@pytest.mark.parametrize("ref", SCHEDULERS, ids=lambda s: f"{type(s).__name__}-{s.config.timestep_spacing}")
@pytest.mark.parametrize("steps", [4, 7])
def test_numpy_sampler_follows_diffusers(ref, steps):
    mine = numpy_scheduler(_config(ref))
    ref.set_timesteps(steps)
    mine.set_timesteps(steps)
    assert np.array_equal(ref.timesteps.numpy().astype(np.float64), mine.timesteps.astype(np.float64))
    assert len(mine.timesteps) == mine.calls(steps)
    rng = np.random.default_rng(0)
    noise = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    x_ref, x = torch.from_numpy(noise) * ref.init_noise_sigma, noise * np.float32(mine.init_noise_sigma)
    for t_ref, t in zip(ref.timesteps, mine.timesteps):
        direction = rng.standard_normal(noise.shape).astype(np.float32)
        scaled_ref, scaled = ref.scale_model_input(x_ref, t_ref), mine.scale_model_input(x, t)
        np.testing.assert_allclose(scaled, scaled_ref.numpy(), rtol=1e-5, atol=1e-5 * float(np.abs(scaled).max()))
        out = (0.8 * scaled + 0.2 * direction).astype(np.float32)  # a "model" that mostly predicts its input
        x_ref = ref.step(torch.from_numpy(out), t_ref, x_ref).prev_sample
        x = mine.step(out, t, x)
        assert x.dtype == np.float32
        np.testing.assert_allclose(x, x_ref.numpy(), rtol=1e-5, atol=1e-5 * float(np.abs(x).max()))


@pytest.mark.parametrize("config, needle", [
    ({"_class_name": "LMSDiscreteScheduler"}, "samples with DDIMScheduler, PNDMScheduler, EulerDiscreteScheduler"),
    ({"_class_name": "PNDMScheduler", "skip_prk_steps": False}, "skip_prk_steps=True only"),
    ({"_class_name": "EulerDiscreteScheduler", "use_karras_sigmas": True}, "use_karras_sigmas=False only"),
    ({"_class_name": "DDIMScheduler", "thresholding": True}, "thresholding=False only"),
    ({"_class_name": "DDIMScheduler", "beta_schedule": "sigmoid"}, "beta_schedule 'sigmoid'"),
    ({"_class_name": "DDIMScheduler", "prediction_type": "sample"}, "prediction_type 'sample'"),
])
def test_options_the_numpy_samplers_lack_are_refused(config, needle):
    with pytest.raises(PipelineError, match="fix: edit scheduler/scheduler_config.json") as err:
        numpy_scheduler(config)
    assert needle in str(err.value)


@pytest.mark.parametrize("ref, tokens", [
    (diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0), None),  # SD3
    (diffusers.FlowMatchEulerDiscreteScheduler(), None),
    (diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15), 1024),
    (diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type="linear"), 64),
], ids=["shift3", "shift1", "dynamic", "dynamic-linear"])
@pytest.mark.parametrize("steps", [3, 28])
def test_flow_matching_follows_diffusers(ref, tokens, steps):
    """SD3's sampler: the same float32 timesteps (which pick the quantized graph's per-step scales), the same
    samples; the dynamic shift's mu computed as diffusers' pipelines compute it."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    mine = numpy_scheduler(_config(ref))
    if tokens is None:
        ref.set_timesteps(steps)
    else:
        c = ref.config
        ref.set_timesteps(steps, mu=calculate_shift(tokens, c.base_image_seq_len, c.max_image_seq_len,
                                                    c.base_shift, c.max_shift))
    mine.set_timesteps(steps, tokens=tokens)
    assert mine.timesteps.dtype == np.float32 and np.array_equal(ref.timesteps.numpy(), mine.timesteps)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    x_ref = torch.from_numpy(x)
    for t_ref, t in zip(ref.timesteps, mine.timesteps):
        out = rng.standard_normal(x.shape).astype(np.float32)
        assert np.array_equal(mine.scale_model_input(x, t), x)  # flow matching feeds the sample as it is
        x_ref, x = ref.step(torch.from_numpy(out), t_ref, x_ref).prev_sample, mine.step(out, t, x)
        assert x.dtype == np.float32
        np.testing.assert_allclose(x, x_ref.numpy(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("steps", [2, 28])
def test_flow_matching_with_flux_sigmas_follows_diffusers(steps):
    """Flux pipelines pass sigmas = linspace(1, 1/steps) and mu from the packed latent's tokens."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    ref = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_image_seq_len=256,
                                                    max_image_seq_len=4096, base_shift=0.5, max_shift=1.15)
    sigmas = np.linspace(1.0, 1 / steps, steps)
    ref.set_timesteps(sigmas=sigmas, mu=calculate_shift(16, 256, 4096, 0.5, 1.15))
    mine = numpy_scheduler(_config(ref))
    mine.set_sigmas(sigmas, tokens=16)
    assert np.array_equal(ref.timesteps.numpy(), mine.timesteps) and np.array_equal(ref.sigmas.numpy(), mine.sigmas)


@pytest.mark.parametrize("config, needle", [
    ({"_class_name": "FlowMatchEulerDiscreteScheduler", "stochastic_sampling": True}, "stochastic_sampling=False"),
    ({"_class_name": "FlowMatchEulerDiscreteScheduler", "use_karras_sigmas": True}, "use_karras_sigmas=False"),
    ({"_class_name": "FlowMatchEulerDiscreteScheduler", "time_shift_type": "cosine"}, "time_shift_type 'cosine'"),
])
def test_flow_matching_options_it_lacks_are_refused(config, needle):
    with pytest.raises(PipelineError, match="fix: edit scheduler/scheduler_config.json") as err:
        numpy_scheduler(config)
    assert needle in str(err.value)
    dynamic = numpy_scheduler({"_class_name": "FlowMatchEulerDiscreteScheduler", "use_dynamic_shifting": True})
    with pytest.raises(PipelineError, match="needs the image's token count"):
        dynamic.set_timesteps(4)
