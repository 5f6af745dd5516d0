"""ONNX Runtime's quantize_static peer on a tiny diffusers UNet: uint8 QDQ graph close to float."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from diffusers import UNet2DModel
from onnx import TensorProto, numpy_helper

from dqdeploy.core.errors import CalibrationError, ExportError
from dqdeploy.exporters.onnx import example_inputs, export_float_onnx
from dqdeploy.exporters.ort_baseline import quantize_with_ort

# measured: 0.04-0.06 over these inputs; every activation scale x4 gives ~0.5, x0.1 ~0.96
REL_BOUND = 0.15


def _session(model: str | bytes) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])


def _feeds(seed: int, count: int) -> list[dict[str, np.ndarray]]:
    g = torch.Generator().manual_seed(seed)
    return [{"sample": torch.randn(2, 1, 8, 8, generator=g).numpy(),
             "timestep": np.array([1.0 + 290.0 * k, 990.0 - 210.0 * k], np.float32)} for k in range(count)]


@pytest.fixture(scope="module")
def peer(tmp_path_factory):
    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
        norm_num_groups=8, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    ).eval()
    root = tmp_path_factory.mktemp("peer")
    float_path = root / "float" / "model.onnx"
    export_float_onnx(unet, float_path, inputs=example_inputs(unet, batch=2))
    out = quantize_with_ort(float_path, root / "peer" / "model.onnx", _feeds(seed=1, count=8))
    return float_path, out


def _max_rel_error(float_path, quant_model: str | bytes) -> float:
    f, q = _session(str(float_path)), _session(quant_model)
    errs = []
    for feed in _feeds(seed=2, count=4):
        a, b = f.run(None, feed)[0], q.run(None, feed)[0]
        errs.append(float(np.linalg.norm(a - b) / np.linalg.norm(a)))
    return max(errs)


def test_peer_graph_is_uint8_qdq(peer):
    _, out = peer
    model = onnx.load(str(out))
    inits = {i.name: i for i in model.graph.initializer}
    qs = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    dqs = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    assert len(qs) > 20 and len(dqs) > len(qs)
    assert all(inits[n.input[2]].data_type == TensorProto.UINT8 for n in qs)  # activations: uint8
    conv_weights = [n.input[1] for n in model.graph.node if n.op_type == "Conv"]
    producers = {o: n for n in model.graph.node for o in n.output}
    weight_dqs = [producers[w] for w in conv_weights]
    assert all(d.op_type == "DequantizeLinear" for d in weight_dqs)
    for d in weight_dqs:  # weights: int8 initializers, per channel
        assert inits[d.input[0]].data_type == TensorProto.INT8
        assert len(inits[d.input[1]].dims) == 1 and inits[d.input[1]].dims[0] == inits[d.input[0]].dims[0]


def test_peer_output_close_to_float(peer):
    """ONNX Runtime's own quantize_static (S8 weights over their full range) is exact only where u8s8 does not
    saturate; on a CPU without VNNI its graph is wrong by design (dqdeploy's portable format exists for that)."""
    from dqdeploy.system.cpu import cpu_info

    if not cpu_info().exact("vnni"):
        pytest.skip(f"{cpu_info().model} has no VNNI: the peer's full-range int8 weights saturate u8s8 here")
    float_path, out = peer
    assert _max_rel_error(float_path, str(out)) < REL_BOUND


def test_bound_catches_broken_scales(peer):
    """Negative control: every activation scale x4 must break the bound."""
    float_path, out = peer
    model = onnx.load(str(out))
    inits = {i.name: i for i in model.graph.initializer}
    for name in {n.input[1] for n in model.graph.node if n.op_type == "QuantizeLinear"}:
        t = inits[name]
        t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * np.float32(4), name))
    assert _max_rel_error(float_path, model.SerializeToString()) > REL_BOUND


def test_bad_calibration_inputs_are_refused(peer, tmp_path):
    float_path, _ = peer
    with pytest.raises(CalibrationError, match="no calibration inputs"):
        quantize_with_ort(float_path, tmp_path / "q.onnx", [])
    with pytest.raises(CalibrationError, match="keys"):
        quantize_with_ort(float_path, tmp_path / "q.onnx", [{"sample": np.zeros((2, 1, 8, 8), np.float32)}])
    with pytest.raises(ExportError, match="no float ONNX model"):
        quantize_with_ort(tmp_path / "missing.onnx", tmp_path / "q.onnx", _feeds(0, 1))


def test_calibration_session_uses_one_thread(peer):
    from onnxruntime.quantization.calibrate import CalibraterBase

    from dqdeploy.exporters.ort_baseline import _calibration_threads

    float_path, _ = peer
    original = CalibraterBase.create_inference_session

    class Probe:
        augmented_model_path = str(float_path)
        execution_providers = ["CPUExecutionProvider"]

    probe = Probe()
    with _calibration_threads(1):
        CalibraterBase.create_inference_session(probe)
    assert probe.infer_session.get_session_options().intra_op_num_threads == 1
    assert CalibraterBase.create_inference_session is original
