"""``dqdeploy analyze``: the sensitivity report of a quantized artifact, written as one folder
(``sensitivity.json``, ``sensitivity.md``, ``sensitivity.png``)."""

from __future__ import annotations

import json
from pathlib import Path

from ..io.atomic import atomic_dir
from ..quant.sensitivity import SensitivityReport, analyze, plot, scheduler_weights


def analyze_artifact(quant_dir: str | Path, *, blocks: bool = True) -> SensitivityReport:
    """Per-layer and per-block sensitivity of an artifact on its stored calibration inputs."""
    from ..io.artifact import load_calibration_inputs, load_quantized, read_manifest
    from ..io.models import make_scheduler

    manifest = read_manifest(quant_dir)
    scheduler = make_scheduler(manifest.calibration.get("scheduler", "ddim"), manifest.scheduler_config)
    weights = scheduler_weights(scheduler, manifest.timesteps)
    return analyze(load_quantized(quant_dir), load_calibration_inputs(quant_dir), step_weights=weights, blocks=blocks)


def write_report(report: SensitivityReport, out_dir: str | Path, *, top: int = 20, overwrite: bool = False) -> Path:
    """Write the report folder atomically; returns its path."""
    out_dir = Path(out_dir)
    with atomic_dir(out_dir, overwrite=overwrite, kind="sensitivity") as tmp:
        (tmp / "sensitivity.json").write_text(json.dumps({"format": "dqdeploy-sensitivity", **report.to_dict()},
                                                         indent=1))
        (tmp / "sensitivity.md").write_text(report.table() + "\n")
        (tmp / "sensitivity.png").write_bytes(plot(report, top=top))
    return out_dir
