"""DenoiserInputs (one typed container for every denoiser input form) and forward_hooks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dqdeploy.core.inputs import CONTEXT, DenoiserInputs, cat, forward_hooks
from tests.helpers import SEQ_LEN, tiny_cond_unet, tiny_unet


def _cond_inputs(unet, n: int = 3) -> DenoiserInputs:
    cfg = unet.config
    g = torch.Generator().manual_seed(0)
    return DenoiserInputs.create(
        torch.randn(n, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g),
        torch.tensor([900.0, 500.0, 1.0][:n]),
        encoder_hidden_states=torch.randn(n, SEQ_LEN, cfg.cross_attention_dim, generator=g),
    )


def test_create_drops_absent_conditioning_and_names_follow_graph_order():
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([1.0, 2.0])
    plain = DenoiserInputs.create(x, t, encoder_hidden_states=None)
    assert plain.conditioning == {} and plain.context is None
    assert plain.names == ["sample", "timestep"]
    ctx = torch.randn(2, 4, 5)
    cond = DenoiserInputs.create(x, t, encoder_hidden_states=ctx, pooled_projections=torch.randn(2, 7))
    assert cond.names == ["sample", "timestep", CONTEXT, "pooled_projections"]
    assert cond.context is ctx
    hidden = DenoiserInputs.create(x, t, sample_name="hidden_states")  # diffusion transformers
    assert hidden.kwargs().keys() == {"hidden_states", "timestep"}


@pytest.mark.parametrize("make", [tiny_unet, tiny_cond_unet], ids=["UNet2DModel", "UNet2DConditionModel"])
def test_call_matches_the_direct_diffusers_call(make):
    unet = make().eval()
    cfg = unet.config
    x = torch.randn(2, cfg.in_channels, cfg.sample_size, cfg.sample_size)
    t = torch.tensor([10.0, 700.0])
    ctx = torch.randn(2, SEQ_LEN, cfg.cross_attention_dim) if make is tiny_cond_unet else None
    with torch.no_grad():
        direct = unet(x, t, encoder_hidden_states=ctx).sample if ctx is not None else unet(x, t).sample
        got = DenoiserInputs.create(x, t, encoder_hidden_states=ctx).call(unet)
    assert torch.equal(got, direct)


def test_slice_cat_dict_and_numpy_round_trips():
    inputs = _cond_inputs(tiny_cond_unet())
    first, rest = inputs.slice(torch.tensor([0])), inputs.slice(slice(1, 3))
    assert len(first) == 1 and len(rest) == 2 and len(inputs.slice(2)) == 1
    joined = cat([first, rest])
    assert all(torch.equal(a, b) for a, b in zip(joined.tensors(), inputs.tensors()))
    back = DenoiserInputs.from_dict(inputs.to_dict())
    assert back.names == inputs.names and all(torch.equal(a, b) for a, b in zip(back.tensors(), inputs.tensors()))
    feed = inputs.numpy({"sample": np.float16})
    assert feed["sample"].dtype == np.float16 and feed[CONTEXT].dtype == np.float32
    from_feed = DenoiserInputs.from_dict(feed)  # numpy feeds come back as float32 tensors
    assert from_feed.sample.dtype == torch.float32 and from_feed.context.dtype == torch.float32


def test_half_keeps_the_timestep_and_integer_inputs():
    x, t = torch.randn(2, 3, 4, 4), torch.tensor([1.0, 2.0])
    ids = torch.arange(2)
    half = DenoiserInputs.create(x, t, encoder_hidden_states=torch.randn(2, 4, 5), class_labels=ids).half()
    assert half.sample.dtype == torch.float16 and half.context.dtype == torch.float16
    assert half.timestep.dtype == torch.float32 and half.conditioning["class_labels"].dtype == torch.int64


def test_forward_hooks_are_removed_also_when_the_body_raises():
    layer = torch.nn.Linear(3, 3)
    seen = []
    with forward_hooks([(layer, "pre", lambda m, a: seen.append("pre")),
                        (layer, "post", lambda m, a, o: seen.append("post"))]):
        layer(torch.randn(1, 3))
    assert seen == ["pre", "post"]
    with pytest.raises(RuntimeError, match="boom"):
        with forward_hooks([(layer, "pre", lambda m, a: seen.append("again"))]):
            raise RuntimeError("boom")
    layer(torch.randn(1, 3))
    assert seen == ["pre", "post"]
    assert not layer._forward_pre_hooks and not layer._forward_hooks
