"""Artifact size and ``load_quantized`` time, float-weight artifacts (format 1) vs integer storage
(format 2), on a reduced Stable-Diffusion-shaped UNet2DConditionModel built from a config in code.

The model: SD-1.5's block layout (CrossAttnDownBlock2D x 3 + DownBlock2D, 2 layers per block,
768-wide cross-attention) at 128/256/512/512 channels (SD-1.5: 320/640/1280/1280), 32x32 latents,
random weights; W8A8 without distillation or fallback (the stages measured do not depend on them).
``--before CODE_DIR`` is a dqdeploy source tree of the format-1 code (e.g. a checkout of main before
integer storage): its ``quantize`` writes the format-1 artifact and its ``load_quantized`` is timed
on it. Every stage runs in a fresh subprocess (one thread); load times are medians of ``--repeats``
runs, each in its own process. The weight-scale search of both code trees is timed too, over the
same weights, with a sha256 of the scales it found (equal hashes: the same result).

Usage: git archive 7b2dcd3 | tar -x -C /tmp/dq-v1   # main before integer storage
       python bench/storage.py --before /tmp/dq-v1 [--repeats 3] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.common import CLI, run_with_code, write_results  # noqa: E402

CONFIG = dict(
    sample_size=32, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(128, 256, 512, 512),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
)
QUANTIZE = ["--recipe", "w8a8", "--steps", "4", "--trajectories", "2", "--calib-samples", "8", "--no-distill",
            "--fallback", "none", "--guidance", "7.5"]


def make_model(work: Path) -> tuple[Path, Path, Path, int]:
    """The UNet folder, scheduler folder and conditioning file; the parameter count."""
    import torch
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from safetensors.torch import save_file

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**CONFIG)
    unet.save_pretrained(str(work / "unet"))
    DDIMScheduler(num_train_timesteps=1000).save_pretrained(str(work / "sched"))
    g = torch.Generator().manual_seed(0)
    save_file({"encoder_hidden_states": torch.randn(2, 77, 768, generator=g),
               "uncond_encoder_hidden_states": torch.randn(1, 77, 768, generator=g)}, str(work / "cond.safetensors"))
    return work / "unet", work / "sched", work / "cond.safetensors", sum(p.numel() for p in unet.parameters())


def load_seconds(code: Path, artifact: Path, repeats: int) -> list[float]:
    """``load_quantized`` wall time inside fresh processes (imports excluded)."""
    script = ("import time, torch; torch.set_num_threads(1); from dqdeploy.io.artifact import load_quantized; "
              f"s = time.perf_counter(); load_quantized({str(artifact)!r}); print(time.perf_counter() - s)")
    env = {**os.environ, "PYTHONPATH": str(code), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return [float(subprocess.run([sys.executable, "-c", script], env=env, check=True, capture_output=True, text=True,
                                 cwd=tempfile.gettempdir()).stdout.strip().splitlines()[-1]) for _ in range(repeats)]


SEARCH = """
import hashlib, time, torch
from diffusers import UNet2DConditionModel
from dqdeploy.quant.primitives import search_weight_scale
torch.set_num_threads(1)
unet = UNet2DConditionModel.from_pretrained({unet!r})
weights = [m.weight.detach() for m in unet.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
start = time.perf_counter()
scales = [search_weight_scale(w, 8) for w in weights]
print(time.perf_counter() - start, hashlib.sha256(torch.cat(scales).numpy().tobytes()).hexdigest())
"""


def search_seconds(code: Path, unet_dir: Path) -> tuple[float, str]:
    """The weight-scale search of ``code`` over every Conv2d/Linear weight: seconds, sha256 of the scales."""
    env = {**os.environ, "PYTHONPATH": str(code), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", SEARCH.format(unet=str(unet_dir))], env=env, check=True,
                         capture_output=True, text=True, cwd=tempfile.gettempdir()).stdout.split()
    return float(out[-2]), out[-1]


def artifact_sizes(path: Path) -> dict:
    from dqdeploy.io.storage import file_header, weight_bytes

    return {"format_version": json.loads((path / "manifest.json").read_text())["format_version"],
            "weights_file_bytes": (path / "model.safetensors").stat().st_size,
            "calibration_inputs_bytes": (path / "calibration_inputs.safetensors").stat().st_size,
            "by_kind": weight_bytes(file_header(path / "model.safetensors"))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", type=Path, required=True, help="dqdeploy source tree writing format-1 artifacts")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--work", type=Path, help="Working folder (default: a temporary one)")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="dq-storage-"))
    work.mkdir(parents=True, exist_ok=True)
    unet_dir, sched_dir, cond, params = make_model(work)
    rows = {}
    search = {}
    for label, code in (("format1", args.before.resolve()), ("format2", ROOT)):
        search[label] = dict(zip(("seconds", "scales_sha256"), search_seconds(code, unet_dir)))
        out = work / f"q-{label}"
        cmd = [*CLI, "quantize", str(unet_dir), "--scheduler-dir", str(sched_dir),
               "--cond", str(cond), "--out", str(out), "--overwrite", *QUANTIZE]
        quantize_s = run_with_code(code, cmd)
        loads = load_seconds(code, out, args.repeats)
        rows[label] = {"code": str(code), "quantize_s": quantize_s, "load_s": loads,
                       "load_median_s": statistics.median(loads), **artifact_sizes(out)}
    old_loads = load_seconds(ROOT, work / "q-format1", args.repeats)  # a format-1 artifact read by the new code
    rows["format1_read_by_format2_code"] = {"load_s": old_loads, "load_median_s": statistics.median(old_loads)}
    data = {"command": "python bench/storage.py --before " + str(args.before),
            "model": {"class": "UNet2DConditionModel", "config": CONFIG, "parameters": params,
                      "fp32_bytes": 4 * params},
            "quantize_args": QUANTIZE, "rows": rows, "weight_scale_search": search}
    print(json.dumps(data, indent=1))
    print("wrote", write_results("storage", data))


if __name__ == "__main__":
    main()
