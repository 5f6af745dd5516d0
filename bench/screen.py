"""Low-noise screening of quantization ideas: the denoiser's relative output error vs FP along
held-out FP DDIM trajectories (other noise than the calibration set), per variant and per step.

Digits-FID at n=500 has noise of several points; this error does not, so ideas are screened here
and the few that matter are confirmed with bench/quality.py (n >= 1000).

Usage: python bench/screen.py --model DIR --variants default,no-distill,fallback-auto --out screen-NAME
Variants are recipe changes (see VARIANTS; compose with ':'), applied to --recipe. ``+ort`` appended to a variant also
measures the `--target ort` export of that artifact (output rounding calibrated at export).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch  # noqa: E402

from bench import zoo  # noqa: E402
from bench.common import write_results  # noqa: E402
from dqdeploy.core.inputs import DenoiserInputs  # noqa: E402
from dqdeploy.core.metrics import relative_error  # noqa: E402
from dqdeploy.core.recipe import PRESETS, CalibrationConfig  # noqa: E402
from dqdeploy.core.sampling import denoise  # noqa: E402
from dqdeploy.eval.digits import digits_model_dir  # noqa: E402
from dqdeploy.io.models import load_model, make_scheduler  # noqa: E402
from dqdeploy.quant.sensitivity import outputs  # noqa: E402
from dqdeploy.quant.trajectories import collect  # noqa: E402
from dqdeploy.stages.quantize import quantize_denoiser  # noqa: E402

VARIANTS: dict[str, dict] = {
    "default": {},
    "no-distill": {"distill": "none"},
    "no-dilation": {"scaling": "none"},
    "minmax-init": {"act_init": "minmax"},
    "layout-ort": {"layout": "ort"},
    "fallback-auto": {"fallback": "auto"},
    "fallback-auto-10": {"fallback": "auto", "fallback_budget": 0.10},
    "float-temb": {"fallback": "time_embedding.*,*time_emb_proj"},
    "float-attn": {"fallback": "*attentions*"},
    "float-first-last": {"fallback": "conv_in,conv_out"},
    "lr-w-1e-4": {"lr_weight": 1e-4},
    "lr-w-1e-6": {"lr_weight": 1e-6},
    "lr-q-1e-3": {"lr_quant": 1e-3},
    "iters-600": {"iters": 600},
    "iters-100": {"iters": 100},
}


def held_out(unet, scheduler, steps: int, trajectories: int, seed: int) -> DenoiserInputs:
    """Every step of ``trajectories`` FP sampling runs (other noise than the calibration set)."""
    cfg = CalibrationConfig(steps=steps, samples=trajectories * steps, trajectories=trajectories, seed=seed)
    return collect(unet, scheduler, cfg).inputs


@torch.no_grad()
def image_error(model, scheduler, noise: torch.Tensor, steps: int, ref: torch.Tensor) -> float:
    """Relative error of the final samples vs FP's from the same noise: error accumulated along the trajectory."""
    out = denoise(model, scheduler, noise, steps)
    return float(relative_error(out, ref).mean())


def error(model, inputs: DenoiserInputs, ref: torch.Tensor) -> tuple[float, list[float]]:
    err = relative_error(outputs(model, inputs, 64), ref)
    steps = sorted(inputs.timestep.unique().tolist(), reverse=True)
    return float(err.mean()), [float(err[inputs.timestep == t].mean()) for t in steps]


def with_ort_rounding(res) -> object:
    """The simulation of the `--target ort` graph of a layout=trt artifact: output Q with the
    constant scales the exporter calibrates on the stored calibration inputs."""
    import copy

    from torch import nn

    from dqdeploy.exporters.dequantize import dequantized_denoiser, layer_tensors
    from dqdeploy.exporters.measure import calibrate_output_scales, input_ranks
    from dqdeploy.quant.modules import quant_layers, quantizes_output

    model = copy.deepcopy(res.model)
    layers = layer_tensors(model, res.manifest)
    calib = DenoiserInputs.from_dict(res.calib_inputs)
    ranks = input_ranks(dequantized_denoiser(model, res.manifest), list(layers), calib.slice(slice(0, 2)))
    fused = {n: t for n, t in layers.items()
             if quantizes_output(n, ranks[n]) and quant_layers(model.denoiser)[n].output_scale is None}
    scales = calibrate_output_scales(model, fused, calib)
    for name, layer in quant_layers(model.denoiser).items():
        if name in scales:
            layer.output_scale = nn.Parameter(torch.tensor(scales[name] / layers[name].ref_scale))
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path)
    ap.add_argument("--recipe", default="w8a8")
    ap.add_argument("--variants", default="default,no-distill")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--trajectories", type=int, default=16, help="held-out FP trajectories (all steps used)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    model_dir = args.model or digits_model_dir()
    zoo.refuse_held_out(model_dir, "screening recipe variants")
    loaded = load_model(model_dir)
    sched = make_scheduler("ddim", loaded.scheduler_config)
    calib_cfg = CalibrationConfig(scheduler="ddim", steps=args.steps, seed=0)
    calib = collect(loaded.denoiser, sched, calib_cfg)
    test = held_out(loaded.denoiser, sched, args.steps, args.trajectories, seed=12345)
    noise = torch.randn(args.trajectories, *test.sample.shape[1:], generator=torch.Generator().manual_seed(777))
    with torch.no_grad():
        ref = outputs(loaded.denoiser, test, 64)
        ref_images = denoise(loaded.denoiser, sched, noise, args.steps)
    rows: list[dict] = []
    result = {"command": "python bench/screen.py " + " ".join(sys.argv[1:]),
              "model": str(model_dir), "recipe": args.recipe,
              "metric": "mean relative denoiser error vs FP, held-out DDIM trajectories",
              "rows": rows}
    for spec in args.variants.split(","):
        name, _, extra = spec.partition("+")
        changes: dict = {}
        for part in name.split(":"):  # variants compose: no-distill:fallback-auto
            changes |= VARIANTS[part]
        recipe = PRESETS[args.recipe].replace(**changes)
        t0 = time.perf_counter()
        res = quantize_denoiser(loaded.denoiser, recipe, calib, calib_cfg, loaded.scheduler_config)
        quant_s = time.perf_counter() - t0
        mean, per_step = error(res.model, test, ref)
        img = image_error(res.model, sched, noise, args.steps, ref_images)
        rows.append({"variant": name, "recipe": recipe.to_dict(), "error": mean, "image_error": img,
                     "per_step": per_step,
                     "fallback": res.manifest.fallback, "quantize_s": quant_s})
        print(f"{args.recipe} {name:22s} err {mean:.5f} image err {img:.4f} fallback={res.manifest.fallback}  "
              f"{quant_s:.0f}s", flush=True)
        if extra == "ort" and recipe.layout != "ort":
            ort_model = with_ort_rounding(res)
            mean, per_step = error(ort_model, test, ref)
            img = image_error(ort_model, sched, noise, args.steps, ref_images)
            rows.append({"variant": name + " -> ort export", "error": mean, "image_error": img, "per_step": per_step})
            print(f"{args.recipe} {name + ' -> ort':22s} err {mean:.5f} image err {img:.4f}", flush=True)
        write_results(args.out, result)


if __name__ == "__main__":
    main()
