"""Weight Dilation (BRIEF §1.1) against a hand-computed case and its invariants; the SmoothQuant
baseline against its formula; the dilated layer computes the same float function."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dqdeploy.core.recipe import W8A8
from dqdeploy.quant.dilation import dilation_factors, smoothquant_factors
from dqdeploy.quant.modules import QuantLayer, quant_layers
from dqdeploy.quant.timestep import StepIndex, TimestepTable
from dqdeploy.stages.quantize import build_quantized
from tests.helpers import random_calib, tiny_unet


def _rows(w: torch.Tensor) -> torch.Tensor:
    return w.reshape(w.shape[0], -1)


def _dilate(w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return w * s.view(1, -1, *([1] * (w.dim() - 2)))


def _saturated(w: torch.Tensor) -> torch.Tensor:
    """[K] bool: input channel k holds the max or min of some output channel."""
    r = w.reshape(w.shape[0], w.shape[1], -1)
    hi = r.amax(dim=(1, 2), keepdim=True)
    lo = r.amin(dim=(1, 2), keepdim=True)
    return ((r == hi) | (r == lo)).any(2).any(0)


def test_hand_computed_linear_case():
    # W[o, k], 2 output channels x 4 input channels:
    #   row 0: [ 2.0, 0.5, -1.0, -0.25]  max 2.0 (k=0), min -1.0 (k=2)
    #   row 1: [-0.5, 1.6,  4.0,  0.5 ]  max 4.0 (k=2), min -0.5 (k=0)
    # k=0 and k=2 hold a row max/min -> saturated, s = 1.
    # k=1: row 0: 2.0 / 0.5 = 4.0 ; row 1: 4.0 / 1.6 = 2.5          -> s_1 = 2.5
    # k=3: row 0: -1.0 / -0.25 = 4.0 ; row 1: 4.0 / 0.5 = 8.0       -> s_3 = 4.0
    w = torch.tensor([[2.0, 0.5, -1.0, -0.25], [-0.5, 1.6, 4.0, 0.5]])
    s = dilation_factors(w)
    assert torch.allclose(s, torch.tensor([1.0, 2.5, 1.0, 4.0]))
    # W * s = [[2.0, 1.25, -1.0, -1.0], [-0.5, 4.0, 4.0, 2.0]]: both rows keep [min, max]
    assert torch.allclose(_dilate(w, s), torch.tensor([[2.0, 1.25, -1.0, -1.0], [-0.5, 4.0, 4.0, 2.0]]))


def test_hand_computed_all_negative_row():
    # row 0 is all negative: max -0.25 (k=3), min -2.0 (k=2); row 1: max 3.0 (k=0), min -1.0 (k=2)
    # saturated: k=0, k=2, k=3.  k=1: row 0: -2.0 / -0.5 = 4.0 ; row 1: 3.0 / 1.0 = 3.0 -> s_1 = 3.0
    w = torch.tensor([[-1.0, -0.5, -2.0, -0.25], [3.0, 1.0, -1.0, 0.5]])
    assert torch.allclose(dilation_factors(w), torch.tensor([1.0, 3.0, 1.0, 1.0]))


def test_hand_computed_zero_column_stays_one():
    # as the first case with k=3 zeroed: every row has both signs, so 0 is neither a max nor a min;
    # nothing bounds the zero column and scaling it gains nothing -> s_3 = 1 (not inf)
    w = torch.tensor([[2.0, 0.5, -1.0, 0.0], [-0.5, 1.6, 4.0, 0.0]])
    assert torch.equal(dilation_factors(w), torch.tensor([1.0, 2.5, 1.0, 1.0]))


def _check_invariants(weights: list[torch.Tensor], s: torch.Tensor) -> None:
    assert s.shape == (weights[0].shape[1],)
    assert (s >= 1.0).all()
    sat = torch.zeros_like(s, dtype=torch.bool)
    for w in weights:
        sat |= _saturated(w)
        d = _dilate(w, s)
        # every output channel keeps its range, hence its per-channel weight step size
        assert torch.allclose(_rows(d).amax(1), _rows(w).amax(1), rtol=1e-6, atol=0)
        assert torch.allclose(_rows(d).amin(1), _rows(w).amin(1), rtol=1e-6, atol=0)
    assert (s[sat] == 1.0).all()
    # maximality: every dilated channel now touches some row's max or min (it could grow no more)
    touched = torch.zeros_like(sat)
    for w in weights:
        d = _dilate(w, s).reshape(w.shape[0], w.shape[1], -1)
        hi = d.amax(dim=(1, 2), keepdim=True)
        lo = d.amin(dim=(1, 2), keepdim=True)
        touched |= (torch.isclose(d, hi, rtol=1e-5) | torch.isclose(d, lo, rtol=1e-5)).any(2).any(0)
    assert touched[~sat].all()
    assert (s[~sat] > 1.0).any()  # the case is not trivial: some channels really grow


@pytest.mark.parametrize("shape", [(4, 32, 3, 3), (6, 48), (3, 40, 1, 1)], ids=["conv3x3", "linear", "conv1x1"])
def test_invariants_on_random_weights(shape):
    w = torch.randn(*shape)
    _check_invariants([w], dilation_factors(w))


def test_joint_factors_keep_every_weights_ranges():
    """Several weights reading one input (to_q/to_k/to_v) get one vector valid for all of them."""
    ws = [torch.randn(4, 40), torch.randn(6, 40) * 3, torch.randn(5, 40) ** 3]
    s = dilation_factors(ws)
    _check_invariants(ws, s)
    alone = [dilation_factors(w) for w in ws]
    assert (s <= torch.stack(alone).amin(0) + 1e-6).all()
    # a vector computed for one weight alone would break another weight's ranges
    broken = [not torch.allclose(_rows(_dilate(w, alone[0])).amax(1), _rows(w).amax(1)) or
              not torch.allclose(_rows(_dilate(w, alone[0])).amin(1), _rows(w).amin(1)) for w in ws[1:]]
    assert any(broken)


def test_joint_factors_reject_mismatched_inputs():
    with pytest.raises(ValueError, match="same input channels"):
        dilation_factors([torch.randn(4, 8), torch.randn(4, 9)])


@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_dilated_layer_computes_the_same_float_function(kind):
    if kind == "conv":
        layer = nn.Conv2d(24, 5, 3, stride=2, padding=1)
        x = torch.randn(3, 24, 9, 9) * torch.linspace(0.1, 8, 24).view(1, -1, 1, 1)
    else:
        layer = nn.Linear(32, 6)
        x = torch.randn(2, 7, 32) * torch.linspace(0.1, 8, 32)
    s = dilation_factors(layer.weight)
    assert (s > 1).sum() >= 4
    q = QuantLayer(layer, weight_bits=8, act_bits=8, act_symmetric=True, n_steps=1, step_index=StepIndex(), dilation=s)
    q.input_quantizer.enabled = False
    q.quantize_weight = False
    with torch.no_grad():
        assert torch.allclose(q(x), layer(x), atol=1e-5, rtol=1e-5)
        # the quantizer sees x / s: unsaturated channels shrink by exactly s
        seen = q.dilated_input(x)
        dim = 1 if kind == "conv" else -1
        reduce = [d for d in range(x.dim()) if d != dim % x.dim()]
        assert torch.allclose(seen.abs().amax(reduce), x.abs().amax(reduce) / s, rtol=1e-6)
    # the stored weight is W * s and keeps each output channel's range
    assert torch.allclose(q.weight, _dilate(layer.weight, s))
    assert torch.allclose(_rows(q.weight).abs().amax(1), _rows(layer.weight).abs().amax(1), rtol=1e-6)


def test_smoothquant_factors_match_formula():
    # max|X_k| = [4, 1, 9]; max|W_k| over both weights = [2, 0.5, 4]
    # alpha 0.5: s_k = sqrt(ax) / sqrt(aw) = [2/sqrt(2), 1/sqrt(0.5), 3/2]
    act = torch.tensor([4.0, 1.0, 9.0])
    w1 = torch.tensor([[2.0, -0.5, 1.0], [-1.0, 0.25, -4.0]])
    w2 = torch.tensor([[0.1, 0.2, 0.3]])
    s = smoothquant_factors(act, [w1, w2], alpha=0.5)
    assert torch.allclose(s, torch.tensor([2 / 2**0.5, 1 / 0.5**0.5, 1.5]))
    # general alpha on a conv weight: the max runs over output channels and kernel positions
    act = torch.rand(6) * 5 + 0.1
    w = torch.randn(4, 6, 3, 3)
    w_absmax = w.abs().amax(dim=(0, 2, 3))
    assert torch.allclose(smoothquant_factors(act, w, alpha=0.75), act**0.75 / w_absmax**0.25, rtol=1e-5)


def test_build_quantized_shares_factors_exactly_among_layers_reading_one_tensor():
    unet = tiny_unet()
    calib = random_calib(unet)
    qmodel, metas = build_quantized(unet, W8A8, TimestepTable(calib.timesteps), calib)
    layers = quant_layers(qmodel.denoiser)
    groups: dict[str, list[str]] = {}
    for name, meta in metas.items():
        groups.setdefault(meta.group, []).append(name)
    for members in groups.values():
        expected = dilation_factors([unet.get_submodule(m).weight for m in members])
        for m in members:
            assert torch.allclose(layers[m].input_scale, 1.0 / expected), m
            assert torch.allclose(layers[m].weight, _dilate(unet.get_submodule(m).weight, expected))
    # self-attention projections read one normalised tensor: one group, 1/s folds into the GroupNorm
    att = "mid_block.attentions.0"
    assert {metas[f"{att}.to_{p}"].group for p in "qkv"} == {f"{att}.to_q"}
    assert all(metas[f"{att}.to_{p}"].fold == f"norm:{att}.group_norm" for p in "qkv")
    # conv1 and conv2 of a ResNet block read different tensors: no shared vector
    assert metas["down_blocks.0.resnets.0.conv1"].group != metas["down_blocks.0.resnets.0.conv2"].group
    multi = [m for m in groups.values() if len(m) > 1]
    assert all(len(m) == 3 and m[0].endswith("to_q") for m in multi), multi
