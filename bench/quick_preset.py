"""A first try of a new model (issue 23, "first hour"): ``dqdeploy quantize MODEL --preset quick``, then ``export
--target ort`` and ``eval --fp`` of the result, each a fresh one-thread process; wall time, CPU time (user + system:
this machine is shared, so wall time also holds the other jobs' load) and peak RSS of each command.

  python bench/quick_preset.py [--repeats 2]

Results into ``bench/results/quick_preset.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.common import CLI, write_results  # noqa: E402

MODEL = ROOT / "dqdeploy" / "assets" / "digits-ddpm"


def timed(args: list[str]) -> dict[str, float]:
    """Run ``args`` (the dqdeploy CLI of this tree, one thread); its wall and CPU seconds and peak RSS in MB (the
    child's own resource usage, from ``wait4``)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(args, env=env, stdout=out, stderr=err, cwd=tempfile.gettempdir())
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait for it again
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(), err.read().decode()
    if proc.returncode:
        raise SystemExit(f"{' '.join(args)} failed:\n{stderr[-3000:]}")
    return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "peak_rss_mb": usage.ru_maxrss / 1024,
            "stderr_tail": stderr[-600:], "stdout": stdout}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    rows: dict[str, list[dict[str, float]]] = {"quantize": [], "export": [], "eval": []}
    quality: dict = {}
    with tempfile.TemporaryDirectory(prefix="dq-quick-") as work:
        for i in range(args.repeats):
            q, e = Path(work) / f"q{i}", Path(work) / f"e{i}"
            commands = {"quantize": ["quantize", str(MODEL), "--preset", "quick", "--out", str(q)],
                        "export": ["export", str(q), "--target", "ort", "--out", str(e)],
                        "eval": ["eval", str(q), "--fp", str(MODEL), "--n", "16", "--step-samples", "4"]}
            for name, command in commands.items():
                row = timed([*CLI, *command])
                if name == "eval":
                    report = json.loads(row["stdout"])
                    quality = {"images": report["images"], "digits": report["digits"], "verdict": report["verdict"]}
                    quality["manifest"] = json.loads((q / "manifest.json").read_text())["quality"]
                row.pop("stdout")
                rows[name].append(row)
                print(f"{time.strftime('%H:%M:%S')} {name} run {i}: {row['wall_s']:.1f} s wall, {row['cpu_s']:.1f} s "
                      f"CPU, {row['peak_rss_mb']:.0f} MB", flush=True)
    calibration = json.loads((MODEL / "scheduler" / "scheduler_config.json").read_text())["_class_name"]
    data = {"command": f"python bench/quick_preset.py --repeats {args.repeats}",
            "model": str(MODEL.relative_to(ROOT)), "scheduler": calibration,
            "commands": {"quantize": "dqdeploy quantize MODEL --preset quick --out Q",
                         "export": "dqdeploy export Q --target ort --out E",
                         "eval": "dqdeploy eval Q --fp MODEL --n 16 --step-samples 4"},
            "rows": rows, "quality": quality}
    print("wrote", write_results("quick_preset", data))


if __name__ == "__main__":
    main()
