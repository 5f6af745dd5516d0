"""Zoo-wide quality benchmark: every recipe on every zoo model (``bench/zoo.py``), per model and
worst case, for the simulation and both exported graphs run on ONNX Runtime.

A *row* is one (model, recipe, variant, flavour, seed):

* ``recipe``: ``fp32`` or a preset (``w8a8``, ``w4a8``, ``w4a4``); ``variant``: ``default`` (the README's
  plain ``dqdeploy quantize MODEL --recipe R``, calibrated with the member's sampler) or an ablation / experiment named
  in ``VARIANTS`` (recipe field overrides; ``calib-seed1``: the default recipe calibrated with another seed, the
  quantizer's own run-to-run noise, ``CALIBRATION_VARIANTS``);
* ``flavour``: ``sim`` (the PyTorch simulation), ``onnx`` (``export --target onnx`` run on ORT) or
  ``ort`` (``export --target ort`` run on ORT), both exported from the same artifact;
* ``seed``: the noise seed of the ``n`` samples (the same noise for every model and recipe), drawn with
  the member's sampler (``ZooModel.scheduler``/``steps``: DDIM 50 for the UNets, the DiT's own
  flow-matching Euler in 28 steps), which also calibrates its artifacts.

Each row records the digits-FID, the ratio to the FP row of the same model and seed with a *paired*
bootstrap interval over samples (same resampled indices for both; see ``bootstrap_fid``), for export rows the
ratio to their simulation, for ablation rows the ratio to the default recipe's row (paired too), for the conditional
member the class accuracy (sample i asked for digit i % 10), and for quantized rows the per-step
denoiser error along FP trajectories (``dqdeploy.eval.compare.step_errors``: cheap, low-noise, use
it to screen variants before paying for FIDs).

Rows are cached in ``bench/results/zoo_quality.json`` (written atomically after every row) together
with the recipe hash they were made with and their provenance (``bench.common.stamp``: commit, code hash,
date, CPU; ``bench/report.py`` refuses rows without it and marks rows of other code stale): a re-run skips rows \
that are present and current, so runs
can be resumed and extended across sessions. Quantized artifacts, exports and sample features are
cached outside git under ``$DQDEPLOY_ZOO/bench`` (reused by later rows and by other scripts).

Python API (for sensitivity / fallback experiments)::

    from bench import zoo_quality as zq
    zq.VARIANTS["my-idea"] = {"act_init": "minmax"}      # any Recipe field overrides
    q = zq.artifact("seed1", "w8a8", "my-idea")          # quantize once, cached
    row = zq.run_row("seed1", "w8a8", "my-idea", "sim", seed=0, n=1000)

Usage: python bench/zoo_quality.py --models shipped,seed1 --recipes fp32,w8a8,w4a8 [--flavours sim,onnx,ort]
           [--seeds 0] [--fp-seeds 0,1] [--variants default] [--n 1000] [--dry-run]
       python bench/zoo_quality.py --merge OTHER/zoo_quality.json   # rows measured in another checkout
Then: python bench/report.py (renders the table and the worst case into BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench import zoo  # noqa: E402
from bench.common import RESULTS, stamp  # noqa: E402
from dqdeploy.cli.quantize import PRESETS as CLI_PRESETS  # noqa: E402
from dqdeploy.core.recipe import PRESETS, CalibrationConfig, Recipe  # noqa: E402
from dqdeploy.io.atomic import atomic_write_bytes  # noqa: E402
from dqdeploy.stages.generate import generate  # noqa: E402

RESULTS_FILE = RESULTS / "zoo_quality.json"
STEPS = 50
FLAVOURS = ("sim", "onnx", "ort")
QUICK = CLI_PRESETS["quick"]
VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "no-dilation": {"scaling": "none"},
    "smoothquant": {"scaling": "smoothquant"},
    "collapsed-scales": {"timestep_scales": "collapsed"},
    "no-distill": {"distill": "none"},
    "layout-ort": {"layout": "ort"},
    "old-defaults": {"layout": "trt", "fallback": "none"},  # the defaults before issue 7 (quantize time, FID)
    # (for w4a4) the w4a4 preset before issue 7 part 6 (same recipe JSON and hash; only its first/last layers' inputs
    # are now 8-bit, Recipe.act_bits_for)
    "legacy": {"layout": "ort", "act8_layers": (), "lr_weight": 1e-5, "lr_quant": 1e-4},
    "calib-seed1": {},  # the default recipe calibrated with another seed: the quantizer's own run-to-run noise
    "int8-attention": {"attention": "int8"},  # issue 22: both batched matmuls of every attention quantized
}
CALIBRATION_VARIANTS: dict[str, dict[str, Any]] = {"calib-seed1": {"seed": 1}}  # CalibrationConfig field overrides
# `quantize --preset quick` (its table, keyed by the CLI's parameter names): recipe and calibration overrides
VARIANTS["quick"] = {"distill": QUICK["distill_mode"], "fallback": QUICK["fallback"]}
CALIBRATION_VARIANTS["quick"] = {"steps": QUICK["steps"], "samples": QUICK["calib_samples"],
                                 "trajectories": QUICK["trajectories"]}
BOOTSTRAP = 200
STEP_TRAJECTORIES = 16


def cache_root() -> Path:
    """Artifacts, exports and features of the benchmark (outside git)."""
    return zoo.zoo_root() / "bench"


def recipe_for(recipe: str, variant: str) -> Recipe:
    """The preset ``recipe`` with ``VARIANTS[variant]`` applied."""
    if variant not in VARIANTS:
        raise KeyError(f"unknown variant {variant!r}; known: {', '.join(VARIANTS)}")
    return PRESETS[recipe].replace(**VARIANTS[variant])


def calibration_for(model: str, variant: str = "default") -> CalibrationConfig:
    """The plain path's calibration (defaults) with the zoo member's sampler, steps (DDIM 50 for the
    UNets, the folder's flow-matching Euler for the DiT) and CFG scale; ``CALIBRATION_VARIANTS[variant]`` applied."""
    member = zoo.get(model)
    if variant != "default":
        zoo.refuse_held_out(model, f"variant {variant!r}")
    return CalibrationConfig(**{"scheduler": member.scheduler, "steps": member.steps, "guidance": member.guidance,
                                **CALIBRATION_VARIANTS.get(variant, {})})


def recipe_hash(model: str, recipe: str, variant: str) -> str:
    """Identity of what a quantized row was made with (recipe fields + calibration); 'fp32' for FP rows."""
    if recipe == "fp32":
        return "fp32"
    text = recipe_for(recipe, variant).to_json() + json.dumps(calibration_for(model, variant).to_dict(), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def artifact(model: str, recipe: str, variant: str = "default") -> Path:
    """The quantized artifact of (model, recipe, variant), quantized now if not cached."""
    from dqdeploy.stages.quantize import quantize

    out = cache_root() / model / f"{recipe}-{variant}-{recipe_hash(model, recipe, variant)}" / "q"
    if not (out / "manifest.json").is_file():
        member = zoo.get(model)
        start = time.perf_counter()
        quantize(zoo.ensure(model), recipe_for(recipe, variant), calibration_for(model, variant), out,
                 cond_file=member.cond_file(), overwrite=True)
        (out.parent / "quantize_s.txt").write_text(f"{time.perf_counter() - start:.1f}\n")
    return out


def exported(model: str, recipe: str, variant: str, flavour: str) -> Path:
    """The ``export --target flavour`` folder of the artifact, exported now if not cached."""
    from dqdeploy.exporters.export import export

    q = artifact(model, recipe, variant)
    out = q.parent / flavour
    if not (out / "dqdeploy_export.json").is_file():
        export(q, out, target=flavour, overwrite=True)
    return out


def _source(model: str, recipe: str, variant: str, flavour: str) -> tuple[Path, str]:
    if recipe == "fp32":
        return zoo.ensure(model), "torch"
    if flavour == "sim":
        return artifact(model, recipe, variant), "torch"
    return exported(model, recipe, variant, flavour), "ort"


def _features_path(key: str) -> Path:
    return cache_root() / "features" / (key.replace("|", "__") + ".pt")


def row_key(model: str, recipe: str, variant: str, flavour: str, seed: int) -> str:
    """The cache key of a row."""
    return f"{model}|{recipe}|{variant}|{flavour}|seed{seed}"


def fp_key(model: str, seed: int) -> str:
    return row_key(model, "fp32", "default", "sim", seed)


def bootstrap_fid(feats: np.ndarray, refs: dict[str, np.ndarray] | None = None, draws: int | None = None,
                  seed: int = 0) -> dict[str, float]:
    """Paired 95% bootstrap intervals of the ratio of this row's digits-FID to each ``refs[name]``
    (features of another model's samples from the same noise): ``{name}_ratio_lo``/``_hi``.

    FID of a resample drawn with replacement is biased upward (duplicates), so a percentile interval
    of the FID itself does not even contain the estimate. The *difference* of two FIDs computed on
    the same resampled indices carries nearly the same bias on both sides, so the interval is taken
    on the difference and mapped to a ratio: ``(FID_ref + d) / FID_ref``. ``boot_bias`` records the
    mean upward shift of the resampled FID (how large the cancelled bias is)."""
    from dqdeploy.eval.fid import feature_stats, frechet_distance, reference_stats

    real = reference_stats()
    rng = np.random.default_rng(seed)
    refs = refs or {}
    point = frechet_distance(*feature_stats(feats), *real)
    ref_point = {name: frechet_distance(*feature_stats(ref), *real) for name, ref in refs.items()}
    boot: list[float] = []
    diffs: dict[str, list[float]] = {name: [] for name in refs}
    for _ in range(draws or BOOTSTRAP):
        idx = rng.integers(0, feats.shape[0], feats.shape[0])
        fid = frechet_distance(*feature_stats(feats[idx]), *real)
        boot.append(fid)
        for name, ref in refs.items():
            diffs[name].append(fid - frechet_distance(*feature_stats(ref[idx]), *real))
    out = {"boot_bias": float(np.mean(boot) - point)}
    for name, d in diffs.items():
        lo, hi = np.percentile(d, [2.5, 97.5])
        out |= {f"{name}_ratio_lo": float((ref_point[name] + lo) / ref_point[name]),
                f"{name}_ratio_hi": float((ref_point[name] + hi) / ref_point[name])}
    return out


def rederive_intervals(results: dict[str, Any]) -> None:
    """Recompute every row's bootstrap fields from its cached features (after a change of method)."""
    for key, row in results["rows"].items():
        feats = _features_path(key)
        if not feats.is_file():
            continue
        for k in [k for k in row if k.endswith(("_lo", "_hi"))]:
            del row[k]
        ident = (row["model"], row["recipe"], row["variant"], row["flavour"], row["seed"])
        row |= bootstrap_fid(torch.load(feats).numpy(), _reference_features(*ident), seed=row["seed"])
        g1 = _features_path(key + G1)
        if "g1" in row and g1.is_file():
            row["g1"] = {k: v for k, v in row["g1"].items() if not k.endswith(("_lo", "_hi"))}
            row["g1"] |= bootstrap_fid(torch.load(g1).numpy(), _reference_features(*ident, G1), seed=row["seed"])


def _reference_features(model: str, recipe: str, variant: str, flavour: str, seed: int,
                        suffix: str = "") -> dict[str, np.ndarray]:
    """The rows a row is compared with, on the same noise (those measured so far): ``fp`` (the FP row), ``sim``
    (for an exported graph, its simulation) and ``default`` (for an ablation, the default recipe's row);
    ``suffix``: their features of another sampling (``G1``: guidance 1)."""
    refs = {}
    if recipe != "fp32":
        refs["fp"] = _features_path(fp_key(model, seed) + suffix)
        if flavour != "sim":
            refs["sim"] = _features_path(row_key(model, recipe, variant, "sim", seed) + suffix)
        if variant != "default":
            refs["default"] = _features_path(row_key(model, recipe, "default", flavour, seed) + suffix)
    return {k: torch.load(f).numpy() for k, f in refs.items() if f.is_file()}


def _step_error_summary(model: str, path: Path, runtime: str) -> dict[str, Any]:
    from dqdeploy.eval.compare import step_errors, summarize_steps
    from dqdeploy.io.models import latent_shape, make_scheduler
    from dqdeploy.stages.generate import load_cond
    from dqdeploy.stages.sources import open_model

    member = zoo.get(model)
    fp, test = open_model(zoo.ensure(model), "torch"), open_model(path, runtime)
    conditioning = load_cond(fp, member.cond_file())
    cond, uncond = (None, None) if conditioning is None else (conditioning.for_batch(0, STEP_TRAJECTORIES),
                                                              conditioning.unconditional())
    noise = torch.randn(STEP_TRAJECTORIES, *latent_shape(fp.denoiser), generator=torch.Generator().manual_seed(1234))
    per_step = step_errors(fp.denoiser, test.denoiser, make_scheduler(member.scheduler, fp.scheduler_config), noise,
                           member.steps, cond=cond, uncond=uncond, guidance=member.guidance)
    return summarize_steps(per_step) | {"per_step_rel_err": [round(s["rel_err"], 6) for s in per_step]}


G1 = "|g1"  # features key suffix of a conditional member's samples at guidance 1


def _sample(model: str, path: Path, runtime: str, seed: int, n: int, guidance: float) -> torch.Tensor:
    member = zoo.get(model)
    return generate(path, n=n, steps=member.steps, scheduler=member.scheduler, seed=seed, batch_size=100,
                    runtime=runtime, cond_file=member.cond_file(), guidance=guidance)


def _save_features(images: torch.Tensor, key: str) -> torch.Tensor:
    from dqdeploy.eval.fid import classifier_features

    feats = classifier_features(images)
    fpath = _features_path(key)
    fpath.parent.mkdir(parents=True, exist_ok=True)
    torch.save(feats, fpath)
    return feats


def guidance_one(model: str, recipe: str, variant: str, flavour: str, seed: int, n: int) -> dict[str, Any]:
    """A conditional member's scores where quantization differences show (issue 19 part 3): the digits-FID of
    samples at guidance 1 (no guidance: no loss of diversity to hide them), with its paired ratio intervals to the
    same rows at guidance 1, their class accuracy and per-class FID (also of the deployment-guidance samples: the
    row's own ``per_class_fid``)."""
    from dqdeploy.eval.digits import classifier_accuracy
    from dqdeploy.eval.fid import digits_fid, per_class_fid

    path, runtime = _source(model, recipe, variant, flavour)
    images = _sample(model, path, runtime, seed, n, guidance=1.0)
    feats = _save_features(images, row_key(model, recipe, variant, flavour, seed) + G1)
    labels = torch.arange(n) % 10
    return {"guidance": 1.0, "digits_fid": digits_fid(images), "class_accuracy": classifier_accuracy(_clf(), images,
                                                                                                    labels),
            **({"per_class_fid": per_class_fid(feats, labels)} if n >= 20 else {}),
            **bootstrap_fid(feats.numpy(), _reference_features(model, recipe, variant, flavour, seed, G1), seed=seed)}


def run_row(model: str, recipe: str, variant: str, flavour: str, seed: int, n: int) -> dict[str, Any]:
    """Measure one row (see the module docstring); FP features of the same seed must exist for the ratio."""
    from dqdeploy.eval.digits import classifier_accuracy
    from dqdeploy.eval.fid import class_histogram, digits_fid, per_class_fid

    member = zoo.get(model)
    key = row_key(model, recipe, variant, flavour, seed)
    path, runtime = _source(model, recipe, variant, flavour)
    start = time.perf_counter()
    images = _sample(model, path, runtime, seed, n, member.guidance)
    sample_s = time.perf_counter() - start
    feats = _save_features(images, key)
    row: dict[str, Any] = {"model": model, "recipe": recipe, "variant": variant, "flavour": flavour, "seed": seed,
                           "n": n, "runtime": runtime, "sampler": member.scheduler or "folder", "steps": member.steps,
                           "hash": recipe_hash(model, recipe, variant),
                           "digits_fid": digits_fid(images), "sample_s": round(sample_s, 1),
                           "class_histogram": class_histogram(images)["counts"]}
    if member.conditional:  # sample i asked for digit i % 10
        row["class_accuracy"] = classifier_accuracy(_clf(), images, torch.arange(n) % 10)
        if n >= 20:  # two samples of every class at least
            row["per_class_fid"] = per_class_fid(feats, torch.arange(n) % 10)
        row["g1"] = guidance_one(model, recipe, variant, flavour, seed, n)
    row |= bootstrap_fid(feats.numpy(), _reference_features(model, recipe, variant, flavour, seed), seed=seed)
    if recipe != "fp32":
        qs = artifact(model, recipe, variant).parent / "quantize_s.txt"
        row["quantize_s"] = float(qs.read_text()) if qs.is_file() else None
        if flavour == "sim" and seed == 0:
            row["step_error"] = _step_error_summary(model, path, runtime)
    return row


def _clf():
    from dqdeploy.eval.digits import load_classifier

    return load_classifier()


def load_results() -> dict[str, Any]:
    """The cached results file (``{"rows": {key: row}, "runs": [...]}``)."""
    if RESULTS_FILE.is_file():
        return json.loads(RESULTS_FILE.read_text())
    return {"rows": {}, "runs": [], "steps": STEPS, "sampler": "ddim"}


def save_results(results: dict[str, Any]) -> Path:
    return atomic_write_bytes(RESULTS_FILE, (json.dumps(results, indent=1) + "\n").encode())


@contextlib.contextmanager
def locked_results() -> Iterator[dict[str, Any]]:
    """The results file as it is on disk now, held under a lock and saved on exit (ratios re-derived), so that
    several harness processes (other models, other variants) can share one file without losing rows."""
    cache_root().mkdir(parents=True, exist_ok=True)
    with open(cache_root() / "zoo_quality.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        results = load_results()
        yield results
        results["zoo_size"] = len(zoo.names())
        derive(results)
        save_results(results)


def update_results(rows: dict[str, dict[str, Any]] | None = None,
                   runs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Add ``rows`` and/or ``runs`` records (those not there yet) to the results file (:func:`locked_results`)."""
    with locked_results() as results:
        results["rows"] |= rows or {}
        results["runs"] += [r for r in runs or [] if r not in results["runs"]]
    return results


def derive(results: dict[str, Any]) -> None:
    """Fill ratios that need two rows: vs the FP row of the same model and seed, vs the simulation, and
    for an ablation vs the default recipe's row."""
    rows = results["rows"]
    for row in rows.values():
        fp = rows.get(fp_key(row["model"], row["seed"]))
        row["vs_fp"] = row["digits_fid"] / fp["digits_fid"] if fp else None
        if "g1" in row:
            row["g1"]["vs_fp"] = row["g1"]["digits_fid"] / fp["g1"]["digits_fid"] if fp and "g1" in fp else None
        if row["flavour"] != "sim":
            sim = rows.get(row_key(row["model"], row["recipe"], row["variant"], "sim", row["seed"]))
            row["vs_sim"] = row["digits_fid"] / sim["digits_fid"] if sim else None
        if row["variant"] != "default" and row["recipe"] != "fp32":
            default = rows.get(row_key(row["model"], row["recipe"], "default", row["flavour"], row["seed"]))
            row["vs_default"] = row["digits_fid"] / default["digits_fid"] if default else None


def plan(models: list[str], recipes: list[str], variants: list[str], flavours: list[str], seeds: list[int],
         fp_seeds: list[int]) -> list[tuple[str, str, str, str, int]]:
    """Rows to measure, model by model: FP rows first (other rows' ratios need them)."""
    todo = []
    for m in models:
        for v in variants:
            if v != "default":
                zoo.refuse_held_out(m, f"variant {v!r}")
        todo += [(m, "fp32", "default", "sim", s) for s in fp_seeds]
        for r in recipes:
            if r == "fp32":
                continue
            for v in variants:
                todo += [(m, r, v, f, s) for f in flavours for s in seeds
                         if f == "sim" or recipe_for(r, v).deployable]
    return todo


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(zoo.names()))
    ap.add_argument("--recipes", default="fp32,w8a8,w4a8", help="fp32 and/or presets")
    ap.add_argument("--variants", default="default", help=f"of {', '.join(VARIANTS)}")
    ap.add_argument("--flavours", default=",".join(FLAVOURS))
    ap.add_argument("--seeds", default="0", help="noise seeds of quantized rows")
    ap.add_argument("--fp-seeds", default="0,1", help="noise seeds of FP rows (two: the seed-to-seed noise)")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--redo", action="store_true", help="measure rows again even if cached")
    ap.add_argument("--dry-run", action="store_true", help="list the rows that would run")
    ap.add_argument("--merge", type=Path, metavar="RESULTS_JSON",
                    help="add the rows and runs of another results file (another checkout or machine), run nothing")
    ap.add_argument("--rederive", action="store_true",
                    help="recompute ratios and intervals of cached rows, run nothing")
    args = ap.parse_args(argv)
    split = lambda s: [x for x in s.split(",") if x]  # noqa: E731
    models = [zoo.get(m).name for m in split(args.models)]
    fp_seeds = [int(s) for s in split(args.fp_seeds)] if "fp32" in split(args.recipes) else []
    todo = plan(models, split(args.recipes), split(args.variants), split(args.flavours),
                [int(s) for s in split(args.seeds)], fp_seeds)
    if args.merge:
        other = json.loads(args.merge.read_text())
        update_results(rows=other["rows"], runs=other["runs"])
        print(f"merged {len(other['rows'])} rows from {args.merge}")
        return
    if args.rederive:
        with locked_results() as results:
            rederive_intervals(results)
        return
    results = load_results()
    if not args.dry_run:
        results = update_results(runs=[stamp({
            "command": "python bench/zoo_quality.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})])
    for m, r, v, f, s in todo:
        key = row_key(m, r, v, f, s)
        cached = results["rows"].get(key)
        # a conditional member's row is complete with its guidance-1 scores (issue 19 part 3)
        complete = cached and ("g1" in cached or not zoo.get(m).conditional)
        if complete and cached.get("hash") == recipe_hash(m, r, v) and cached["n"] >= args.n and not args.redo:
            print(f"cached   {key}", flush=True)
            continue
        if args.dry_run:
            print(f"would run {key}", flush=True)
            continue
        if not zoo.get(m).available():
            print(f"skip     {key}: {m} is not trained yet (python scripts/train_zoo.py {m})", flush=True)
            continue
        # each row: its commit, code, date, CPU
        results = update_results(rows={key: stamp(run_row(m, r, v, f, s, args.n))})
        row = results["rows"][key]
        print(f"done     {key}: digits-FID {row['digits_fid']:.2f}"
              + (f" vs FP {row['vs_fp']:.3f}" if row.get("vs_fp") else ""), flush=True)


if __name__ == "__main__":
    main()
