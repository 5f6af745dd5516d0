"""``dqdeploy lora``: fold a LoRA file into a quantized artifact, re-searching only the touched layers' weight
step sizes, so that every export target deploys it as a plain artifact (no branch in the graph)."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from ..core.arguments import as_path, public
from ..core.errors import DQDeployError
from ..io.artifact import CALIB_INPUTS, WEIGHTS, load_quantized, load_state, read_manifest, save_artifact
from ..io.lora import read_lora
from ..io.paths import check_output_dir
from ..io.storage import stored_state
from ..quant.lora import fold_lora

log = logging.getLogger(__name__)
EXTRAS = ("distill_report.json", "distill_loss.png")  # copied from the source artifact as they are


@public
def fold_lora_artifact(quant_dir: str | Path, lora_file: str | Path, out_dir: str | Path, *, scale: float = 1.0,
                       overwrite: bool = False) -> Path:
    """A new artifact ``out_dir``: ``quant_dir`` with the LoRA ``lora_file`` (times ``scale``) folded into its
    weights; the quantized layers it touches get their weight step sizes searched again, every other tensor
    (activation step sizes, calibration inputs) is copied. The manifest records the file, its sha256 and scale."""
    quant_dir = as_path(quant_dir, "quant_dir", "fold_lora_artifact")
    lora_file = as_path(lora_file, "lora_file", "fold_lora_artifact")
    out_dir = as_path(out_dir, "out_dir", "fold_lora_artifact")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not float(scale) == float(scale) \
            or abs(float(scale)) == float("inf"):
        raise DQDeployError(f"scale={scale!r}: expected a finite number", hint="e.g. --scale 0.8")
    check_output_dir(out_dir, overwrite=overwrite, kind="quantized", sources=[quant_dir, lora_file])
    manifest = read_manifest(quant_dir)
    model = load_quantized(quant_dir)
    adapter = read_lora(lora_file, model.denoiser)
    searched = fold_lora(model, adapter.layers, float(scale))
    log.info("folded %s into %d layers (%d weight step sizes searched again)", lora_file.name, len(adapter.layers),
             len(searched))
    entry = {"file": lora_file.name, "sha256": adapter.sha256, "scale": float(scale), "layers": len(adapter.layers)}
    # the source's quality figure measured the model without this LoRA, against an FP model without it: not kept
    new = dataclasses.replace(manifest, lora=[*manifest.lora, entry], quality=None, integrity="")
    tensors = {WEIGHTS: stored_state(model.denoiser), CALIB_INPUTS: load_state(quant_dir, manifest, CALIB_INPUTS)}
    extras = {name: (quant_dir / name).read_bytes() for name in EXTRAS if (quant_dir / name).is_file()}
    return save_artifact(out_dir, new, tensors, extras, overwrite=overwrite, sources=[quant_dir, lora_file])
