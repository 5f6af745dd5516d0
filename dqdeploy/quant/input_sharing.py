"""One traced forward pass that tells, for every Conv2d/Linear layer of a denoiser, which layers read the
same input tensor (they share one dilation vector) and which module produced that input (whether
``1/s`` folds exactly into a preceding per-channel affine op or stays a per-channel Mul).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef

from ..core.inputs import Hook, forward_hooks
from .modules import QUANTIZABLE

AFFINE_NORMS = (nn.GroupNorm, nn.LayerNorm)


@dataclass(frozen=True)
class InputInfo:
    """Where a layer's input comes from: its sharing ``group`` (first member's name) and the fold
    target of ``1/s`` (``"norm:<module>"`` when exact, else ``"mul"``)."""

    group: str
    fold: str
    rank: int  # rank of the input activation (2: [B, C] vectors such as the time embedding)


class _Storages:
    """A number per storage seen during one forward, keeping none of them alive: an address is
    reused once its storage is freed, so an address whose storage has expired gets a new number.
    (Keeping every tensor alive instead cost a whole forward's activations: +4.7 GB on an SD-1.5 UNet.)"""

    def __init__(self) -> None:
        self.seen: dict[int, tuple[StorageWeakRef, int]] = {}
        self.count = 0

    def id(self, x: torch.Tensor) -> int:
        """The number of ``x``'s storage."""
        storage = x.untyped_storage()
        known = self.seen.get(storage.data_ptr())
        if known is None or known[0].expired():
            self.count += 1
            known = self.seen[storage.data_ptr()] = (StorageWeakRef(storage), self.count)
        return known[1]

    def key(self, x: torch.Tensor) -> tuple:
        """What identifies the tensor ``x`` reads: its storage, shape, strides and offset."""
        return (self.id(x), tuple(x.shape), tuple(x.stride()), x.storage_offset())


@torch.no_grad()
def analyze_inputs(denoiser: nn.Module, run: Callable[[], object], names: list[str]) -> dict[str, InputInfo]:
    """Trace one forward (``run``) and describe the inputs of the layers ``names``."""
    producer: dict[int, str] = {}  # storage -> leaf module that wrote it
    consumers: dict[int, set[str]] = {}  # storage -> leaf modules that read it
    inputs: dict[str, tuple] = {}
    storages = _Storages()  # a reused address must not merge unrelated layers into one group
    hooks: list[Hook] = []
    wanted = set(names)
    for name, module in denoiser.named_modules():
        if list(module.children()):
            continue

        def pre(mod, args, name=name):
            if args and isinstance(args[0], torch.Tensor):
                consumers.setdefault(storages.id(args[0]), set()).add(name)
                if name in wanted:
                    inputs[name] = storages.key(args[0])

        def post(mod, args, out, name=name):
            if isinstance(out, torch.Tensor):
                producer[storages.id(out)] = name

        hooks += [(module, "pre", pre), (module, "post", post)]
    with forward_hooks(hooks):
        run()

    groups: dict[tuple, list[str]] = {}
    for name in names:
        if name in inputs:
            groups.setdefault(inputs[name], []).append(name)
    info: dict[str, InputInfo] = {}
    for key, members in groups.items():
        ptr = key[0]  # the storage's number
        src = producer.get(ptr)
        fold = "mul"
        if src is not None:
            mod = denoiser.get_submodule(src)
            affine = isinstance(mod, AFFINE_NORMS) and getattr(mod, "weight", None) is not None
            only_members = consumers.get(ptr, set()) <= set(members)
            if affine and only_members and _is_quantizable_group(denoiser, members):
                fold = f"norm:{src}"
        for name in members:
            info[name] = InputInfo(group=members[0], fold=fold, rank=len(key[1]))
    return info


def _is_quantizable_group(denoiser: nn.Module, members: list[str]) -> bool:
    return all(isinstance(denoiser.get_submodule(m), QUANTIZABLE) for m in members)
