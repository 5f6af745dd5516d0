"""onnx.checker on exported graphs: tensors left in external data are checked by type, wherever the
process runs; a broken graph is refused with ExportError."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from dqdeploy.core.errors import ExportError
from dqdeploy.exporters.external import load_graph
from dqdeploy.exporters.folder import check_graph


def _matmul(x: str = "x") -> onnx.ModelProto:
    w = numpy_helper.from_array(np.ones((600, 600), np.float32), "w")
    node = helper.make_node("MatMul", [x, "w"], ["y"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 600])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 600])], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])


def test_weights_in_external_data_are_not_looked_up_in_the_working_directory(tmp_path, monkeypatch):
    onnx.save(_matmul(), str(tmp_path / "m.onnx"), save_as_external_data=True, location="m.data", size_threshold=0)
    graph = load_graph(tmp_path / "m.onnx", load_below=1024)  # "w" stays in m.data
    assert graph.graph.initializer[0].data_location == TensorProto.EXTERNAL
    monkeypatch.chdir(tmp_path.parent)  # the data file is not next to the working directory
    check_graph(graph)


def test_a_broken_graph_is_refused():
    with pytest.raises(ExportError, match="fails onnx.checker"):
        check_graph(_matmul(x="missing"))
