"""Wall time of ``dqdeploy quantize`` in one process vs ``--nproc 2`` (torchrun, gloo), side by side.

Each run is the real command line in a fresh subprocess on the shipped digits DDPM, one thread per
process (so two processes may use both cores), runs alternating 1, 2, 1, 2, ...; the load average
before each run is recorded, since this machine is shared. The artifacts are compared too: the
two-process one against one process with ``micro_batches=2`` (the same slices, gradients accumulated:
expected byte-identical), and against the plain one-process run (the first distilled block's loss
curve, the largest difference of the float tensors and of the dequantized weights, the share of
integer weights that differ).

Usage: python bench/distributed.py [--rounds 2] [--iters 40] [--samples 256] [--trajectories 32] [--steps 20]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.common import write_results  # noqa: E402


def run(nproc: int, args: list[str], out: Path) -> dict:
    """One quantize; its wall time and the load average before it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    load = os.getloadavg()[0]
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "dqdeploy", "quantize", *args, "--out", str(out), "--overwrite",
                           "--nproc", str(nproc)], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"nproc {nproc} failed:\n{proc.stderr[-3000:]}")
    return {"nproc": nproc, "wall_s": wall, "loadavg_before": load}


def compare(one: Path, two: Path) -> dict:
    """How far the two artifacts are apart."""
    from safetensors.torch import load_file

    a, b = load_file(str(one / "model.safetensors")), load_file(str(two / "model.safetensors"))
    c1, c2 = (json.loads((d / "distill_report.json").read_text())[0]["curve"] for d in (one, two))
    rel = max((abs(x - y) / abs(x) for x, y in zip(c1, c2)), default=0.0)
    ints = [k for k in a if k.endswith(("weight_int8", "weight_int4"))]
    deq = []
    for k in [k for k in ints if k.endswith("weight_int8")]:
        s1, s2 = (t[k.replace("weight_int8", "weight_quantizer.scale")].reshape(-1, *[1] * (a[k].dim() - 1))
                  for t in (a, b))
        deq.append(float((a[k].float() * s1 - b[k].float() * s2).abs().max()))
    return {"same_tensors": a.keys() == b.keys(),
            "max_abs_float_tensor_diff": max(float((a[k].float() - b[k].float()).abs().max())
                                             for k in a if k not in ints),
            "max_abs_dequantized_weight_diff": max(deq, default=0.0),
            "int_weights_differing": sum(int((a[k] != b[k]).sum()) for k in ints) / sum(a[k].numel() for k in ints),
            "first_block_curve_max_rel_diff": rel}


def same_bytes(one: Path, two: Path) -> bool:
    """Whether two artifact folders hold the same files, byte for byte."""
    names = sorted(p.name for p in one.iterdir())
    return names == sorted(p.name for p in two.iterdir()) and all((one / n).read_bytes() == (two / n).read_bytes()
                                                                  for n in names)


def micro_reference(model: str, a: argparse.Namespace, out: Path) -> None:
    """One process, each distillation batch in 2 slices (what two processes compute), through the API
    with the settings the command lines use."""
    code = ("from dqdeploy import quantize; from dqdeploy.core.recipe import W8A8, CalibrationConfig; "
            f"quantize({model!r}, W8A8.replace(iters={a.iters}, batch_size=32), CalibrationConfig(scheduler='ddim', "
            f"steps={a.steps}, samples={a.samples}, trajectories={a.trajectories}, batch_size=32), {str(out)!r}, "
            "micro_batches=2)")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--iters", type=int, default=40)
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--trajectories", type=int, default=32)
    p.add_argument("--steps", type=int, default=20)
    a = p.parse_args()
    from dqdeploy.eval.digits import digits_model_dir

    args = [str(digits_model_dir()), "--recipe", "w8a8", "--scheduler", "ddim", "--steps", str(a.steps),
            "--trajectories", str(a.trajectories), "--calib-samples", str(a.samples), "--iters", str(a.iters),
            "--batch-size", "32"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        outs = {n: Path(tmp) / f"q{n}" for n in (1, 2)}
        for _ in range(a.rounds):
            for n in (1, 2):
                rows.append(run(n, args, outs[n]))
                print(rows[-1], file=sys.stderr)
        agreement = compare(outs[1], outs[2])
        micro = Path(tmp) / "micro2"
        micro_reference(args[0], a, micro)
        agreement["two_processes_byte_identical_to_micro_batches_2"] = same_bytes(micro, outs[2])
    med = {n: statistics.median(r["wall_s"] for r in rows if r["nproc"] == n) for n in (1, 2)}
    write_results("distributed", {
        "command": "python bench/distributed.py " + " ".join(sys.argv[1:]),
        "machine": {"cpus": str(os.cpu_count())},
        "quantize_args": args[1:], "rows": rows, "median_wall_s": {str(k): v for k, v in med.items()},
        "speedup_2_vs_1": med[1] / med[2], "agreement": agreement,
    })


if __name__ == "__main__":
    main()
