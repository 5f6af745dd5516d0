"""Capturing block-wise distillation data by propagation, not by re-running the model per block.

* FP targets: one full-precision forward per calibration batch, a hook on every block, stores each
  block's output (every tensor it returns) at once.
* Quantized inputs of block k: the quantized model's forward is replayed with every block before k
  answered from the store (its forward returns the outputs cached after it was distilled instead
  of computing them) and stops when block k is called; the replay costs the model's glue code (a
  UNet's skip connections, embeddings, reshapes) and nothing of the blocks, and works for any
  model whose forward calls its blocks as modules.
* After block k is distilled, its quantized outputs are computed once on its captured inputs and
  cached for the replays of the blocks after it.

Each block is expected to run once per forward (true of diffusers UNets and transformers); a block
called again in the same forward is refused rather than answered wrongly.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ..core.errors import CalibrationError
from ..core.inputs import Hook, forward_hooks
from ..system.progress import progress
from .blockstore import BlockStore
from .modules import QuantizedDenoiser
from .trajectories import CalibrationSet

FP, INPUTS, CACHED = "fp", "inputs", "cached"  # the kinds of values in the store


class _Stop(Exception):
    """Ends a forward pass as soon as the block of interest has been reached."""


def output_tensors(out: Any) -> list[torch.Tensor]:
    """Every tensor of a block output: a tensor, a tuple (transformer blocks return
    ``(encoder_hidden_states, hidden_states)``, the first possibly None), or a diffusers output."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        found = [t for o in out if o is not None for t in output_tensors(o)]
        if found:
            return found
    if hasattr(out, "sample"):
        return [out.sample]
    raise TypeError(f"cannot find a tensor in block output of type {type(out).__name__}")


def _called_twice(name: str) -> CalibrationError:
    return CalibrationError(f"block {name} runs more than once in one forward; "
                            "block-wise distillation caches one output per block",
                            hint="distill with --distill model, or report the model class")


@torch.no_grad()
def capture_targets(fp_denoiser: nn.Module, names: Sequence[str], calib: CalibrationSet,
                    batches: Sequence[torch.Tensor], store: BlockStore) -> None:
    """One FP forward per batch; every block's output tensors go to the store (kind ``fp``)."""
    index = {name: k for k, name in enumerate(names)}
    current = 0

    def post(name: str):
        def hook(mod, args, kwargs, out):
            if store.has(FP, index[name], current):
                raise _called_twice(name)
            store.put(FP, index[name], current, output_tensors(out))
        return hook

    hooks: list[Hook] = [(fp_denoiser.get_submodule(n), "post", post(n)) for n in names]
    with forward_hooks(hooks, with_kwargs=True):
        for current, idx in enumerate(progress(batches, len(batches), "distillation targets", unit="batch")):
            calib.batch(idx).call(fp_denoiser)


class _Replay:
    """While open, every block of ``modules`` returns its cached output of batch :attr:`batch`
    without computing (each block at most once per forward)."""

    def __init__(self, modules: Sequence[nn.Module], names: Sequence[str], store: BlockStore) -> None:
        self.modules, self.names, self.store = modules, names, store
        self.batch = 0
        self.called: set[int] = set()

    def start(self, batch: int) -> None:
        """Answer the next forward from batch ``batch``."""
        self.batch = batch
        self.called.clear()

    def _cached(self, j: int):
        def forward(*args, **kwargs):
            if j in self.called:
                raise _called_twice(self.names[j])
            self.called.add(j)
            return self.store.get(CACHED, j, self.batch)
        return forward

    @contextmanager
    def installed(self) -> Iterator[None]:
        """Shadow each block's ``forward`` for the ``with`` body (an instance attribute wins over the class's)."""
        try:
            for j, module in enumerate(self.modules):
                module.forward = self._cached(j)
            yield
        finally:
            for module in self.modules:
                module.__dict__.pop("forward", None)


@torch.no_grad()
def capture_inputs(qmodel: QuantizedDenoiser, names: Sequence[str], k: int, calib: CalibrationSet,
                   batches: Sequence[torch.Tensor], store: BlockStore) -> int:
    """Store block ``k``'s ``(args, kwargs)`` per batch (kind ``inputs``), replaying the quantized
    model with blocks ``0 .. k-1`` answered from the cache. Returns the number of batches that reached it."""
    modules = [qmodel.denoiser.get_submodule(n) for n in names[: k + 1]]
    replay = _Replay(modules[:k], names, store)

    def pre(mod, args, kwargs):
        store.put(INPUTS, k, replay.batch, (args, kwargs))
        raise _Stop

    with forward_hooks([(modules[k], "pre", pre)], with_kwargs=True), replay.installed():
        for i, idx in enumerate(batches):
            replay.start(i)
            try:
                calib.batch(idx).call(qmodel)
            except _Stop:
                pass
    return len(store.batches(INPUTS, k))


@torch.no_grad()
def cache_outputs(qmodel: QuantizedDenoiser, block: nn.Module, k: int, rows: Sequence[torch.Tensor],
                  store: BlockStore) -> None:
    """Run the (distilled) quantized block ``k`` once on each batch of its captured inputs and cache its output."""
    for i in store.batches(INPUTS, k):
        args, kwargs = store.get(INPUTS, k, i)
        store.put(CACHED, k, i, qmodel.run_rows(rows[i], block, *args, **kwargs))
