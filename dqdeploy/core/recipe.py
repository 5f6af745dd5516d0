"""Recipes: frozen, validated, versioned quantization configs with presets and a JSON round trip."""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .errors import RecipeError
from .vocab import LAYOUTS, SCALINGS, Layout, Scaling

RECIPE_VERSION = 1
WEIGHT_BITS = (4, 7, 8)  # 7: int8 weights within [-64, 63], exact on every CPU's u8s8 kernel (dqdeploy.system.cpu)
ACT_BITS = (4, 8)
UNET_ENDS = ("conv_in", "conv_out")  # a UNet's first and last layer
TimestepScales = Literal["per-step", "collapsed"]
DistillMode = Literal["block", "model", "none"]
ActInit = Literal["mse", "minmax"]
AttentionMode = Literal["float", "int8"]
TIMESTEP_SCALES = ("per-step", "collapsed")
DISTILL_MODES = ("block", "model", "none")
ACT_INITS = ("mse", "minmax")
ATTENTION_MODES = ("float", "int8")
LEGACY_KEYS = {"dilation": "scaling"}  # recipe JSON and manifests written before the rename
# fields added after version 1, omitted from to_dict at their default
LATER_KEYS: dict[str, Any] = {"act8_layers": (), "fallback_time": None, "attention": "float",
                              "fallback_candidates": None}


@dataclass(frozen=True)
class Recipe:
    """What to quantize and how. Layer selection uses wildcard module names (``fnmatch``)."""

    name: str = "w8a8"
    weight_bits: int = 8
    act_bits: int = 8
    act_symmetric: bool = True
    first_last_bits: int | None = 8  # conv_in / conv_out weights; None keeps weight_bits
    # the first and last layer; conv_in / conv_out also stand for a transformer's own (DenoiserSpec.ends)
    first_last: tuple[str, ...] = UNET_ENDS
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    scaling: Scaling = "wd"  # equivalent scaling: "wd" (Weight Dilation) | "smoothquant" | "none" (--scaling)
    smoothquant_alpha: float = 0.5
    timestep_scales: TimestepScales = "per-step"  # "per-step" (TPQ) | "collapsed" (one scale for all steps)
    act_init: ActInit = "mse"
    distill: DistillMode = "block"  # "block" (BKD) | "model" (whole-model distillation) | "none" (PTQ)
    # deployment layout the simulation reproduces exactly: "trt" (input Q/DQ only) or "ort" (convs
    # and token matmuls also quantize their output, as ONNX Runtime's fused QLinearConv does)
    # the default artifact is exact for both graphs (the TensorRT one carries the output Q/DQ too)
    layout: Layout = "ort"
    iters: int = 300  # per block (or total, for distill="model")
    batch_size: int = 32
    lr_weight: float = 1e-5
    lr_quant: float = 1e-4
    # layers kept in float (no Q/DQ in either graph): "auto" (the most costly by sensitivity, within
    # fallback_budget of the MACs), "none", or comma-separated module-name patterns
    fallback: str = "auto"
    fallback_budget: float = 0.05
    # "auto": seconds after which the sensitivity search stops, the layers not scored stay quantized (None: no limit)
    fallback_time: float | None = None
    # "auto": how many layers the leave-one-out search scores, those a first-order screen ranks highest (None: every
    # layer of a model with at most 192 quantized layers, else 32; dqdeploy.quant.fallback)
    fallback_candidates: int | None = None
    # layers whose input activations keep 8 bits (wildcard module names): mixed precision for act_bits=4
    act8_layers: tuple[str, ...] = ()
    # "int8": both batched matmuls of every attention the recipe selects take quantized inputs -- q, k, v with
    # per-step scales at act_bits, the softmax output on a fixed 8-bit grid (dqdeploy.quant.attention)
    attention: AttentionMode = "float"
    version: int = RECIPE_VERSION

    def __post_init__(self) -> None:
        problems = self._type_problems()
        if problems:  # the value checks below would fail with a TypeError on these
            raise RecipeError("invalid recipe: " + "; ".join(problems), hint="fix the types in the recipe JSON")
        if self.weight_bits not in WEIGHT_BITS:
            problems.append(f"weight_bits={self.weight_bits!r} (expected 4, 7 or 8)")
        if self.act_bits not in ACT_BITS:
            problems.append(f"act_bits={self.act_bits!r} (expected 4 or 8)")
        if self.first_last_bits is not None and self.first_last_bits not in WEIGHT_BITS:
            problems.append(f"first_last_bits={self.first_last_bits} (expected 4, 7, 8 or null)")
        for attr, allowed in (
            ("scaling", SCALINGS), ("timestep_scales", TIMESTEP_SCALES),
            ("distill", DISTILL_MODES), ("act_init", ACT_INITS), ("layout", LAYOUTS), ("attention", ATTENTION_MODES),
        ):
            if getattr(self, attr) not in allowed:
                problems.append(f"{attr}={getattr(self, attr)!r} (expected one of {', '.join(allowed)})")
        if not 0.0 <= self.smoothquant_alpha <= 1.0:
            problems.append(f"smoothquant_alpha={self.smoothquant_alpha} (expected 0..1)")
        if self.iters < 0 or self.batch_size < 1:
            problems.append(f"iters={self.iters}, batch_size={self.batch_size} (expected iters >= 0, batch_size >= 1)")
        if self.lr_weight < 0 or self.lr_quant < 0:
            problems.append("learning rates must be >= 0")
        if not 0.0 <= self.fallback_budget <= 1.0:
            problems.append(f"fallback_budget={self.fallback_budget} (expected a MAC fraction 0..1)")
        if self.fallback_time is not None and self.fallback_time <= 0:
            problems.append(f"fallback_time={self.fallback_time} (expected seconds > 0, or null for no limit)")
        if self.fallback_candidates is not None and self.fallback_candidates < 0:
            problems.append(f"fallback_candidates={self.fallback_candidates} (expected a count >= 0 -- 0: the "
                            "first-order screen alone chooses --, or null)")
        if not self.fallback.strip():
            problems.append("fallback is empty (expected auto, none or module-name patterns)")
        if not self.include:
            problems.append("include is empty: no layer would be quantized")
        if self.version != RECIPE_VERSION:
            problems.append(f"version={self.version} (this dqdeploy reads recipe version {RECIPE_VERSION})")
        if problems:
            raise RecipeError(
                "invalid recipe: " + "; ".join(problems),
                hint="see `dqdeploy quantize --help` for the allowed values",
            )

    def _type_problems(self) -> list[str]:
        problems = []
        for attr, kind, expected in (
            ("weight_bits", int, "an integer"), ("act_bits", int, "an integer"),
            ("iters", int, "an integer"), ("batch_size", int, "an integer"), ("version", int, "an integer"),
            ("smoothquant_alpha", (int, float), "a number"), ("lr_weight", (int, float), "a number"),
            ("lr_quant", (int, float), "a number"), ("act_symmetric", bool, "true or false"), ("name", str, "a string"),
            ("fallback", str, "auto, none or comma-separated patterns"), ("fallback_budget", (int, float), "a number"),
        ):
            value = getattr(self, attr)
            if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
                problems.append(f"{attr}={value!r} (expected {expected})")
            elif kind == (int, float) and not math.isfinite(float(value)):
                problems.append(f"{attr}={value!r} (expected a finite number)")
        if self.fallback_time is not None and (isinstance(self.fallback_time, bool)
                                               or not isinstance(self.fallback_time, (int, float))
                                               or not math.isfinite(self.fallback_time)):
            problems.append(f"fallback_time={self.fallback_time!r} (expected a finite number of seconds or null)")
        if self.fallback_candidates is not None and (isinstance(self.fallback_candidates, bool)
                                                     or not isinstance(self.fallback_candidates, int)):
            problems.append(f"fallback_candidates={self.fallback_candidates!r} (expected an integer or null)")
        if self.first_last_bits is not None and (isinstance(self.first_last_bits, bool)
                                                 or not isinstance(self.first_last_bits, int)):
            problems.append(f"first_last_bits={self.first_last_bits!r} (expected an integer or null)")
        for attr in ("first_last", "include", "exclude", "act8_layers"):
            value = getattr(self, attr)
            if not isinstance(value, (tuple, list)) or not all(isinstance(p, str) for p in value):
                problems.append(f"{attr}={value!r} (expected a list of module-name patterns)")
        return problems

    @property
    def deployable(self) -> bool:
        """True when TensorRT/ONNX Runtime can run it: 8-bit symmetric activations."""
        return self.act_bits == 8 and self.act_symmetric

    def selects(self, module_name: str) -> bool:
        """Whether the layer ``module_name`` is quantized under this recipe."""
        hit = any(fnmatch.fnmatchcase(module_name, p) for p in self.include)
        return hit and not any(fnmatch.fnmatchcase(module_name, p) for p in self.exclude)

    def is_end(self, module_name: str, ends: tuple[str, str] = ("conv_in", "conv_out")) -> bool:
        """Whether ``module_name`` is one of the 8-bit ends: ``first_last`` names it, where ``ends`` (the model's
        first and last layer) stand for ``conv_in`` / ``conv_out`` (a transformer's patch embedding, proj_out)."""
        alias = dict(zip(ends, UNET_ENDS)).get(module_name, module_name)
        return self.first_last_bits is not None and (module_name in self.first_last or alias in self.first_last)

    def weight_bits_for(self, module_name: str, ends: tuple[str, str] = ("conv_in", "conv_out")) -> int:
        """Weight bits of layer ``module_name`` (``first_last_bits`` at the ends, see :meth:`is_end`)."""
        return (self.first_last_bits if self.first_last_bits is not None and self.is_end(module_name, ends)
                else self.weight_bits)

    def act_bits_for(self, module_name: str, ends: tuple[str, str] = ("conv_in", "conv_out")) -> int:
        """Input-activation bits of layer ``module_name``: the first and last layer (see
        :meth:`is_end`) keep at least ``first_last_bits`` (Q-Diffusion's 8-bit ends: with 4-bit
        activations the first layer would otherwise round the noisy sample itself to 16 levels)."""
        if self.first_last_bits is not None and self.is_end(module_name, ends):
            return max(self.act_bits, self.first_last_bits)
        if any(fnmatch.fnmatchcase(module_name, p) for p in self.act8_layers):
            return max(self.act_bits, 8)
        return self.act_bits

    @property
    def fallback_patterns(self) -> tuple[str, ...]:
        """The explicit fallback patterns (empty for ``auto`` and ``none``)."""
        if self.fallback in ("auto", "none"):
            return ()
        return tuple(p.strip() for p in self.fallback.split(",") if p.strip())

    def replace(self, **changes: Any) -> "Recipe":
        """A copy with ``changes`` (field names; an unknown one is a :class:`RecipeError` listing the fields)."""
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise RecipeError(f"Recipe has no field(s) {', '.join(unknown)}",
                              hint=f"fields: {', '.join(f.name for f in dataclasses.fields(self))}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Every field, except those added after recipe version 1 while they hold their default (so
        an existing recipe's JSON, and what is keyed on it, stays the same)."""
        data = dataclasses.asdict(self)
        for key, default in LATER_KEYS.items():
            if data[key] == default:
                del data[key]
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Recipe":
        if not isinstance(data, dict):
            raise RecipeError(f"a recipe is a JSON object of settings; found {type(data).__name__}")
        data = {LEGACY_KEYS.get(k, k): v for k, v in data.items()}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise RecipeError(
                f"unknown recipe keys: {', '.join(unknown)}",
                hint=f"allowed keys: {', '.join(sorted(known))}",
            )
        data = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return cls(**data)

    @classmethod
    def load(cls, path: str | Path) -> "Recipe":
        path = Path(path)
        hint = "pass a preset (w8a8, w7a8, w4a8, w4a4) or a JSON file written by Recipe.to_json()"
        try:
            return cls.from_dict(json.loads(path.read_text(encoding="utf-8")))
        except FileNotFoundError:
            raise RecipeError(f"recipe file {path} not found", hint=hint) from None
        except IsADirectoryError:
            raise RecipeError(f"recipe {path} is a folder, not a JSON file", hint=hint) from None
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
            raise RecipeError(f"recipe file {path} is not valid JSON: {str(exc)[:200]}", hint=hint) from None
        except OSError as exc:
            raise RecipeError(f"recipe file {path} cannot be read: {exc.strerror or exc}", hint=hint) from None


W8A8 = Recipe(name="w8a8", weight_bits=8, act_bits=8)
W4A8 = Recipe(name="w4a8", weight_bits=4, act_bits=8)
# 7-bit weights: ONNX Runtime's fast u8s8 kernels are exact with them on x86 without VNNI too (AVX2 / AVX-512F: pairs
# of u8 x s8 products stay within int16), where 8-bit weights need the slower u8u8 format (export --cpu portable)
W7A8 = Recipe(name="w7a8", weight_bits=7, act_bits=8, first_last_bits=7)
# simulation only (no runtime runs A4), so its settings serve accuracy alone (docs/notes/bench-notes.md, "W4A4"): no
# 4-bit rounding of conv outputs (the ort layout's output Q is an 8-bit runtime's fusion), 8-bit inputs of the
# 1x1 shortcut convs (the raw skip concatenation, few MACs), and distillation rates 10x / 100x the 8-bit ones
W4A4 = Recipe(name="w4a4", weight_bits=4, act_bits=4, layout="trt", act8_layers=("*conv_shortcut",),
              lr_weight=1e-3, lr_quant=1e-3)
PRESETS: dict[str, Recipe] = {r.name: r for r in (W8A8, W7A8, W4A8, W4A4)}


def resolve_recipe(name_or_path: str) -> Recipe:
    """A preset name (``w8a8``, ``w4a8``, ``w4a4``) or a path to a recipe JSON file."""
    if name_or_path.lower() in PRESETS:
        return PRESETS[name_or_path.lower()]
    path = Path(name_or_path)
    if path.suffix == ".json" or path.exists():
        return Recipe.load(path)
    raise RecipeError(
        f"unknown recipe {name_or_path!r}",
        hint=f"use a preset ({', '.join(PRESETS)}) or a path to a recipe .json file",
    )


@dataclass(frozen=True)
class CalibrationConfig:
    """How calibration data is drawn from full-precision sampling trajectories."""

    scheduler: str | None = None  # None: the model folder's own scheduler class
    steps: int = 50
    samples: int = 1024  # (x_t, t, cond) triples drawn at random across steps
    trajectories: int = 64  # independent sampling runs to draw from
    seed: int = 0
    guidance: float = 1.0  # classifier-free guidance scale (conditional models)
    batch_size: int = 32
    resolution: int | None = None  # latent height = width (default: the model's sample_size; Flux needs it)

    def __post_init__(self) -> None:
        if self.resolution is not None and (self.resolution < 2 or self.resolution % 2):
            raise RecipeError(f"resolution={self.resolution}: the latent size must be an even number >= 2")
        counts = (self.steps, self.samples, self.trajectories, self.batch_size, self.seed)
        if any(isinstance(v, bool) or not isinstance(v, int) for v in counts):
            raise RecipeError("calibration steps, samples, trajectories, batch_size and seed must be integers "
                              f"(found {self})")
        if self.steps < 1 or self.samples < 1 or self.trajectories < 1 or self.batch_size < 1:
            raise RecipeError(
                f"calibration needs steps, samples, trajectories, batch_size >= 1 (found {self})"
            )
        if not isinstance(self.guidance, (int, float)) or not math.isfinite(self.guidance) or self.guidance < 0:
            raise RecipeError(f"guidance={self.guidance} must be a finite number >= 0")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
