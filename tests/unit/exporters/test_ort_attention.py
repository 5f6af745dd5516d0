"""ORT layout attention fusion: the exporter's attention pattern becomes one MultiHeadAttention node with
the same outputs (float summation order aside); anything that is not exactly that pattern is left alone."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from dqdeploy.exporters.ort_attention import MS_DOMAIN, fuse_attention

B, N, M, H, D = 2, 12, 7, 4, 8  # batch, query tokens, key tokens, heads, head size


def _attention_graph(variant: str = "exporter") -> onnx.ModelProto:
    """q [B, N, H*D], k/v [B, M, H*D] -> attention as the torch exporter writes it (``exporter``: the
    K^T chain Reshape/Transpose/Reshape; ``direct``: one Transpose [0, 2, 3, 1]); ``mask``: an Add
    before the Softmax; ``axis``: Softmax over another axis; ``perm``: a wrong head transpose; ``scramble``:
    the K^T chain regroups tokens across heads (same element count, other values)."""
    c = H * D
    consts = {"s4q": [-1, N, H, D], "s4k": [-1, M, H, D], "s3k": [-1, 2 * M if variant == "scramble" else M, D],
              "s4kt": [-1, H, D, M], "s3": [-1, N, c]}
    inits = [numpy_helper.from_array(np.asarray(v, np.int64), k) for k, v in consts.items()]
    inits.append(numpy_helper.from_array(np.asarray([D ** -0.25], np.float32), "half_scale"))
    if variant == "mask":
        inits.append(numpy_helper.from_array(np.full((1, 1, N, M), -0.5, np.float32), "mask"))
    q_perm = [0, 1, 2, 3] if variant == "perm" else [0, 2, 1, 3]
    nodes = [helper.make_node("Reshape", ["q", "s4q"], ["q4"]),
             helper.make_node("Transpose", ["q4"], ["qt"], perm=q_perm),
             helper.make_node("Mul", ["qt", "half_scale"], ["qs"]),
             helper.make_node("Reshape", ["k", "s4k"], ["k4"]), helper.make_node("Reshape", ["v", "s4k"], ["v4"]),
             helper.make_node("Transpose", ["v4"], ["vt"], perm=[0, 2, 1, 3])]
    if variant == "direct":
        nodes.append(helper.make_node("Transpose", ["k4"], ["kT"], perm=[0, 2, 3, 1]))
    else:
        nodes += [helper.make_node("Transpose", ["k4"], ["kt"], perm=[0, 2, 1, 3]),
                  helper.make_node("Reshape", ["kt", "s3k"], ["k3"]),
                  helper.make_node("Transpose", ["k3"], ["k3t"], perm=[0, 2, 1]),
                  helper.make_node("Reshape", ["k3t", "s4kt"], ["kT"])]
    nodes += [helper.make_node("Mul", ["kT", "half_scale"], ["ks"]),
              helper.make_node("MatMul", ["qs", "ks"], ["scores"])]
    if variant == "mask":
        nodes.append(helper.make_node("Add", ["scores", "mask"], ["masked"]))
    nodes += [helper.make_node("Softmax", ["masked" if variant == "mask" else "scores"], ["p"],
                               axis=2 if variant == "axis" else -1),
              helper.make_node("MatMul", ["p", "vt"], ["o4"]),
              helper.make_node("Transpose", ["o4"], ["ot"], perm=[0, 2, 1, 3]),
              helper.make_node("Reshape", ["ot", "s3"], ["o"])]
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", t, c])
              for n, t in (("q", N), ("k", M), ("v", M))]
    graph = helper.make_graph(nodes, "attention", inputs,
                              [helper.make_tensor_value_info("o", TensorProto.FLOAT, ["batch", N, c])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def _feeds() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {n: rng.standard_normal((B, t, H * D), dtype=np.float32) for n, t in (("q", N), ("k", M), ("v", M))}


@pytest.mark.parametrize("variant", ["exporter", "direct"])
def test_attention_becomes_one_node_with_the_same_output(variant):
    model, feeds = _attention_graph(variant), _feeds()
    want = _run(model, feeds)
    assert fuse_attention(model) == 1
    onnx.checker.check_model(model)
    assert [(n.op_type, n.domain) for n in model.graph.node] == [("MultiHeadAttention", MS_DOMAIN)]
    node = model.graph.node[0]
    assert list(node.input) == ["q", "k", "v"] and list(node.output) == ["o"]
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert attrs["num_heads"] == H and attrs["scale"] == pytest.approx(D ** -0.5)
    assert not model.graph.initializer  # the shape constants and scales went with their nodes
    np.testing.assert_allclose(_run(model, feeds), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("variant", ["mask", "axis", "perm", "scramble"])
def test_other_patterns_are_left_alone(variant):
    model = _attention_graph(variant)
    before = model.SerializeToString()
    assert fuse_attention(model) == 0
    assert model.SerializeToString() == before


def test_intermediate_with_another_reader_is_not_fused():
    """The probabilities also leave the graph: fusing would drop them."""
    model = _attention_graph()
    model.graph.output.append(helper.make_tensor_value_info("p", TensorProto.FLOAT, ["batch", H, N, M]))
    assert fuse_attention(model) == 0


T = 5  # text tokens of a joint attention


def _joint_graph(axis: int = 2) -> onnx.ModelProto:
    """SD3's joint attention as the exporter writes it: image q/k/v [B, N, H*D] and text q/k/v
    [B, T, H*D] each split into heads, concatenated along the tokens (``axis`` of [B, H, N, D]), then
    one attention over the N + T tokens, heads merged to [B, N + T, H*D]."""
    c, m = H * D, N + T
    consts = {"s4i": [-1, N, H, D], "s4t": [-1, T, H, D], "s3k": [-1, m, D], "s4kt": [-1, H, D, m], "s3": [-1, m, c]}
    inits = [numpy_helper.from_array(np.asarray(v, np.int64), k) for k, v in consts.items()]
    inits.append(numpy_helper.from_array(np.asarray([D ** -0.25], np.float32), "half_scale"))
    nodes = []
    for x in "qkv":
        for part, shape in (("img", "s4i"), ("txt", "s4t")):
            nodes += [helper.make_node("Reshape", [f"{x}_{part}", shape], [f"{x}_{part}4"]),
                      helper.make_node("Transpose", [f"{x}_{part}4"], [f"{x}_{part}t"], perm=[0, 2, 1, 3])]
        nodes.append(helper.make_node("Concat", [f"{x}_imgt", f"{x}_txtt"], [f"{x}t"], axis=axis))
    nodes += [helper.make_node("Mul", ["qt", "half_scale"], ["qs"]), helper.make_node("Reshape", ["kt", "s3k"], ["k3"]),
              helper.make_node("Transpose", ["k3"], ["k3t"], perm=[0, 2, 1]),
              helper.make_node("Reshape", ["k3t", "s4kt"], ["kT"]),
              helper.make_node("Mul", ["kT", "half_scale"], ["ks"]),
              helper.make_node("MatMul", ["qs", "ks"], ["scores"]),
              helper.make_node("Softmax", ["scores"], ["p"], axis=-1), helper.make_node("MatMul", ["p", "vt"], ["o4"]),
              helper.make_node("Transpose", ["o4"], ["ot"], perm=[0, 2, 1, 3]),
              helper.make_node("Reshape", ["ot", "s3"], ["o"])]
    inputs = [helper.make_tensor_value_info(f"{x}_{part}", TensorProto.FLOAT, ["batch", t, c])
              for x in "qkv" for part, t in (("img", N), ("txt", T))]
    graph = helper.make_graph(nodes, "joint", inputs,
                              [helper.make_tensor_value_info("o", TensorProto.FLOAT, ["batch", m, c])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])


def test_joint_attention_becomes_concatenations_and_one_node():
    model = _joint_graph()
    rng = np.random.default_rng(1)
    feeds = {i.name: rng.standard_normal((B, N if i.name.endswith("img") else T, H * D), dtype=np.float32)
             for i in model.graph.input}
    want = _run(model, feeds)
    assert fuse_attention(model) == 1
    onnx.checker.check_model(model)
    assert [n.op_type for n in model.graph.node] == ["Concat", "Concat", "Concat", "MultiHeadAttention"]
    assert [list(n.input) for n in model.graph.node[:3]] == [[f"{x}_img", f"{x}_txt"] for x in "qkv"]
    assert all(helper.get_attribute_value(n.attribute[0]) == 1 for n in model.graph.node[:3])  # along the tokens
    np.testing.assert_allclose(_run(model, feeds), want, rtol=1e-5, atol=1e-6)


def test_concatenation_along_another_axis_is_left_alone():
    model = _joint_graph(axis=3)  # joins head dimensions, not tokens: not an attention over N + T tokens
    before = model.SerializeToString()
    assert fuse_attention(model) == 0
    assert model.SerializeToString() == before
