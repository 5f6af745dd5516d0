"""Fallback end to end: the layer the sensitivity analysis keeps in float has no Q/DQ in either
exported graph (TensorRT and ONNX Runtime layouts), and ``inspect`` shows it."""

from __future__ import annotations

import subprocess
import sys

import onnx
import pytest

from dqdeploy.core.recipe import W8A8
from dqdeploy.exporters.export import export
from dqdeploy.io.artifact import save_quantized
from dqdeploy.runtimes.spec import ONNX_FILE
from dqdeploy.stages.quantize import quantize_denoiser
from tests.helpers import random_calib
from tests.unit.test_sensitivity import FRAGILE, fragile_unet


@pytest.fixture(scope="module")
def fallback_artifact(tmp_path_factory):
    unet = fragile_unet()
    recipe = W8A8.replace(scaling="none", distill="none", fallback="auto")
    result = quantize_denoiser(unet, recipe, random_calib(unet, n=16))
    assert FRAGILE in result.manifest.fallback
    return save_quantized(result, tmp_path_factory.mktemp("fallback") / "q"), result.manifest.fallback


def _float_weight_convs(model) -> list:
    inits = {i.name for i in model.graph.initializer}
    return [n for n in model.graph.node if n.op_type == "Conv" and n.input[1] in inits]


@pytest.mark.parametrize("target", ["onnx", "ort"])
def test_fallback_layer_has_no_qdq(fallback_artifact, target, tmp_path):
    path, fallback = fallback_artifact
    out = export(path, tmp_path / target, target=target)
    model = onnx.load(str(out / ONNX_FILE))
    for name in fallback:
        assert not [n.name for n in model.graph.node if f"dq/{name}/" in n.name]
    producer = {o: n for n in model.graph.node for o in n.output}
    float_convs = _float_weight_convs(model)  # every other conv reads DequantizeLinear(int8 weight)
    assert len(float_convs) == sum(1 for n in fallback if "conv" in n.rsplit(".", 1)[-1])
    for conv in float_convs:
        assert (conv.input[0] not in producer
                or producer[conv.input[0]].op_type not in ("DequantizeLinear", "QuantizeLinear"))
    assert sum(n.op_type == "QuantizeLinear" for n in model.graph.node) > 10  # the rest stays quantized


def test_inspect_shows_fallback(fallback_artifact):
    env_cmd = [sys.executable, "-m", "dqdeploy.cli", "inspect", str(fallback_artifact[0])]
    out = subprocess.run(env_cmd, capture_output=True, text=True, check=True).stdout
    assert "fallback" in out and FRAGILE in out
