"""Schema and consistency checks of what dqdeploy reads back, before anything is allocated:
quantized-artifact manifests (types, sizes, names, bit widths, finite time steps, the recipe they
claim) and their tensors (the weights file's header against the model the config describes: names,
dtypes, shapes and packed sizes; finite values, integer ranges against the bit widths), and export
specs (I/O, shapes, time steps).

Every problem found is collected and reported in one :class:`~dqdeploy.errors.ArtifactError`.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .errors import ArtifactError, DQDeployError

MODULE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*\Z")
MAX_CONFIG_BYTES = 1 << 16
MAX_TIMESTEPS = 10_000
MAX_LAYERS = 100_000
LAYER_KINDS = ("conv", "linear")
WEIGHT_BITS, ACT_BITS = (4, 7, 8), (4, 8)
# a trained weight may lie beyond the clipping range: the clip search goes down to 0.3 of max-abs
# and training can shrink the step further; 8-bit weights relabelled 4-bit exceed this by far
WEIGHT_RANGE_SLACK = 2.0 / 0.3
# step sizes a quantizer can produce: not denormal or zero, and no weight beyond MAX_WEIGHT nor activation grid
# beyond MAX_ACTIVATION (the runtimes refuse inputs above 1e4; trained diffusion weights stay far below 1e3)
MIN_STEP, MAX_WEIGHT, MAX_ACTIVATION = 1e-20, 1e4, 1e7


class Problems:
    """Collects schema problems and raises them together."""

    def __init__(self, where: Path | str, command: str, what: str = "metadata") -> None:
        self.where, self.command, self.what = where, command, what
        self.items: list[str] = []

    def add(self, message: str) -> None:
        self.items.append(message)

    def require(self, ok: bool, message: str) -> bool:
        if not ok:
            self.add(message)
        return ok

    def raise_if_any(self) -> None:
        if self.items:
            shown = "; ".join(self.items[:8]) + (f"; and {len(self.items) - 8} more" if len(self.items) > 8 else "")
            raise ArtifactError(f"{self.where}: malformed {self.what}: {shown}",
                                hint=f"re-run `{self.command}` (dqdeploy never loads hand-edited metadata)")


def is_int(value: Any) -> bool:
    """An integer that is not a bool (JSON ``true`` is not a bit width)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """A finite int or float that is not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _json_size(value: Any) -> int:
    try:
        return len(json.dumps(value))
    except (TypeError, ValueError, RecursionError):
        return MAX_CONFIG_BYTES + 1


def check_config(p: Problems, name: str, value: Any) -> None:
    """A config dict (model or scheduler) of bounded size."""
    if p.require(isinstance(value, dict), f"{name} must be a JSON object, found {type(value).__name__}"):
        p.require(_json_size(value) <= MAX_CONFIG_BYTES, f"{name} is larger than {MAX_CONFIG_BYTES} bytes")


def check_timesteps(p: Problems, value: Any, *, allow_empty: bool = False) -> None:
    """A bounded list of finite numbers (at least one unless ``allow_empty``)."""
    if not p.require(isinstance(value, list), f"timesteps must be a list of numbers, found {type(value).__name__}"):
        return
    p.require(allow_empty or len(value) >= 1, "timesteps is empty (at least one calibrated step is needed)")
    p.require(len(value) <= MAX_TIMESTEPS, f"timesteps has {len(value)} entries (at most {MAX_TIMESTEPS})")
    bad = [v for v in value if not is_number(v)]
    p.require(not bad, f"timesteps must be finite numbers, found {bad[:3]!r}")


# -- manifests ------------------------------------------------------------------------------------


def check_manifest(data: dict[str, Any], where: Path, allowed_keys: set[str], layer_fields: set[str]) -> None:
    """Schema of a manifest dict (after its format and seal were checked)."""
    from .denoisers import SPECS
    from .denoisers import SUPPORTED as SUPPORTED_UNETS
    from .recipe import CalibrationConfig, Recipe

    p = Problems(where, "dqdeploy quantize", "manifest")
    missing = sorted({"recipe", "calibration", "model_class", "model_config", "timesteps", "layers", "files"} - set(data))
    extra = sorted(set(data) - allowed_keys)
    p.require(not missing, f"missing keys {missing}")
    p.require(not extra, f"unknown keys {extra}")
    p.raise_if_any()
    recipe = None
    try:
        recipe = Recipe.from_dict(data["recipe"])
    except DQDeployError as exc:
        p.add(f"recipe: {str(exc).splitlines()[0]}")
    except TypeError as exc:
        p.add(f"recipe: {exc}")
    try:
        if p.require(isinstance(data["calibration"], dict), "calibration must be a JSON object"):
            CalibrationConfig(**data["calibration"])
    except (DQDeployError, TypeError) as exc:
        p.add(f"calibration: {str(exc).splitlines()[0]}")
    p.require(data["model_class"] in SUPPORTED_UNETS, f"model_class {data['model_class']!r} is not one of {SUPPORTED_UNETS}")
    check_config(p, "model_config", data["model_config"])
    check_config(p, "scheduler_config", data.get("scheduler_config", {}))
    check_timesteps(p, data["timesteps"])
    ends = SPECS[data["model_class"]].ends if data["model_class"] in SPECS else None
    _check_layers(p, data["layers"], layer_fields, recipe, ends)
    _check_files(p, data["files"])
    blocks = data.get("blocks", [])
    if p.require(isinstance(blocks, list), "blocks must be a list"):
        for b in blocks:
            ok = isinstance(b, dict) and isinstance(b.get("name"), str) and all(
                isinstance(b.get(k), (int, float)) and not isinstance(b.get(k), bool) for k in ("loss_before", "loss_after"))
            if not p.require(ok, f"blocks entry {str(b)[:80]} is not {{name, loss_before, loss_after}}"):
                break
    p.require(isinstance(data.get("dqdeploy_version", ""), str), "dqdeploy_version must be a string")
    p.raise_if_any()


def _check_layers(p: Problems, layers: Any, fields: set[str], recipe, ends: tuple[str, str] | None) -> None:
    if not p.require(isinstance(layers, dict) and 0 < len(layers) <= MAX_LAYERS,
                     f"layers must be a non-empty object of at most {MAX_LAYERS} layers"):
        return
    for name, meta in layers.items():
        if len(p.items) > 20:
            return
        if not p.require(bool(MODULE_NAME.match(name)), f"layer name {name!r} is not a module name"):
            continue
        if not p.require(isinstance(meta, dict) and set(meta) <= fields and {"kind", "weight_bits", "act_bits"} <= set(meta),
                         f"layer {name}: expected an object with keys {sorted(fields)}"):
            continue
        p.require(meta["kind"] in LAYER_KINDS, f"layer {name}: kind {meta['kind']!r} (expected conv or linear)")
        for key, allowed in (("weight_bits", WEIGHT_BITS), ("act_bits", ACT_BITS)):
            p.require(is_int(meta.get(key)) and meta.get(key) in allowed,
                      f"layer {name}: {key}={meta.get(key)!r} (expected {', '.join(map(str, allowed[:-1]))} or {allowed[-1]})")
        for key in ("act_symmetric", "output_quant"):
            p.require(isinstance(meta.get(key, False), bool), f"layer {name}: {key} must be true or false")
        p.require(isinstance(meta.get("group"), str), f"layer {name}: group must be a string")
        fold = meta.get("fold")
        p.require(fold == "mul" or (isinstance(fold, str) and fold.startswith("norm:") and bool(MODULE_NAME.match(fold[5:]))),
                  f"layer {name}: fold {fold!r} (expected 'mul' or 'norm:<module>')")
        if recipe is not None:
            bits = recipe.weight_bits_for(name, *(ends,) if ends else ())
            p.require(meta.get("weight_bits") == bits,
                      f"layer {name}: weight_bits {meta.get('weight_bits')!r} contradicts the recipe ({bits})")
            end = recipe.is_end(name, *(ends,) if ends else ())
            act_bits = {recipe.act_bits_for(name, *(ends,) if ends else ())} | ({recipe.act_bits} if end else set())
            # (artifacts written before the 8-bit end activations quantized the ends at act_bits: still valid)
            p.require(meta.get("act_bits") in act_bits and meta.get("act_symmetric") == recipe.act_symmetric,
                      f"layer {name}: activation quantizer contradicts the recipe")
            p.require(not meta.get("output_quant") or recipe.layout == "ort",
                      f"layer {name}: output_quant is only written for layout 'ort'")


def _check_files(p: Problems, files: Any) -> None:
    from .integrity import check_digest, check_file_name

    if not p.require(isinstance(files, dict), "files must be an object of file name -> sha256"):
        return
    for name, digest in files.items():
        try:
            check_file_name(name, "manifest")
            check_digest(digest, f"files[{name!r}]")
        except ArtifactError as exc:
            p.add(str(exc).splitlines()[0])


# -- the model a manifest describes ------------------------------------------------------------


def meta_model(cls: Any, config: dict[str, Any], where: Path) -> torch.nn.Module:
    """The model of ``config`` on the meta device: its structure and sizes, nothing allocated."""
    try:
        with torch.device("meta"):
            return cls.from_config(config)
    except Exception as exc:  # diffusers raises many types for impossible configs
        raise ArtifactError(f"{where}: model_config does not describe a {cls.__name__}: {type(exc).__name__}: {str(exc)[:200]}",
                            hint="re-run `dqdeploy quantize`") from None


def check_model_layers(model: torch.nn.Module, manifest, where: Path) -> None:
    """Every manifest layer and fold target exists in ``model`` (built on the meta device) with the
    right type."""
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
            p.require(isinstance(target, (torch.nn.GroupNorm, torch.nn.LayerNorm)) and getattr(target, "weight", None) is not None,
                      f"layer {name}: fold target {meta.fold[5:]!r} is not an affine norm of the model")
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


def check_state(state: Mapping[str, torch.Tensor], manifest, where: Path, shapes: Mapping[str, tuple[int, ...]]) -> None:
    """The loaded tensors: finite, non-zero finite scales, weights inside their bit width's range
    (integer weights by their dtype, plus the unused nibble of packed 4-bit ones; float weights of
    format version 1 by their ratio to the scale). ``shapes``: the model's, ``<layer>.weight`` included."""
    from .quant.primitives import qrange
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
        if not p.require(bool((scale > 0).all()) and bool((act > 0).all()) and (out is None or bool((out > 0).all())),
                         f"layer {name}: a step size is zero or negative (dqdeploy stores them positive)"):
            continue
        qmax_w, qmax_a = qrange(meta.weight_bits, True)[1], qrange(meta.act_bits, True)[1]
        if not p.require(MIN_STEP <= float(scale.min()) and float(scale.max()) * qmax_w <= MAX_WEIGHT
                         and MIN_STEP <= float(act.min()) and float(act.max()) * qmax_a <= MAX_ACTIVATION,
                         f"layer {name}: step sizes outside what any model needs (weight steps {float(scale.min()):.3g}.."
                         f"{float(scale.max()):.3g}, activation steps {float(act.min()):.3g}..{float(act.max()):.3g})"):
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
    p.raise_if_any()


def check_calibrated_size(manifest, header: Mapping[str, tuple[str, tuple[int, ...]]], where: Path) -> None:
    """A UNet's stored calibration inputs (safetensors header: name -> (dtype, shape)) have the latent size the manifest
    says it was calibrated at (``calibration.resolution``, else ``model_config.sample_size``)."""
    sample = header.get("sample")
    cfg = manifest.model_config
    size = manifest.calibration.get("resolution") or cfg.get("sample_size")
    hw = (size, size) if is_int(size) else tuple(size) if isinstance(size, list) else None
    if sample is None or hw is None or len(sample[1]) != 4:
        return
    p = Problems(where, "dqdeploy quantize", "artifact")
    p.require(tuple(sample[1][2:]) == hw, f"the calibration inputs are {sample[1][2]}x{sample[1][3]} latents, but the manifest "
                                          f"says the model was calibrated at {hw[0]}x{hw[1]} (sample_size or resolution was changed)")
    p.raise_if_any()


def check_calibration_inputs(calib: Mapping[str, torch.Tensor], manifest, where: Path) -> None:
    """The artifact's calibration inputs match the model: [N, C, H, W] samples (H = W = the
    calibrated resolution, else the config's sample_size), [N] finite time steps, [N, S, D] conditioning for conditional models, N >= 1."""
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
    p.require(t.dim() == 1 and t.shape[0] == n and bool(torch.isfinite(t).all()), f"timestep has shape {tuple(t.shape)}, expected [{n}] finite")
    cond = calib.get("encoder_hidden_states")
    dim = cfg.get("cross_attention_dim")
    if dim is not None:
        p.require(cond is not None and cond.dim() == 3 and cond.shape[0] == n and cond.shape[2] == dim,
                  f"encoder_hidden_states must be [{n}, S, {dim}], found {None if cond is None else tuple(cond.shape)}")
    for key, value in calib.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            p.add(f"{key} holds NaN or Inf")
    p.raise_if_any()


# -- export specs ---------------------------------------------------------------------------------


def check_spec(data: dict[str, Any], where: Path, allowed_keys: set[str]) -> None:
    """Schema of an export spec dict (after its format and seal were checked)."""
    from .denoisers import SUPPORTED as SUPPORTED_UNETS
    from .vocab import GRAPH_TARGETS, INT8_FORMATS

    p = Problems(where, "dqdeploy export", "export spec")
    required = {"target", "precision", "opset", "model_class", "model_config", "inputs", "outputs", "files"}
    p.require(not (required - set(data)), f"missing keys {sorted(required - set(data))}")
    p.require(not (set(data) - allowed_keys), f"unknown keys {sorted(set(data) - allowed_keys)}")
    p.raise_if_any()
    p.require(data["target"] in GRAPH_TARGETS, f"target {data['target']!r} (expected one of {GRAPH_TARGETS})")
    p.require(data["precision"] in ("fp32", "fp16"), f"precision {data['precision']!r}")
    p.require(is_int(data["opset"]) and 7 <= data["opset"] <= 30, f"opset {data['opset']!r}")
    p.require(data["model_class"] in SUPPORTED_UNETS, f"model_class {data['model_class']!r}")
    check_config(p, "model_config", data["model_config"])
    if isinstance(data["model_config"], dict) and str(data["model_class"]).startswith("UNet"):
        size: Any = data["model_config"].get("sample_size")
        sizes = size if isinstance(size, list) and len(size) == 2 else [size]
        p.require(all(is_int(v) and v > 0 for v in sizes),
                  f"model_config.sample_size {size!r} (expected a positive integer or [height, width])")
        p.require(is_int(data["model_config"].get("in_channels")), "model_config.in_channels must be an integer")
    if data.get("scheduler_config") is not None:
        check_config(p, "scheduler_config", data["scheduler_config"])
    check_timesteps(p, data.get("timesteps", []), allow_empty=data["target"] == "float")
    rr = data.get("resolution_range")
    p.require(rr is None or (isinstance(rr, list) and len(rr) == 2 and all(is_int(v) and v > 0 for v in rr) and rr[0] <= rr[1]),
              f"resolution_range {rr!r} (expected [MIN, MAX] latent pixels)")
    fmt = data.get("int8_format")
    p.require(fmt is None or (fmt in INT8_FORMATS and data["target"] == "ort"),
              f"int8_format {fmt!r} (expected one of {INT8_FORMATS}, on an ort-target graph only)")
    for key in ("inputs", "outputs"):
        tensors = data[key]
        if not p.require(isinstance(tensors, list) and 0 < len(tensors) <= 8, f"{key} must be a non-empty list"):
            continue
        for t in tensors:
            ok = isinstance(t, dict) and set(t) == {"name", "shape", "dtype"} and isinstance(t["name"], str) \
                and isinstance(t["dtype"], str) and isinstance(t["shape"], list) and len(t["shape"]) <= 8 \
                and all((is_int(d) and d >= 0) or (isinstance(d, str) and len(d) < 64) for d in t["shape"])
            p.require(ok, f"{key}: {str(t)[:80]} is not {{name, shape: [int|str], dtype}}")
    files = data["files"]
    if p.require(isinstance(files, dict) and any(str(k).endswith("/model.onnx") for k in files),
                 "files must list the exported files (unet/ or transformer/model.onnx at least)"):
        from .integrity import check_digest, check_file_name

        for name, rec in files.items():
            try:
                check_file_name(name, "export spec", nested=True)
                ok = isinstance(rec, dict) and set(rec) == {"sha256", "size"} and is_int(rec["size"]) and rec["size"] >= 0
                p.require(ok, f"files[{name!r}] must be {{sha256, size}}")
                if ok:
                    check_digest(rec["sha256"], f"files[{name!r}]")
            except ArtifactError as exc:
                p.add(str(exc).splitlines()[0])
    p.raise_if_any()
