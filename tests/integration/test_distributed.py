"""Many processes: ``dqdeploy quantize --nproc 2`` (torchrun, two real gloo processes) against one
process with the same seed and global batch, and a failure on one rank of a two-node run.

Tolerances. Trajectories, activation ranges, MSE scale searches and the fallback are sharded and
combined exactly (min/max) or in float64 (error sums): they decide the same. Distillation sums the
ranks' gradients, so a step differs from the one-process step only by summation order (~1e-7
relative). Two things amplify that: Adam's first steps are ``lr * sign(g)`` (an element whose
gradient is at rounding-noise level may step the other way) and rounding to the integer grid (a
weight that moves by 1e-9 may land on the next integer), and each block's inputs come from the
blocks distilled before it. So: the first block's loss curve, where no earlier block differs, must
match to 1e-4, and every tensor must lie within Adam's bound ``2 * iters * lr`` of one process.
Without the gradient sum (each rank stepping on its half batch) the first block's curve differs by
more than 1e-4.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dqdeploy import quantize
from dqdeploy.recipe import W8A8, CalibrationConfig
from tests.helpers import tiny_cond_unet, write_bare_unet, write_cond_file

ROOT = Path(__file__).resolve().parents[2]
ITERS, BATCH = 3, 4
ARGS = ["--steps", "4", "--trajectories", "6", "--calib-samples", "24", "--batch-size", str(BATCH), "--iters", str(ITERS),
        "--guidance", "3", "--recipe", "w8a8"]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1",
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    unet_dir, sched_dir = write_bare_unet(tiny_cond_unet(), root)
    return root, ["--scheduler-dir", str(sched_dir), "--cond", str(write_cond_file(root / "cond.safetensors"))], unet_dir


def test_two_processes_match_one(model):
    root, inputs, unet_dir = model
    torch.set_num_threads(1)
    one = root / "one"
    quantize(unet_dir, W8A8.replace(iters=ITERS, batch_size=BATCH),
             CalibrationConfig(steps=4, samples=24, trajectories=6, batch_size=BATCH, guidance=3.0), one,
             scheduler_dir=root / "sched", cond_file=root / "cond.safetensors")
    two = root / "two"
    proc = subprocess.run([sys.executable, "-m", "dqdeploy", "quantize", str(unet_dir), *inputs, *ARGS, "--out", str(two),
                           "--nproc", "2"], capture_output=True, text=True, env=_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("quantized ") == 1, proc.stdout  # rank 0 reports

    m1, m2 = (json.loads((d / "manifest.json").read_text()) for d in (one, two))
    assert m1["fallback"] == m2["fallback"] and m1["timesteps"] == m2["timesteps"]
    assert m2["blocks"][0]["loss_before"] == pytest.approx(m1["blocks"][0]["loss_before"], rel=1e-5)
    c1, c2 = (json.loads((d / "distill_report.json").read_text())[0]["curve"] for d in (one, two))
    assert len(c1) == ITERS and c2 == pytest.approx(c1, rel=1e-4)
    for name in ("calibration_inputs.safetensors",):
        a, b = load_file(str(one / name)), load_file(str(two / name))
        assert all(torch.equal(a[k], b[k]) for k in a)  # trajectories: the same set, in the same order
    a, b = load_file(str(one / "model.safetensors")), load_file(str(two / "model.safetensors"))
    assert a.keys() == b.keys()
    bound = 2 * ITERS * max(W8A8.lr_weight, W8A8.lr_quant) + 1e-6
    for k in a:
        diff = (a[k].float() - b[k].float()).abs()
        assert diff.max() <= bound, (k, float(diff.max()))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_failing_rank_stops_every_rank(model):
    """Two torchrun 'nodes' on this machine; node 1 is given a conditioning file that does not exist."""
    root, inputs, unet_dir = model
    out = root / "failed"
    port = _free_port()
    procs = []
    for node, cond in ((0, str(root / "cond.safetensors")), (1, str(root / "missing.safetensors"))):
        args = [a if a != str(root / "cond.safetensors") else cond for a in inputs]
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(node),
             "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "dqdeploy-test",
             "-m", "dqdeploy", "quantize", str(unet_dir), *args, *ARGS, "--out", str(out)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**_env(), "DQDEPLOY_DIST_TIMEOUT": "120"}))
    results = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, results):
        assert p.returncode != 0, err[-2000:]
        assert "error: " in err and f'File "{ROOT / "dqdeploy"}' not in err, err[-3000:]  # torchrun adds its own report
    assert "not found" in results[1][1]  # the rank that failed says why
    assert "rank 1 failed while loading" in results[0][1], results[0][1][-3000:]  # and the other rank names it
    assert not out.exists() and not list(root.glob(".failed*"))
