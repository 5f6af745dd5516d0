"""Reference levels of the quality check ``dqdeploy quantize`` ends with: the per-step denoiser error vs full
precision on held trajectories (``dqdeploy/stages/quality.py``), measured on the zoo's *tuning* members at each
recipe's defaults, and the threshold above which ``quantize`` warns.

For every (member, recipe): the member's default artifact (``bench/zoo_quality.py``'s, quantized now if not cached:
the plain path with the member's sampler, steps and guidance) is measured afresh against its FP folder with
``dqdeploy.stages.quality.artifact_quality`` -- the figure ``quantize`` records -- and the row written to
``bench/results/quality_reference.json`` (``bench/common.py::write_results``, one entry per member and recipe, others
kept). Then every row of that file makes ``dqdeploy/assets/quality_reference.json``: per recipe the members' levels,
the worst of them and ``warn_above = FAR_ABOVE * worst``, with the command, commit and CPU. Held-out members are
refused (``zoo.refuse_held_out``): the warning must not be tuned on them.

Entries: ``w8a8``, ``w4a8`` (the defaults, distilled) and ``w8a8-ptq``, ``w4a8-ptq`` (``--preset quick``: no
distillation, the quick budget): quantize compares a run with the entry of its bit widths and whether it distils.

Usage: python bench/quality_reference.py [--models shipped,seed1,...] [--recipes w8a8,w4a8,w8a8-ptq,w4a8-ptq]
                                        [--rebuild-only]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import zoo  # noqa: E402
from bench.common import RESULTS, provenance, write_results  # noqa: E402
from dqdeploy.io.atomic import atomic_write_bytes  # noqa: E402
from dqdeploy.stages.quality_risk import REFERENCE_FILE, REFERENCE_FORMAT  # noqa: E402

NAME = "quality_reference"
FAR_ABOVE = 2.0  # warn when a model's figure is over twice the worst tuning member's at its recipe


def measure(model: str, recipe: str) -> dict[str, Any]:
    """One row: the figure of ``model``'s default ``recipe`` artifact, how long its two parts take (what the check
    adds to ``quantize``: recording the FP calls, the quantized model answering them) and how long quantizing took."""
    from bench import zoo_quality as zq
    from dqdeploy.io.artifact import load_quantized, read_manifest
    from dqdeploy.stages.quality import held_for, held_quality

    zoo.refuse_held_out(model, "the quality check's reference levels")
    member = zoo.get(model)
    q = zq.artifact(*artifact_of(recipe, model))
    fp_dir, quantized = zoo.ensure(model), load_quantized(q)
    start = time.perf_counter()
    held = held_for(q, fp_dir, member.cond_file())
    record_s = time.perf_counter() - start  # (with loading the FP folder: quantize has it in memory already)
    start = time.perf_counter()
    figure = held_quality(quantized, held)
    qs = q.parent / "quantize_s.txt"
    recorded = read_manifest(q).quality  # what quantize recorded, when this code quantized it
    return {"model": model, "recipe": recipe, "artifact": q.parent.name, "figure": figure,
            "recorded_mean_rel_err": None if recorded is None else recorded["mean_rel_err"],
            "check_s": {"record_fp_calls_with_load": round(record_s, 2),
                        "quantized_answers": round(time.perf_counter() - start, 2)},
            "quantize_s": float(qs.read_text()) if qs.is_file() else None}


def artifact_of(recipe: str, model: str) -> tuple[str, str, str]:
    """(model, preset, zoo_quality variant) of a reference entry: ``w8a8`` the defaults, ``w8a8-ptq`` the quick
    preset's budget without distillation (what ``quality_risk.recipe_key`` names a run without distillation)."""
    preset, _, ptq = recipe.partition("-")
    if ptq not in ("", "ptq"):
        raise SystemExit(f"unknown reference entry {recipe!r}: a preset (w8a8) or a preset with -ptq (w8a8-ptq)")
    return model, preset, "quick" if ptq else "default"


def levels(rows: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per recipe: each tuning member's mean relative error, the worst, and the warning threshold."""
    out: dict[str, dict[str, Any]] = {}
    for row in rows.values():
        if zoo.ZOO.get(row["model"], None) is None or zoo.get(row["model"]).group != "tuning":
            continue
        entry = out.setdefault(row["recipe"], {"members": {}})
        entry["members"][row["model"]] = row["figure"]["mean_rel_err"]
    for entry in out.values():
        entry["worst"] = max(entry["members"].values())
        entry["warn_above"] = round(FAR_ABOVE * entry["worst"], 6)
    return out


def write_reference(command: str) -> Path:
    """``dqdeploy/assets/quality_reference.json`` from every row of ``bench/results/quality_reference.json``."""
    rows = {k: v for k, v in json.loads((RESULTS / f"{NAME}.json").read_text()).items() if isinstance(v, dict)}
    data = {"format": REFERENCE_FORMAT, "metric": next(iter(rows.values()))["figure"]["metric"],
            "far_above": FAR_ABOVE, "command": command, **provenance(), "recipes": levels(rows),
            "rows": {k: {key: v[key] for key in ("commit", "code_hash", "date")} for k, v in rows.items()}}
    return atomic_write_bytes(REFERENCE_FILE, (json.dumps(data, indent=2) + "\n").encode())


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(zoo.names("tuning")), help="tuning members (held-out: refused)")
    ap.add_argument("--recipes", default="w8a8,w4a8,w8a8-ptq,w4a8-ptq")
    ap.add_argument("--rebuild-only", action="store_true", help="rewrite the package's file from the results only")
    args = ap.parse_args(argv)
    command = "python bench/quality_reference.py " + " ".join(sys.argv[1:] if argv is None else argv)
    models = [m for m in args.models.split(",") if m]
    for m in models:
        zoo.refuse_held_out(m, "the quality check's reference levels")
    for m in [] if args.rebuild_only else models:
        if not zoo.get(m).available():
            print(f"skip {m}: not trained (python scripts/train_zoo.py {m})", flush=True)
            continue
        for r in [r for r in args.recipes.split(",") if r]:
            row = measure(m, r)
            write_results(NAME, row | {"command": command}, label=f"{m}|{r}")
            print(f"{m} {r}: mean relative error {row['figure']['mean_rel_err']:.4f} "
                  f"(check {sum(row['check_s'].values()):.1f} s, quantize {row['quantize_s']} s)", flush=True)
    print(f"wrote {write_reference(command)}")


if __name__ == "__main__":
    main()
