"""The inputs of an export's LoRA slots (:mod:`dqdeploy.exporters.lora_slots`) for a set of adapters: several adapters
add up exactly by stacking their ranks (along each input's rank axis); a slot no adapter uses gets rank-1 zeros, so
its branch adds nothing."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..core.errors import DQDeployError
from ..quant.lora import LoraLayer
from .spec import ExportSpec


def require_slots(spec: ExportSpec) -> None:
    """Refuse an adapter for an export without LoRA slots, saying how to get one."""
    if not spec.lora_slots:
        raise DQDeployError("this export has no LoRA slots",
                            hint="export with `dqdeploy export Q --lora-slots LORA_FILE` (or `attention`), or fold "
                                 "the LoRA into the artifact (`dqdeploy lora`) and export that")


def lora_feeds(spec: ExportSpec, adapters: Sequence[tuple[dict[str, LoraLayer], float]], dtype: Any = np.float32
               ) -> dict[str, np.ndarray]:
    """Graph inputs for ``adapters`` (per adapter: its layers and scale) on ``spec``'s slots."""
    slots = {s["layer"]: s for s in spec.lora_slots}
    used = {name for layers, _ in adapters for name in layers}
    if used:
        require_slots(spec)
    missing = sorted(used - set(slots))
    if missing:
        raise DQDeployError(f"{len(missing)} adapted layer(s) have no LoRA slot in this export (first: {missing[0]})",
                            hint="export with --lora-slots naming this LoRA file (or `attention`)")
    feeds = {}
    for name, slot in slots.items():
        used_here = [(layer, scale) for layers, scale in adapters if (layer := layers.get(name)) is not None]
        down, up = _slot_inputs(slot, used_here)
        feeds[slot["down"]], feeds[slot["up"]] = down.astype(dtype), up.astype(dtype)
    return feeds


def _slot_inputs(slot: dict[str, Any], used: list[tuple[LoraLayer, float]]) -> tuple[np.ndarray, np.ndarray]:
    """One slot's ``down`` and ``up`` for its adapters (rank-1 zeros for none): a Linear's [in, r] and [r, out], a
    convolution's [r, in, kh, kw] and [out, r, 1, 1]."""
    conv = slot.get("conv")
    if conv is None:
        downs = [layer.down.numpy().T for layer, _ in used]
        ups = [(scale * layer.alpha_scale * layer.up.numpy()).T for layer, scale in used]
        return (np.concatenate(downs, axis=1) if downs else np.zeros((slot["in"], 1)),
                np.concatenate(ups, axis=0) if ups else np.zeros((1, slot["out"])))
    downs = [layer.down.numpy() for layer, _ in used]
    ups = [(scale * layer.alpha_scale * layer.up.numpy())[:, :, None, None] for layer, scale in used]
    return (np.concatenate(downs, axis=0) if downs else np.zeros((1, slot["in"], *conv["kernel"])),
            np.concatenate(ups, axis=1) if ups else np.zeros((slot["out"], 1, 1, 1)))
