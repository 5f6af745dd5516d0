"""The Temporal Parallel Quantizer (per-sample step rows, parallel gradients, attention layout), the
per-channel weight quantizer, QuantLayer and the drop-in QuantizedDenoiser's explicit step binding."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dqdeploy.core.recipe import W8A8
from dqdeploy.quant.modules import QuantLayer
from dqdeploy.quant.primitives import fake_quant
from dqdeploy.quant.quantizer import ActQuantizer, WeightQuantizer
from dqdeploy.quant.timestep import StepIndex, TimestepTable
from dqdeploy.stages.quantize import build_quantized
from tests.helpers import random_calib, tiny_unet

SCALES = torch.tensor([0.01, 0.02, 0.04, 0.08, 0.16])
ROWS = torch.tensor([0, 3, 3, 1])


def _tpq(symmetric: bool = True, bits: int = 8) -> tuple[ActQuantizer, StepIndex]:
    idx = StepIndex()
    q = ActQuantizer(len(SCALES), bits, symmetric, idx)
    with torch.no_grad():
        q.scale.copy_(SCALES)
        if not symmetric:
            q.zero_point.copy_(torch.tensor([10.0, 20.0, 30.0, 40.0, 50.0]))
    return q, idx


def _manual(x: torch.Tensor, q: ActQuantizer, rows: torch.Tensor) -> torch.Tensor:
    return torch.stack([
        fake_quant(x[i], q.scale[r].detach().abs(), q.zero_point[r].detach(), q.qmin, q.qmax)
        for i, r in enumerate(rows.tolist())
    ])


@pytest.mark.parametrize("symmetric", [True, False], ids=["symmetric", "asymmetric"])
def test_mixed_step_batch_uses_each_samples_own_step(symmetric):
    q, idx = _tpq(symmetric)
    x = torch.randn(4, 3, 5, 5) * 2
    with idx.bound(ROWS):
        y = q(x)
    assert torch.equal(y, _manual(x, q, ROWS))
    # a row really matters: the same sample under another step's scale quantizes differently
    assert not torch.equal(y[1], _manual(x[1:2], q, torch.tensor([0]))[0])


def test_backward_reaches_exactly_the_rows_used():
    q, idx = _tpq(symmetric=False)
    x = torch.randn(4, 3, 5, 5) * 20  # wide enough that every row clips, so zero points get gradient too
    with idx.bound(ROWS):
        y = q(x)
    (y * torch.randn_like(y)).sum().backward()
    used = torch.tensor([True, True, False, True, False])  # rows 0, 1, 3 appear in [0, 3, 3, 1]
    assert (q.scale.grad[used] != 0).all() and (q.scale.grad[~used] == 0).all()
    assert (q.zero_point.grad[used] != 0).all() and (q.zero_point.grad[~used] == 0).all()


def test_attention_layout_repeats_rows_per_head():
    """(B*H, N, d): sample b's heads are rows b*H .. b*H + H - 1 (diffusers' head_to_batch_dim)."""
    q, idx = _tpq()
    heads = 3
    x = torch.randn(len(ROWS) * heads, 6, 4)
    with idx.bound(ROWS):
        y = q(x)
        assert torch.equal(q.rows_for(x), ROWS.repeat_interleave(heads))
    assert torch.equal(y, _manual(x, q, ROWS.repeat_interleave(heads)))


def test_batch_that_is_not_a_multiple_of_the_steps_is_refused():
    q, idx = _tpq()
    with idx.bound(ROWS), pytest.raises(RuntimeError, match="not a multiple"):
        q(torch.randn(6, 3))


def test_calling_without_a_bound_step_raises():
    q, _ = _tpq()
    with pytest.raises(RuntimeError, match="no time step is bound"):
        q(torch.randn(2, 3))


def test_disabled_quantizer_is_identity_and_negative_scale_acts_as_its_magnitude():
    q, idx = _tpq()
    x = torch.randn(4, 8)
    q.enabled = False
    assert q(x) is x  # no step needed either
    q.enabled = True
    with torch.no_grad():
        q.scale.neg_()
    with idx.bound(ROWS):
        assert torch.equal(q(x), _manual(x, q, ROWS))


def test_weight_quantizer_is_per_output_channel():
    w = torch.randn(6, 4, 3, 3) * torch.logspace(-2, 1, 6).view(-1, 1, 1, 1)
    wq = WeightQuantizer(w, bits=4)
    assert wq.scale.shape == (6,)
    ints = wq.integers(w)
    assert ints.dtype == torch.int8 and ints.min() >= -8 and ints.max() <= 7
    assert torch.equal(wq(w), ints.float() * wq.scale.view(-1, 1, 1, 1))
    # each channel uses its own step: the error stays relative to the channel's magnitude
    rel = (wq(w) - w).reshape(6, -1).abs().amax(1) / w.reshape(6, -1).abs().amax(1)
    assert (rel < 0.2).all()
    wq(w).pow(2).sum().backward()
    assert (wq.scale.grad != 0).all()


def test_quant_layer_matches_manual_fake_quant():
    conv = nn.Conv2d(8, 4, 3, padding=1)
    idx = StepIndex()
    s = torch.linspace(1, 3, 8)
    q = QuantLayer(conv, weight_bits=4, act_bits=8, act_symmetric=True, n_steps=5, step_index=idx, dilation=s)
    with torch.no_grad():
        q.input_quantizer.scale.copy_(SCALES)
    x = torch.randn(4, 8, 6, 6)
    with idx.bound(ROWS):
        y = q(x)
    xq = _manual(x / s.view(1, -1, 1, 1), q.input_quantizer, ROWS)
    wq = fake_quant(q.weight, q.weight_quantizer.scale.view(-1, 1, 1, 1), 0.0, -8, 7)
    expected = torch.nn.functional.conv2d(xq, wq, conv.bias, padding=1)
    assert torch.allclose(y, expected, atol=1e-6)


@pytest.fixture(scope="module")
def qmodel():
    unet = tiny_unet()
    calib = random_calib(unet)
    model, _ = build_quantized(unet, W8A8, TimestepTable(calib.timesteps), calib)
    # give every step a clearly different scale so the row choice shows in the output
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, ActQuantizer):
                m.scale.copy_(torch.tensor([0.2, 0.05, 0.02, 0.008]))
    return model


def test_quantized_unet_binds_rows_per_call_and_releases_them(qmodel):
    x = torch.randn(4, 1, 8, 8)
    t = torch.tensor([901.0, 301.0, 301.0, 601.0])
    with torch.no_grad():
        out = qmodel(x, t).sample
        explicit = qmodel.run_rows(torch.tensor([0, 2, 2, 1]), qmodel.denoiser, x, t).sample
    assert torch.equal(out, explicit)
    with pytest.raises(RuntimeError, match="no time step is bound"):
        qmodel.step_index.value  # nothing stays bound after the call (no hidden state)


def test_each_sample_of_a_mixed_batch_follows_its_own_timestep(qmodel):
    x = torch.randn(4, 1, 8, 8)
    t = torch.tensor([901.0, 301.0, 301.0, 601.0])
    with torch.no_grad():
        mixed = qmodel(x, t).sample
        for i in range(4):
            alone = qmodel(x, t[i].expand(4)).sample[i]  # same batch shape, every sample at t[i]
            assert torch.allclose(mixed[i], alone, atol=1e-5), i
        wrong = qmodel(x, torch.full((4,), 1.0)).sample
    assert (mixed - wrong).abs().amax() > 100 * 1e-5


def test_classifier_free_guidance_batch_with_a_scalar_timestep(qmodel):
    """A doubled batch and a scalar timestep (what pipelines do under CFG) is repeatable call after
    call: no counter advances between calls."""
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        first = qmodel(x, torch.tensor(601.0)).sample
        second = qmodel(x, 601).sample
        third = qmodel(x, torch.tensor(601.0)).sample
    assert torch.equal(first, second) and torch.equal(first, third)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_clip_to_grid_keeps_the_integers_and_stays_inside_the_bit_width(sign):
    """A learned step far below max-abs / qmax clips a channel's outliers; storing them clipped changes
    no integer (so no quantized weight) and keeps max|w| / |step| within the grid (what loading checks)."""
    w = torch.randn(6, 10, generator=torch.Generator().manual_seed(0))
    w[2, 3] = 9.0  # an outlier
    q = WeightQuantizer(w, 4)
    with torch.no_grad():
        q.scale.mul_(sign * 0.1)  # as distillation can shrink it (or flip its sign)
    clipped = q.clip_to_grid(w)
    assert torch.equal(q.integers(clipped), q.integers(w)) and torch.equal(q(clipped), q(w))
    assert float((clipped.abs().amax(1) / q.scale.abs()).max()) <= 8 + 1e-4
    inside = (w / q.scale[:, None]).abs() < 7
    assert torch.equal(clipped[inside], w[inside])  # untouched inside the grid
