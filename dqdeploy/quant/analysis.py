"""One traced forward pass that tells, for every Conv2d/Linear layer of a UNet, which layers read the
same input tensor (they share one dilation vector) and which module produced that input (whether
``1/s`` folds exactly into a preceding per-channel affine op or stays a per-channel Mul).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..inputs import Hook, forward_hooks
from .modules import QUANTIZABLE

AFFINE_NORMS = (nn.GroupNorm, nn.LayerNorm)


@dataclass(frozen=True)
class InputInfo:
    """Where a layer's input comes from: its sharing ``group`` (first member's name) and the fold
    target of ``1/s`` (``"norm:<module>"`` when exact, else ``"mul"``)."""

    group: str
    fold: str
    rank: int  # rank of the input activation (2: [B, C] vectors such as the time embedding)


def _key(x: torch.Tensor) -> tuple:
    return (x.untyped_storage().data_ptr(), tuple(x.shape), tuple(x.stride()), x.storage_offset())


@torch.no_grad()
def analyze_inputs(unet: nn.Module, run: Callable[[], object], names: list[str]) -> dict[str, InputInfo]:
    """Trace one forward (``run``) and describe the inputs of the layers ``names``."""
    producer: dict[int, str] = {}  # storage ptr -> leaf module that wrote it
    consumers: dict[int, set[str]] = {}  # storage ptr -> leaf modules that read it
    inputs: dict[str, tuple] = {}
    # every tensor seen stays referenced until the analysis is done: a freed tensor's storage is
    # reused by later ones, and a reused pointer would merge unrelated layers into one group
    alive: list[torch.Tensor] = []
    hooks: list[Hook] = []
    wanted = set(names)
    for name, module in unet.named_modules():
        if list(module.children()):
            continue

        def pre(mod, args, name=name):
            if args and isinstance(args[0], torch.Tensor):
                alive.append(args[0])
                consumers.setdefault(args[0].untyped_storage().data_ptr(), set()).add(name)
                if name in wanted:
                    inputs[name] = _key(args[0])

        def post(mod, args, out, name=name):
            if isinstance(out, torch.Tensor):
                alive.append(out)
                producer[out.untyped_storage().data_ptr()] = name

        hooks += [(module, "pre", pre), (module, "post", post)]
    with forward_hooks(hooks):
        run()

    groups: dict[tuple, list[str]] = {}
    for name in names:
        if name in inputs:
            groups.setdefault(inputs[name], []).append(name)
    info: dict[str, InputInfo] = {}
    for key, members in groups.items():
        ptr = key[0]
        src = producer.get(ptr)
        fold = "mul"
        if src is not None:
            mod = unet.get_submodule(src)
            affine = isinstance(mod, AFFINE_NORMS) and getattr(mod, "weight", None) is not None
            only_members = consumers.get(ptr, set()) <= set(members)
            if affine and only_members and _is_quantizable_group(unet, members):
                fold = f"norm:{src}"
        for name in members:
            info[name] = InputInfo(group=members[0], fold=fold, rank=len(key[1]))
    return info


def _is_quantizable_group(unet: nn.Module, members: list[str]) -> bool:
    return all(isinstance(unet.get_submodule(m), QUANTIZABLE) for m in members)
