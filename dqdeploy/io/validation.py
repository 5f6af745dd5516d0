"""Schema checks of what dqdeploy reads back, before anything is allocated: quantized-artifact
manifests (types, sizes, names, bit widths, finite time steps, the recipe they claim) and export
specs (I/O, shapes, time steps). The checks of an artifact's tensors against its manifest are in
:mod:`dqdeploy.io.tensor_checks`.

Every problem found is collected and reported in one :class:`~dqdeploy.core.errors.ArtifactError`.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from ..core.errors import ArtifactError, DQDeployError

MODULE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*\Z")
SHA256 = re.compile(r"[0-9a-f]{64}\Z")
MAX_CONFIG_BYTES = 1 << 16
MAX_TIMESTEPS = 10_000
MAX_LAYERS = 100_000
LAYER_KINDS = ("conv", "linear")
WEIGHT_BITS, ACT_BITS = (4, 7, 8), (4, 8)


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
    from ..core.denoisers import SPECS
    from ..core.denoisers import SUPPORTED as SUPPORTED_UNETS
    from ..core.recipe import CalibrationConfig, Recipe

    p = Problems(where, "dqdeploy quantize", "manifest")
    missing = sorted({"recipe", "calibration", "model_class", "model_config", "timesteps", "layers", "files"}
                     - set(data))
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
    p.require(data["model_class"] in SUPPORTED_UNETS,
              f"model_class {data['model_class']!r} is not one of {SUPPORTED_UNETS}")
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
                isinstance(b.get(k), (int, float)) and not isinstance(b.get(k), bool)
                for k in ("loss_before", "loss_after"))
            if not p.require(ok, f"blocks entry {str(b)[:80]} is not {{name, loss_before, loss_after}}"):
                break
    p.require(isinstance(data.get("dqdeploy_version", ""), str), "dqdeploy_version must be a string")
    _check_lora(p, data.get("lora", []))
    _check_attention(p, data.get("attention", []), recipe)
    _check_quality(p, data.get("quality"))
    p.raise_if_any()


def _check_attention(p: Problems, names: Any, recipe) -> None:
    """``attention``: the attention modules with quantized matmul inputs (recipe ``attention="int8"``)."""
    if not p.require(isinstance(names, list) and len(names) <= MAX_LAYERS
                     and all(isinstance(n, str) and MODULE_NAME.match(n) for n in names),
                     "attention must be a list of module names"):
        return
    if recipe is not None:
        p.require(bool(names) == (recipe.attention == "int8"),
                  f"recipe attention {recipe.attention!r} but {len(names)} quantized attention modules listed")


def _check_lora(p: Problems, entries: Any) -> None:
    """``lora``: the LoRA files folded into the weights (``dqdeploy lora``)."""
    if not p.require(isinstance(entries, list), "lora must be a list"):
        return
    for e in entries:
        ok = (isinstance(e, dict) and set(e) == {"file", "sha256", "scale", "layers"} and isinstance(e["file"], str)
              and isinstance(e["sha256"], str) and bool(SHA256.match(e["sha256"]))
              and isinstance(e["scale"], (int, float)) and not isinstance(e["scale"], bool)
              and math.isfinite(e["scale"]) and isinstance(e["layers"], int) and e["layers"] > 0)
        if not p.require(ok, f"lora entry {str(e)[:80]} is not {{file, sha256, scale, layers}}"):
            return


QUALITY_NUMBERS = ("mean_rel_err", "worst_rel_err", "mean_snr_db", "mean_cosine")


def _check_quality(p: Problems, quality: Any) -> None:
    """``quality`` (optional): the quantize stage's per-step denoiser error, a small object of finite figures."""
    if quality is None or not p.require(isinstance(quality, dict), "quality must be a JSON object"):
        return
    p.require(_json_size(quality) <= MAX_CONFIG_BYTES, f"quality is larger than {MAX_CONFIG_BYTES} bytes")
    bad = [k for k in QUALITY_NUMBERS if not is_number(quality.get(k))]
    p.require(not bad, f"quality must hold finite numbers {list(QUALITY_NUMBERS)}; {bad} are not")
    p.require(isinstance(quality.get("at_risk", False), bool), "quality.at_risk must be true or false")


def _check_layers(p: Problems, layers: Any, fields: set[str], recipe, ends: tuple[str, str] | None) -> None:
    if not p.require(isinstance(layers, dict) and 0 < len(layers) <= MAX_LAYERS,
                     f"layers must be a non-empty object of at most {MAX_LAYERS} layers"):
        return
    for name, meta in layers.items():
        if len(p.items) > 20:
            return
        if not p.require(bool(MODULE_NAME.match(name)), f"layer name {name!r} is not a module name"):
            continue
        if not p.require(isinstance(meta, dict) and set(meta) <= fields
                         and {"kind", "weight_bits", "act_bits"} <= set(meta),
                         f"layer {name}: expected an object with keys {sorted(fields)}"):
            continue
        p.require(meta["kind"] in LAYER_KINDS, f"layer {name}: kind {meta['kind']!r} (expected conv or linear)")
        for key, allowed in (("weight_bits", WEIGHT_BITS), ("act_bits", ACT_BITS)):
            p.require(is_int(meta.get(key)) and meta.get(key) in allowed,
                      f"layer {name}: {key}={meta.get(key)!r} "
                      f"(expected {', '.join(map(str, allowed[:-1]))} or {allowed[-1]})")
        for key in ("act_symmetric", "output_quant"):
            p.require(isinstance(meta.get(key, False), bool), f"layer {name}: {key} must be true or false")
        p.require(isinstance(meta.get("group"), str), f"layer {name}: group must be a string")
        fold = meta.get("fold")
        p.require(fold == "mul"
                  or (isinstance(fold, str) and fold.startswith("norm:") and bool(MODULE_NAME.match(fold[5:]))),
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


# -- export specs ---------------------------------------------------------------------------------


def _check_slots(p: Problems, slots: Any) -> None:
    """``lora_slots`` of an export spec: the graph inputs of each adapted layer's branch."""
    if not p.require(isinstance(slots, list) and len(slots) <= MAX_LAYERS, "lora_slots must be a list"):
        return
    for slot in slots:
        ok = (isinstance(slot, dict) and set(slot) - {"conv"} == {"layer", "down", "up", "in", "out"}
              and all(isinstance(slot[k], str) for k in ("layer", "down", "up"))
              and bool(MODULE_NAME.match(slot["layer"]))
              and all(is_int(slot[k]) and slot[k] > 0 for k in ("in", "out"))
              and ("conv" not in slot or _conv_geometry_ok(slot["conv"])))
        if not p.require(ok, f"lora_slots entry {str(slot)[:80]} is not {{layer, down, up, in, out[, conv]}}"):
            return


def _conv_geometry_ok(conv: Any) -> bool:
    """A conv slot's ``{kernel, stride, padding, dilation}``: pairs of ints (padding >= 0, the others >= 1)."""
    return (isinstance(conv, dict) and set(conv) == {"kernel", "stride", "padding", "dilation"}
            and all(isinstance(v, list) and len(v) == 2
                    and all(is_int(x) and x >= (0 if k == "padding" else 1) for x in v) for k, v in conv.items()))


def check_spec(data: dict[str, Any], where: Path, allowed_keys: set[str]) -> None:
    """Schema of an export spec dict (after its format and seal were checked)."""
    from ..core.denoisers import SUPPORTED as SUPPORTED_UNETS
    from ..core.vocab import GRAPH_TARGETS, INT8_FORMATS

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
    for key, unit in (("resolution_range", "latent pixels"), ("text_length_range", "text tokens")):
        rr = data.get(key)
        p.require(rr is None or (isinstance(rr, list) and len(rr) == 2 and all(is_int(v) and v > 0 for v in rr)
                                 and rr[0] <= rr[1]),
                  f"{key} {rr!r} (expected [MIN, MAX] {unit})")
    fmt = data.get("int8_format")
    p.require(fmt is None or (fmt in INT8_FORMATS and data["target"] == "ort"),
              f"int8_format {fmt!r} (expected one of {INT8_FORMATS}, on an ort-target graph only)")
    _check_slots(p, data.get("lora_slots", []))
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
                ok = (isinstance(rec, dict) and set(rec) == {"sha256", "size"} and is_int(rec["size"])
                      and rec["size"] >= 0)
                p.require(ok, f"files[{name!r}] must be {{sha256, size}}")
                if ok:
                    check_digest(rec["sha256"], f"files[{name!r}]")
            except ArtifactError as exc:
                p.add(str(exc).splitlines()[0])
    p.raise_if_any()
