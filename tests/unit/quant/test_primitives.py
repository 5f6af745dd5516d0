"""Pure quantization math against hand-computed values and closed forms (LSQ gradients, STE)."""

from __future__ import annotations

import pytest
import torch

from dqdeploy.quant.primitives import (
    CLIP_RATIOS,
    fake_quant,
    minmax_scale,
    qrange,
    quant_error,
    quantize,
    round_ste,
    search_tensor_scale,
    search_weight_scale,
)


def test_qrange_signed_and_unsigned_grids():
    assert qrange(8, True) == (-128, 127)
    assert qrange(4, True) == (-8, 7)
    assert qrange(8, False) == (0, 255)
    assert qrange(4, False) == (0, 15)


def test_fake_quant_symmetric_hand_computed():
    # scale 0.25, 3-bit grid [-4, 3]:
    #   x / s        = [-5.2, -0.8, 1.04, 3.6, 20.0]
    #   round        = [-5,   -1,   1,    4,   20  ]
    #   clamp[-4, 3] = [-4,   -1,   1,    3,   3   ]
    #   * s          = [-1.0, -0.25, 0.25, 0.75, 0.75]
    x = torch.tensor([-1.3, -0.2, 0.26, 0.9, 5.0])
    out = fake_quant(x, torch.tensor(0.25), 0.0, -4, 3)
    assert torch.allclose(out, torch.tensor([-1.0, -0.25, 0.25, 0.75, 0.75]), atol=1e-7)
    assert torch.equal(quantize(x, torch.tensor(0.25), 0.0, -4, 3), torch.tensor([-4.0, -1.0, 1.0, 3.0, 3.0]))


def test_fake_quant_asymmetric_hand_computed():
    # scale 0.5, zero point 3, grid [0, 7]:
    #   x / s       = [-4, -1.2, 0.6, 3.8]; round = [-4, -1, 1, 4]; + zp = [-1, 2, 4, 7]
    #   clamp[0, 7] = [0, 2, 4, 7]; - zp = [-3, -1, 1, 4]; * s = [-1.5, -0.5, 0.5, 2.0]
    x = torch.tensor([-2.0, -0.6, 0.3, 1.9])
    out = fake_quant(x, torch.tensor(0.5), torch.tensor(3.0), 0, 7)
    assert torch.allclose(out, torch.tensor([-1.5, -0.5, 0.5, 2.0]), atol=1e-7)


def test_round_ste_rounds_half_to_even_with_identity_gradient():
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.7, 0.2], requires_grad=True)
    y = round_ste(x)
    assert torch.equal(y.detach(), torch.tensor([0.0, 2.0, 2.0, -0.0, -2.0, 0.0]))
    weights = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    (y * weights).sum().backward()
    assert torch.equal(x.grad, weights)  # d round_ste(x)/dx == 1 everywhere


def test_fake_quant_scale_gradient_matches_lsq_closed_form():
    # LSQ: d fq / d s = round(x/s) - x/s inside the grid, qmin - zp / qmax - zp when clipped.
    # s = 0.5, grid [-4, 3]; x / s = [0.6, -1.3, 2.2, 9.0, -11.0]
    #   round - x/s = [0.4, 0.3, -0.2] for the first three, then qmax = 3 and qmin = -4 (clipped)
    x = torch.tensor([0.3, -0.65, 1.1, 4.5, -5.5], requires_grad=True)
    s = torch.tensor(0.5, requires_grad=True)
    out = fake_quant(x, s, 0.0, -4, 3)
    per_elem = []
    for i in range(len(x)):
        (g,) = torch.autograd.grad(out[i], s, retain_graph=True)
        per_elem.append(float(g))
    assert per_elem == pytest.approx([0.4, 0.3, -0.2, 3.0, -4.0], abs=1e-6)
    # and the input gradient is the clipped STE: 1 inside the grid, 0 outside
    (gx,) = torch.autograd.grad(out.sum(), x)
    assert torch.equal(gx, torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0]))


def test_fake_quant_scale_gradient_asymmetric_clipped_uses_zero_point():
    # zp = 2, grid [0, 7]: clipped high gives qmax - zp = 5, clipped low gives qmin - zp = -2
    x = torch.tensor([10.0, -10.0])
    s = torch.tensor(1.0, requires_grad=True)
    out = fake_quant(x, s, torch.tensor(2.0), 0, 7)
    g_hi, = torch.autograd.grad(out[0], s, retain_graph=True)
    g_lo, = torch.autograd.grad(out[1], s)
    assert float(g_hi) == pytest.approx(5.0) and float(g_lo) == pytest.approx(-2.0)


def test_minmax_scale_hand_computed():
    lo, hi = torch.tensor([-1.0]), torch.tensor([3.0])
    scale, zp = minmax_scale(lo, hi, -128, 127, symmetric=True)
    assert float(scale) == pytest.approx(3.0 / 127) and float(zp) == 0.0
    # asymmetric 8-bit: scale = (3 - -1) / 255, zp = round(0 - (-1) / scale) = round(63.75) = 64
    scale, zp = minmax_scale(lo, hi, 0, 255, symmetric=False)
    assert float(scale) == pytest.approx(4.0 / 255) and float(zp) == 64.0
    # the covered range includes both ends
    q = quantize(torch.tensor([-1.0, 3.0]), scale, zp, 0, 255)
    assert q.tolist() == [0.0, 255.0]


def test_quant_error_is_sum_of_powered_rounding_error():
    x = torch.tensor([[0.3, -0.65, 1.1]])
    s = torch.tensor([[0.5]])
    # fq = [0.5, -0.5, 1.0]; |err| = [0.2, 0.15, 0.1]
    assert float(quant_error(x, s, torch.zeros_like(s), -4, 3, p=2.0)) == pytest.approx(0.04 + 0.0225 + 0.01)
    assert float(quant_error(x, s, torch.zeros_like(s), -4, 3, p=1.0)) == pytest.approx(0.45)


@pytest.mark.parametrize("bits", [4, 8])
def test_search_weight_scale_never_worse_than_max_abs(bits):
    g = torch.Generator().manual_seed(1)
    # heavy-tailed rows (where clipping helps) and Gaussian rows
    w = torch.cat([torch.randn(8, 64, generator=g), torch.randn(8, 64, generator=g) ** 3]).view(16, 4, 4, 4)
    qmin, qmax = qrange(bits)
    flat = w.reshape(16, -1)
    maxabs = flat.abs().amax(1, keepdim=True) / qmax
    best = search_weight_scale(w, bits)
    assert best.shape == (16,)
    err_best = quant_error(flat, best[:, None], torch.zeros_like(maxabs), qmin, qmax, p=2.4)
    err_max = quant_error(flat, maxabs, torch.zeros_like(maxabs), qmin, qmax, p=2.4)
    assert (err_best <= err_max).all()
    assert (best <= maxabs[:, 0] * (1 + 1e-6)).all() and (best >= CLIP_RATIOS[0] * maxabs[:, 0] * (1 - 1e-6)).all()
    if bits == 4:  # for heavy-tailed rows clipping must win clearly (the search is not a no-op)
        assert err_best[8:].sum() < 0.95 * err_max[8:].sum()


def test_search_tensor_scale_never_worse_than_max_abs():
    g = torch.Generator().manual_seed(2)
    values = torch.randn(4096, generator=g) ** 3
    s = search_tensor_scale(values, -128, 127)
    maxabs = float(values.abs().max()) / 127
    err = lambda sc: float(quant_error(values[None], torch.tensor([[sc]]), torch.zeros(1, 1), -128, 127))  # noqa: E731
    assert err(s) <= err(maxabs)
    assert CLIP_RATIOS[0] * maxabs * (1 - 1e-6) <= s <= maxabs * (1 + 1e-6)
