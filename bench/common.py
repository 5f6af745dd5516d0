"""Shared benchmark plumbing: one thread, timing medians, JSON results next to the scripts.

Every file in bench/results is written by :func:`write_results` (rows of the zoo harness are stamped by
:func:`stamp`): each result carries its ``commit``, the ``code_hash`` of the dqdeploy/ code it measured,
its ``date`` (UTC) and the ``machine`` (CPU model, int8 class and flags, versions). ``bench/report.py``
refuses results without them and marks those measured on other code as stale.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from bench.provenance import code_hash, git_commit, utc_now  # noqa: E402, F401  (git_commit: re-exported)
from dqdeploy.io.atomic import atomic_write_bytes  # noqa: E402

torch.set_num_threads(1)
RESULTS = Path(__file__).parent / "results"
CLI = [sys.executable, "-c", "from dqdeploy.cli import main; main()"]  # the dqdeploy CLI of the code on PYTHONPATH


def run_with_code(code: Path, args: list[str]) -> float:
    """Run ``args`` with the dqdeploy source tree ``code`` first on the import path (from a folder without a
    dqdeploy/: ``-c`` puts the working directory before PYTHONPATH), one thread; wall seconds."""
    env = {**os.environ, "PYTHONPATH": str(code), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    subprocess.run(args, env=env, check=True, stdout=subprocess.DEVNULL, cwd=tempfile.gettempdir())
    return time.perf_counter() - start


def median_ms(fn: Callable[[], object], repeats: int, warmup: int = 3) -> tuple[float, list[float]]:
    """Median wall time of ``fn`` in milliseconds, and all samples."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples), samples


def interleaved_ms(runs: dict[str, Callable[[], object]], repeats: int, warmup: int = 2) -> dict[str, list[float]]:
    """Wall times (ms) of every ``runs[name]``, measured in interleaved rounds (after ``warmup`` calls of
    each): drift on a shared machine hits all of them alike, so their medians compare."""
    for fn in runs.values():
        median_ms(fn, repeats=1, warmup=warmup)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            times[name].append(median_ms(fn, repeats=1, warmup=0)[0])
    return times


def machine() -> dict[str, str]:
    """The CPU (model, int8 class and flags) and the versions a result was measured with."""
    from dqdeploy.system.cpu import cpu_info

    try:
        import onnxruntime

        ort_version = onnxruntime.__version__
    except ImportError:
        ort_version = "not installed"
    return {**cpu_info().as_dict(), "python": platform.python_version(),
            "torch": torch.__version__, "onnxruntime": ort_version, "threads": "1"}


def interleaved_wall_cpu(runs: dict[str, Callable[[], object]],
                         repeats: int) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall and process CPU seconds of every ``runs[name]``, in interleaved rounds (call each once first to warm it):
    on a shared machine the CPU time of a one-thread run is the less noisy figure (preemption inflates wall time)."""
    wall: dict[str, list[float]] = {n: [] for n in runs}
    cpu: dict[str, list[float]] = {n: [] for n in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            w, c = time.perf_counter(), time.process_time()
            fn()
            wall[name].append(time.perf_counter() - w)
            cpu[name].append(time.process_time() - c)
    return wall, cpu


def provenance() -> dict[str, Any]:
    """Where a result comes from: commit, hash of the dqdeploy/ code, date (UTC), machine."""
    return {"commit": git_commit(), "code_hash": code_hash(), "date": utc_now(), "machine": machine()}


def stamp(entry: dict[str, Any]) -> dict[str, Any]:
    """``entry`` with its provenance (machine fields the script recorded itself, e.g. a GPU, are kept)."""
    prov = provenance()
    return {**entry, **prov, "machine": {**(entry.get("machine") or {}), **prov["machine"]}}


def write_results(name: str, data: dict[str, Any], label: str | None = None) -> Path:
    """The one writer of ``bench/results/NAME.json``: ``data`` stamped with its provenance, as the whole file,
    or with ``label`` as the entry ``label`` of a file holding one entry per label (others kept). Atomic."""
    path = RESULTS / f"{name}.json"
    if label is None:
        out = stamp(data)
    else:
        out = json.loads(path.read_text()) if path.is_file() else {}
        out[label] = stamp(data)
    return atomic_write_bytes(path, (json.dumps(out, indent=2) + "\n").encode())


def ort_session(path: str | Path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
