"""Q/DQ surgery: single layers reproduce the simulation's integers exactly, both layouts; the
timestep -> row mapping inside the graph; refused recipes."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from dqdeploy.core.errors import ExportError
from dqdeploy.core.inputs import DenoiserInputs
from dqdeploy.exporters.dequantize import simulate_layer_input, tensors_of
from dqdeploy.exporters.export import resolve_format
from dqdeploy.exporters.onnx import export_float_onnx
from dqdeploy.exporters.qdq import UINT8_ZERO_POINT, SurgeryOptions, insert_qdq
from dqdeploy.quant.modules import QuantLayer
from dqdeploy.quant.timestep import StepIndex, TimestepTable
from dqdeploy.runtimes.targets import layout_of

TIMESTEPS = [901.0, 601.0, 301.0, 1.0]


class OneLayer(nn.Module):
    """A single quantized layer with the UNet I/O names (timestep only selects the step row)."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, sample, timestep, return_dict: bool = False):
        return (self.layer(sample) + 0.0 * timestep.view(-1, *([1] * (sample.dim() - 1))),)


def quant_layer(kind: str, seed: int = 0) -> tuple[QuantLayer, TimestepTable, StepIndex]:
    torch.manual_seed(seed)
    base = nn.Conv2d(8, 6, 3, padding=1) if kind == "conv" else nn.Linear(8, 6)
    s = 1.0 + torch.rand(8) * 2.0  # a dilation vector, so the 1/s Mul is exercised
    index = StepIndex()
    table = TimestepTable(TIMESTEPS)
    q = QuantLayer(base, weight_bits=8, act_bits=8, act_symmetric=True, n_steps=len(TIMESTEPS), step_index=index,
                   dilation=s)
    with torch.no_grad():
        q.input_quantizer.scale.copy_(torch.tensor([0.05, 0.02, 0.011, 0.004]))
    return q, table, index


def exported(kind: str, target: str, tmp_path, out_scale: float | None = None):
    layer, table, index = quant_layer(kind)
    shape = (4, 8, 5, 5) if kind == "conv" else (4, 7, 8)
    # activations whose range follows their step's scale, as calibrated ones do (rows 0..3)
    x = torch.randn(*shape) * torch.tensor([0.05, 0.02, 0.011, 0.004]).view(-1, *([1] * (len(shape) - 1))) * 40
    graph = export_float_onnx(OneLayer(_plain(layer)), tmp_path / "f.onnx",
                              inputs=DenoiserInputs(x, torch.tensor(TIMESTEPS)))
    tensors = {"layer": tensors_of("layer", layer)}
    scales = {"layer": out_scale} if out_scale else None
    graph = insert_qdq(graph, tensors, TIMESTEPS, {"layer": x.dim()},
                       SurgeryOptions(layout=layout_of(target), scope_prefix="unet.",
                                      int8_format=resolve_format("auto")), scales)  # exact on this CPU
    onnx.checker.check_model(graph)
    int_type = onnx.TensorProto.UINT8 if target == "ort" else onnx.TensorProto.INT8
    graph.graph.output.append(onnx.helper.make_tensor_value_info("dq/layer/input_q", int_type, None))
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(graph.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return layer, table, index, sess, x


def _plain(layer: QuantLayer) -> nn.Module:
    from dqdeploy.exporters.dequantize import plain_layer

    return plain_layer(layer)


@pytest.mark.parametrize("kind", ["conv", "linear"])
@pytest.mark.parametrize("target", ["onnx", "ort"])
def test_single_layer_integers_match_simulation(kind, target, tmp_path):
    layer, table, index, sess, x = exported(kind, target, tmp_path, out_scale=None)
    t = torch.tensor([901.0, 1.0, 301.0, 601.0])  # mixed steps in one batch (not x's own rows: any is valid)
    rows = table.index(t, 4)
    out, ints = sess.run(None, {"sample": x.numpy(), "timestep": t.numpy()})
    sim_ints = simulate_layer_input(layer, x, rows).numpy()
    graph_ints = ints.astype(np.int32) - (UINT8_ZERO_POINT if target == "ort" else 0)
    assert np.array_equal(graph_ints, sim_ints.astype(np.int32))
    with index.bound(rows), torch.no_grad():
        ref = layer(x).numpy()
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)


def test_ort_output_quantization_error_is_bounded(tmp_path):
    layer, table, index, _, x = exported("conv", "ort", tmp_path)
    t = torch.tensor(TIMESTEPS)
    rows = table.index(t, 4)
    with index.bound(rows), torch.no_grad():
        ref = layer(x)
        y = (ref - layer.bias.view(1, -1, 1, 1)) * torch.tensor(
            np.median(TIMESTEPS_SCALES) / TIMESTEPS_SCALES)[rows].view(-1, 1, 1, 1).float()
    out_scale = float(y.abs().max()) / 127
    _, _, _, sess, _ = exported("conv", "ort", tmp_path / "q", out_scale=out_scale)
    out, _ = sess.run(None, {"sample": x.numpy(), "timestep": t.numpy()})
    rel = np.linalg.norm(out - ref.numpy()) / np.linalg.norm(ref.numpy())
    assert 0 < rel < 0.01  # the output Q adds rounding, and only a little


TIMESTEPS_SCALES = np.array([0.05, 0.02, 0.011, 0.004])


def test_timestep_maps_to_nearest_calibrated_row(tmp_path):
    layer, table, index, sess, x = exported("linear", "onnx", tmp_path)
    # every calibrated step picks its own row; in-between values the nearest one
    for t_value, row in [(901.0, 0), (601.0, 1), (301.0, 2), (1.0, 3), (880.0, 0), (700.0, 1), (320.0, 2), (0.0, 3)]:
        t = torch.full((4,), t_value)
        _, ints = sess.run(None, {"sample": x.numpy(), "timestep": t.numpy()})
        expected = simulate_layer_input(layer, x, torch.full((4,), row)).numpy()
        assert np.array_equal(ints.astype(np.int32), expected.astype(np.int32)), (t_value, row)


def test_weights_are_int8_initializers_without_float_copy(tmp_path):
    layer, *_ = quant_layer("conv")
    x = torch.randn(2, 8, 5, 5)
    graph = export_float_onnx(OneLayer(_plain(layer)), tmp_path / "f.onnx",
                              inputs=DenoiserInputs(x, torch.tensor([1.0, 2.0])))
    graph = insert_qdq(graph, {"layer": tensors_of("layer", layer)}, TIMESTEPS, {"layer": 4},
                       SurgeryOptions(scope_prefix="unet."))
    floats = [i for i in graph.graph.initializer
              if i.data_type == onnx.TensorProto.FLOAT and tuple(i.dims) == tuple(layer.weight.shape)]
    ints = [i for i in graph.graph.initializer
            if i.data_type == onnx.TensorProto.INT8 and tuple(i.dims) == tuple(layer.weight.shape)]
    assert not floats and len(ints) == 1


def test_asymmetric_and_4bit_activations_are_refused(tmp_path):
    layer, *_ = quant_layer("linear")
    tensors = tensors_of("layer", layer)
    graph = export_float_onnx(OneLayer(_plain(layer)), tmp_path / "f.onnx",
                              inputs=DenoiserInputs(torch.randn(2, 3, 8), torch.tensor([1.0, 2.0])))
    bad_zp = tensors.__class__(**{**tensors.__dict__, "act_zero_point": np.full(4, 3.0)})
    with pytest.raises(ExportError, match="zero point"):
        insert_qdq(graph, {"layer": bad_zp}, TIMESTEPS, {"layer": 3}, SurgeryOptions(scope_prefix="unet."))
    four_bit = tensors.__class__(**{**tensors.__dict__, "act_bits": 4})
    with pytest.raises(ExportError, match="simulation-only"):
        insert_qdq(graph, {"layer": four_bit}, TIMESTEPS, {"layer": 3}, SurgeryOptions(scope_prefix="unet."))


def test_int4_linear_is_weight_only_blocked(tmp_path):
    torch.manual_seed(1)
    index = StepIndex()
    layer = QuantLayer(nn.Linear(128, 16), weight_bits=4, act_bits=8, act_symmetric=True, n_steps=len(TIMESTEPS),
                       step_index=index, dilation=1.0 + torch.rand(128))
    x = torch.randn(2, 5, 128)
    graph = export_float_onnx(OneLayer(_plain(layer)), tmp_path / "f.onnx",
                              inputs=DenoiserInputs(x, torch.tensor([1.0, 2.0])), opset=21)
    graph = insert_qdq(graph, {"layer": tensors_of("layer", layer)}, TIMESTEPS, {"layer": 3},
                       SurgeryOptions(scope_prefix="unet.", int4_linear=True))
    onnx.checker.check_model(graph)
    int4 = [i for i in graph.graph.initializer if i.data_type == onnx.TensorProto.INT4]
    assert sorted(tuple(i.dims) for i in int4) == [(1, 16), (128, 16)]  # weight and its zero points
    dq = next(n for n in graph.graph.node if n.op_type == "DequantizeLinear")
    assert {a.name: onnx.helper.get_attribute_value(a) for a in dq.attribute}["block_size"] == 128
    assert not any(n.op_type == "QuantizeLinear" for n in graph.graph.node)  # activations stay float (W4A16)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")  # fp32 compute
    out = ort.InferenceSession(graph.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(
        None, {"sample": x.numpy(), "timestep": np.array([1.0, 2.0], np.float32)})[0]
    with torch.no_grad():
        w = layer.weight_quantizer(layer.weight)
        ref = torch.nn.functional.linear(layer.dilated_input(x), w, layer.bias).numpy()
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)
