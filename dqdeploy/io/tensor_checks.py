"""Consistency checks of a quantized artifact's model and tensors against its manifest: the model
the manifest describes (built on the meta device), the weights file's header against it (names,
dtypes, shapes and packed sizes), the loaded tensors (finite values, integer ranges against the bit
widths) and the stored calibration inputs.

Every problem found is collected and reported in one :class:`~dqdeploy.core.errors.ArtifactError`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..core.errors import ArtifactError
from .validation import Problems, is_int

# a trained weight may lie beyond the clipping range: the clip search goes down to 0.3 of max-abs
# and training can shrink the step further; 8-bit weights relabelled 4-bit exceed this by far
WEIGHT_RANGE_SLACK = 2.0 / 0.3
# step sizes a quantizer can produce: not denormal or zero, and no weight beyond MAX_WEIGHT nor activation grid
# beyond MAX_ACTIVATION (the runtimes refuse inputs above 1e4; trained diffusion weights stay far below 1e3)
MIN_STEP, MAX_WEIGHT, MAX_ACTIVATION = 1e-20, 1e4, 1e7


def meta_model(cls: Any, config: dict[str, Any], where: Path) -> torch.nn.Module:
    """The model of ``config`` on the meta device: its structure and sizes, nothing allocated."""
    try:
        with torch.device("meta"):
            return cls.from_config(config)
    except Exception as exc:  # diffusers raises many types for impossible configs
        raise ArtifactError(f"{where}: model_config does not describe a {cls.__name__}: "
                            f"{type(exc).__name__}: {str(exc)[:200]}",
                            hint="re-run `dqdeploy quantize`") from None


def check_model_layers(model: torch.nn.Module, manifest, where: Path) -> None:
    """Every manifest layer, fold target and quantized attention exists in ``model`` (built on the meta device)
    with the right type."""
    from ..quant.attention import is_attention

    p = Problems(where, "dqdeploy quantize", "artifact (the manifest and the model it describes disagree)")
    modules = dict(model.named_modules())
    for name, meta in manifest.layers.items():
        layer = modules.get(name)
        kind = {torch.nn.Conv2d: "conv", torch.nn.Linear: "linear"}.get(type(layer))
        if not p.require(layer is not None, f"layer {name!r} does not exist in {manifest.model_class}"):
            continue
        p.require(kind == meta.kind, f"layer {name}: manifest kind {meta.kind!r}, the model has {type(layer).__name__}")
        if meta.fold != "mul":
            target = modules.get(meta.fold[5:])
            p.require(isinstance(target, (torch.nn.GroupNorm, torch.nn.LayerNorm))
                      and getattr(target, "weight", None) is not None,
                      f"layer {name}: fold target {meta.fold[5:]!r} is not an affine norm of the model")
    for name in manifest.attention:
        p.require(name in modules and is_attention(modules[name]),
                  f"quantized attention {name!r} is not an attention module of {manifest.model_class}")
    p.raise_if_any()


def check_header(expected: Mapping[str, tuple[str, tuple[int, ...]]], found: Mapping[str, tuple[str, tuple[int, ...]]],
                 where: Path) -> None:
    """Before loading: the weights file holds exactly the tensors of the model the manifest
    describes, with their dtypes and shapes (integer weights: int8 for 8-bit layers, uint8 packed
    two per byte for 4-bit ones, so the sizes follow from the bit widths)."""
    p = Problems(where, "dqdeploy quantize", "artifact (the manifest and the weights file disagree)")
    missing, extra = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    for key in missing:
        layer, _, stored = key.rpartition(".")
        other = f"{layer}.weight_int{'8' if stored == 'weight_int4' else '4'}"
        if stored.startswith("weight_int") and other in found:
            p.add(f"layer {layer}: the manifest says {stored[10:]}-bit weights ({key}), the file holds {other}")
    if not p.items:
        p.require(not missing, f"{len(missing)} tensors missing ({', '.join(missing[:4])})")
        p.require(not extra, f"{len(extra)} unexpected tensors ({', '.join(extra[:4])})")
    for key in sorted(set(expected) & set(found)):
        (want_dtype, want_shape), (dtype, shape) = expected[key], found[key]
        p.require(dtype == want_dtype, f"tensor {key} is {dtype}, expected {want_dtype}")
        p.require(shape == want_shape, f"tensor {key} has shape {list(shape)}, expected {list(want_shape)}")
        if len(p.items) > 20:
            break
    p.raise_if_any()


def check_state(state: Mapping[str, torch.Tensor], manifest, where: Path,
                shapes: Mapping[str, tuple[int, ...]]) -> None:
    """The loaded tensors: finite, non-zero finite scales, weights inside their bit width's range
    (integer weights by their dtype, plus the unused nibble of packed 4-bit ones; float weights of
    format version 1 by their ratio to the scale). ``shapes``: the model's, ``<layer>.weight``
    included."""
    from ..quant.attention import attention_scale_keys
    from ..quant.primitives import qrange
    from .storage import INT_KEYS, padding_nibble

    p = Problems(where, "dqdeploy quantize", "artifact (impossible tensor values)")
    for key, t in state.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            p.add(f"tensor {key} holds NaN or Inf")
    p.raise_if_any()
    for name, meta in manifest.layers.items():
        scale, act = state.get(f"{name}.weight_quantizer.scale"), state.get(f"{name}.input_quantizer.scale")
        weight, packed = state.get(f"{name}.weight"), state.get(f"{name}.{INT_KEYS[4]}")
        if scale is None or act is None:
            continue  # the header check reports missing tensors
        # steps are stored positive (storage.stored_state) and within what a weight or an activation can need
        out = state.get(f"{name}.output_scale")
        if not p.require(bool((scale > 0).all()) and bool((act > 0).all())
                         and (out is None or bool((out > 0).all())),
                         f"layer {name}: a step size is zero or negative (dqdeploy stores them positive)"):
            continue
        qmax_w, qmax_a = qrange(meta.weight_bits, True)[1], qrange(meta.act_bits, True)[1]
        if not p.require(MIN_STEP <= float(scale.min()) and float(scale.max()) * qmax_w <= MAX_WEIGHT
                         and MIN_STEP <= float(act.min()) and float(act.max()) * qmax_a <= MAX_ACTIVATION,
                         f"layer {name}: step sizes outside what any model needs "
                         f"(weight steps {float(scale.min()):.3g}..{float(scale.max()):.3g}, "
                         f"activation steps {float(act.min()):.3g}..{float(act.max()):.3g})"):
            continue
        if packed is not None:
            p.require(padding_nibble(packed, math.prod(shapes[f"{name}.weight"])) == 0,
                      f"layer {name}: the unused nibble of the packed 4-bit weights is not 0")
        if weight is None or scale.numel() != weight.shape[0]:
            continue
        qmax = qmax_w
        ratio = float((weight.float().reshape(weight.shape[0], -1).abs().amax(1) / scale.float().abs()).max())
        p.require(ratio <= (qmax + 1) * WEIGHT_RANGE_SLACK,
                  f"layer {name}: weights reach {ratio:.0f} steps, impossible for {meta.weight_bits}-bit weights "
                  f"(at most {qmax}); the bit width or the scales were changed")
        if len(p.items) > 20:
            break
    for key in attention_scale_keys(state):
        step = state[key]
        p.require(bool((step > 0).all()) and MIN_STEP <= float(step.min())
                  and float(step.max()) * 127 <= MAX_ACTIVATION,
                  f"{key}: attention step sizes outside what any model needs "
                  f"({float(step.min()):.3g}..{float(step.max()):.3g}; dqdeploy stores them positive)")
    p.raise_if_any()


def check_calibrated_size(manifest, header: Mapping[str, tuple[str, tuple[int, ...]]], where: Path) -> None:
    """A UNet's stored calibration inputs (safetensors header: name -> (dtype, shape)) have the latent
    size the manifest says it was calibrated at (``calibration.resolution``, else
    ``model_config.sample_size``)."""
    sample = header.get("sample")
    cfg = manifest.model_config
    size = manifest.calibration.get("resolution") or cfg.get("sample_size")
    hw = (size, size) if is_int(size) else tuple(size) if isinstance(size, list) else None
    if sample is None or hw is None or len(sample[1]) != 4:
        return
    p = Problems(where, "dqdeploy quantize", "artifact")
    p.require(tuple(sample[1][2:]) == hw,
              f"the calibration inputs are {sample[1][2]}x{sample[1][3]} latents, but the manifest "
              f"says the model was calibrated at {hw[0]}x{hw[1]} (sample_size or resolution was changed)")
    p.raise_if_any()


def check_calibration_inputs(calib: Mapping[str, torch.Tensor], manifest, where: Path) -> None:
    """The artifact's calibration inputs match the model: [N, C, H, W] samples (H = W = the
    calibrated resolution, else the config's sample_size), [N] finite time steps, [N, S, D]
    conditioning for conditional models, N >= 1."""
    p = Problems(where, "dqdeploy quantize", "calibration inputs")
    cfg = manifest.model_config
    size = manifest.calibration.get("resolution") or cfg.get("sample_size")  # `quantize --resolution` wins
    hw = (size, size) if is_int(size) else tuple(size) if isinstance(size, list) else None
    sample, t = calib.get("sample", calib.get("hidden_states")), calib.get("timestep")
    if sample is None or t is None:
        p.add("the model input and timestep are required")
        p.raise_if_any()
        return
    if "sample" not in calib:  # transformers: token or latent layouts differ per family; check the batch only
        n = sample.shape[0] if sample.dim() else 0
        p.require(n >= 1, "the model input is empty")  # Flux's position ids have no batch axis
        for key, value in calib.items():
            if value.is_floating_point() and not torch.isfinite(value).all():
                p.add(f"{key} holds NaN or Inf")
        p.raise_if_any()
        return
    n = sample.shape[0] if sample.dim() == 4 else -1
    p.require(n >= 1 and tuple(sample.shape[1:]) == (cfg.get("in_channels"), *(hw or ())),
              f"sample has shape {tuple(sample.shape)}, expected [N>=1, {cfg.get('in_channels')}, {hw}]")
    p.require(t.dim() == 1 and t.shape[0] == n and bool(torch.isfinite(t).all()),
              f"timestep has shape {tuple(t.shape)}, expected [{n}] finite")
    cond = calib.get("encoder_hidden_states")
    dim = cfg.get("cross_attention_dim")
    if dim is not None:
        p.require(cond is not None and cond.dim() == 3 and cond.shape[0] == n and cond.shape[2] == dim,
                  f"encoder_hidden_states must be [{n}, S, {dim}], found {None if cond is None else tuple(cond.shape)}")
    for key, value in calib.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            p.add(f"{key} holds NaN or Inf")
    p.raise_if_any()
