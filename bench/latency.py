"""ONNX Runtime CPU latency of one UNet forward, one thread, batch 8, measured side by side:

  fp32          the float graph
  ort-peer      ONNX Runtime's own quantize_static QDQ (uint8 activations, per-channel int8 weights)
  dq-per-step   dqdeploy --target ort --cpu vnni, per-time-step activation scales (rescale form)
  dq-portable   the same artifact, --cpu portable (exact on CPUs without VNNI: full-range weights as uint8)
  dq-constant   dqdeploy --target ort --cpu vnni from the same model with collapsed (constant) scales

Every row is the graph's speed on *this* CPU (``machine.int8_class``); rows of different CPU classes are
never compared with each other.

Model: a conv-heavy diffusers UNet2DModel (block_out 64/128/128, 32x32, one attention level),
random weights (latency does not depend on training). Usage: python bench/latency.py [--repeats N]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import interleaved_ms, ort_session, write_results  # noqa: E402  (first: one thread before torch)

# isort: split
import numpy as np  # noqa: E402
import torch  # noqa: E402
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel  # noqa: E402

from dqdeploy import W8A8, CalibrationConfig, export, quantize  # noqa: E402


def bench_unet() -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=32, in_channels=3, out_channels=3, block_out_channels=(64, 128, 128), layers_per_block=2,
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"), norm_num_groups=32,
    ).eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args()
    from dqdeploy.exporters.ort_baseline import quantize_with_ort

    work = Path(tempfile.mkdtemp(prefix="dqdeploy-bench-"))
    DDPMPipeline(unet=bench_unet(), scheduler=DDPMScheduler()).save_pretrained(str(work / "model"))
    calib = CalibrationConfig(steps=10, samples=64, trajectories=8, batch_size=8)
    graphs: dict[str, Path] = {}
    export(work / "model", work / "fp32", target="float")
    graphs["fp32"] = work / "fp32/unet/model.onnx"
    for name, recipe in (("dq-per-step", W8A8), ("dq-constant", W8A8.replace(timestep_scales="collapsed"))):
        quantize(work / "model", recipe.replace(distill="none"), calib, work / f"q-{name}")
        export(work / f"q-{name}", work / name, target="ort", cpu="vnni")
        graphs[name] = work / name / "unet/model.onnx"
    export(work / "q-dq-per-step", work / "dq-portable", target="ort", cpu="portable")
    graphs["dq-portable"] = work / "dq-portable/unet/model.onnx"

    rng = np.random.default_rng(0)
    feed = {"sample": rng.standard_normal((args.batch, 3, 32, 32)).astype(np.float32),
            "timestep": np.full((args.batch,), 501.0, np.float32)}
    calib_feeds = [{"sample": rng.standard_normal((args.batch, 3, 32, 32)).astype(np.float32),
                    "timestep": rng.choice(np.arange(1, 1000, 100), args.batch).astype(np.float32)} for _ in range(4)]
    graphs["ort-peer"] = quantize_with_ort(graphs["fp32"], work / "peer.onnx", calib_feeds)

    sessions = {name: ort_session(path) for name, path in graphs.items()}
    order = ["fp32", "ort-peer", "dq-per-step", "dq-portable", "dq-constant"]
    times = interleaved_ms({n: lambda s=sessions[n]: s.run(None, feed) for n in order}, args.repeats)
    med = {n: float(np.median(v)) for n, v in times.items()}
    result = {
        "command": "python bench/latency.py " + " ".join(sys.argv[1:]),
        "load_average": os.getloadavg(),
        "model": "UNet2DModel block_out (64,128,128), layers_per_block 2, 32x32, attention at the lowest level",
        "batch": args.batch,
        "repeats": args.repeats,
        "median_ms": med,
        "speedup_vs_fp32": {n: med["fp32"] / med[n] for n in order},
        "dq_per_step_vs_peer": med["ort-peer"] / med["dq-per-step"],
        "per_step_overhead": med["dq-per-step"] / med["dq-constant"] - 1,
        "samples_ms": times,
    }
    path = write_results("latency", result)
    for n in order:
        print(f"{n:12s} {med[n]:8.1f} ms  {med['fp32'] / med[n]:5.2f}x vs fp32")
    print(f"per-step overhead vs constant scales: {result['per_step_overhead']:+.1%}; wrote {path}")


if __name__ == "__main__":
    main()
