"""Block-wise distillation time per block and peak memory, two code versions side by side.

A reduced-width Stable-Diffusion-1.5-shaped ``UNet2DConditionModel`` (the SD-1.5 block layout: 3
cross-attention down blocks + 1 plain, 2 resnets per block, mid block, 3 cross-attention up blocks;
widths 64/128/256/256 instead of 320/640/1280/1280, cross-attention width 256, 32x32 latent, 77
tokens, random weights built from the config) is quantized W8A8 (min-max init, no fallback) on
random calibration inputs, then every block is distilled. Each code version runs in a fresh
subprocess (one thread) with ``PYTHONPATH`` set to its source tree; the process's peak RSS is
reset right before distillation, so the peak is distillation's own. The time of one block is from
the start of its training to the start of the next one's (capture + training), read off
``distill._train``.

Usage: python bench/distill_scale.py --before OLD_TREE [--after .] [--iters 2] [--samples 8] [--batch-size 2]
(OLD_TREE: e.g. ``git archive 7b2dcd3 | tar -x -C /tmp/old``, the code before propagation.)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parents[1]))  # after PYTHONPATH: the tree under test wins
from bench.common import write_results  # noqa: E402

CONFIG = dict(
    sample_size=32, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(64, 128, 256, 256),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=256, attention_head_dim=8, norm_num_groups=32,
)
TOKENS = 77


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def run_version(iters: int, samples: int, batch_size: int) -> dict:
    """Inside the subprocess: build, calibrate, distill every block; time per block and peak RSS."""
    import torch
    from diffusers import UNet2DConditionModel

    from dqdeploy.core.inputs import DenoiserInputs
    from dqdeploy.core.recipe import W8A8
    from dqdeploy.quant import distill
    from dqdeploy.quant.blocks import partition
    from dqdeploy.quant.calibrate import init_activation_scales
    from dqdeploy.quant.timestep import TimestepTable
    from dqdeploy.quant.trajectories import CalibrationSet
    from dqdeploy.stages.quantize import build_quantized, example_forward

    torch.set_num_threads(1)
    torch.manual_seed(0)
    source = str(Path(distill.__file__).resolve().parents[2])
    unet = UNet2DConditionModel(**CONFIG).eval()
    g = torch.Generator().manual_seed(0)
    steps = [901.0, 601.0, 301.0, 1.0]
    rows = torch.arange(samples) % len(steps)
    inputs = DenoiserInputs.create(torch.randn(samples, 4, 32, 32, generator=g), torch.tensor(steps)[rows],
                                   encoder_hidden_states=torch.randn(samples, TOKENS, CONFIG["cross_attention_dim"],
                                                                     generator=g))
    calib = CalibrationSet(inputs, rows, steps)
    recipe = W8A8.replace(iters=iters, batch_size=batch_size, act_init="minmax", fallback="none")
    qmodel, _ = build_quantized(unet, recipe, TimestepTable(steps), calib)
    init_activation_scales(qmodel, calib, method="minmax", batch_size=batch_size)
    blocks = partition(qmodel.denoiser, example_forward(qmodel, calib),
                       ("ResnetBlock2D", "Transformer2DModel", "Downsample2D", "Upsample2D", "TimestepEmbedding"))
    starts: list[float] = []
    train = distill._train

    def timed(*args, **kwargs):
        starts.append(time.perf_counter())
        return train(*args, **kwargs)

    distill._train = timed  # type: ignore[assignment]
    baseline = _status_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    start = time.perf_counter()
    with distill.open_store(None) as store:  # targets and distillation timed together, as before
        reports = distill.distill_blocks(qmodel, blocks, calib, recipe,
                                         distill.block_targets(unet, blocks, calib, recipe, store))
    end = time.perf_counter()
    per_block = [b - a for a, b in zip(starts, starts[1:] + [end])]
    return {"source": source, "parameters_m": sum(p.numel() for p in unet.parameters()) / 1e6, "blocks": len(blocks),
            "distill_s": end - start, "first_block_capture_s": starts[0] - start if starts else None,
            "per_block_s_mean": sum(per_block) / len(per_block), "per_block_s": [round(t, 3) for t in per_block],
            "baseline_rss_mb": baseline / 1024, "peak_rss_mb": _status_kb("VmHWM") / 1024,
            "peak_above_baseline_mb": (_status_kb("VmHWM") - baseline) / 1024,
            "loss_after_mean": sum(r.loss_after for r in reports) / len(reports)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", help="source tree of the code before the change (required)")
    ap.add_argument("--after", default=str(Path(__file__).resolve().parents[1]))
    ap.add_argument("--iters", type=int, default=2)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.inner:
        print(json.dumps(run_version(args.iters, args.samples, args.batch_size)))
        return
    if not args.before:
        ap.error("--before OLD_TREE is required")
    rows = {}
    for name, tree in (("before", args.before), ("after", args.after)):
        env = {**os.environ, "PYTHONPATH": str(Path(tree).resolve()), "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
        out = subprocess.run([sys.executable, __file__, "--inner", "--iters", str(args.iters),
                              "--samples", str(args.samples), "--batch-size", str(args.batch_size)],
                             check=True, capture_output=True, text=True, env=env).stdout
        rows[name] = json.loads(out.strip().splitlines()[-1])
        print(name, {k: v for k, v in rows[name].items() if k != "per_block_s"}, flush=True)
    speedup = rows["before"]["distill_s"] / rows["after"]["distill_s"]
    result = {"command": "python bench/distill_scale.py " + " ".join(sys.argv[1:]),
              "model": {"class": "UNet2DConditionModel", **CONFIG, "tokens": TOKENS},
              "recipe": "w8a8 (minmax init, no fallback)",
              "iters": args.iters, "calibration_samples": args.samples, "batch_size": args.batch_size,
              "before": rows["before"], "after": rows["after"], "distill_speedup": speedup}
    print(f"distillation {speedup:.2f}x faster; wrote {write_results('distill_scale', result)}")


if __name__ == "__main__":
    main()
