"""The inputs of LoRA slots: adapters stack their ranks so that their branches add up exactly; an unused slot adds
nothing; an adapter for a layer without a slot is refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dqdeploy.core.errors import DQDeployError
from dqdeploy.quant.lora import LoraLayer
from dqdeploy.runtimes.lora_feeds import lora_feeds
from dqdeploy.runtimes.spec import ExportSpec, TensorSpec, lora_inputs


def _spec(slots: dict[str, tuple[int, int]]) -> ExportSpec:
    entries = [{"layer": n, "down": lora_inputs(n)[0], "up": lora_inputs(n)[1], "in": i, "out": o}
               for n, (i, o) in slots.items()]
    return ExportSpec(target="ort", precision="fp32", opset=20, model_class="UNet2DModel", model_config={},
                      inputs=[TensorSpec("sample", [1, 1, 8, 8], "float32")], outputs=[], lora_slots=entries)


def _layer(seed: int, rank: int, i: int = 6, o: int = 5, alpha_scale: float = 1.0) -> LoraLayer:
    g = torch.Generator().manual_seed(seed)
    return LoraLayer(torch.randn(rank, i, generator=g), torch.randn(o, rank, generator=g), alpha_scale)


def test_stacked_ranks_add_the_branches_and_unused_slots_are_zero():
    spec = _spec({"a": (6, 5), "b": (3, 2)})
    one, two = _layer(0, 2, alpha_scale=0.5), _layer(1, 4)
    feeds = lora_feeds(spec, [({"a": one}, 0.8), ({"a": two}, -1.5)])
    down, up = feeds[lora_inputs("a")[0]], feeds[lora_inputs("a")[1]]
    assert down.shape == (6, 6) and up.shape == (6, 5)  # ranks 2 + 4
    x = np.random.default_rng(0).standard_normal((3, 6)).astype(np.float32)
    want = one.branch(torch.from_numpy(x), 0.8) + two.branch(torch.from_numpy(x), -1.5)
    assert np.allclose(x @ down @ up, want.numpy(), atol=1e-5)
    zeros = (feeds[lora_inputs("b")[0]], feeds[lora_inputs("b")[1]])
    assert zeros[0].shape == (3, 1) and zeros[1].shape == (1, 2) and not zeros[0].any() and not zeros[1].any()
    assert all(v.dtype == np.float32 for v in feeds.values())
    assert lora_feeds(spec, [({"a": one}, 1.0)], np.float16)[lora_inputs("a")[0]].dtype == np.float16


def test_an_adapter_needs_a_slot_for_every_layer():
    with pytest.raises(DQDeployError, match="no LoRA slot"):
        lora_feeds(_spec({"a": (6, 5)}), [({"c": _layer(0, 2)}, 1.0)])
    with pytest.raises(DQDeployError, match="no LoRA slots"):
        lora_feeds(_spec({}), [({"a": _layer(0, 2)}, 1.0)])
    assert lora_feeds(_spec({}), []) == {}


def test_conv_slots_stack_ranks_and_the_engine_profile_covers_them():
    from dqdeploy.exporters.engine import slot_shapes
    from dqdeploy.quant.lora import ConvGeometry

    geometry = ConvGeometry((2, 2), (1, 1), (1, 1))
    conv = {"kernel": [3, 3], "stride": [2, 2], "padding": [1, 1], "dilation": [1, 1]}
    spec = _spec({"lin": (6, 5), "c": (4, 3)})
    spec.lora_slots[1]["conv"] = conv
    g = torch.Generator().manual_seed(0)
    one = LoraLayer(torch.randn(2, 4, 3, 3, generator=g), torch.randn(3, 2, generator=g), 0.5, geometry)
    two = LoraLayer(torch.randn(3, 4, 3, 3, generator=g), torch.randn(3, 3, generator=g), 1.0, geometry)
    feeds = lora_feeds(spec, [({"c": one}, 0.8), ({"c": two}, -1.0)])
    down, up = feeds[lora_inputs("c")[0]], feeds[lora_inputs("c")[1]]
    assert down.shape == (5, 4, 3, 3) and up.shape == (3, 5, 1, 1)  # ranks 2 + 3
    x = torch.randn(2, 4, 9, 9, generator=g)
    graph = F.conv2d(F.conv2d(x, torch.from_numpy(down), stride=2, padding=1), torch.from_numpy(up))
    assert torch.allclose(graph, one.branch(x, 0.8) + two.branch(x, -1.0), atol=1e-5)
    empty = lora_feeds(spec, [])
    assert empty[lora_inputs("c")[0]].shape == (1, 4, 3, 3) and empty[lora_inputs("c")[1]].shape == (3, 1, 1, 1)
    profile = slot_shapes(spec, (1, 8, 32))
    assert profile[lora_inputs("c")[0]] == ([1, 4, 3, 3], [8, 4, 3, 3], [32, 4, 3, 3])
    assert profile[lora_inputs("c")[1]] == ([3, 1, 1, 1], [3, 8, 1, 1], [3, 32, 1, 1])
    assert profile[lora_inputs("lin")[0]] == ([6, 1], [6, 8], [6, 32])
    assert profile[lora_inputs("lin")[1]] == ([1, 5], [8, 5], [32, 5])
