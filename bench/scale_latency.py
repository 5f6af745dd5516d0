"""ORT CPU latency of two export folders (FP32 graph vs dqdeploy int8 graph), interleaved.

``python bench/scale_latency.py FP_EXPORT INT8_EXPORT [--repeats 5] [--threads 1 2]``: batch 2 (one
CFG pair), the config's latent size, 77 text tokens; for each thread count both sessions are built,
warmed up once, then run alternately ``repeats`` times; medians in seconds and the RSS each session
added. Prints one JSON line (the last line of its output), read by ``bench/scale.py``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np


def rss_gb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024 / 1e9
    return float("nan")


def session(folder: Path, threads: int):
    import onnxruntime as ort

    from dqdeploy.runtimes.spec import read_spec

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    spec = read_spec(folder)
    return ort.InferenceSession(str(folder / spec.onnx_file), so, providers=["CPUExecutionProvider"]), spec


def feeds(spec, seq_len: int = 77) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    size = int(spec.model_config["sample_size"])
    out = {"sample": rng.standard_normal((2, int(spec.model_config["in_channels"]), size, size), dtype=np.float32),
           "timestep": np.array([801.0, 801.0], np.float32)}
    ctx = next((t for t in spec.inputs if t.name == "encoder_hidden_states"), None)
    if ctx is not None:
        out["encoder_hidden_states"] = rng.standard_normal((2, seq_len, int(ctx.shape[-1])), dtype=np.float32)
    return out


def measure(fp: Path, q: Path, threads: int, repeats: int) -> dict:
    before = rss_gb()
    fp_sess, spec = session(fp, threads)
    fp_rss = rss_gb() - before
    before = rss_gb()
    q_sess, _ = session(q, threads)
    q_rss = rss_gb() - before
    x = feeds(spec)
    times: dict[str, list[float]] = {"fp32": [], "int8": []}
    for sess in (fp_sess, q_sess):
        sess.run(None, x)  # warm-up
    for _ in range(repeats):
        for name, sess in (("fp32", fp_sess), ("int8", q_sess)):
            start = time.perf_counter()
            sess.run(None, x)
            times[name].append(time.perf_counter() - start)
    fp_s, q_s = statistics.median(times["fp32"]), statistics.median(times["int8"])
    return {"threads": threads, "fp32_s": round(fp_s, 3), "int8_s": round(q_s, 3), "speedup": round(fp_s / q_s, 2),
            "fp32_session_gb": round(fp_rss, 2), "int8_session_gb": round(q_rss, 2), "repeats": repeats,
            "batch": 2, "latent": int(spec.model_config["sample_size"]), "tokens": 77}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("fp", type=Path)
    ap.add_argument("int8", type=Path)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = ap.parse_args()
    rows = [measure(args.fp, args.int8, t, args.repeats) for t in args.threads]
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
