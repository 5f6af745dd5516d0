"""One word per idea: the literals in dqdeploy.core.vocab, and reading files written with the old words."""

from __future__ import annotations

import json

from dqdeploy.core.recipe import W8A8, Recipe
from dqdeploy.core.vocab import LAYOUTS, TARGETS
from dqdeploy.runtimes.spec import ExportSpec, TensorSpec
from dqdeploy.runtimes.targets import layout_of


def _spec(**changes) -> ExportSpec:
    base = dict(target="onnx", precision="fp32", opset=20, model_class="UNet2DModel", model_config={},
                inputs=[TensorSpec("sample", ["batch", 1, 8, 8], "float32")], outputs=[], recipe=W8A8)
    return ExportSpec(**(base | changes))


def test_layout_of_each_graph_target():
    assert [layout_of(t) for t in ("onnx", "ort", "float")] == ["trt", "ort", None]
    assert set(LAYOUTS) == {"trt", "ort"} and set(TARGETS) == {"onnx", "ort", "trt", "float"}
    assert _spec(target="onnx").layout == "trt" and _spec(target="unknown").layout is None


def test_export_spec_round_trip_keeps_the_recipe_object():
    spec = _spec(recipe=W8A8.replace(layout="ort"))
    back = ExportSpec.from_dict(json.loads(spec.to_json()))
    assert back == spec and isinstance(back.recipe, Recipe) and back.recipe.layout == "ort"


def test_old_export_specs_and_recipes_are_read():
    data = json.loads(_spec().to_json())
    data["flavour"] = data.pop("target")  # written before the rename
    recipe = data["recipe"]
    recipe["dilation"] = recipe.pop("scaling")
    spec = ExportSpec.from_dict(data)
    assert spec.target == "onnx" and spec.recipe == W8A8
