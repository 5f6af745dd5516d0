"""The automatic fallback's search: leave-one-out on every layer vs a first-order screen and leave-one-out on its top
candidates (``Recipe.fallback_candidates``; dqdeploy/quant/fallback.py), measured where each applies.

``--models``: for each tuning member of the zoo (held-out members refused: this chooses a default), calibrated as
``quantize`` does by default (DDIM 50, 1024 samples from 64 trajectories, the member's guidance), all layers
quantized, no distillation -- the state the search sees. On the search's own subset (8 steps x 8 samples, the step
weights it uses): every layer's leave-one-out gain and the screen's estimate, their rank agreement (Spearman), the
screen's rank of every layer the exhaustive search keeps in float, and the time of each. Then, per candidate count,
the layers fallback keeps in float and the resulting model's error on held-out FP trajectories (other noise than
calibration; the relative denoiser error of bench/screen.py, and the relative error of final images from the same
noise): what screening would cost in quality on a model where every layer can be scored.

``--sd15 WORK``: the search's cost at Stable Diffusion 1.5 size (860M parameters, random weights from the config,
64x64 latent, 77 tokens, CFG pairs), calibrated at the README's smallest budget (DDIM 4 steps, 2 trajectories, 8
samples, guidance 7.5; min-max activation ranges so that calibration is quick: the search's cost does not depend on
how the ranges were found): the screen's time and peak memory, and leave-one-out's time per layer, hence the whole
search with and without the screen. Results: bench/results/fallback_search.json (one entry per member / "sd15");
BENCHMARKS.md via bench/report.py.

Candidate count 0: no leave-one-out, the screen's estimates choose (the default above 192 layers).

Usage: python bench/fallback_search.py --models shipped [--candidates 0,8,16,32] [--sd15 /tmp/fs-sd15]
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch  # noqa: E402

from bench import zoo  # noqa: E402
from bench.common import write_results  # noqa: E402

NAME = "fallback_search"


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def spearman(a: list[float], b: list[float]) -> float:
    """Rank correlation (average ranks for ties)."""
    def ranks(v: list[float]) -> torch.Tensor:
        t = torch.tensor(v, dtype=torch.float64)
        order = t.argsort()
        r = torch.empty_like(t)
        r[order] = torch.arange(len(v), dtype=torch.float64)
        for value in t.unique():  # ties: their mean rank
            tie = t == value
            r[tie] = r[tie].mean()
        return r

    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def calibrated(model_dir: Path, cond_file: Path | None, guidance: float, config) -> tuple:
    """What ``quantize`` has when fallback runs: (loaded model, scheduler, calibration set, step weights, a function
    quantizing the FP denoiser on that set with a recipe)."""
    from dqdeploy.io.models import load_model, make_scheduler
    from dqdeploy.quant.sensitivity import scheduler_weights
    from dqdeploy.quant.trajectories import collect, load_conditioning
    from dqdeploy.stages.quantize import quantize_denoiser

    loaded = load_model(model_dir)
    sched = make_scheduler(config.scheduler, loaded.scheduler_config)
    cond = load_conditioning(cond_file) if cond_file else None
    calib = collect(loaded.denoiser, sched, config, cond, guidance=guidance)
    weights = scheduler_weights(make_scheduler(config.scheduler, loaded.scheduler_config), calib.timesteps)

    def run(recipe, in_place: bool = False):
        return quantize_denoiser(loaded.denoiser, recipe, calib, config, loaded.scheduler_config, in_place=in_place)

    return loaded, sched, calib, weights, run


def member_rows(name: str, candidates: list[int]) -> dict:
    from bench.screen import error, held_out, image_error
    from dqdeploy.core.recipe import W8A8 as w8a8
    from dqdeploy.core.recipe import CalibrationConfig
    from dqdeploy.core.sampling import denoise
    from dqdeploy.quant.fallback import SCREEN_BATCH, fallback_layers
    from dqdeploy.quant.modules import quant_layers
    from dqdeploy.quant.sensitivity import analyze, outputs, screen
    from dqdeploy.quant.trajectories import calibration_subset

    zoo.refuse_held_out(name, "choosing the fallback search's defaults")
    member = zoo.get(name)
    if member.conditional:
        raise SystemExit(f"{name}: conditional members are not wired into this bench yet (held-out trajectories "
                         "need the class prompts)")
    config = CalibrationConfig(scheduler="ddim", steps=50, seed=0)
    loaded, sched, calib, weights, run = calibrated(zoo.ensure(name), None, 1.0, config)
    base = run(w8a8.replace(fallback="none", distill="none")).model
    subset = calibration_subset(calib, steps=8, per_step=8, seed=0)
    start = time.perf_counter()
    report = analyze(base, subset, step_weights=weights, detail=False, blocks=False)
    loo_s = time.perf_counter() - start
    start = time.perf_counter()
    estimate = screen(base, subset, step_weights=weights, batch=SCREEN_BATCH)  # as fallback runs it
    screen_s = time.perf_counter() - start
    names = list(quant_layers(base.denoiser))
    gains = {r.name: r.gain for r in report.layers}
    screen_rank = {n: i for i, n in enumerate(sorted(names, key=lambda n: -estimate[n]))}
    exhaustive = fallback_layers(base, w8a8.replace(fallback="auto"), calib, step_weights=weights)
    test = held_out(loaded.denoiser, sched, 50, 16, seed=12345)
    noise = torch.randn(16, *test.sample.shape[1:], generator=torch.Generator().manual_seed(777))
    with torch.no_grad():
        ref, ref_images = outputs(loaded.denoiser, test, 64), denoise(loaded.denoiser, sched, noise, 50)
    variants = []
    for count in [None, *candidates]:
        recipe = w8a8.replace(fallback="auto", distill="none", fallback_candidates=count)
        start = time.perf_counter()
        res = run(recipe)
        seconds = time.perf_counter() - start
        mean, _ = error(res.model, test, ref)
        variants.append({"candidates": len(names) if count is None else count, "fallback": res.manifest.fallback,
                         "quantize_s": round(seconds, 1), "heldout_error": mean,
                         "image_error": image_error(res.model, sched, noise, 50, ref_images)})
        print(f"{name}: {'all' if count is None else count} candidates -> {len(res.manifest.fallback)} float "
              f"layers, held-out error "
              f"{mean:.5f}, image error {variants[-1]['image_error']:.4f} ({seconds:.0f} s)", flush=True)
    top = sorted(names, key=lambda n: -gains[n])
    return {
        "layers": len(names), "subset_samples": int(next(iter(subset.values())).shape[0]),
        "full_error": report.full, "exhaustive_s": round(loo_s, 1), "screen_s": round(screen_s, 1),
        "spearman": spearman([gains[n] for n in names], [estimate[n] for n in names]),
        "exhaustive_fallback": exhaustive, "screen_rank_of_exhaustive_fallback": [screen_rank[n] for n in exhaustive],
        "top10": [{"layer": n, "gain": gains[n], "estimate": estimate[n], "screen_rank": screen_rank[n]}
                  for n in top[:10]],
        "variants": variants,
    }


def sd15_row(work: Path, candidates: int) -> dict:
    from bench.scale_models import CONFIGS, write_folder
    from dqdeploy.core.recipe import W8A8 as w8a8
    from dqdeploy.core.recipe import CalibrationConfig
    from dqdeploy.quant.fallback import SCREEN_BATCH
    from dqdeploy.quant.modules import quant_layers
    from dqdeploy.quant.sensitivity import analyze, screen
    from dqdeploy.quant.trajectories import calibration_subset

    folder = work / "model"
    cond = work / "model-cond.safetensors"
    if not (folder / "unet" / "config.json").is_file():
        write_folder(CONFIGS["sd15"](), folder)
    config = CalibrationConfig(scheduler="ddim", steps=4, samples=8, trajectories=2, seed=0, batch_size=2)
    start = time.perf_counter()
    _, _, calib, weights, run = calibrated(folder, cond, 7.5, config)
    # converted in place, as quantize holds an SD-size model once
    base = run(w8a8.replace(fallback="none", distill="none", act_init="minmax", batch_size=2), in_place=True).model
    calibrate_s = time.perf_counter() - start
    subset = calibration_subset(calib, steps=8, per_step=8, seed=0)
    names = list(quant_layers(base.denoiser))
    rss0 = peak_rss_gb()
    start = time.perf_counter()
    estimate = screen(base, subset, step_weights=weights, batch=SCREEN_BATCH)
    screen_s = time.perf_counter() - start
    rss_screen = peak_rss_gb()
    probe = sorted(names, key=lambda n: -estimate[n])[:2]
    start = time.perf_counter()
    analyze(base, subset, step_weights=weights, detail=False, blocks=False, only=probe, batch=2)
    probe_s = time.perf_counter() - start  # the reference pass, the full model's error, then one pass per layer
    start = time.perf_counter()
    analyze(base, subset, step_weights=weights, detail=False, blocks=False, only=probe[:1], batch=2)
    per_layer = probe_s - (time.perf_counter() - start)
    overhead = probe_s - 2 * per_layer
    return {
        "layers": len(names), "subset_samples": int(next(iter(subset.values())).shape[0]),
        "calibration_s": round(calibrate_s, 1), "screen_s": round(screen_s, 1),
        "peak_rss_gb_before_screen": round(rss0, 2), "peak_rss_gb_after_screen": round(rss_screen, 2),
        "leave_one_out_s_per_layer": round(per_layer, 1), "search_overhead_s": round(overhead, 1),
        "candidates": candidates,
        "projected_exhaustive_s": round(overhead + len(names) * per_layer),
        "projected_screened_s": round(screen_s + overhead + candidates * per_layer),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="", help="comma-separated tuning members of the zoo")
    ap.add_argument("--candidates", default="0,8,16,32", help="candidate counts compared with every layer")
    ap.add_argument("--sd15", type=Path, help="work folder for the SD-1.5-size timing")
    args = ap.parse_args()
    command = "python bench/fallback_search.py " + " ".join(sys.argv[1:])
    counts = [int(c) for c in args.candidates.split(",") if c]
    torch.manual_seed(0)
    for name in [m for m in args.models.split(",") if m]:
        row = member_rows(name, counts)
        write_results(NAME, {"command": command, **row}, label=name)
        print(f"{name}: spearman {row['spearman']:.3f}; exhaustive {row['exhaustive_s']} s, screen {row['screen_s']} s;"
              f" screen ranks of the exhaustive fallback {row['screen_rank_of_exhaustive_fallback']}", flush=True)
    if args.sd15:
        args.sd15.mkdir(parents=True, exist_ok=True)
        from dqdeploy.quant.fallback import SCREENED

        row = sd15_row(args.sd15, SCREENED)
        write_results(NAME, {"command": command, **row}, label="sd15")
        print(row, flush=True)


if __name__ == "__main__":
    main()
