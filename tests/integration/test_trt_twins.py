"""CPU twins of ``tests/gpu/test_trt_engine.py``: everything of the TensorRT path up to the engine
build, run in CI without TensorRT or a GPU.

The FP16 graph ``export --target trt`` builds its engine from (:func:`trt_graph`, the same call) is
exported, linted (dqdeploy's TensorRT rules, the CLI, ``polygraphy check lint``), its optimization
profile derived, and run on ONNX Runtime's CPU provider against the simulation with the FP16
per-step budget the engine test uses; FP16 float graphs are run against the PyTorch model. The
Triton repository ``export(..., triton_repo=)`` writes without TensorRT is parsed and checked
against the graph's own inputs and outputs. What only TensorRT can tell (the parser accepting the
graph, the build, the engine's numbers) stays in ``tests/gpu``.
"""

from __future__ import annotations

import subprocess

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from diffusers import DDIMScheduler

from dqdeploy import export, quantize
from dqdeploy.cli import cli
from dqdeploy.core.errors import MissingDependencyError, RuntimeInputError
from dqdeploy.core.recipe import W8A8, CalibrationConfig
from dqdeploy.exporters.engine import profile_shapes
from dqdeploy.exporters.export import trt_graph
from dqdeploy.exporters.lint import lint_path
from dqdeploy.runtimes.ort import OrtDenoiser
from dqdeploy.runtimes.spec import ONNX_FILE, read_spec
from dqdeploy.verify.check import check_export
from tests.helpers import tiny_cond_unet, tiny_unet, write_pipeline
from tests.triton_config import config_io, graph_io, parse_pbtxt

CALIB = CalibrationConfig(steps=6, samples=48, trajectories=8, batch_size=8)
FP16_REL = 1e-2  # relative L2 error of a whole FP16 forward against FP32 (the engine tests' bound)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp(min=1e-12))


@pytest.fixture(scope="module")
def w8a8(tmp_path_factory):
    """A w8a8 artifact and the FP16 graph `--target trt` would build its engine from."""
    root = tmp_path_factory.mktemp("w8a8")
    write_pipeline(tiny_unet(), root / "pipe")
    q = quantize(root / "pipe", W8A8.replace(iters=10, batch_size=16), CALIB, root / "q").path
    return q, trt_graph(q, root / "fp16")


def test_trt_graph_is_the_linted_fp16_tensorrt_layout(w8a8):
    _, out = w8a8
    spec = read_spec(out)
    assert (spec.target, spec.precision) == ("onnx", "fp16")
    assert {t.name: t.dtype for t in spec.inputs} == {"sample": "float16", "timestep": "float32"}
    graph = out / ONNX_FILE
    ops = {n.op_type for n in onnx.load(str(graph)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert lint_path(graph) == []
    result = CliRunner().invoke(cli, ["lint", str(out)])
    assert result.exit_code == 0 and "passes every TensorRT rule check" in result.output, result.output
    lint = subprocess.run(["polygraphy", "check", "lint", str(graph)], capture_output=True, text=True)
    assert lint.returncode == 0 and "PASSED" in lint.stdout + lint.stderr, lint.stdout[-2000:] + lint.stderr[-2000:]


def test_profile_covers_the_graphs_own_inputs(w8a8):
    """What build_engine hands Polygraphy's Profile, checked against the graph (the parsed network's
    inputs must be these names; fixed dims must be the graph's)."""
    _, out = w8a8
    shapes = profile_shapes(read_spec(out), batch=(1, 2, 4), cfg=True)
    inputs = graph_io(onnx.load(str(out / ONNX_FILE)))["input"]
    assert sorted(shapes) == sorted(t["name"] for t in inputs)
    for t in inputs:
        lo, opt, hi = shapes[t["name"]]
        assert len(lo) == len(t["dims"]) and (lo[0], opt[0], hi[0]) == (2, 4, 8)  # cfg doubles the rows
        assert all(a == b == d for a, b, d in zip(lo[1:], hi[1:], t["dims"][1:])), (t, shapes[t["name"]])


def test_trt_graph_on_ort_cpu_passes_the_per_step_check(w8a8):
    """Twin of the w8a8 engine test: the same FP16 graph, the same check and budget, on ORT CPU."""
    q, out = w8a8
    result = check_export(q, out, tolerance_ratio=2.0)  # FP16 rounding before each Q: 2x (see the engine test)
    assert result.ok, result.table()
    assert len(result.steps) == CALIB.steps


@pytest.mark.parametrize("conditional", [False, True])
def test_fp16_float_graph_on_ort_cpu_matches_pytorch(conditional, tmp_path):
    """Twin of the float FP16 engine tests: an FP16 float export against the FP32 PyTorch model."""
    unet = tiny_cond_unet() if conditional else tiny_unet()
    if conditional:  # as tests/gpu's cond_export fixture: a folder with unet/ and scheduler/
        source = tmp_path / "pipe"
        unet.save_pretrained(str(source / "unet"))
        DDIMScheduler(num_train_timesteps=1000).save_pretrained(str(source / "scheduler"))
    else:
        source = write_pipeline(unet, tmp_path / "pipe")
    out = export(source, tmp_path / "fp16", target="float", fp16=True)
    ort = OrtDenoiser(out)
    assert ort.dtype == torch.float32 and ort.graph_dtype == torch.float16
    x, t = torch.randn(3, unet.config.in_channels, 8, 8), torch.tensor([5, 421, 999])
    kw = {}
    if conditional:
        seq = read_spec(out).inputs[2].shape[1]
        kw["encoder_hidden_states"] = torch.randn(3, seq, unet.config.cross_attention_dim)
        assert profile_shapes(read_spec(out), batch=(1, 1, 2), cfg=True)["encoder_hidden_states"][2] == [4, seq, 24]
        with pytest.raises(RuntimeInputError, match="encoder_hidden_states is missing"):
            ort(x, t)
    with torch.no_grad():
        ref = unet(x, t, **kw).sample
    assert rel(ort(x, t, **kw).sample, ref) < FP16_REL


def test_export_writes_a_triton_repo_matching_the_graph(w8a8, tmp_path):
    """Without TensorRT, ``triton_repo=`` serves the graph: an ``onnxruntime_onnx`` model whose
    config.pbtxt, parsed, has the graph's own inputs and outputs; the copied graph runs."""
    q, _ = w8a8
    out = export(q, tmp_path / "e", target="onnx", fp16=True, triton_repo=tmp_path / "repo")
    model = tmp_path / "repo" / "unet"
    config = parse_pbtxt((model / "config.pbtxt").read_text())
    assert (config["name"], config["platform"], config["max_batch_size"]) == ("unet", "onnxruntime_onnx", 0)
    assert config["instance_group"] == [{"count": 1, "kind": "KIND_AUTO"}]
    assert (model / "1" / "model.onnx").read_bytes() == (out / ONNX_FILE).read_bytes()
    graph = onnx.load(str(model / "1" / "model.onnx"))
    assert config_io(config) == graph_io(graph)
    assert [e["dims"][0] for e in config["input"] + config["output"]] == [-1] * 3  # the batch, dynamic

    import onnxruntime as ort

    session = ort.InferenceSession(str(model / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    np_types = {"TYPE_FP16": np.float16, "TYPE_FP32": np.float32}
    feeds = {e["name"]: np.full([2 if d == -1 else d for d in e["dims"]], 0.5, np_types[e["data_type"]])
             for e in config["input"]}
    feeds["timestep"][:] = read_spec(out).timesteps[0]
    (result,) = session.run(None, feeds)
    assert list(result.shape) == [2, *config["output"][0]["dims"][1:]] and np.isfinite(result).all()


def test_trt_target_without_tensorrt_writes_nothing(w8a8, tmp_path):
    import importlib.util

    if importlib.util.find_spec("tensorrt") is not None and torch.cuda.is_available():
        pytest.skip("TensorRT and a GPU are present")
    q, _ = w8a8
    with pytest.raises(MissingDependencyError, match=r"dqdeploy\[trt\]|NVIDIA GPU"):
        export(q, tmp_path / "e", target="trt", triton_repo=tmp_path / "repo")
    assert not (tmp_path / "e").exists() and not (tmp_path / "repo").exists()


def test_trt_target_is_the_graph_step_then_the_engine(w8a8, tmp_path, monkeypatch):
    """`export(target="trt")` runs `trt_graph` (the step the twins above test) and builds from its
    folder: with the gate and the build faked, the calls are recorded."""
    import dqdeploy.exporters.export as export_mod

    q, _ = w8a8
    calls = []
    monkeypatch.setattr(export_mod, "require_tensorrt", lambda: None)
    monkeypatch.setattr(export_mod, "trt_graph", lambda *a, **kw: calls.append(("graph", a, kw)))
    monkeypatch.setattr(export_mod, "build_engine", lambda *a, **kw: calls.append(("engine", a, kw)))
    export(q, tmp_path / "e", target="trt", batch=(1, 2, 4), cfg=True)
    assert [c[0] for c in calls] == ["graph", "engine"]
    assert calls[0][1] == (q, tmp_path / "e") and calls[1][1] == (tmp_path / "e",)
    assert calls[1][2]["batch"] == (1, 2, 4) and calls[1][2]["cfg"] is True
