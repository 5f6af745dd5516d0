"""Block partition of a denoiser for block-wise distillation: every module of the block classes of
its :class:`~dqdeploy.denoisers.DenoiserSpec` (UNets: each ResnetBlock2D, attention / transformer
block, down/up-sampler and time embedding; diffusion transformers: each transformer block and
embedder), plus every quantized layer outside them (conv_in, conv_out, proj_out, ...). Blocks come
in execution order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..denoisers import SPECS
from ..inputs import Hook, forward_hooks
from .modules import QuantLayer, quant_layers

BLOCK_CLASSES = SPECS["UNet2DModel"].blocks


@dataclass(frozen=True)
class Block:
    """A named unit of distillation and the quantized layers inside it."""

    name: str
    layers: tuple[str, ...]


def _candidates(root: nn.Module, classes: Sequence[str]) -> list[str]:
    found: list[str] = []

    def visit(prefix: str, module: nn.Module) -> None:
        for child_name, child in module.named_children():
            full = prefix + child_name
            if type(child).__name__ in classes or isinstance(child, QuantLayer):
                if quant_layers(child) or isinstance(child, QuantLayer):
                    found.append(full)
            else:
                visit(full + ".", child)

    visit("", root)
    return found


@torch.no_grad()
def partition(unet: nn.Module, run: Callable[[], object], classes: Sequence[str] = BLOCK_CLASSES) -> list[Block]:
    """Blocks (modules of ``classes``) of the quantized ``unet`` in the order one forward (``run``)
    executes them."""
    names = _candidates(unet, classes)
    order: list[str] = []
    hooks: list[Hook] = [(unet.get_submodule(n), "pre", lambda m, a, n=n: order.append(n) if n not in order else None) for n in names]
    with forward_hooks(hooks):
        run()
    order += [n for n in names if n not in order]  # never-called blocks go last
    blocks = []
    for name in order:
        module = unet.get_submodule(name)
        layers = (name,) if isinstance(module, QuantLayer) else tuple(f"{name}.{n}" for n in quant_layers(module))
        blocks.append(Block(name, layers))
    return blocks
