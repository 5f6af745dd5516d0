"""Quantize wall time of the README's plain command on the shipped digits model, today's code and defaults
against the code from before issue 7 (``--before``) and against today's code with the old defaults, run
interleaved so that the machine's load falls on every configuration alike.

Configurations (each a fresh ``dqdeploy quantize ... --scheduler ddim --steps 50`` process, one thread):

* ``before``: the ``--before`` source tree (its own defaults);
* ``default``: this tree's defaults (``--layout ort --fallback auto``, propagated block distillation);
* ``old-defaults``: this tree with ``--layout trt --fallback none`` (what the defaults cost, apart from code).

Usage: git archive 4d59ec2 | tar -x -C /tmp/dq-before    # main before issue 7
       python bench/quantize_time.py --before /tmp/dq-before [--recipe w8a8] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.common import CLI, run_with_code, write_results  # noqa: E402

MODEL = ROOT / "dqdeploy" / "assets" / "digits-ddpm"
PLAIN = ["--scheduler", "ddim", "--steps", "50"]
OLD_DEFAULTS = ["--layout", "trt", "--fallback", "none"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", type=Path, required=True, help="dqdeploy source tree from before issue 7")
    ap.add_argument("--recipe", default="w8a8")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    configs = {"before": (args.before.resolve(), []), "default": (ROOT, []), "old-defaults": (ROOT, OLD_DEFAULTS)}
    seconds: dict[str, list[float]] = {name: [] for name in configs}
    with tempfile.TemporaryDirectory(prefix="dq-qtime-") as work:
        for i in range(args.repeats):
            for name, (code, extra) in configs.items():
                out = Path(work) / f"{name}-{i}"
                cmd = [*CLI, "quantize", str(MODEL), "--recipe", args.recipe, "--out", str(out), *PLAIN, *extra]
                seconds[name].append(run_with_code(code, cmd))
                print(f"{time.strftime('%H:%M:%S')} {name} run {i}: {seconds[name][-1]:.1f} s", flush=True)
    med = {name: statistics.median(s) for name, s in seconds.items()}
    data = {"command": f"python bench/quantize_time.py --before {args.before} --recipe {args.recipe} "
                       f"--repeats {args.repeats}",
            "model": str(MODEL.relative_to(ROOT)), "recipe": args.recipe,
            "args": PLAIN, "old_defaults_args": OLD_DEFAULTS, "seconds": seconds, "median_s": med,
            "default_vs_before": med["default"] / med["before"],
            "default_vs_old_defaults": med["default"] / med["old-defaults"]}
    print(f"medians: {med}; default / before = {data['default_vs_before']:.2f}x, "
          f"default / old-defaults = {data['default_vs_old_defaults']:.2f}x")
    print("wrote", write_results(f"quantize_time_{args.recipe}", data))


if __name__ == "__main__":
    main()
