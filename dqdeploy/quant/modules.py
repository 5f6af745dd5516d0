"""Quantized Conv2d / Linear layers and the drop-in quantized denoiser (a UNet or a diffusion transformer).

A :class:`QuantLayer` computes ``layer(Qa(x * input_scale), Qw(W'))`` where ``W' = W * s`` is the
dilated weight and ``input_scale = 1 / s`` (Weight Dilation, DilateQuant arXiv 2409.14307). ``Qa`` is the per-step
activation quantizer, ``Qw`` the per-channel weight quantizer.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from ..core.deprecation import deprecated_alias, renamed
from .primitives import fake_quant, qrange
from .quantizer import ActQuantizer, WeightQuantizer
from .timestep import StepIndex, TimestepTable

QUANTIZABLE = (nn.Conv2d, nn.Linear)
OUTPUT_LAYER = "conv_out"  # the diffusers UNets' last layer: its output is the network output


def quantizes_output(name: str, input_rank: int) -> bool:
    """Whether the ORT layout quantizes this layer's output (QLinearConv / QLinearMatMul fusion): the
    compute-heavy layers (convs and token matmuls, input rank > 2), except the network's last
    layer -- the denoiser output itself is never rounded."""
    return input_rank > 2 and name != OUTPUT_LAYER


def channel_view(v: torch.Tensor, kind: str, ndim: int) -> torch.Tensor:
    """Shape a per-input-channel vector to broadcast against an activation of rank ``ndim``."""
    return v.view(1, -1, *([1] * (ndim - 2))) if kind == "conv" else v


class QuantLayer(nn.Module):
    """A Conv2d or Linear with dilation, per-channel weight and per-step activation quantizers
    (``weight_scale``: an artifact's stored weight scales; without it they are searched)."""

    input_scale: torch.Tensor  # a buffer: 1/s
    weight_quantizer: WeightQuantizer
    input_quantizer: ActQuantizer
    bias: nn.Parameter | None
    output_scale: nn.Parameter | None
    conv_args: dict[str, Any]

    def __init__(
        self,
        layer: nn.Conv2d | nn.Linear,
        *,
        weight_bits: int,
        act_bits: int,
        act_symmetric: bool,
        n_steps: int,
        step_index: StepIndex,
        dilation: torch.Tensor | None = None,
        output_quant: bool = False,
        weight_scale: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.kind = "conv" if isinstance(layer, nn.Conv2d) else "linear"
        if self.kind == "conv":
            self.conv_args = dict(
                stride=layer.stride, padding=layer.padding, dilation=layer.dilation, groups=layer.groups
            )
            if layer.padding_mode != "zeros":
                raise NotImplementedError(f"padding_mode={layer.padding_mode!r} is not supported")
        in_ch = layer.weight.shape[1]
        s = torch.ones(in_ch) if dilation is None else dilation.detach().float()
        shape = (1, -1) + (1,) * (layer.weight.dim() - 2)
        self.weight = nn.Parameter(layer.weight.detach() * s.view(shape).to(layer.weight))
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone())
        self.register_buffer("input_scale", (1.0 / s).to(layer.weight))
        self.weight_quantizer = WeightQuantizer(self.weight, weight_bits, weight_scale)
        self.input_quantizer = ActQuantizer(n_steps, act_bits, act_symmetric, step_index)
        self.quantize_weight = True
        # ORT layout: the bias-free output is quantized with step c * s_t (s_t: the input's step)
        self.output_scale = nn.Parameter(torch.ones(())) if output_quant else None
        self.output_enabled = True
        self.out_qmin, self.out_qmax = qrange(act_bits, True)

    @property
    def in_channels(self) -> int:
        return self.weight.shape[1]

    def dilated_input(self, x: torch.Tensor) -> torch.Tensor:
        """``x / s``: the activation the quantizer sees."""
        return x * channel_view(self.input_scale, self.kind, x.dim())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.input_quantizer(self.dilated_input(x))
        w = self.weight_quantizer(self.weight) if self.quantize_weight else self.weight
        if self.output_scale is None or not (self.output_enabled and self.input_quantizer.enabled):
            return self._compute(x, w, self.bias)
        y = self.quantize_output(self._compute(x, w, None))
        return y if self.bias is None else y + channel_view(self.bias, self.kind, y.dim())

    def _compute(self, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.kind == "conv":
            return F.conv2d(x, w, bias, **self.conv_args)
        return F.linear(x, w, bias)

    def output_step(self, y: torch.Tensor) -> torch.Tensor:
        """Per-sample step of the output quantizer, ``c * s_t``, shaped to broadcast against ``y``."""
        q = self.input_quantizer
        rows = q.rows_for(y)
        assert self.output_scale is not None, "output_step is for layers with an output quantizer"
        return (self.output_scale.abs() * q.scale.abs()[rows]).view(-1, *([1] * (y.dim() - 1)))

    def quantize_output(self, y: torch.Tensor) -> torch.Tensor:
        """Fake-quantize the bias-free output on the symmetric grid (ORT layout)."""
        return fake_quant(y, self.output_step(y), 0.0, self.out_qmin, self.out_qmax)

    def extra_repr(self) -> str:
        return f"kind={self.kind}, weight={tuple(self.weight.shape)}"


def quant_layers(model: nn.Module) -> dict[str, QuantLayer]:
    """Every QuantLayer in ``model`` by qualified name (relative to ``model``)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantLayer)}


def act_quantizers(model: nn.Module) -> dict[str, ActQuantizer]:
    """Every per-step activation quantizer in ``model`` by qualified name: each QuantLayer's
    ``<layer>.input_quantizer`` and, with quantized attention, ``<attention>.act_quant.query|key|value``."""
    return {name: m for name, m in model.named_modules() if isinstance(m, ActQuantizer)}


def set_act_quant(model: nn.Module, enabled: bool) -> None:
    """Switch every activation quantizer on or off (calibration runs them off)."""
    for q in act_quantizers(model).values():
        q.enabled = enabled


def set_weight_quant(model: nn.Module, enabled: bool) -> None:
    """Switch every weight quantizer on or off."""
    for layer in quant_layers(model).values():
        layer.quantize_weight = enabled


def replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule at dotted ``name`` by ``new``."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


class QuantizedDenoiser(nn.Module):
    """Drop-in for the diffusers denoiser it wraps (a UNet or a diffusion transformer): same call
    signature and return type.

    Each call maps ``timestep`` to calibrated-step rows and binds them for the activation
    quantizers for exactly that call.
    """

    lora_branches: Any = None  # the LoRA branches load_quantized(..., lora=) added (dqdeploy.quant.lora)

    def __init__(self, denoiser: nn.Module, table: TimestepTable, step_index: StepIndex) -> None:
        super().__init__()
        self.denoiser = denoiser
        self.table = table
        self.step_index = step_index
        self._signature = inspect.signature(denoiser.forward)
        self._sample_name = next(iter(self._signature.parameters))  # "sample" | "hidden_states"

    unet = deprecated_alias("QuantizedDenoiser", "unet", "denoiser")

    @property
    def config(self):
        return self.denoiser.config

    @property
    def dtype(self) -> torch.dtype:
        return cast(torch.dtype, self.denoiser.dtype)

    @property
    def device(self) -> torch.device:
        return cast(torch.device, self.denoiser.device)

    def forward(self, *args, **kwargs):
        bound = self._signature.bind_partial(*args, **kwargs).arguments
        sample, timestep = bound.get(self._sample_name), bound.get("timestep")
        if sample is None or timestep is None:
            raise TypeError(f"{type(self.denoiser).__name__} needs {self._sample_name} and timestep")
        rows = self.table.index(timestep, sample.shape[0])
        with self.step_index.bound(rows):
            return self.denoiser(*args, **kwargs)

    def cache_context(self, name: str):
        """The wrapped model's cache context (Flux pipelines open one around each call)."""
        return cast(Any, self.denoiser).cache_context(name)

    def run_rows(self, rows: torch.Tensor, fn, *args, **kwargs):
        """Call ``fn`` with explicit step ``rows`` bound (block-wise training uses this)."""
        with self.step_index.bound(rows):
            return fn(*args, **kwargs)


if not TYPE_CHECKING:  # old names, kept for one release (mypy sees only the new ones)
    __getattr__ = renamed(__name__, {"QuantizedUNet": "QuantizedDenoiser"})
