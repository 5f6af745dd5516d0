"""ONNX Runtime's integer kernels on this CPU, per weight format: exact or not, and how fast.

  python bench/int8_kernels.py [--repeats 15] [--exactness-only] [--label NAME]

Exactness: every probe of :mod:`dqdeploy.verify.int8_probe` (QLinearConv, QLinearMatMul, QGemm,
MatMulIntegerToFloat -- the ops the ORT-layout graph fuses into) with full-range int8 weights (the ``vnni``
format), uint8 weights (``portable``) and int8 weights within [-64, 64], against exact integer arithmetic.
Speed: one conv 320->320, 3x3, 32x32, batch 2 (an SD-1.5 mid-resolution conv), one thread: FP32 ``Conv``
vs the exporter's QDQ pattern fused into QLinearConv in each format, interleaved rounds, medians of wall
and CPU time. ``--exactness-only`` skips the timing (for an emulated CPU, e.g.
``qemu-x86_64 -cpu Haswell python bench/int8_kernels.py --exactness-only --label haswell-emulated``,
where the integers are the emulated CPU's but the times are not). Results go to
``bench/results/int8_kernels.json`` under ``--label`` (default: the CPU's int8 class).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.common import interleaved_wall_cpu, write_results  # noqa: E402
from dqdeploy.exporters.qdq import UINT8_ZERO_POINT, SurgeryOptions, stored_weight  # noqa: E402
from dqdeploy.system.cpu import cpu_info  # noqa: E402
from dqdeploy.verify.int8_probe import PROBES, probe  # noqa: E402

FORMATS = {"full-range int8 (vnni)": ("vnni", 127), "uint8 (portable)": ("portable", 127),
           "int8 in [-64, 64]": ("vnni", 64)}


def conv_session(fmt: str | None, weight_range: int = 127):
    """One 320->320 3x3 conv as ORT runs it: FP32 (``fmt`` None) or the exporter's QDQ pattern in ``fmt``."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w_int = rng.integers(-weight_range, weight_range + 1, size=(320, 320, 3, 3))
    scale = np.float32(0.01)
    if fmt is None:
        inits = [numpy_helper.from_array((w_int * scale).astype(np.float32), "w")]
        nodes = [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])]
    else:
        stored, zp = stored_weight(w_int, SurgeryOptions(layout="ort", int8_format=fmt))  # type: ignore[arg-type]
        inits = [numpy_helper.from_array(stored, "W"), numpy_helper.from_array(np.full(320, scale, np.float32), "ws"),
                 numpy_helper.from_array(np.full(320, zp, stored.dtype), "wz"),
                 numpy_helper.from_array(np.array(0.05, np.float32), "s"),
                 numpy_helper.from_array(np.array(UINT8_ZERO_POINT, np.uint8), "z")]
        nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
                 helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
                 helper.make_node("DequantizeLinear", ["W", "ws", "wz"], ["w"], axis=0),
                 helper.make_node("Conv", ["xd", "w"], ["c"], pads=[1, 1, 1, 1]),
                 helper.make_node("QuantizeLinear", ["c", "s", "z"], ["cq"]),
                 helper.make_node("DequantizeLinear", ["cq", "s", "z"], ["y"])]
    graph = helper.make_graph(nodes, "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 320, 32, 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    so = ort.SessionOptions()
    so.intra_op_num_threads = so.inter_op_num_threads = 1
    so.log_severity_level = 3
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def speed(repeats: int) -> dict:
    sessions = {"fp32": conv_session(None)} | {label: conv_session(fmt, wr) for label, (fmt, wr) in FORMATS.items()}
    x = {"x": np.random.default_rng(1).standard_normal((2, 320, 32, 32)).astype(np.float32)}
    for s in sessions.values():
        s.run(None, x)
    wall_s, cpu_s = interleaved_wall_cpu({n: (lambda s=s: s.run(None, x)) for n, s in sessions.items()}, repeats)
    wall = {n: [t * 1e3 for t in v] for n, v in wall_s.items()}
    cpu = {n: [t * 1e3 for t in v] for n, v in cpu_s.items()}
    med = {n: statistics.median(v) for n, v in cpu.items()}
    return {"shape": "conv 320->320 3x3, 2x320x32x32", "repeats": repeats,
            "wall_ms": {n: round(statistics.median(v), 2) for n, v in wall.items()},
            "cpu_ms": {n: round(v, 2) for n, v in med.items()},
            "cpu_ms_iqr": {n: [round(float(q), 2) for q in np.percentile(v, [25, 75])] for n, v in cpu.items()},
            "speedup_vs_fp32_cpu": {n: round(med["fp32"] / v, 2) for n, v in med.items() if n != "fp32"}}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--exactness-only", action="store_true", help="skip the timing (emulated CPUs)")
    ap.add_argument("--label", default=None, help="key in int8_kernels.json (default: the CPU's int8 class)")
    args = ap.parse_args(argv)
    info = cpu_info()
    exactness = {op: {label: (lambda r: {"fused": r.fused, "mismatch": r.mismatch, "max_diff": r.max_diff})(
        probe(op, fmt, weight_range=wr)) for label, (fmt, wr) in FORMATS.items()} for op in PROBES}
    entry = {"command": "python bench/int8_kernels.py " + " ".join(argv if argv is not None else sys.argv[1:]),
             "exactness": exactness,
             "speed": None if args.exactness_only else speed(args.repeats)}
    path = write_results("int8_kernels", entry, label=args.label or info.int8_class)
    print(json.dumps(entry, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
