"""ONNX Runtime CPU: FP32 graph vs the ``--target ort`` int8 graph before and after a layout change,
interleaved, plus an ORT profile of each graph aggregated by op type (issue 9, part 5).

  python bench/ort_speed.py FP_EXPORT BEFORE_EXPORT AFTER_EXPORT [--threads 1 2] [--repeats 9] [--profile-runs 5]

Latency: batch 2 (one CFG pair), the config's latent, 77 tokens (``bench/scale_latency.py``'s inputs); for each
thread count the three sessions are built, warmed up, then run in turn ``repeats`` times; medians of wall
time and of the process's CPU time (on this shared machine, CPU time of a one-thread run is the less
noisy figure: preemption inflates wall time, not CPU time). Profile: ``enable_profiling`` over
``profile-runs`` runs at one thread; each node's *minimum* over the runs after the first (robust to
preemption), summed by op type and by group (int8 kernels, attention -- Softmax, the two batched MatMuls
or MultiHeadAttention --, Q/DQ, float conv/matmul, other). Results go to
``bench/results/ort_speed.json`` (key ``--label``), with the load average before and after.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.common import interleaved_wall_cpu, write_results  # noqa: E402
from bench.scale_latency import feeds, session  # noqa: E402

GRAPHS = ("fp32", "before", "after")
GROUPS = {"int8 kernels": {"QLinearConv", "QLinearMatMul", "QGemm", "MatMulInteger", "ConvInteger"},
          "attention": {"MultiHeadAttention", "Softmax", "FusedMatMul"},
          "Q/DQ": {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"},
          "float conv/matmul": {"Conv", "MatMul", "Gemm", "FusedConv", "FusedGemm"}}


def _group(node: str, op: str) -> str:
    """The group of a profiled node: the exporter names attention's P.V MatMul after scaled_dot_product_attention."""
    if op == "MatMul" and "scaled_dot_product_attention" in node:
        return "attention"
    return next((g for g, members in GROUPS.items() if op in members), "other")


def interleaved(folders: dict[str, Path], threads: int, repeats: int) -> dict:
    """Median wall and CPU seconds per graph, runs alternated."""
    sessions = {name: session(path, threads)[0] for name, path in folders.items()}
    from dqdeploy.runtimes.spec import read_spec

    x = feeds(read_spec(folders["fp32"]))
    for s in sessions.values():
        s.run(None, x)
    wall, cpu = interleaved_wall_cpu({n: (lambda s=s: s.run(None, x)) for n, s in sessions.items()}, repeats)
    med = {n: statistics.median(v) for n, v in wall.items()}
    med_cpu = {n: statistics.median(v) for n, v in cpu.items()}
    return {"threads": threads, "repeats": repeats, "wall_s": {n: round(v, 4) for n, v in med.items()},
            "cpu_s": {n: round(v, 4) for n, v in med_cpu.items()},
            "wall_spread_s": {n: [round(min(v), 4), round(max(v), 4)] for n, v in wall.items()},
            "speedup_wall": {n: round(med["fp32"] / med[n], 2) for n in ("before", "after")},
            "speedup_cpu": {n: round(med_cpu["fp32"] / med_cpu[n], 2) for n in ("before", "after")}}


def profile(folder: Path, runs: int) -> dict:
    """Per-node minimum kernel time over ``runs - 1`` profiled runs, summed by op type and by group (ms)."""
    import onnxruntime as ort

    from dqdeploy.runtimes.spec import read_spec

    spec = read_spec(folder)
    with tempfile.TemporaryDirectory() as tmp:
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = 1, 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.enable_profiling, so.profile_file_prefix = True, str(Path(tmp) / "prof")
        s = ort.InferenceSession(str(folder / spec.onnx_file), so, providers=["CPUExecutionProvider"])
        x = feeds(spec)
        for _ in range(runs):
            s.run(None, x)
        events = json.loads(Path(s.end_profiling()).read_text())
    starts = sorted(e["ts"] for e in events if e.get("name") == "model_run")
    best: dict[str, float] = {}
    ops: dict[str, str] = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= starts[1]:
            best[e["name"]] = min(best.get(e["name"], float("inf")), e["dur"] / 1e3)
            ops[e["name"]] = e["args"]["op_name"]
    by_op: collections.Counter = collections.Counter()
    count: collections.Counter = collections.Counter()
    for name, ms in best.items():
        by_op[ops[name]] += ms
        count[ops[name]] += 1
    groups_ms: collections.Counter = collections.Counter()
    for name, ms in best.items():
        groups_ms[_group(name, ops[name])] += ms
    total = sum(by_op.values())
    groups = {g: round(groups_ms[g], 1) for g in (*GROUPS, "other")}
    return {"total_ms": round(total, 1), "groups_ms": groups, "nodes": len(best),
            "by_op_ms": {op: round(ms, 1) for op, ms in by_op.most_common(16)},
            "count": {op: count[op] for op, _ in by_op.most_common(16)}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name in GRAPHS:
        ap.add_argument(name, type=Path, help=f"export folder of the {name} graph")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--profile-runs", type=int, default=5)
    ap.add_argument("--label", default="reduced")
    ap.add_argument("--note", default="")
    args = ap.parse_args()
    folders = {n: getattr(args, n) for n in GRAPHS}
    load_before = os.getloadavg()
    rows = [interleaved(folders, t, args.repeats) for t in args.threads]
    profiles = {n: profile(p, args.profile_runs) for n, p in folders.items()} if args.profile_runs > 1 else {}
    argv = [a if " " not in a else repr(a) for a in sys.argv[1:]]
    if "--note" in argv:  # the note is stored on its own
        k = argv.index("--note")
        del argv[k:k + 2]
    entry = {"command": "python bench/ort_speed.py " + " ".join(argv),
             "loadavg_before": [round(v, 2) for v in load_before],
             "loadavg_after": [round(v, 2) for v in os.getloadavg()],
             "batch": 2, "tokens": 77, "rows": rows, "profile_1_thread": profiles, "note": args.note}
    path = write_results("ort_speed", entry, label=args.label)
    print(json.dumps(rows))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
