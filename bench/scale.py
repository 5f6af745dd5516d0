"""Time and peak memory of every stage at Stable Diffusion size, and ORT int8 vs FP32 latency.

Each stage is the user's own command (``dqdeploy ...``, ``-v``) in a fresh process; its wall time,
peak RSS (``os.wait4``'s ``ru_maxrss`` of that process) and longest silence (the most seconds between two
lines of its output, progress lines included) are recorded:

  folder        the random-weight pipeline folder (``bench/scale_models.py``)
  quantize      the README's default: W8A8, fallback auto, block-wise distillation at a small budget
                (--iters, --batch-size 2)
  quantize-ptq  W8A8 --no-distill --fallback none (the artifact later stages read; --artifact q-bkd: the
                default one)
  export-ort    --target ort          export-onnx   --target onnx        export-float  --target float
  load          dqdeploy.load_quantized of the artifact
  latency       ONNX Runtime CPU, FP32 graph vs the --target ort graph: batch 2 (CFG), the config's latent,
                77 tokens, 1 and 2 threads, runs alternated (interleaved), medians; session RSS

Calibration budget (the smallest the CLI allows for CFG): --steps 4 --trajectories 2 --calib-samples 8
--guidance 7.5. Results go to bench/results/scale.json under the config's name (one entry per config,
every stage row from this code: rows measured on other code, by the hash of dqdeploy/, are dropped, and
``skipped`` lists the stages this run did not measure); BENCHMARKS.md via bench/report.py. Usage:

  nice -n 10 python bench/scale.py --config sd15 --work /tmp/scale [--skip quantize] [--iters 2] [--artifact q-bkd]
                                  [--resolution 64]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.common import RESULTS, code_hash, write_results  # noqa: E402
from bench.scale_models import CONFIGS  # noqa: E402

STAGES = ("folder", "quantize", "quantize-ptq", "export-ort", "export-onnx", "export-float", "load", "latency")
CALIB = ["--steps", "4", "--trajectories", "2", "--calib-samples", "8", "--guidance", "7.5"]


def run_stage(argv: list[str], log: Path) -> dict:
    """Run ``argv`` to completion, its output to ``log`` line by line (each stamped with the seconds since the
    start); its wall seconds, CPU seconds (what it used on a shared machine), peak RSS (GB), longest silence (seconds
    without an output line) and exit status."""
    env = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    start = last = time.perf_counter()
    silence = 0.0
    with open(log, "w") as out:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        assert proc.stdout is not None
        for line in proc.stdout:  # progress bars end their updates with \r: those count as lines too
            now = time.perf_counter()
            silence, last = max(silence, now - last), now
            for part in line.decode(errors="replace").replace("\r", "\n").splitlines():
                out.write(f"[{now - start:8.1f}s] {part}\n")
            out.flush()
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    end = time.perf_counter()
    return {"seconds": round(end - start, 1), "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 1),
            "peak_rss_gb": round(usage.ru_maxrss * 1024 / 1e9, 2),
            "longest_silence_s": round(max(silence, end - last), 1), "exit": proc.returncode,
            "command": " ".join(argv[2:] if argv[1] == "-m" else argv)}


PHASE = re.compile(r"INFO dqdeploy\.stages\.\w+: (?P<name>.+): (?P<s>[\d.]+) s \(peak RSS so far (?P<gb>[\d.]+) GB")


def phases(log: Path) -> dict[str, dict[str, float]]:
    """The seconds and peak RSS so far of every step a ``-v`` quantize or export logged (``system.progress.stage``)."""
    found = (PHASE.search(line) for line in log.read_text(errors="replace").splitlines())
    return {m["name"]: {"seconds": float(m["s"]), "peak_rss_gb": float(m["gb"])} for m in found if m}


def dq(*args: str) -> list[str]:
    return [sys.executable, "-m", "dqdeploy.cli", "-v", *args]


def stage_commands(config: str, work: Path, iters: int, width: int | None, artifact: str = "q",
                   resolution: int | None = None) -> dict[str, list[str]]:
    model, cond, q = work / "model", work / "model-cond.safetensors", work / artifact
    calib = CALIB + ([] if resolution is None else ["--resolution", str(resolution)])
    py = [sys.executable, "-c"]
    make = f"from bench.scale_models import CONFIGS, write_folder; from pathlib import Path; " \
           f"write_folder(CONFIGS[{config!r}]({'' if width is None else width}), Path({str(model)!r}))"
    return {
        "folder": py + [make],
        "quantize": dq("quantize", str(model), "--cond", str(cond), *calib, "--iters", str(iters), "--batch-size", "2",
                       "--out", str(work / "q-bkd"), "--overwrite"),
        "quantize-ptq": dq("quantize", str(model), "--cond", str(cond), *calib, "--no-distill", "--fallback", "none",
                           "--out", str(work / "q"), "--overwrite"),
        "export-ort": dq("export", str(q), "--target", "ort", "--out", str(work / "e-ort"), "--overwrite"),
        "export-onnx": dq("export", str(q), "--target", "onnx", "--out", str(work / "e-onnx"), "--overwrite"),
        "export-float": dq("export", str(model), "--target", "float", "--out", str(work / "e-fp"), "--overwrite"),
        "load": py + [f"import dqdeploy; dqdeploy.load_quantized({str(q)!r})"],
        "latency": [sys.executable, str(ROOT / "bench" / "scale_latency.py"), str(work / "e-fp"), str(work / "e-ort")],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", choices=sorted(CONFIGS), default="sd15")
    ap.add_argument("--width", type=int, help="reduced config only: channels of the first block")
    ap.add_argument("--work", type=Path, required=True, help="scratch folder (GBs at SD size)")
    ap.add_argument("--iters", type=int, default=2, help="distillation iterations per block (stage quantize)")
    ap.add_argument("--skip", nargs="*", default=[], choices=STAGES)
    ap.add_argument("--artifact", choices=("q", "q-bkd"), default="q",
                    help="what export and load read: the PTQ artifact (q) or the distilled one (q-bkd)")
    ap.add_argument("--resolution", type=int,
                    help="calibration latent size (quantize --resolution; the config's sample_size "
                         "by default); the exported graphs take that size")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    commands = stage_commands(args.config, args.work, args.iters, args.width, args.artifact, args.resolution)
    path = RESULTS / "scale.json"
    here = code_hash()
    before = (json.loads(path.read_text()) if path.is_file() else {}).get(args.config, {})
    # stage rows of an earlier run are kept only if they measured this same code (and so carry its hash)
    stages = {n: r for n, r in before.get("stages", {}).items() if r.get("code_hash") == here}
    entry = {"command": "python bench/scale.py " + " ".join(sys.argv[1:]),
             "calibration": " ".join(CALIB + ([f"--resolution {args.resolution}"] if args.resolution else [])),
             "iters": args.iters, "skipped": [n for n in STAGES if n in args.skip], "stages": stages}
    if "latency" in stages and "latency" in before:
        entry["latency"] = before["latency"]
    for name in STAGES:
        if name in args.skip:
            continue
        print(f"[scale] {name} ...", flush=True)
        row = run_stage(commands[name], args.work / f"{name}.log") | {"code_hash": here}
        row["phases"] = phases(args.work / f"{name}.log")
        if name == "latency" and row["exit"] == 0:
            entry["latency"] = json.loads((args.work / "latency.log").read_text().strip().splitlines()[-1])
        stages[name] = row
        print(f"[scale] {name}: {row}", flush=True)
        write_results("scale", entry, label=args.config)
        if row["exit"] != 0:
            print(f"[scale] {name} failed: see {args.work / (name + '.log')}", flush=True)
            break


if __name__ == "__main__":
    main()
