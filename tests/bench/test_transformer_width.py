"""bench/transformer_width.py: the PixArt-Sigma-width config and the per-op-type profile."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

from bench import transformer_width as tw


def test_config_is_pixart_sigma_width():
    config = tw.pixart_sigma_width(blocks=2, sample_size=64)
    assert config["num_attention_heads"] * config["attention_head_dim"] == 1152
    assert config["caption_channels"] == 4096 and config["num_layers"] == 2
    assert (config["sample_size"] // config["patch_size"]) ** 2 == 1024  # image tokens


def test_profile_splits_one_call_by_op_type(tmp_path):
    w = helper.make_tensor("w", TensorProto.FLOAT, [64, 64], np.eye(64, dtype=np.float32).ravel().tolist())
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [8, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [8, 64])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    (tmp_path / "g" / "unet").mkdir(parents=True)
    path = tmp_path / "g" / "unet" / "model.onnx"
    onnx.save(model, str(path))
    prof = tw.profile(path, {"x": np.ones((8, 64), np.float32)}, tmp_path)
    assert set(prof) <= {"MatMul", "Relu", "FusedMatMul"} and prof
    assert abs(sum(p["share"] for p in prof.values()) - 1) < 1e-6
