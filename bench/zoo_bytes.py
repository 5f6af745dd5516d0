"""Do two code trees write the same artifact on every zoo member? For changes meant to leave the
quantizer's numbers alone (memory, structure): equal bytes carry every quality row over unchanged.

Each member is quantized with the default W4A8 recipe (block distillation, 20 iterations per block,
fallback auto) on 64 calibration samples from 16 trajectories, once per tree, each in a fresh process
with that tree first on ``sys.path``; the sha256 of ``model.safetensors`` and of the calibration
subset are compared (``--graphs``: and of both exported graphs). Usage (TREE: a checkout, e.g.
``git worktree add /tmp/old BASE``):

  python bench/zoo_bytes.py --trees /tmp/old . --work /tmp/zoo-bytes
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ONE = r"""
import dataclasses, hashlib, sys
from pathlib import Path
import torch
torch.set_num_threads(1)
root, model, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
sys.path.insert(0, root)
from bench import zoo
from bench.zoo_quality import calibration_for, recipe_for
from dqdeploy import quantize
calib = dataclasses.replace(calibration_for(model), samples=64, trajectories=16)
quantize(zoo.ensure(model), recipe_for("w4a8", "default").replace(iters=20), calib, out,
         cond_file=zoo.get(model).cond_file(), overwrite=True)
digests = [hashlib.sha256((out / f).read_bytes()).hexdigest()
           for f in ("model.safetensors", "calibration_inputs.safetensors")]
if len(sys.argv) > 4:  # --graphs: the exported graphs too (every file of the graph's folder)
    from dqdeploy import export
    for target in ("ort", "onnx"):
        folder = export(out, Path(f"{out}-{target}"), target=target, overwrite=True)
        sub = next(p for p in folder.iterdir() if p.is_dir())
        digests.append(hashlib.sha256(b"".join(p.read_bytes() for p in sorted(sub.iterdir()))).hexdigest())
print(*digests)
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trees", nargs=2, type=Path, required=True)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--models", default="shipped,early,seed1,narrow,cond,dit")
    ap.add_argument("--graphs", action="store_true", help="also export both layouts and compare the graphs' bytes")
    args = ap.parse_args()
    for model in args.models.split(","):
        digests = [subprocess.run([sys.executable, "-c", ONE, str(tree.resolve()), model,
                                   str(args.work / f"{i}-{model}"), *(["graphs"] if args.graphs else [])],
                                  capture_output=True, text=True, check=True, env=os.environ | {"OMP_NUM_THREADS": "1"}
                                  ).stdout.split()
                   for i, tree in enumerate(args.trees)]
        names = ["artifact", "calibration", "ort graph", "onnx graph"][:len(digests[0])]
        same = ", ".join(f"{n} {'same' if a == b else 'DIFFERENT'}" for n, a, b in zip(names, *digests))
        print(f"{model:8s} {same} ({digests[0][0][:16]} {digests[1][0][:16]})", flush=True)


if __name__ == "__main__":
    main()
