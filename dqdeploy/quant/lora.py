"""LoRA on a quantized denoiser without quantizing again.

Two ways, both exact about what they change:

* a **branch**: each adapted layer's output gains ``scale * alpha / r * up(down(x))`` on the layer's own float
  input ``x`` (before Weight Dilation's ``1/s``), run in float beside the quantized layer; the base integers and
  step sizes never change, and removing the branch restores the model bit for bit. On a convolution (LoCon)
  ``down`` is a convolution with the base conv's kernel size, stride, padding and dilation, ``up`` a 1x1 one;
* a **fold**: the update is added to the weight (dilated like it: ``W' += delta * s``) and the touched layers'
  weight step sizes are searched again; every other tensor stays as it was.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .modules import QuantLayer, channel_view
from .primitives import search_weight_scale


@dataclass(frozen=True)
class ConvGeometry:
    """Stride, padding and dilation of the base convolution (the ``down`` convolution takes them)."""

    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]


@dataclass(frozen=True)
class LoraLayer:
    """One adapted layer: ``down`` [r, in] (a convolution's: [r, in, kh, kw]), ``up`` [out, r] and ``alpha / r``
    (1 without alpha); ``conv``: the base convolution's geometry (None for a Linear)."""

    down: torch.Tensor
    up: torch.Tensor
    alpha_scale: float
    conv: ConvGeometry | None = None

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def delta(self, scale: float = 1.0) -> torch.Tensor:
        """The weight update ``scale * alpha / r * up @ down`` [out, in] (a convolution's: [out, in, kh, kw], the 1x1
        ``up`` composed with ``down``)."""
        d = (scale * self.alpha_scale) * (self.up.double() @ self.down.double().flatten(1))
        return d.view(self.up.shape[0], *self.down.shape[1:]).float()

    def branch(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        """``scale * alpha / r * up(down(x))`` for the layer's input ``x`` (a Linear's [..., in], a conv's
        [B, in, H, W])."""
        down, up = self.down.to(x.dtype), self.up.to(x.dtype)
        if self.conv is None:
            return (scale * self.alpha_scale) * F.linear(F.linear(x, down), up)
        h = F.conv2d(x, down, None, self.conv.stride, self.conv.padding, self.conv.dilation)
        return (scale * self.alpha_scale) * F.conv2d(h, up[:, :, None, None])


def _root(model: nn.Module) -> nn.Module:
    return getattr(model, "denoiser", model)  # a QuantizedDenoiser holds the diffusers module


class LoraBranches:
    """The forward hooks of :func:`attach_lora`; ``remove()`` takes every branch off again."""

    def __init__(self, handles: list[Any]) -> None:
        self.handles = handles

    def remove(self) -> None:
        """Remove every branch (the model computes exactly what it did before)."""
        for h in self.handles:
            h.remove()
        self.handles = []


def attach_lora(model: nn.Module, adapters: Iterable[tuple[dict[str, LoraLayer], float]]) -> LoraBranches:
    """Add each adapter's float branch (``layers``, ``scale``) to the layers it names, as forward hooks."""
    handles = []
    root = _root(model)
    for layers, scale in adapters:
        for name, layer in layers.items():
            def hook(module: nn.Module, args: tuple, out: torch.Tensor, layer=layer, scale=scale) -> torch.Tensor:
                return out + layer.branch(args[0], scale)

            handles.append(root.get_submodule(name).register_forward_hook(hook))
    return LoraBranches(handles)


@torch.no_grad()
def fold_lora(model: nn.Module, layers: dict[str, LoraLayer], scale: float = 1.0) -> list[str]:
    """Add the adapter's update to its layers' weights; a quantized layer's weight step sizes are searched
    again (its dilation kept). Returns the quantized layers whose step sizes changed."""
    root, searched = _root(model), []
    for name, layer in layers.items():
        module = root.get_submodule(name)
        weight = module.weight
        assert isinstance(weight, torch.Tensor)
        delta = layer.delta(scale).to(weight.dtype)
        if isinstance(module, QuantLayer):
            weight += delta * channel_view(1.0 / module.input_scale, module.kind, weight.dim())  # dilated: W * s
            module.weight_quantizer.scale.copy_(search_weight_scale(weight, module.weight_quantizer.bits))
            searched.append(name)
        else:  # a layer kept in float
            weight += delta
    return searched
