"""From a quantized artifact to what the ONNX graph needs: a float denoiser whose exported graph is the
canvas for Q/DQ surgery (dequantized weights in place, ``1/s`` folded into affine norms where exact),
and per layer the integer weights, scales and per-step tables.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from ..core.deprecation import renamed
from ..io.artifact import Manifest
from ..quant.attention import remove_attention_quant
from ..quant.modules import QuantizedDenoiser, QuantLayer, channel_view, quant_layers, replace_module


@dataclass(frozen=True)
class LayerTensors:
    """Everything the graph needs for one quantized layer (numpy, float32 unless noted).

    ``act_scale`` [T] (T = 1 when the recipe collapses time steps) is the per-step step size;
    ``in_factor`` [C] is the part of ``1/s`` not folded into a norm (ones when folded).
    """

    name: str
    kind: str
    w_int: np.ndarray  # int8 [O, I, ...]
    w_scale: np.ndarray  # [O]
    bias: np.ndarray | None
    act_scale: np.ndarray
    act_zero_point: np.ndarray
    in_factor: np.ndarray
    weight_bits: int
    act_bits: int
    out_c: float | None = None  # output quantizer step factor c (step c * s_t), layout "ort"
    dilation: np.ndarray | None = None  # s [C]: the graph's input of the layer times s * in_factor is its float input

    @property
    def ref_scale(self) -> float:
        """The constant Q/DQ scale ``s0`` of the rescale form: the median per-step scale."""
        return float(np.median(self.act_scale))


def tensors_of(name: str, layer: QuantLayer, fold: str = "mul") -> LayerTensors:
    """Integer weight, scales and tables of one quantized layer (``fold``: its manifest entry)."""
    meta_bits = (layer.weight_quantizer.bits, layer.input_quantizer.bits)
    inv_s = layer.input_scale.detach().float()
    return LayerTensors(
        name=name,
        kind=layer.kind,
        w_int=layer.weight_quantizer.integers(layer.weight).numpy(),
        w_scale=layer.weight_quantizer.scale.detach().abs().float().numpy().copy(),
        bias=None if layer.bias is None else layer.bias.detach().float().numpy().copy(),
        act_scale=layer.input_quantizer.scale.detach().abs().float().numpy().copy(),
        act_zero_point=torch.round(layer.input_quantizer.zero_point.detach()).float().numpy().copy(),
        in_factor=np.ones(inv_s.numel(), np.float32) if fold.startswith("norm:") else inv_s.numpy().copy(),
        weight_bits=meta_bits[0],
        act_bits=meta_bits[1],
        out_c=None if layer.output_scale is None else float(layer.output_scale.detach().abs()),
        dilation=(1.0 / inv_s).numpy(),
    )


def layer_tensors(model: QuantizedDenoiser, manifest: Manifest) -> dict[str, LayerTensors]:
    """Integer weights, scales and tables of every quantized layer."""
    return {name: tensors_of(name, layer, manifest.layers[name].fold)
            for name, layer in quant_layers(model.denoiser).items()}


def plain_layer(layer: QuantLayer) -> nn.Conv2d | nn.Linear:
    """Plain conv/linear holding the dequantized weight of ``layer``: what gets exported, then rewritten.

    Built without the random initialisation (``skip_init``): its parameters are the dequantized
    tensor and the layer's own bias, not copies."""
    with torch.no_grad():
        w = layer.weight_quantizer(layer.weight).float()
    inner: nn.Conv2d | nn.Linear
    if layer.kind == "conv":
        args = layer.conv_args
        inner = nn.utils.skip_init(nn.Conv2d, w.shape[1] * args["groups"], w.shape[0], tuple(w.shape[2:]),
                                   stride=args["stride"], padding=args["padding"], dilation=args["dilation"],
                                   groups=args["groups"], bias=layer.bias is not None)
    else:
        inner = nn.utils.skip_init(nn.Linear, w.shape[1], w.shape[0], bias=layer.bias is not None)
    inner.weight = nn.Parameter(w, requires_grad=False)
    if layer.bias is not None:
        inner.bias = nn.Parameter(layer.bias.detach().float(), requires_grad=False)
    return inner


def dequantized_denoiser(model: QuantizedDenoiser, manifest: Manifest, *, inplace: bool = False) -> nn.Module:
    """A float diffusers denoiser: each QuantLayer becomes a plain layer (dequantized weights) named like
    the original, and ``1/s`` is folded into the affine norm in front of it where that is exact.

    ``inplace=True`` converts ``model``'s own denoiser layer by layer (``model`` is consumed): no second
    copy of the weights is ever held, which is what bounds the export's memory."""
    denoiser = (model.denoiser if inplace else copy.deepcopy(model.denoiser)).float().eval()
    remove_attention_quant(denoiser)  # float attention: its Q/DQ are added to the graph (attention_qdq)
    layers = quant_layers(denoiser)
    folded: set[str] = set()
    for name, layer in layers.items():
        fold = manifest.layers[name].fold
        if fold.startswith("norm:") and fold not in folded:
            norm: Any = denoiser.get_submodule(fold[5:])
            with torch.no_grad():
                norm.weight.mul_(layer.input_scale)
                norm.bias.mul_(layer.input_scale)
            folded.add(fold)
    for name in list(layers):
        replace_module(denoiser, name, plain_layer(layers.pop(name)))  # the QuantLayer is freed here
    return denoiser


def simulate_layer_input(layer: QuantLayer, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The integers the simulation feeds layer ``layer`` for input ``x`` at step ``rows`` (tests/checks)."""
    q = layer.input_quantizer
    xs = x * channel_view(layer.input_scale, layer.kind, x.dim())
    scale = q.scale.detach().abs()[rows].view(-1, *([1] * (x.dim() - 1)))
    return torch.clamp(torch.round(xs / scale) + q.zero_point.detach()[rows].view_as(scale), q.qmin, q.qmax)


if not TYPE_CHECKING:  # old names, kept for one release (mypy sees only the new ones)
    __getattr__ = renamed(__name__, {"dequantized_unet": "dequantized_denoiser"})
