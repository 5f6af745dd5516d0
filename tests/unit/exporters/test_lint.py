"""TensorRT lint: a good QDQ graph passes; each broken graph trips exactly its own rule."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from dqdeploy.core.errors import LintError
from dqdeploy.exporters.lint import RULES, Violation, check_trt, lint_path, lint_trt

C_IN, C_OUT, HW = 4, 8, 6


def _const(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array), name)


def build(
    *,
    opset: int = 20,
    float_type: int = TensorProto.FLOAT,
    act_scale_dtype=None,
    act_scale: str = "init",  # "init" | "constant" | "gather" | "per_channel"
    act_zp=np.int8(0),
    weight: str = "int8",  # "int8" | "qfloat" | "int4"
    attention_qdq: str | bool = False,  # False | "left" (q only) | "both"
    dangling_q: bool = False,
) -> onnx.ModelProto:
    """input -> Q -> DQ -> Conv(int8 W -> DQ per channel) -> attention-like MatMul(a, a^T) -> output."""
    rng = np.random.default_rng(0)
    fnp = np.float16 if float_type == TensorProto.FLOAT16 else np.float32
    s_np = act_scale_dtype or fnp
    nodes, inits = [], []
    inputs = [helper.make_tensor_value_info("x", float_type, [1, C_IN, HW, HW])]

    # activation Q/DQ
    if act_scale == "per_channel":
        inits += [_const("s_x", np.full(C_IN, 0.05, s_np)), _const("zp_x", np.zeros(C_IN, act_zp.dtype) + act_zp)]
        qattrs = {"axis": 1}
    elif act_scale == "gather":
        inputs.append(helper.make_tensor_value_info("step", TensorProto.INT64, []))
        inits += [_const("s_table", np.array([0.04, 0.05, 0.06], s_np)), _const("zp_x", act_zp)]
        nodes.append(helper.make_node("Gather", ["s_table", "step"], ["s_x"], name="step_scale", axis=0))
        qattrs = {}
    elif act_scale == "constant":
        nodes.append(helper.make_node("Constant", [], ["s_x_c"], name="s_const",
                                      value=_const("v", np.array(0.05, s_np))))
        nodes.append(helper.make_node("Identity", ["s_x_c"], ["s_x"], name="s_identity"))
        inits.append(_const("zp_x", act_zp))
        qattrs = {}
    else:
        inits += [_const("s_x", np.array(0.05, s_np)), _const("zp_x", act_zp)]
        qattrs = {}
    nodes.append(helper.make_node("QuantizeLinear", ["x", "s_x", "zp_x"], ["x_q"], name="x_q", **qattrs))
    nodes.append(helper.make_node("DequantizeLinear", ["x_q", "s_x", "zp_x"], ["x_dq"], name="x_dq", **qattrs))
    conv_in = "x_dq"
    if s_np != fnp:
        nodes.append(helper.make_node("Cast", ["x_dq"], ["x_dq_cast"], name="x_cast", to=float_type))
        conv_in = "x_dq_cast"

    # weight: int8 initializer -> DQ (per output channel, axis 0)
    w = rng.standard_normal((C_OUT, C_IN, 3, 3)).astype(np.float32)
    w_scale = (np.abs(w).reshape(C_OUT, -1).max(1) / 127).astype(np.float32)
    w_int = np.clip(np.round(w / w_scale[:, None, None, None]), -127, 127).astype(np.int8)
    inits.append(_const("w_scale", w_scale.astype(fnp)))
    if weight == "qfloat":
        inits += [_const("w_float", w.astype(fnp)), _const("w_zp", np.zeros(C_OUT, np.int8))]
        nodes.append(helper.make_node("Identity", ["w_float"], ["w_float_id"], name="w_identity"))
        nodes.append(helper.make_node("QuantizeLinear", ["w_float_id", "w_scale", "w_zp"], ["w_q"], name="w_q", axis=0))
        nodes.append(helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zp"], ["w_dq"], name="w_dq", axis=0))
    elif weight == "int4":
        w4 = np.clip(w_int // 16, -8, 7)
        inits.append(helper.make_tensor("w_int4", TensorProto.INT4, w4.shape, w4.flatten().tolist()))
        inits.append(helper.make_tensor("w_zp", TensorProto.INT4, [C_OUT], [0] * C_OUT))
        nodes.append(helper.make_node("DequantizeLinear", ["w_int4", "w_scale", "w_zp"], ["w_dq"], name="w_dq", axis=0))
    else:
        inits += [_const("w_int8", w_int), _const("w_zp", np.zeros(C_OUT, np.int8))]
        nodes.append(helper.make_node("DequantizeLinear", ["w_int8", "w_scale", "w_zp"], ["w_dq"], name="w_dq", axis=0))
    inits.append(_const("bias", rng.standard_normal(C_OUT).astype(fnp)))
    nodes.append(helper.make_node("Conv", [conv_in, "w_dq", "bias"], ["y"], name="conv", pads=[1, 1, 1, 1]))

    # attention-like batched matmul of two activations, no Q/DQ
    inits.append(_const("tokens_shape", np.array([1, C_OUT, HW * HW], np.int64)))
    nodes.append(helper.make_node("Reshape", ["y", "tokens_shape"], ["tokens"], name="tokens"))
    nodes.append(helper.make_node("Transpose", ["tokens"], ["tokens_t"], name="tokens_t", perm=[0, 2, 1]))
    left, right = "tokens", "tokens_t"
    if attention_qdq:
        inits += [_const("s_t", np.array(0.1, fnp)), _const("zp_t", np.int8(0))]
        nodes.append(helper.make_node("QuantizeLinear", ["tokens", "s_t", "zp_t"], ["tokens_q"], name="tokens_q"))
        nodes.append(helper.make_node("DequantizeLinear", ["tokens_q", "s_t", "zp_t"], ["tokens_dq"], name="tokens_dq"))
        left = "tokens_dq"
    if attention_qdq == "both":
        nodes.append(helper.make_node("QuantizeLinear", ["tokens_t", "s_t", "zp_t"], ["keys_q"], name="keys_q"))
        nodes.append(helper.make_node("DequantizeLinear", ["keys_q", "s_t", "zp_t"], ["keys_dq"], name="keys_dq"))
        right = "keys_dq"
    nodes.append(helper.make_node("MatMul", [left, right], ["scores"], name="qk_matmul"))
    if dangling_q:
        inits += [_const("s_y", np.array(0.1, fnp)), _const("zp_y", np.int8(0))]
        nodes.append(helper.make_node("QuantizeLinear", ["y", "s_y", "zp_y"], ["y_q"], name="dangling_q"))

    graph = helper.make_graph(nodes, "lint_case", inputs,
                              [helper.make_tensor_value_info("scores", float_type, [1, C_OUT, C_OUT])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10
    return model


def rules_of(violations: list[Violation]) -> set[str]:
    return {v.rule for v in violations}


def test_good_graph_passes_checker_and_lint():
    model = build()
    onnx.checker.check_model(model, full_check=True)
    assert lint_trt(model) == []
    check_trt(model)  # no raise


def test_good_variants_pass():
    # Constant scale behind Identity, fp16 graph with fp16 scales, INT4 MatMul-free opset 21 is not needed here
    assert lint_trt(build(act_scale="constant")) == []
    fp16 = build(float_type=TensorProto.FLOAT16)
    onnx.checker.check_model(fp16, full_check=True)
    assert lint_trt(fp16) == []
    assert lint_trt(build(opset=13)) == []


CASES = {
    "qdq-constant-scale": dict(act_scale="gather"),
    "qdq-zero-point": dict(act_zp=np.uint8(128)),
    "qdq-scale-dtype": dict(float_type=TensorProto.FLOAT16, act_scale_dtype=np.float32),
    "activation-per-tensor": dict(act_scale="per_channel"),
    "int8-weights": dict(weight="qfloat"),
    "no-int4-conv": dict(weight="int4", opset=21),
    "attention-unquantized": dict(attention_qdq="both"),
    "attention-partial": dict(attention_qdq="left", allow_attention_qdq=True),
    "opset": dict(opset=22),
    "qdq-pairing": dict(dangling_q=True),
}


def test_every_rule_has_a_case():
    assert set(CASES) == set(RULES)


@pytest.mark.parametrize("rule_id", sorted(CASES))
def test_broken_graph_trips_only_its_rule(rule_id):
    case = dict(CASES[rule_id])
    allow = case.pop("allow_attention_qdq", False)
    violations = lint_trt(build(**case), allow_attention_qdq=allow)
    assert violations, f"{rule_id} not caught"
    assert rules_of(violations) == {rule_id}, [str(v) for v in violations]
    for v in violations:
        assert v.node and "expected" in v.message and "fix" in v.message


def test_messages_name_the_culprit():
    (v,) = [v for v in lint_trt(build(act_scale="gather")) if v.node == "x_q"]
    assert "Gather" in v.message and "step_scale" in v.message
    (v,) = lint_trt(build(weight="qfloat"))
    assert v.node == "w_q" and "w_float" in v.message and "int8 initializer" in v.message
    (v,) = lint_trt(build(dangling_q=True))
    assert v.node == "dangling_q"


def test_opset_rules():
    assert rules_of(lint_trt(build(opset=12))) == {"opset"}
    assert rules_of(lint_trt(build(opset=21))) == {"opset"}  # 21 only where INT4 is present
    assert lint_trt(build(opset=20)) == []


def test_allow_attention_qdq():
    """INT8 attention (quantize --attention int8): Q/DQ on both inputs pass; on one input only they do not."""
    assert lint_trt(build(attention_qdq="both"), allow_attention_qdq=True) == []
    assert rules_of(lint_trt(build(attention_qdq="left"), allow_attention_qdq=True)) == {"attention-partial"}


def test_check_trt_lists_all_violations():
    model = build(act_zp=np.uint8(128), dangling_q=True, opset=22)
    with pytest.raises(LintError) as err:
        check_trt(model)
    text = str(err.value)
    for rule_id in ("opset", "qdq-zero-point", "qdq-pairing"):
        assert f"[{rule_id}]" in text
    assert "fix:" in text


def test_violation_is_frozen():
    v = Violation("opset", "<model>", "m")
    with pytest.raises(AttributeError):
        v.rule = "x"  # type: ignore[misc]


def test_lint_path_with_external_data(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(build(), str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location="m.onnx.data", size_threshold=0)
    assert (tmp_path / "m.onnx.data").is_file()
    assert lint_path(path) == []
    onnx.save(build(act_zp=np.uint8(128)), str(path), save_as_external_data=True, location="m.onnx.data",
              size_threshold=0)
    assert rules_of(lint_path(path)) == {"qdq-zero-point"}
    with pytest.raises(LintError):
        lint_path(tmp_path / "missing.onnx")


def linear(*, op: str = "MatMul", axis: int | None = 1, trans_b: int = 0, int4_block: int = 0, opset: int = 20,
           check: bool = True):
    """x -> Q -> DQ -> MatMul/Gemm(int8 W -> DQ) -> y: the weight-layout cases."""
    k, n = 32, 24
    shape = (n, k) if trans_b else (k, n)
    out_axis = 0 if trans_b else 1
    nodes = [helper.make_node("QuantizeLinear", ["x", "s_x", "zp_x"], ["x_q"], name="x_q"),
             helper.make_node("DequantizeLinear", ["x_q", "s_x", "zp_x"], ["x_dq"], name="x_dq")]
    inits = [_const("s_x", np.array(0.05, np.float32)), _const("zp_x", np.int8(0))]
    attrs = {} if axis is None else {"axis": axis}
    if int4_block:
        blocks = k // int4_block
        inits += [helper.make_tensor("w", TensorProto.INT4, shape, [1] * (k * n)),
                  helper.make_tensor("w_zp", TensorProto.INT4, [blocks, n], [0] * (blocks * n)),
                  _const("w_scale", np.full((blocks, n), 0.01, np.float32))]
        attrs = {"axis": 0, "block_size": int4_block}
    else:
        inits += [_const("w", np.ones(shape, np.int8)), _const("w_zp", np.zeros(shape[out_axis], np.int8)),
                  _const("w_scale", np.full(shape[out_axis], 0.01, np.float32))]
    nodes.append(helper.make_node("DequantizeLinear", ["w", "w_scale", "w_zp"], ["w_dq"], name="w_dq", **attrs))
    if op == "Gemm":
        nodes.append(helper.make_node("Gemm", ["x_dq", "w_dq"], ["y"], name="fc", transB=trans_b))
        x_shape, y_shape = [2, k], [2, n]
    else:
        nodes.append(helper.make_node("MatMul", ["x_dq", "w_dq"], ["y"], name="fc"))
        x_shape, y_shape = [2, 5, k], [2, 5, n]
    graph = helper.make_graph(nodes, "linear", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 10
    if check:
        onnx.checker.check_model(model, full_check=True)
    return model


def test_weight_layouts():
    assert lint_trt(linear(axis=1)) == []  # MatMul W [K, N]: output axis 1
    assert lint_trt(linear(op="Gemm", trans_b=1, axis=0)) == []
    assert lint_trt(linear(op="Gemm", trans_b=0, axis=1)) == []
    assert lint_trt(linear(int4_block=16, opset=21)) == []  # blocked INT4 W4A16-style MatMul
    assert rules_of(lint_trt(linear(int4_block=16, opset=20, check=False))) == {"opset"}
    (v,) = lint_trt(linear(op="Gemm", trans_b=1, axis=1))
    assert v.rule == "activation-per-tensor" and v.node == "w_dq" and "axis 0" in v.message


def test_conv_weight_axis_default_is_flagged():
    model = build()
    (dq,) = [n for n in model.graph.node if n.name == "w_dq"]
    del dq.attribute[:]  # DequantizeLinear's default axis is 1: the input channels of a conv weight
    (v,) = lint_trt(model)
    assert v.rule == "activation-per-tensor" and "axis 1" in v.message
