"""Whether a quantized model's quality is at risk: its per-step denoiser error (``stages/quality.py``) against what
the development zoo's tuning members reach at the same recipe.

The reference levels are data, written by ``bench/quality_reference.py`` into ``dqdeploy/assets/
quality_reference.json`` (with the command, commit and CPU that measured them); ``$DQDEPLOY_QUALITY_REFERENCE``
names another file of that format. A recipe is looked up by its bit widths (``w4a8``); the warning fires above the
file's ``warn_above`` for it (the worst member times the file's ``far_above`` factor). Runs without distillation
are compared with the zoo's level at ``--preset quick``'s budget (``w8a8-ptq``), distilled runs with the defaults'.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from ..core.errors import ArtifactError
from ..core.recipe import CalibrationConfig, Recipe

REFERENCE_FILE = Path(__file__).resolve().parents[1] / "assets" / "quality_reference.json"
REFERENCE_ENV = "DQDEPLOY_QUALITY_REFERENCE"
REFERENCE_FORMAT = "dqdeploy-quality-reference"
log = logging.getLogger(__name__)


def reference_path() -> Path:
    """The reference file in use (``$DQDEPLOY_QUALITY_REFERENCE`` or the shipped one)."""
    return Path(os.environ.get(REFERENCE_ENV) or REFERENCE_FILE).expanduser()


def load_reference(path: Path | None = None) -> dict[str, Any] | None:
    """The reference levels (``None`` when the shipped file is absent); a malformed file is an ArtifactError."""
    path = reference_path() if path is None else path
    if not path.is_file():
        if path != REFERENCE_FILE:
            raise ArtifactError(f"{REFERENCE_ENV}={path}: no such file", hint=f"unset {REFERENCE_ENV}")
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ArtifactError(f"quality reference {path} is not readable JSON ({exc})",
                            hint="re-run python bench/quality_reference.py") from None
    levels = data.get("recipes") if isinstance(data, dict) else None
    if data.get("format") != REFERENCE_FORMAT or not isinstance(levels, dict) or not all(
            isinstance(v, dict) and all(isinstance(v.get(k), (int, float)) for k in ("worst", "warn_above"))
            for v in levels.values()):
        raise ArtifactError(f"quality reference {path} is not a {REFERENCE_FORMAT} file with the worst level and "
                            "warn_above of each recipe",
                            hint="re-run python bench/quality_reference.py")
    return data


def recipe_key(recipe: Recipe) -> str:
    """The reference entry a recipe is compared with: its bit widths (``w8a8``, ``w4a8``), ``-ptq`` without
    distillation (``w8a8-ptq``: measured at ``--preset quick``'s budget, so a run without distillation is compared
    with runs like it, not with distilled ones)."""
    return f"w{recipe.weight_bits}a{recipe.act_bits}" + ("-ptq" if recipe.distill == "none" else "")


def next_steps(recipe: Recipe, calibration: CalibrationConfig) -> str:
    """What to try next, most effective first, with this run's settings."""
    steps = [f"more calibration samples (--calib-samples {calibration.samples * 4} --trajectories "
             f"{calibration.trajectories * 4}; now {calibration.samples} from {calibration.trajectories})"]
    if recipe.distill != "none":
        steps.append(f"a larger distillation budget (--iters {recipe.iters * 4}; now {recipe.iters})")
    else:
        steps.append("block-wise distillation (--distill block)")
    if recipe.fallback == "auto":
        steps.append(f"a larger fallback budget (--fallback-budget {min(1.0, recipe.fallback_budget * 2):g}; "
                     f"now {recipe.fallback_budget:g})")
    else:
        steps.append("layers kept in float by sensitivity (--fallback auto)")
    if recipe.weight_bits < 8 or recipe.act_bits < 8:
        steps.append("W8A8 instead (--recipe w8a8)")
    return ", ".join(steps[:-1]) + " or " + steps[-1]


def assess(quality: dict[str, Any], recipe: Recipe, calibration: CalibrationConfig,
           reference: dict[str, Any] | None) -> dict[str, Any]:
    """``quality`` with the reference it was compared with and the verdict (``at_risk``, ``next_step``)."""
    entry = (reference or {}).get("recipes", {}).get(recipe_key(recipe))
    if entry is None:
        return quality | {"reference": None, "at_risk": False}
    ref = {"recipe": recipe_key(recipe), "zoo_worst": entry["worst"], "warn_above": entry["warn_above"],
           "members": sorted(entry.get("members", {})), "commit": (reference or {}).get("commit")}
    at_risk = quality["mean_rel_err"] > entry["warn_above"]
    return quality | {"reference": ref, "at_risk": at_risk,
                      **({"next_step": next_steps(recipe, calibration)} if at_risk else {})}


def quality_text(quality: dict[str, Any]) -> str:
    """One line: the figure and the zoo's level at the recipe."""
    text = (f"per-step denoiser error vs full precision: mean relative error {quality['mean_rel_err']:.4f} "
            f"(worst step {quality.get('worst_step', '?')}: {quality['worst_rel_err']:.4f}; "
            f"SNR {quality['mean_snr_db']:.1f} dB; {quality.get('inputs', '?')} held inputs)")
    ref = quality.get("reference")
    if isinstance(ref, dict) and isinstance(ref.get("zoo_worst"), (int, float)):
        text += (f"; the zoo's models reach up to {ref['zoo_worst']:.4f} at {ref.get('recipe')} "
                 f"({len(ref.get('members') or [])} measured)")
    elif ref is None:
        text += "; no zoo reference for this recipe"
    return text


def warn_if_at_risk(quality: dict[str, Any] | None) -> None:
    """Log the figure, and a warning with the next step when it is far above the zoo's level."""
    if not quality:
        return
    log.info(quality_text(quality))
    if quality.get("at_risk"):
        ref = quality["reference"]
        log.warning("quality at risk: the per-step denoiser error vs full precision is %.4f, far above what the zoo's "
                    "models reach at %s (up to %.4f; warning above %.4f). Check the samples (`dqdeploy eval OUT --fp "
                    "MODEL`) and try %s.", quality["mean_rel_err"], ref["recipe"], ref["zoo_worst"],
                    ref["warn_above"], quality["next_step"])
