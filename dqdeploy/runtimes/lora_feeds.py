"""The inputs of an export's LoRA slots (:mod:`dqdeploy.exporters.lora_slots`) for a set of adapters: several adapters
add up exactly by stacking their ranks (along each input's rank axis); a slot no adapter uses gets rank-1 zeros, so
its branch adds nothing."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..core.errors import DQDeployError
from ..quant.lora import LoraLayer
from .spec import ExportSpec


def require_slots(spec: ExportSpec) -> None:
    """Refuse an adapter for an export without LoRA slots, saying how to get one."""
    if not spec.lora_slots:
        raise DQDeployError("this export has no LoRA slots",
                            hint="export with `dqdeploy export Q --lora-slots LORA_FILE` (or `attention`), or fold "
                                 "the LoRA into the artifact (`dqdeploy lora`) and export that")


class SlotLayers(torch.nn.Module):
    """What :func:`~dqdeploy.io.lora.read_lora` checks a LoRA file against, built from an export's slots: one Linear
    or Conv2d (on the meta device) per slot."""

    def __init__(self, spec: ExportSpec) -> None:
        super().__init__()
        for slot in spec.lora_slots:
            parent = self
            *path, leaf = slot["layer"].split(".")
            for part in path:
                if not hasattr(parent, part):
                    parent.add_module(part, torch.nn.Module())
                parent = getattr(parent, part)
            conv = slot.get("conv")
            parent.add_module(leaf, torch.nn.Linear(slot["in"], slot["out"], bias=False, device="meta") if conv is None
                              else _meta_conv(slot["in"], slot["out"], conv))


def _meta_conv(c_in: int, c_out: int, conv: dict[str, list[int]]) -> torch.nn.Conv2d:
    """A conv slot's layer on the meta device, with the geometry the export recorded."""
    def pair(key: str) -> tuple[int, int]:
        return int(conv[key][0]), int(conv[key][1])

    return torch.nn.Conv2d(c_in, c_out, kernel_size=pair("kernel"), stride=pair("stride"), padding=pair("padding"),
                           dilation=pair("dilation"), bias=False, device="meta")


def adapter_feeds(spec: ExportSpec, lora: Any, source: str) -> dict[str, np.ndarray]:
    """What a runtime feeds its LoRA slots for ``lora`` (``FILE``, ``(FILE, scale)``, a list of them, or None: rank-1
    zeros), each file checked against the slots (:class:`SlotLayers`); ``{}`` for an export without slots."""
    from ..io.lora import lora_list, read_lora

    if lora is not None:
        require_slots(spec)
    if not spec.lora_slots:
        return {}
    skeleton = SlotLayers(spec)
    adapters = [] if lora is None else [(read_lora(path, skeleton, slots_of=source).layers, scale)
                                        for path, scale in lora_list(lora)]
    return lora_feeds(spec, adapters, np.float16 if spec.precision == "fp16" else np.float32)


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
