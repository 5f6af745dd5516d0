"""simplify keeps Q/DQ intact (or falls back); fold_weight_quantize turns Q(W_fp32) into int8 weights."""

from __future__ import annotations

import logging
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from dqdeploy.exporters import simplify as simplify_mod
from dqdeploy.exporters.lint import lint_trt
from dqdeploy.exporters.simplify import fold_weight_quantize, qdq_structure, simplify

C_IN, C_OUT, HW = 4, 8, 6


def _const(name: str, array) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array), name)


def _weight(ties: bool = False) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    scale = (0.01 + 0.02 * rng.random(C_OUT)).astype(np.float32)
    steps = rng.integers(-100, 100, (C_OUT, C_IN, 3, 3)).astype(np.float32)
    noise = 0.5 if ties else rng.uniform(-0.45, 0.45, steps.shape).astype(np.float32)
    w = ((steps + noise) * scale[:, None, None, None]).astype(np.float32)  # ties: exact .5 steps
    return w, scale


def conv_graph(*, weight: str = "qfloat", zp_dtype=np.int8, ties: bool = False,
               extras: bool = False) -> onnx.ModelProto:
    """x -> Q -> DQ -> Conv(W) -> y, W as Identity(W_fp32) -> Q -> DQ ("qfloat") or int8 -> DQ ("int8").

    ``extras`` adds what a simplifier removes: Identity chains and a constant shape subgraph.
    """
    w, w_scale = _weight(ties)
    zp0 = zp_dtype(128 if zp_dtype == np.uint8 else 0)
    nodes = [helper.make_node("QuantizeLinear", ["x", "s_x", "zp_x"], ["x_q"], name="x_q"),
             helper.make_node("DequantizeLinear", ["x_q", "s_x", "zp_x"], ["x_dq"], name="x_dq")]
    inits = [_const("s_x", np.float32(0.02)), _const("zp_x", zp0), _const("w_scale", w_scale),
             _const("w_zp", np.zeros(C_OUT, np.int8)), _const("bias", np.linspace(-1, 1, C_OUT, dtype=np.float32))]
    if weight == "qfloat":
        inits.append(_const("w_float", w))
        nodes += [helper.make_node("Identity", ["w_float"], ["w_id1"], name="w_id1"),
                  helper.make_node("Identity", ["w_id1"], ["w_id2"], name="w_id2"),
                  helper.make_node("QuantizeLinear", ["w_id2", "w_scale", "w_zp"], ["w_q"], name="w_q", axis=0),
                  helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zp"], ["w_dq"], name="w_dq", axis=0)]
    else:
        w_int = np.clip(np.rint(w / w_scale[:, None, None, None]), -128, 127).astype(np.int8)
        inits.append(_const("w_int8", w_int))
        nodes.append(helper.make_node("DequantizeLinear", ["w_int8", "w_scale", "w_zp"], ["w_dq"], name="w_dq", axis=0))
    conv_in = "x_dq"
    if extras:
        nodes.append(helper.make_node("Identity", ["x_dq"], ["x_dq_id"], name="x_dq_id"))
        conv_in = "x_dq_id"
    nodes.append(helper.make_node("Conv", [conv_in, "w_dq", "bias"], ["conv_out"], name="conv", pads=[1, 1, 1, 1]))
    if extras:  # Reshape to a shape computed from constants: folded by a simplifier
        inits += [_const("flat_a", np.array([1, C_OUT, 0], np.int64)),
                  _const("flat_b", np.array([0, 0, HW * HW], np.int64))]
        nodes += [helper.make_node("Add", ["flat_a", "flat_b"], ["flat_shape"], name="flat_shape"),
                  helper.make_node("Reshape", ["conv_out", "flat_shape"], ["flat"], name="flat"),
                  helper.make_node("Identity", ["flat"], ["y"], name="y_id")]
        y_shape = [1, C_OUT, HW * HW]
    else:
        nodes.append(helper.make_node("Identity", ["conv_out"], ["y"], name="y_id"))
        y_shape = [1, C_OUT, HW, HW]
    graph = helper.make_graph(nodes, "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, C_IN, HW, HW])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    model.ir_version = 10
    onnx.checker.check_model(model, full_check=True)
    return model


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), so,
                                providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def ops(model: onnx.ModelProto) -> Counter:
    return Counter(n.op_type for n in model.graph.node)


X = np.random.default_rng(1).standard_normal((1, C_IN, HW, HW)).astype(np.float32)


@pytest.mark.parametrize("ties", [False, True])
def test_fold_turns_float_weight_quantize_into_int8_initializer(ties):
    model = conv_graph(weight="qfloat", ties=ties)
    assert {v.rule for v in lint_trt(model)} == {"int8-weights"}
    folded = fold_weight_quantize(model)
    onnx.checker.check_model(folded, full_check=True)
    inits = {i.name: i for i in folded.graph.initializer}
    assert ops(folded)["QuantizeLinear"] == 1 and ops(folded)["DequantizeLinear"] == 2
    assert ops(folded)["Identity"] == 1  # the weight's Identity chain is gone, the output Identity stays
    assert "w_float" not in inits and inits["w_q"].data_type == TensorProto.INT8
    assert lint_trt(folded) == []
    np.testing.assert_array_equal(run(folded, X), run(model, X))
    # the folded integers are the ones an int8 export writes directly
    np.testing.assert_array_equal(run(folded, X), run(conv_graph(weight="int8", ties=ties), X))
    assert len(model.graph.node) == 8  # input untouched


def test_fold_is_a_no_op_without_weight_quantize():
    model = conv_graph(weight="int8")
    folded = fold_weight_quantize(model)
    assert folded == model and folded is not model


def test_fold_keeps_runtime_scales():
    model = conv_graph(weight="qfloat")
    model.graph.input.append(helper.make_tensor_value_info("w_scale_in", TensorProto.FLOAT, [C_OUT]))
    q = next(n for n in model.graph.node if n.name == "w_q")
    q.input[1] = "w_scale_in"
    assert ops(fold_weight_quantize(model))["QuantizeLinear"] == 2


def test_simplify_keeps_qdq_and_outputs():
    model = conv_graph(weight="int8", extras=True)
    simplified = simplify(model)
    assert len(simplified.graph.node) < len(model.graph.node)  # something was simplified
    assert (ops(simplified)["QuantizeLinear"], ops(simplified)["DequantizeLinear"]) == (1, 2)
    assert not qdq_structure(model).differences(qdq_structure(simplified))
    np.testing.assert_array_equal(run(simplified, X), run(model, X))


def test_onnxslim_is_the_fallback(monkeypatch):
    def fail(model):
        raise RuntimeError("boom")

    monkeypatch.setitem(simplify_mod.BACKENDS, "onnxsim", fail)
    model = conv_graph(weight="int8", extras=True)
    simplified = simplify(model)
    assert len(simplified.graph.node) < len(model.graph.node)
    np.testing.assert_array_equal(run(simplified, X), run(model, X))


def _dequantize_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    """A 'simplifier' that constant-folds weight DQ into float weights: what must be refused."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    inits = {i.name: i for i in out.graph.initializer}
    dq = next(n for n in out.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits)
    w = numpy_helper.to_array(inits[dq.input[0]]).astype(np.float32)
    s = numpy_helper.to_array(inits[dq.input[1]])
    out.graph.initializer.append(_const(dq.output[0], w * s[:, None, None, None]))
    out.graph.node.remove(dq)
    return out


def test_simplify_falls_back_when_qdq_breaks(monkeypatch, caplog):
    monkeypatch.setitem(simplify_mod.BACKENDS, "onnxsim", _dequantize_weights)
    monkeypatch.setitem(simplify_mod.BACKENDS, "onnxslim", _dequantize_weights)
    model = conv_graph(weight="int8", extras=True)
    with caplog.at_level(logging.WARNING, logger="dqdeploy.exporters.simplify"):
        assert simplify(model) is model
    assert "broke the Q/DQ structure" in caplog.text and "returning the model unchanged" in caplog.text


def test_simplify_works_on_external_data_without_loading_it(tmp_path):
    """The simplifier sees a skeleton: external tensors stay references, the result runs the same."""
    model = conv_graph(weight="int8", extras=True)
    expected = run(model, X)
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path), save_as_external_data=True, location="m.onnx.data", size_threshold=0)
    lazy = onnx.load(str(path), load_external_data=False)
    external = {t.name for t in lazy.graph.initializer if t.data_location == TensorProto.EXTERNAL}
    assert "w_int8" in external
    simplified = simplify(lazy)
    assert simplified is not lazy and len(simplified.graph.node) < len(lazy.graph.node)
    kept = {t.name for t in simplified.graph.initializer if t.data_location == TensorProto.EXTERNAL}
    # weights are initializers again
    assert "w_int8" in kept and not {i.name for i in simplified.graph.input} & external
    onnx.save(simplified, str(tmp_path / "s.onnx"))  # refers to m.onnx.data in the same folder
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    out = ort.InferenceSession(str(tmp_path / "s.onnx"), so, providers=["CPUExecutionProvider"]).run(None, {"x": X})[0]
    np.testing.assert_array_equal(out, expected)
