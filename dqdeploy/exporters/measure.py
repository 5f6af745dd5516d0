"""Export-time measurements on the simulation: the rank of each layer's input, and the constant
output-Q scales of the ORT layout when the artifact was not quantized for it."""

from __future__ import annotations

import logging

import torch

from ..core.inputs import DenoiserInputs, forward_hooks
from ..core.recipe import Recipe
from ..quant.modules import QuantizedDenoiser, quant_layers, quantizes_output
from ..quant.primitives import search_tensor_scale
from .dequantize import LayerTensors

log = logging.getLogger(__name__)


@torch.no_grad()
def input_ranks(denoiser: torch.nn.Module, names: list[str], inputs: DenoiserInputs,
                root: torch.nn.Module | None = None) -> dict[str, int]:
    """Rank of each named layer's input activation, from one forward of ``denoiser``; the names are
    submodules of ``root`` (default ``denoiser``; a QuantizedDenoiser's ``.denoiser``)."""
    root = denoiser if root is None else root
    ranks: dict[str, int] = {}

    def record(name: str):
        def hook(module, args) -> None:
            ranks.setdefault(name, args[0].dim())

        return hook

    with forward_hooks((root.get_submodule(n), "pre", record(n)) for n in names):
        inputs.call(denoiser)
    return ranks


@torch.no_grad()
def calibrate_output_scales(
    model: QuantizedDenoiser, layers: dict[str, LayerTensors], calib: DenoiserInputs, qmax: int = 127,
    keep: int = 1 << 16
) -> dict[str, float]:
    """Constant scales of the output Q (ort layout), one per layer: the clipping of the bias-free
    output in the rescaled (``s0``) domain that minimises the 8-bit rounding MSE over the artifact's
    calibration inputs."""
    values: dict[str, list[torch.Tensor]] = {n: [] for n in layers}
    modules = quant_layers(model.denoiser)
    gen = torch.Generator().manual_seed(0)

    def make_hook(name: str):
        layer, tensors = modules[name], layers[name]

        def hook(mod, args, out):
            y = out if layer.bias is None else out - (layer.bias.view(1, -1, 1, 1) if layer.kind == "conv"
                                                      else layer.bias)
            rows = layer.input_quantizer.rows_for(y)
            ratio = torch.as_tensor(tensors.ref_scale / tensors.act_scale, dtype=y.dtype)[rows]
            flat = (y * ratio.view(-1, *([1] * (y.dim() - 1)))).flatten()
            pick = torch.randperm(flat.numel(), generator=gen)[:keep]
            values[name].append(torch.cat([flat[pick], flat.abs().max().view(1)]))

        return hook

    with forward_hooks((modules[n], "post", make_hook(n)) for n in layers):
        for idx in torch.arange(len(calib)).split(16):
            calib.slice(idx).call(model)
    return {name: search_tensor_scale(torch.cat(chunks), -qmax - 1, qmax) for name, chunks in values.items()}


def ort_output_scales(
    model: QuantizedDenoiser, recipe: Recipe, layers: dict[str, LayerTensors], ranks: dict[str, int],
    calib: DenoiserInputs
) -> dict[str, float] | None:
    """Output Q scales (QLinear* fusion) where the compute is -- convs and token matmuls -- for an
    artifact whose simulation does not model this rounding (``quantize --layout ort`` makes it exact)."""
    if recipe.layout == "ort":
        return None
    log.warning("recipe layout %r: the ort graph adds output rounding the simulation lacks "
                "(quantize with --layout ort for an exact match)", recipe.layout)
    fused = {n: t for n, t in layers.items() if quantizes_output(n, ranks[n])}
    return calibrate_output_scales(model, fused, calib)
