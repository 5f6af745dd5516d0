"""Run each integer op the ORT-layout graph fuses into on this CPU's ONNX Runtime and compare it with exact
integer arithmetic: the machine-dependent half of the exactness proof (the other half, that the exporter
only emits weights that cannot saturate, is pure arithmetic: :mod:`dqdeploy.system.cpu`).

Each probe is the exporter's own pattern for one layer -- uint8 activations with zero point 128, weights as
:func:`dqdeploy.exporters.qdq.stored_weight` stores them -- with power-of-two scales, so the fused kernel's
float requantization is exact too and any difference is the integer GEMM's.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..core.errors import require
from ..core.vocab import Int8Format
from ..exporters.qdq import UINT8_ZERO_POINT, SurgeryOptions, stored_weight

# op -> (the fused op ORT must make of the pattern, whether the pattern ends in an output Q)
PROBES = {"conv": ("QLinearConv", True), "matmul": ("QLinearMatMul", True), "gemm": ("QGemm", True),
          "matmul-float-out": ("MatMulIntegerToFloat", False)}


@dataclass(frozen=True)
class ProbeResult:
    """One integer op on this machine: the kernel ORT chose and its agreement with exact arithmetic."""

    op: str
    fused: str  # the integer op ORT ran ("" when it did not fuse: the probe then checked float math)
    weights: str  # "full-range int8" | "int8 in [-64, 64]" | "uint8"
    mismatch: float  # fraction of outputs that differ from exact integer arithmetic
    max_diff: float

    @property
    def exact(self) -> bool:
        return self.mismatch == 0.0


def _graph(op: str, w_int: np.ndarray, fmt: Int8Format, k: int, x_shape: tuple[int, ...]):
    onnx = require("onnx", "ort", "probing ONNX Runtime's integer kernels")
    from onnx import TensorProto, helper, numpy_helper

    out_q = PROBES[op][1]
    if op == "conv":
        w, axis = w_int, 0
    elif op == "gemm":
        w, axis = w_int, 0  # Gemm(transB=1): W [N, K]
    else:
        w, axis = np.ascontiguousarray(w_int.T), 1  # MatMul: W^T [K, N]
    stored, zp = stored_weight(w, SurgeryOptions(layout="ort", int8_format=fmt))
    n_out = w_int.shape[0]
    inits = [
        numpy_helper.from_array(stored, "W"),
        numpy_helper.from_array(np.ones(n_out, np.float32), "w_scale"),
        numpy_helper.from_array(np.full(n_out, zp, stored.dtype), "w_zp"),
        numpy_helper.from_array(np.array(1.0, np.float32), "x_scale"),
        numpy_helper.from_array(np.array(UINT8_ZERO_POINT, np.uint8), "zp"),
        numpy_helper.from_array(np.array(2.0 ** k, np.float32), "y_scale"),
    ]
    nodes = [helper.make_node("DequantizeLinear", ["X", "x_scale", "zp"], ["x"]),
             helper.make_node("DequantizeLinear", ["W", "w_scale", "w_zp"], ["w"], axis=axis)]
    compute = {"conv": helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1]),
               "gemm": helper.make_node("Gemm", ["x", "w"], ["y"], transB=1)}.get(
        op, helper.make_node("MatMul", ["x", "w"], ["y"]))
    nodes.append(compute)
    if out_q:
        nodes.append(helper.make_node("QuantizeLinear", ["y", "y_scale", "zp"], ["Y"]))
    out_type = TensorProto.UINT8 if out_q else TensorProto.FLOAT
    graph = helper.make_graph(nodes, f"probe_{op}",
                              [helper.make_tensor_value_info("X", TensorProto.UINT8, list(x_shape))],
                              [helper.make_tensor_value_info("Y" if out_q else "y", out_type, None)], inits)
    return onnx, helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])


def _exact(op: str, x: np.ndarray, w_int: np.ndarray, k: int, out_q: bool) -> np.ndarray:
    xs = x.astype(np.int64) - UINT8_ZERO_POINT
    w = w_int.astype(np.int64)
    if op == "conv":
        n, c, h, wd = xs.shape
        kh, kw = w.shape[2:]
        padded = np.pad(xs, ((0, 0), (0, 0), (1, 1), (1, 1)))
        acc = np.zeros((n, w.shape[0], h, wd), np.int64)
        for i in range(kh):
            for j in range(kw):
                acc += np.einsum("nchw,oc->nohw", padded[:, :, i:i + h, j:j + wd], w[:, :, i, j])
    else:
        acc = xs @ w.T
    if not out_q:
        return acc.astype(np.float64)
    return np.clip(np.rint(acc / 2.0 ** k) + UINT8_ZERO_POINT, 0, 255)


def probe(op: str, fmt: Int8Format = "vnni", *, weight_range: int = 127, seed: int = 0) -> ProbeResult:
    """Run probe ``op`` (a key of :data:`PROBES`) with random full-range uint8 activations and weights in
    ``[-weight_range, weight_range]`` stored as format ``fmt`` would store them; one thread."""
    ort = require("onnxruntime", "ort", "probing ONNX Runtime's integer kernels")
    rng = np.random.default_rng(seed)
    if op == "conv":
        w_int = rng.integers(-weight_range, weight_range + 1, size=(16, 32, 3, 3))
        x = rng.integers(0, 256, size=(2, 32, 8, 8)).astype(np.uint8)
    else:
        w_int = rng.integers(-weight_range, weight_range + 1, size=(16, 64))
        x = rng.integers(0, 256, size=(8, 64)).astype(np.uint8)
    fused_op, out_q = PROBES[op]
    k = max(0, int(np.ceil(np.log2(max(1.0, 255 * weight_range * np.sqrt(w_int[0].size) / 3 / 40)))))
    onnx, model = _graph(op, w_int, fmt, k, x.shape)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3  # ORT warns that an optimized model saved at this level is machine-specific: it is
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    with tempfile.TemporaryDirectory() as tmp:
        so.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        session = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        ran = {n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node}
    got = session.run(None, {"X": x})[0].astype(np.float64)
    want = _exact(op, x, w_int, k, out_q)
    stored = stored_weight(w_int, SurgeryOptions(layout="ort", int8_format=fmt))[0]
    weights = ("uint8" if stored.dtype == np.uint8
               else ("int8 in [-64, 64]" if weight_range <= 64 else "full-range int8"))
    return ProbeResult(op, fused_op if fused_op in ran else "", weights, float(np.mean(got != want)),
                       float(np.abs(got - want).max()))


# quantized attention's two products (exporters/attention_qdq.py), both operands activations -> MatMulIntegerToFloat:
# "scores": q (uint8, zero point 128) x k^T (int8, or uint8 with zero point 128 in the portable format);
# "mix": the softmax output (uint8 in [0, 127], zero point 0) x v (int8)
ATTENTION_PROBES = ("scores", "mix")


def probe_attention(product: str, fmt: Int8Format = "vnni", *, seed: int = 0) -> ProbeResult:
    """Run one of quantized attention's products (:data:`ATTENTION_PROBES`) as the ORT-layout graph writes it, on
    random integers over the full range the format allows, against exact integer arithmetic; one thread."""
    ort = require("onnxruntime", "ort", "probing ONNX Runtime's integer kernels")
    onnx = require("onnx", "ort", "probing ONNX Runtime's integer kernels")
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    unsigned_b = product == "scores" and fmt == "portable"
    a_zp, a_max = (UINT8_ZERO_POINT, 255) if product == "scores" else (0, 127)
    b_zp = UINT8_ZERO_POINT if unsigned_b else 0
    a = rng.integers(0, a_max + 1, size=(2, 4, 16, 64)).astype(np.uint8)
    b = (rng.integers(0, 256, size=(2, 4, 64, 16)).astype(np.uint8) if unsigned_b
         else rng.integers(-128, 128, size=(2, 4, 64, 16)).astype(np.int8))
    b_type = TensorProto.UINT8 if unsigned_b else TensorProto.INT8
    inits = [numpy_helper.from_array(np.array(1.0, np.float32), "one"),
             numpy_helper.from_array(np.array(a_zp, np.uint8), "a_zp"),
             numpy_helper.from_array(np.array(b_zp, b.dtype), "b_zp")]
    nodes = [helper.make_node("DequantizeLinear", ["A", "one", "a_zp"], ["a"]),
             helper.make_node("DequantizeLinear", ["B", "one", "b_zp"], ["b"]),
             helper.make_node("MatMul", ["a", "b"], ["y"])]
    graph = helper.make_graph(nodes, f"probe_attention_{product}",
                              [helper.make_tensor_value_info("A", TensorProto.UINT8, list(a.shape)),
                               helper.make_tensor_value_info("B", b_type, list(b.shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    with tempfile.TemporaryDirectory() as tmp:
        so.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        session = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        ran = {n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node}
    got = session.run(None, {"A": a, "B": b})[0].astype(np.float64)
    want = ((a.astype(np.int64) - a_zp) @ (b.astype(np.int64) - b_zp)).astype(np.float64)
    return ProbeResult(f"attention {product}", "MatMulIntegerToFloat" if "MatMulIntegerToFloat" in ran else "",
                       "uint8" if unsigned_b else "full-range int8", float(np.mean(got != want)),
                       float(np.abs(got - want).max()))
