"""Latency of the LoRA branch at Stable Diffusion 1.5 size: ONNX Runtime CPU, one forward with and without adapters.

The model: Stable Diffusion 1.5's UNet2DConditionModel config with random weights (``bench/scale_models.py``),
quantized W8A8 with the smallest budget (post-training, no distillation, ``--fallback none``: the weights' values do
not change the latency) and exported twice with ``--target ort``: without slots, and with ``--lora-slots attention``
(a float branch on every attention projection, its matrices graph inputs). Each stage runs in its own process
(``bench/scale.py``'s runner: wall time and peak RSS recorded).

Rows (batch 2 = one CFG pair, the config's 64x64 latent, 77 tokens, one thread; the configurations run in turn,
``--repeats`` times after a warm-up each; medians):

  no slots        the export without slots
  slots, empty    the slots export with no adapter (what ``set_lora(None)`` feeds: rank-1 zeros)
  rank R          the slots export with a random rank-R adapter on every slot (``lora_feeds``, as ``set_lora``)

Overhead: each row's median over the ``no slots`` median. Usage:

  nice -n 5 python bench/lora_overhead.py --work /tmp/lora-overhead [--config sd15] [--ranks 4 16 64] [--repeats 5]
                                          [--skip folder quantize]

Writes bench/results/lora_overhead.json (BENCHMARKS.md via bench/report.py).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.common import write_results  # noqa: E402  (first: one thread before torch)
from bench.scale import dq, run_stage  # noqa: E402
from bench.scale_models import CONFIGS  # noqa: E402

CALIB = ["--steps", "1", "--trajectories", "1", "--calib-samples", "2", "--guidance", "7.5", "--fallback", "none",
         "--no-distill"]
STAGES = ("folder", "quantize", "export-plain", "export-slots", "latency")


def stage_commands(config: str, work: Path, ranks: list[int], repeats: int) -> dict[str, list[str]]:
    model, cond, q = work / "model", work / "model-cond.safetensors", work / "q"
    make = (f"from bench.scale_models import CONFIGS, write_folder; from pathlib import Path; "
            f"write_folder(CONFIGS[{config!r}](), Path({str(model)!r}))")
    return {
        "folder": [sys.executable, "-c", make],
        "quantize": dq("quantize", str(model), "--cond", str(cond), *CALIB, "--out", str(q), "--overwrite"),
        "export-plain": dq("export", str(q), "--target", "ort", "--out", str(work / "e-plain"), "--overwrite"),
        "export-slots": dq("export", str(q), "--target", "ort", "--lora-slots", "attention",
                           "--out", str(work / "e-slots"), "--overwrite"),
        "latency": [sys.executable, str(Path(__file__).resolve()), "--work", str(work), "--measure",
                    "--repeats", str(repeats), "--ranks", *map(str, ranks)],
    }


def random_adapter(spec, rank: int, seed: int = 0) -> dict:
    """A rank-``rank`` adapter on every slot of ``spec`` (random factors, a small update)."""
    import torch

    from dqdeploy.quant.lora import LoraLayer

    g = torch.Generator().manual_seed(seed)
    return {s["layer"]: LoraLayer(torch.randn(rank, s["in"], generator=g) / s["in"] ** 0.5,
                                  0.01 * torch.randn(s["out"], rank, generator=g), 1.0) for s in spec.lora_slots}


def measure(work: Path, ranks: list[int], repeats: int) -> dict:
    """Interleaved medians of one forward per configuration (run in the ``latency`` stage's own process)."""
    from bench.scale_latency import feeds, rss_gb, session
    from dqdeploy.runtimes.lora_feeds import lora_feeds

    before = rss_gb()
    plain, spec = session(work / "e-plain", 1)
    slots, slot_spec = session(work / "e-slots", 1)
    x = feeds(spec)
    configs = {"no slots": (plain, x), "slots, empty": (slots, {**x, **lora_feeds(slot_spec, [])})}
    for rank in ranks:
        configs[f"rank {rank}"] = (slots, {**x, **lora_feeds(slot_spec, [(random_adapter(slot_spec, rank), 1.0)])})
    times: dict[str, list[float]] = {name: [] for name in configs}
    for sess, feed in configs.values():
        sess.run(None, feed)  # warm-up
    for _ in range(repeats):
        for name, (sess, feed) in configs.items():
            start = time.perf_counter()
            sess.run(None, feed)
            times[name].append(time.perf_counter() - start)
    base = statistics.median(times["no slots"])
    rows = {name: {"median_s": round(statistics.median(t), 3), "overhead": round(statistics.median(t) / base - 1, 4),
                   "times_s": [round(v, 3) for v in t]} for name, t in times.items()}
    return {"rows": rows, "slots": len(slot_spec.lora_slots), "batch": 2,
            "latent": int(spec.model_config["sample_size"]), "tokens": 77, "threads": 1, "repeats": repeats,
            "sessions_gb": round(rss_gb() - before, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", choices=sorted(CONFIGS), default="sd15")
    ap.add_argument("--work", type=Path, required=True, help="scratch folder (GBs at SD size)")
    ap.add_argument("--ranks", type=int, nargs="+", default=[4, 16, 64])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--skip", nargs="*", default=[], choices=STAGES, help="stages already done in --work")
    ap.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)  # the latency stage's own process
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(measure(args.work, args.ranks, args.repeats)))
        return
    args.work.mkdir(parents=True, exist_ok=True)
    commands = stage_commands(args.config, args.work, args.ranks, args.repeats)
    entry: dict = {"command": "python bench/lora_overhead.py " + " ".join(sys.argv[1:]), "config": args.config,
                   "calibration": " ".join(CALIB), "skipped": list(args.skip), "stages": {}}
    for name in STAGES:
        if name in args.skip:
            continue
        print(f"[lora-overhead] {name} ...", flush=True)
        row = run_stage(commands[name], args.work / f"{name}.log")
        entry["stages"][name] = row
        print(f"[lora-overhead] {name}: {row}", flush=True)
        if row["exit"] != 0:
            print(f"[lora-overhead] {name} failed: see {args.work / (name + '.log')}", flush=True)
            return
    entry.update(json.loads((args.work / "latency.log").read_text().strip().splitlines()[-1]))
    path = write_results("lora_overhead", entry)
    for name, r in entry["rows"].items():
        print(f"{name:>14}: {r['median_s']:.3f} s  overhead {r['overhead']:+.1%}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
