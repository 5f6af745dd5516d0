"""Distillation data on disk: one safetensors shard per (kind, block, batch), loaded per batch.

Block-wise distillation needs, per calibration batch, each block's full-precision output (the
target), the inputs the quantized model feeds it, and the outputs of the already-distilled
quantized blocks (answered from here when the model's forward is replayed). On a Stable-Diffusion
size UNet that is many times the model, so nothing of it stays in memory: the tensors of a value
(a tensor, or a tuple / list / dict of them, as a module takes or returns) go to a shard, and only
its small skeleton (structure and non-tensor leaves) is kept. Shards of a block are dropped as soon
as distillation no longer needs them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file


@dataclass(frozen=True)
class _Slot:
    """Where the ``index``-th tensor of a value goes back in its skeleton, and the permutation that
    gives it back its memory layout (a kernel's rounding can depend on it)."""

    index: int
    perm: tuple[int, ...] | None = None

    def restore(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        t = tensors[self.index]
        return t if self.perm is None else t.permute(*sorted(range(len(self.perm)), key=self.perm.__getitem__))


def _dense_order(t: torch.Tensor) -> tuple[int, ...] | None:
    """The dimension order that makes ``t`` contiguous without a copy (channels-last, transposes),
    or None when ``t`` is contiguous or not a permutation of a dense layout."""
    if t.is_contiguous() or t.dim() < 2:
        return None
    strides = t.stride()
    perm = tuple(sorted(range(t.dim()), key=lambda d: -strides[d]))
    return perm if t.permute(*perm).is_contiguous() else None


def flatten(value: Any) -> tuple[Any, list[torch.Tensor]]:
    """Split ``value`` into a skeleton (tensors replaced by slots) and its tensors, detached and
    contiguous (a permuted dense layout is kept by its slot); a tensor that appears twice keeps one slot."""
    tensors: list[torch.Tensor] = []
    seen: dict[int, _Slot] = {}

    def visit(obj: Any) -> Any:
        if isinstance(obj, torch.Tensor):
            if id(obj) not in seen:
                perm = _dense_order(obj)
                seen[id(obj)] = _Slot(len(tensors), perm)
                tensors.append(obj.detach().contiguous() if perm is None else obj.detach().permute(*perm))
            return seen[id(obj)]
        if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
            return tuple(visit(o) for o in obj)
        if isinstance(obj, list):
            return [visit(o) for o in obj]
        if type(obj) is dict:
            return {k: visit(v) for k, v in obj.items()}
        return obj

    return visit(value), tensors


def unflatten(skeleton: Any, tensors: list[torch.Tensor]) -> Any:
    """Inverse of :func:`flatten`."""
    if isinstance(skeleton, _Slot):
        return skeleton.restore(tensors)
    if isinstance(skeleton, tuple):
        return tuple(unflatten(o, tensors) for o in skeleton)
    if isinstance(skeleton, list):
        return [unflatten(o, tensors) for o in skeleton]
    if type(skeleton) is dict:
        return {k: unflatten(v, tensors) for k, v in skeleton.items()}
    return skeleton


def contiguous(value: Any) -> Any:
    """``value`` with every tensor made contiguous."""
    if isinstance(value, torch.Tensor):
        return value.contiguous()
    if isinstance(value, (tuple, list)) and not hasattr(value, "_fields"):
        return type(value)(contiguous(o) for o in value)
    if type(value) is dict:
        return {k: contiguous(v) for k, v in value.items()}
    return value


def _owned(tensors: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Name the tensors for safetensors, copying any that shares memory with an earlier one."""
    out: dict[str, torch.Tensor] = {}
    storages: set[int] = set()
    for i, t in enumerate(tensors):
        ptr = t.untyped_storage().data_ptr()
        out[str(i)] = t.clone() if ptr in storages and t.numel() else t
        storages.add(ptr)
    return out


class BlockStore:
    """Values by ``(kind, block, batch)`` in safetensors shards under ``root`` (a folder this store
    owns: it creates it and removes only the shards it wrote)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._skeletons: dict[tuple[str, int, int], Any] = {}

    def _path(self, kind: str, block: int, batch: int) -> Path:
        return self.root / f"{kind}-{block:05d}-{batch:06d}.safetensors"

    def put(self, kind: str, block: int, batch: int, value: Any) -> None:
        """Store ``value`` (tensors to disk, skeleton in memory)."""
        skeleton, tensors = flatten(value)
        save_file(_owned(tensors), str(self._path(kind, block, batch)))
        self._skeletons[(kind, block, batch)] = skeleton

    def get(self, kind: str, block: int, batch: int) -> Any:
        """The stored value, its tensors read from disk."""
        skeleton = self._skeletons[(kind, block, batch)]
        loaded = load_file(str(self._path(kind, block, batch)))
        return unflatten(skeleton, [loaded[str(i)] for i in range(len(loaded))])

    def has(self, kind: str, block: int, batch: int) -> bool:
        """Whether a value is stored under this key."""
        return (kind, block, batch) in self._skeletons

    def batches(self, kind: str, block: int) -> list[int]:
        """The batches stored for ``(kind, block)``, in order."""
        return sorted(b for (k, j, b) in self._skeletons if k == kind and j == block)

    def drop(self, kind: str, block: int) -> None:
        """Delete the shards of ``(kind, block)``."""
        for batch in self.batches(kind, block):
            self._path(kind, block, batch).unlink(missing_ok=True)
            del self._skeletons[(kind, block, batch)]

    def clear(self) -> None:
        """Delete every shard this store wrote, then its folder if nothing else is left in it."""
        for kind, block, batch in list(self._skeletons):
            self._path(kind, block, batch).unlink(missing_ok=True)
        self._skeletons.clear()
        try:
            self.root.rmdir()
        except OSError:
            pass
