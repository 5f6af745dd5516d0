"""Peak memory of block-wise distillation (BKD) vs whole-model distillation of the same model.

Each mode runs in a fresh subprocess on the digits DDPM with the same calibration set, recipe and
iteration count. The process's peak RSS is reset (Linux /proc/self/clear_refs) right before
distillation starts, so the figure is the distillation's own peak above the resident baseline.
The paper reports 3,439 MB (BKD) vs 9,974 MB (full QAT) on GPU: 0.34x.

Usage: python bench/memory.py [--iters 100] [--recipe w4a8]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import write_results  # noqa: E402


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def run_mode(mode: str, iters: int, recipe_name: str, samples: int) -> dict:
    """Inside the subprocess: calibrate, then distill with ``mode`` and measure its peak."""
    import torch

    from dqdeploy.core.recipe import PRESETS, CalibrationConfig
    from dqdeploy.eval.digits import digits_model_dir
    from dqdeploy.io.models import load_model, make_scheduler
    from dqdeploy.quant.blocks import partition
    from dqdeploy.quant.calibrate import init_activation_scales
    from dqdeploy.quant.distill import block_targets, distill_blocks, distill_model, model_targets, open_store
    from dqdeploy.quant.timestep import TimestepTable
    from dqdeploy.quant.trajectories import collect
    from dqdeploy.stages.quantize import build_quantized, example_forward

    torch.set_num_threads(1)
    loaded = load_model(digits_model_dir())
    cfg = CalibrationConfig(samples=samples)
    calib = collect(loaded.denoiser, make_scheduler("ddim", loaded.scheduler_config), cfg)
    recipe = PRESETS[recipe_name].replace(iters=iters, distill=mode)
    qmodel, _ = build_quantized(loaded.denoiser, recipe, TimestepTable(calib.timesteps), calib)
    init_activation_scales(qmodel, calib)
    blocks = partition(qmodel.denoiser, example_forward(qmodel, calib))
    baseline = _status_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    start = time.perf_counter()
    if mode == "block":
        with open_store(None) as store:
            reports = distill_blocks(qmodel, blocks, calib, recipe,
                                     block_targets(loaded.denoiser, blocks, calib, recipe, store))
    else:
        reports = distill_model(qmodel, calib, recipe, model_targets(loaded.denoiser, calib, recipe))
    return {"mode": mode, "baseline_mb": baseline / 1024, "peak_mb": _status_kb("VmHWM") / 1024,
            "distill_peak_above_baseline_mb": (_status_kb("VmHWM") - baseline) / 1024,
            "distill_s": time.perf_counter() - start,
            "final_loss_mean": sum(r.loss_after for r in reports) / len(reports)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--recipe", default="w4a8")
    ap.add_argument("--samples", type=int, default=1024)
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.mode:
        print(json.dumps(run_mode(args.mode, args.iters, args.recipe, args.samples)))
        return
    rows = []
    for mode in ("block", "model"):
        out = subprocess.run([sys.executable, __file__, "--mode", mode, "--iters", str(args.iters),
                              "--recipe", args.recipe, "--samples", str(args.samples)],
                             check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    ratio = rows[0]["distill_peak_above_baseline_mb"] / max(rows[1]["distill_peak_above_baseline_mb"], 1e-9)
    result = {"command": "python bench/memory.py " + " ".join(sys.argv[1:]), "recipe": args.recipe,
              "iters": args.iters, "calibration_samples": args.samples, "rows": rows,
              "block_vs_model_peak_ratio": ratio}
    print(f"BKD / whole-model distillation peak: {ratio:.2f}x; wrote {write_results('memory', result)}")


if __name__ == "__main__":
    main()
