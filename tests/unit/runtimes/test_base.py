"""The drop-in adaptor: timestep expansion, casting, validation against the spec, output wrapping,
the calibrated-step warning. A backend that echoes its inputs makes every check exact."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from diffusers.configuration_utils import FrozenDict
from diffusers.models.unets.unet_2d import UNet2DOutput
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

from dqdeploy.core.errors import ArtifactError, RuntimeInputError
from dqdeploy.runtimes.base import CalibratedStepWarning, DenoiserRuntime
from dqdeploy.runtimes.spec import ExportSpec, TensorSpec


def make_spec(conditional: bool = False, sample_dtype: str = "float32", timesteps=()) -> ExportSpec:
    inputs = [TensorSpec("sample", ["batch", 4, 8, 8], sample_dtype), TensorSpec("timestep", ["batch"], "float32")]
    config = {"in_channels": 4, "out_channels": 4, "sample_size": 8, "time_cond_proj_dim": None}
    if conditional:
        inputs.append(TensorSpec("encoder_hidden_states", ["batch", 5, 24], sample_dtype))
        config["cross_attention_dim"] = 24
    return ExportSpec(
        target="onnx", precision="fp16" if sample_dtype == "float16" else "fp32", opset=20,
        model_class="UNet2DConditionModel" if conditional else "UNet2DModel", model_config=config,
        inputs=inputs, outputs=[TensorSpec("out_sample", ["batch", 4, 8, 8], sample_dtype)], timesteps=list(timesteps),
    )


class Echo(DenoiserRuntime):
    """out = sample + timestep (per sample) [+ mean of the context]; records what it was fed."""

    def _run(self, feeds):
        self.fed = feeds
        out = feeds["sample"] + feeds["timestep"].view(-1, 1, 1, 1).to(feeds["sample"].dtype)
        if "encoder_hidden_states" in feeds:
            out = out + feeds["encoder_hidden_states"].mean(dim=(1, 2)).view(-1, 1, 1, 1)
        return out


@pytest.mark.parametrize("t", [7, 7.0, torch.tensor(7), torch.tensor([7]), torch.tensor([7, 7, 7]), np.float32(7),
                               np.array([7.0, 7.0, 7.0])])
def test_timestep_forms_expand_to_batch(t):
    rt = Echo(make_spec())
    x = torch.zeros(3, 4, 8, 8)
    out = rt(x, t).sample
    assert rt.fed["timestep"].shape == (3,) and rt.fed["timestep"].dtype == torch.float32
    assert torch.equal(out, torch.full_like(x, 7.0))


def test_per_sample_timesteps_are_kept():
    rt = Echo(make_spec())
    out = rt(torch.zeros(2, 4, 8, 8), torch.tensor([3, 900])).sample
    assert out[0].unique().item() == 3 and out[1].unique().item() == 900


def test_output_follows_input_dtype_and_type():
    rt = Echo(make_spec(sample_dtype="float16"))
    assert rt.graph_dtype == torch.float16 and rt.dtype == torch.float32  # pipelines keep FP32 latents
    x = torch.zeros(1, 4, 8, 8, dtype=torch.float64)
    out = rt(x, 1.0)
    assert isinstance(out, UNet2DOutput) and out.sample.dtype == torch.float64
    assert rt.fed["sample"].dtype == torch.float16  # cast to the graph's dtype on the way in
    (tup,) = rt(x, 1.0, return_dict=False)
    assert torch.equal(tup, out.sample)


def test_numpy_sample_gives_torch_output():
    out = Echo(make_spec())(np.zeros((2, 4, 8, 8), np.float32), 2, return_dict=False)[0]
    assert isinstance(out, torch.Tensor) and float(out.mean()) == 2.0


def test_conditional_output_class_and_context():
    rt = Echo(make_spec(conditional=True))
    out = rt(torch.zeros(2, 4, 8, 8), 1, encoder_hidden_states=torch.ones(2, 5, 24))
    assert isinstance(out, UNet2DConditionOutput) and float(out.sample.mean()) == 2.0


def test_config_dtype_device_and_attribute_access():
    rt = Echo(make_spec())
    assert rt.config.sample_size == 8 and rt.config["in_channels"] == 4
    assert rt.in_channels == 4  # diffusers models answer config keys as attributes too
    assert rt.device == torch.device("cpu") and rt.to("cpu") is rt
    with pytest.raises(AttributeError):
        rt.not_a_config_key
    assert isinstance(rt.config, FrozenDict)  # what diffusers models expose


@pytest.mark.parametrize(
    ("shape", "words"),
    [((2, 3, 8, 8), "expected channels 4"), ((2, 4, 8, 16), "expected width 8"), ((4, 8, 8), "4-D"),
     ((2, 4, 8, 8, 1), "4-D")],
)
def test_wrong_sample_shape(shape, words):
    with pytest.raises(RuntimeInputError, match=words) as err:
        Echo(make_spec())(torch.zeros(shape), 1)
    assert "fix:" in str(err.value) or "expected" in str(err.value)


def test_wrong_timestep_shape_and_type():
    rt = Echo(make_spec())
    with pytest.raises(RuntimeInputError, match=r"timestep: expected a scalar or a tensor of shape \[2\]"):
        rt(torch.zeros(2, 4, 8, 8), torch.tensor([1, 2, 3]))
    with pytest.raises(RuntimeInputError, match="timestep"):
        rt(torch.zeros(2, 4, 8, 8), torch.tensor([[1], [2]]))
    with pytest.raises(RuntimeInputError, match="torch.Tensor or numpy array"):
        rt(torch.zeros(2, 4, 8, 8), "500")
    with pytest.raises(RuntimeInputError, match="floating-point"):
        rt(torch.zeros(2, 4, 8, 8, dtype=torch.int64), 1)


def test_context_missing_extra_or_mismatched():
    cond, uncond = Echo(make_spec(conditional=True)), Echo(make_spec())
    x = torch.zeros(2, 4, 8, 8)
    with pytest.raises(RuntimeInputError, match="encoder_hidden_states is missing: this exported UNet is conditional"):
        cond(x, 1)
    with pytest.raises(RuntimeInputError, match="unconditional"):
        uncond(x, 1, encoder_hidden_states=torch.zeros(2, 5, 24))
    with pytest.raises(RuntimeInputError, match="expected hidden size 24"):
        cond(x, 1, encoder_hidden_states=torch.zeros(2, 5, 32))
    with pytest.raises(RuntimeInputError, match="same axis 'batch'"):
        cond(x, 1, encoder_hidden_states=torch.zeros(3, 5, 24))


def test_kwargs_the_graph_cannot_honour():
    rt = Echo(make_spec(conditional=True))
    x, ctx = torch.zeros(2, 4, 8, 8), torch.zeros(2, 5, 24)
    rt(x, 1, encoder_hidden_states=ctx, timestep_cond=None, cross_attention_kwargs=None, added_cond_kwargs={})
    with pytest.raises(RuntimeInputError, match="class_labels was given"):
        rt(x, 1, encoder_hidden_states=ctx, class_labels=torch.tensor([0, 1]))


def test_spec_without_unet_io_is_refused():
    spec = make_spec()
    bad = ExportSpec(**{**spec.__dict__, "inputs": [TensorSpec("x", [1, 4, 8, 8], "float32")]})
    with pytest.raises(ArtifactError, match="expected inputs sample and timestep"):
        Echo(bad)


def test_calibrated_step_warning_fires_once():
    rt = Echo(make_spec(timesteps=[901.0, 501.0, 1.0]))
    x = torch.zeros(2, 4, 8, 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rt(x, 501)
        rt(x, torch.tensor([901, 1]))
        assert not caught  # calibrated steps: silent
        rt(x, 500)
        rt(x, 250)
        rt(x, torch.tensor([3, 4]))
    hits = [w for w in caught if issubclass(w.category, CalibratedStepWarning)]
    assert len(hits) == 1
    assert "the graph uses the nearest calibrated step (501)" in str(hits[0].message)


def test_no_warning_without_calibrated_steps():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Echo(make_spec())(torch.zeros(1, 4, 8, 8), 123.5)
