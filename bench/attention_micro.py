"""One attention on ONNX Runtime CPU at Stable-Diffusion shapes, three ways (issue 9, part 5):

* ``float``: what the exporter writes (heads split by Reshape/Transpose, MatMul, Softmax, MatMul, heads merged);
* ``mha``: ``com.microsoft.MultiHeadAttention`` (what the ``--target ort`` layout now writes);
* ``int8``: int8 batched matmuls, ``QLinearMatMul(u8 q, s8 k^T) -> DQ -> Softmax -> Q(1/255) ->
  QLinearMatMul(u8 p, s8 v) -> DQ`` with constant scales on inputs already quantized (a best case);
* ``int8 vnni`` / ``int8 portable``: what ``quantize --attention int8`` exports for ONNX Runtime
  (``exporters/attention_qdq.py``): the float graph's heads with ``Q -> DQ`` on q, k^T (u8 x s8, or u8 x u8 for
  ``portable``), the softmax output (1/127) and v, which ONNX Runtime fuses into ``MatMulIntegerToFloat``, and
  the per-step rescale ``Mul`` after each product.

  python bench/attention_micro.py [--repeats 5]

Batch 2 (CFG), 8 heads, one thread; median CPU time of ``repeats`` runs after a warm-up (CPU time: this
machine is shared). Results into ``bench/results/ort_speed.json`` under ``attention micro``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.common import write_results  # noqa: E402

HEADS = 8
KINDS = ("float", "mha", "int8", "int8 vnni", "int8 portable")
SHAPES = {  # name: (query tokens, key tokens, channels)
    "SD-1.5 level 1 self (64x64 latent)": (4096, 4096, 320),
    "SD-1.5 level 1 cross": (4096, 77, 320),
    "SD-1.5 level 2 self": (1024, 1024, 640),
    "reduced-w128 level 1 self (32x32 latent)": (1024, 1024, 128),
}


def _graph(kind: str, n: int, m: int, c: int):
    """The three forms as ONNX models; inputs q [2, n, c], k/v [2, m, c] (int8: heads already split)."""
    from onnx import TensorProto as TP
    from onnx import helper as h
    from onnx import numpy_helper as nh

    d = c // HEADS
    const = [nh.from_array(np.asarray([2, -1, HEADS, d], np.int64), "s4"),
             nh.from_array(np.asarray([2, -1, c], np.int64), "s3"),
             nh.from_array(np.asarray(d ** -0.5, np.float32), "sc")]
    if kind == "mha":
        nodes = [h.make_node("MultiHeadAttention", ["q", "k", "v"], ["o"], domain="com.microsoft", num_heads=HEADS)]
        const = []
    elif kind in ("float", "int8 vnni", "int8 portable"):
        nodes = [h.make_node("Reshape", [x, "s4"], [x + "4"]) for x in "qkv"]
        nodes += [h.make_node("Transpose", [x + "4"], [x + "t"], perm=[0, 2, 3, 1] if x == "k" else [0, 2, 1, 3])
                  for x in "qkv"]
        qk, pv = ["qt", "kt"], ["p", "vt"]
        if kind != "float":  # the exporter's Q/DQ in front of both products (attention_qdq.py)
            unsigned_k = kind == "int8 portable"
            grid = {"qt": (0.05, np.uint8(128)), "kt": (0.05, np.uint8(128) if unsigned_k else np.int8(0)),
                    "p": (1 / 127, np.uint8(0)), "vt": (0.05, np.int8(0))}
            for x, (scale, zp) in grid.items():
                const += [nh.from_array(np.asarray(scale, np.float32), x + "_s"),
                          nh.from_array(np.asarray(zp), x + "_z")]
                nodes += [h.make_node("QuantizeLinear", [x, x + "_s", x + "_z"], [x + "_q"]),
                          h.make_node("DequantizeLinear", [x + "_q", x + "_s", x + "_z"], [x + "_dq"])]
            qk, pv = ["qt_dq", "kt_dq"], ["p_dq", "vt_dq"]
            const.append(nh.from_array(np.asarray(1.01, np.float32), "step"))
        nodes += [h.make_node("MatMul", qk, ["s"]), h.make_node("Mul", ["s", "sc"], ["ss"]),
                  h.make_node("Softmax", ["ss"], ["p"], axis=-1), h.make_node("MatMul", pv, ["a0"]),
                  h.make_node("Mul" if kind != "float" else "Identity", ["a0", "step"] if kind != "float" else ["a0"],
                              ["a"]),
                  h.make_node("Transpose", ["a"], ["at"], perm=[0, 2, 1, 3]),
                  h.make_node("Reshape", ["at", "s3"], ["o"])]
    else:
        scales = {"qs": (0.05, np.float32), "qz": (128, np.uint8), "ks": (0.05, np.float32), "kz": (0, np.int8),
                  "ss": (0.1, np.float32), "sz": (128, np.uint8), "ps": (1 / 255, np.float32), "pz": (0, np.uint8),
                  "os": (0.02, np.float32), "oz": (128, np.uint8)}
        const = [nh.from_array(np.asarray(v, t), name) for name, (v, t) in scales.items()]
        nodes = [h.make_node("QLinearMatMul", ["q", "qs", "qz", "k", "ks", "kz", "ss", "sz"], ["s8"]),
                 h.make_node("DequantizeLinear", ["s8", "ss", "sz"], ["s"]),
                 h.make_node("Softmax", ["s"], ["p"], axis=-1),
                 h.make_node("QuantizeLinear", ["p", "ps", "pz"], ["p8"]),
                 h.make_node("QLinearMatMul", ["p8", "ps", "pz", "v", "ks", "kz", "os", "oz"], ["o8"]),
                 h.make_node("DequantizeLinear", ["o8", "os", "oz"], ["o"])]
    inputs = [h.make_tensor_value_info(x, TP.FLOAT, None) for x in "qkv"] if kind != "int8" else \
        [h.make_tensor_value_info("q", TP.UINT8, None), h.make_tensor_value_info("k", TP.INT8, None),
         h.make_tensor_value_info("v", TP.INT8, None)]
    graph = h.make_graph(nodes, kind, inputs, [h.make_tensor_value_info("o", TP.FLOAT, None)], const)
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 20), h.make_opsetid("com.microsoft", 1)])


def _feeds(kind: str, n: int, m: int, c: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    if kind != "int8":
        return {"q": rng.standard_normal((2, n, c), dtype=np.float32),
                "k": rng.standard_normal((2, m, c), dtype=np.float32),
                "v": rng.standard_normal((2, m, c), dtype=np.float32)}
    d, bh = c // HEADS, 2 * HEADS
    return {"q": rng.integers(0, 256, (bh, n, d), dtype=np.uint8),
            "k": rng.integers(-127, 128, (bh, d, m), dtype=np.int8),
            "v": rng.integers(-127, 128, (bh, m, d), dtype=np.int8)}


def cpu_ms(kind: str, n: int, m: int, c: int, repeats: int) -> float:
    """Median CPU milliseconds of one run of the ``kind`` graph, one thread."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = 1, 1
    s = ort.InferenceSession(_graph(kind, n, m, c).SerializeToString(), so, providers=["CPUExecutionProvider"])
    x = _feeds(kind, n, m, c)
    s.run(None, x)
    times = []
    for _ in range(repeats):
        start = time.process_time()
        s.run(None, x)
        times.append(time.process_time() - start)
    return round(1e3 * statistics.median(times), 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    rows = {name: {kind: cpu_ms(kind, *shape, args.repeats) for kind in KINDS}
            | {"shape": list(shape)} for name, shape in SHAPES.items()}
    path = write_results("ort_speed", {"command": " ".join(["python bench/attention_micro.py", *sys.argv[1:]]),
                                        "batch": 2, "heads": HEADS, "cpu_ms": rows},
                          label="attention micro")
    print(json.dumps(rows, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
