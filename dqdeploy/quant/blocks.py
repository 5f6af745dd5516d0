"""Block partition of a denoiser for block-wise distillation: every module of the block classes of
its :class:`~dqdeploy.core.denoisers.DenoiserSpec` (UNets: each ResnetBlock2D, attention / transformer
block, down/up-sampler and time embedding; diffusion transformers: each transformer block and
embedder), plus every quantized layer outside them (conv_in, conv_out, proj_out, ...). Blocks come
in execution order.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..core.denoisers import SPECS
from ..core.inputs import Hook, forward_hooks
from .modules import quant_layers

BLOCK_CLASSES = SPECS["UNet2DModel"].blocks


@dataclass(frozen=True)
class Block:
    """A named unit of distillation and the quantized layers inside it."""

    name: str
    layers: tuple[str, ...]


def _candidates(root: nn.Module, classes: Sequence[str], quantized: Collection[str]) -> list[str]:
    found: list[str] = []
    # every module above a quantized layer
    prefixes = {n.rsplit(".", i)[0] for n in quantized for i in range(n.count(".") + 1)}

    def visit(prefix: str, module: nn.Module) -> None:
        for child_name, child in module.named_children():
            full = prefix + child_name
            if type(child).__name__ in classes or full in quantized:
                if full in prefixes:
                    found.append(full)
            else:
                visit(full + ".", child)

    visit("", root)
    return found


@torch.no_grad()
def partition(denoiser: nn.Module, run: Callable[[], object], classes: Sequence[str] = BLOCK_CLASSES,
              layers: Collection[str] | None = None) -> list[Block]:
    """Blocks (modules of ``classes``) of ``denoiser`` in the order one forward (``run``) executes them.
    ``layers``: the names of the layers quantized, or to be quantized when ``denoiser`` is still the
    float model (by default its QuantLayers)."""
    quantized = set(quant_layers(denoiser) if layers is None else layers)
    names = _candidates(denoiser, classes, quantized)
    order: list[str] = []
    hooks: list[Hook] = [(denoiser.get_submodule(n), "pre",
                          lambda m, a, n=n: order.append(n) if n not in order else None) for n in names]
    with forward_hooks(hooks):
        run()
    order += [n for n in names if n not in order]  # never-called blocks go last
    blocks = []
    for name in order:
        inside = [f"{name}.{n}" if n else name for n, _ in denoiser.get_submodule(name).named_modules()]
        blocks.append(Block(name, tuple(n for n in inside if n in quantized)))
    return blocks
