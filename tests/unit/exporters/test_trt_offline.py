"""What of the TensorRT path can be checked without TensorRT: fail-fast messages, profile shapes,
the engine build's calls into Polygraphy's loaders (TensorRT faked), engine.json reading, the Triton
config text and repository, the C++ example's build files."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from dqdeploy.core.errors import ArtifactError, DQDeployError, ExportError, MissingDependencyError
from dqdeploy.exporters.engine import build_engine, profile_shapes
from dqdeploy.exporters.triton import triton_config, write_triton_repo
from dqdeploy.runtimes.engine_spec import read_engine_info
from dqdeploy.runtimes.spec import ENGINE_FILE, ENGINE_SPEC_FILE, ExportSpec, TensorSpec
from dqdeploy.system.trt_gate import require_tensorrt

ROOT = Path(__file__).resolve().parents[3]
CPP = ROOT / "examples" / "cpp"
HAS_TRT = importlib.util.find_spec("tensorrt") is not None
no_tensorrt = pytest.mark.skipif(HAS_TRT and torch.cuda.is_available(), reason="TensorRT and a GPU are present")


def spec(conditional: bool = True, sample_shape=("batch", 4, 64, 64), ctx_shape=("batch", 77, 768)) -> ExportSpec:
    inputs = [TensorSpec("sample", list(sample_shape), "float16"), TensorSpec("timestep", ["batch"], "float32")]
    if conditional:
        inputs.append(TensorSpec("encoder_hidden_states", list(ctx_shape), "float16"))
    return ExportSpec(target="onnx", precision="fp16", opset=20, model_class="UNet2DConditionModel",
                      model_config={"in_channels": 4}, inputs=inputs,
                      outputs=[TensorSpec("out_sample", list(sample_shape), "float16")],
                      timesteps=[981.0, 1.0], recipe={"name": "w8a8"})


ENGINE_JSON = {
    "format": "dqdeploy-engine", "format_version": 1, "tensorrt_version": "10.8.0", "gpu": "NVIDIA H100 80GB HBM3",
    "compute_capability": "9.0", "strongly_typed": True, "precision": "fp16", "target": "onnx",
    "model_class": "UNet2DConditionModel",
    "inputs": [
        {"name": "sample", "shape": [-1, 4, 64, 64], "dtype": "float16"},
        {"name": "timestep", "shape": [-1], "dtype": "float32"},
        {"name": "encoder_hidden_states", "shape": [-1, 77, 768], "dtype": "float16"},
    ],
    "outputs": [{"name": "out_sample", "shape": [-1, 4, 64, 64], "dtype": "float16"}],
    "profile": {"sample": {"min": [2, 4, 64, 64], "opt": [4, 4, 64, 64], "max": [16, 4, 64, 64]}},
    "batch": [1, 2, 8], "cfg": True, "recipe": {"name": "w8a8"}, "timesteps": [981.0, 1.0],
    "workspace_gb": None, "build_seconds": 42.0,
}

TRITON_CONFIG = '''name: "unet"
platform: "tensorrt_plan"
max_batch_size: 0
input [
  {
    name: "sample"
    data_type: TYPE_FP16
    dims: [ -1, 4, 64, 64 ]
  },
  {
    name: "timestep"
    data_type: TYPE_FP32
    dims: [ -1 ]
  },
  {
    name: "encoder_hidden_states"
    data_type: TYPE_FP16
    dims: [ -1, 77, 768 ]
  }
]
output [
  {
    name: "out_sample"
    data_type: TYPE_FP16
    dims: [ -1, 4, 64, 64 ]
  }
]
instance_group [
  {
    count: 1
    kind: KIND_GPU
  }
]
'''


# -- fail fast ------------------------------------------------------------------------------------
@pytest.mark.skipif(HAS_TRT, reason="tensorrt is installed")
def test_missing_tensorrt_message():
    with pytest.raises(MissingDependencyError) as err:
        require_tensorrt()
    msg = str(err.value)
    assert "pip install 'dqdeploy[trt]'" in msg and "NVIDIA GPU" in msg and "'tensorrt'" in msg


@no_tensorrt
def test_build_engine_fails_before_any_work(tmp_path):
    # not even an export folder: the dependency check comes first, before any file is read
    with pytest.raises(MissingDependencyError, match=r"dqdeploy\[trt\]"):
        build_engine(tmp_path / "does-not-exist")


@no_tensorrt
def test_trt_runtime_fails_fast(tmp_path):
    from dqdeploy.runtimes import load_runtime
    from dqdeploy.runtimes.trt import TrtDenoiser

    with pytest.raises(MissingDependencyError, match="running a TensorRT engine"):
        TrtDenoiser(tmp_path)
    with pytest.raises(MissingDependencyError, match=r"dqdeploy\[trt\]"):
        load_runtime(tmp_path, "trt")


def _fake_tensorrt(monkeypatch, version: str = "10.8.0", complete: bool = True) -> None:
    fake = types.ModuleType("tensorrt")
    fake.__version__ = version
    if complete:
        fake.Builder = fake.Runtime = object
    monkeypatch.setitem(sys.modules, "tensorrt", fake)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_tensorrt_without_gpu(monkeypatch):
    _fake_tensorrt(monkeypatch)
    with pytest.raises(MissingDependencyError, match="no CUDA device is visible") as err:
        require_tensorrt()
    assert "NVIDIA GPU" in str(err.value)


def test_tensorrt_placeholder_or_old(monkeypatch):
    _fake_tensorrt(monkeypatch, complete=False)
    with pytest.raises(MissingDependencyError, match="not a working TensorRT"):
        require_tensorrt()
    _fake_tensorrt(monkeypatch, version="8.6.1")
    with pytest.raises(MissingDependencyError, match="TensorRT 8.6.1 is too old"):
        require_tensorrt()


def test_cli_export_trt_fails_fast(tmp_path):
    from click.testing import CliRunner

    from dqdeploy.cli import cli

    if HAS_TRT and torch.cuda.is_available():
        pytest.skip("TensorRT and a GPU are present")
    result = CliRunner().invoke(cli, ["export", str(tmp_path / "q"), "--target", "trt", "--out", str(tmp_path / "e")],
                                standalone_mode=False)
    assert isinstance(result.exception, MissingDependencyError)
    assert not (tmp_path / "e").exists()


# -- profile shapes -------------------------------------------------------------------------------
def test_profile_shapes_batch_and_cfg():
    shapes = profile_shapes(spec(), batch=(1, 2, 8))
    assert shapes["sample"] == ([1, 4, 64, 64], [2, 4, 64, 64], [8, 4, 64, 64])
    assert shapes["timestep"] == ([1], [2], [8])
    assert shapes["encoder_hidden_states"] == ([1, 77, 768], [2, 77, 768], [8, 77, 768])
    doubled = profile_shapes(spec(), batch=(1, 2, 8), cfg=True)
    assert doubled["sample"][0][0] == 2 and doubled["timestep"] == ([2], [4], [16])
    assert profile_shapes(spec(False), batch=4)["sample"] == ([4, 4, 64, 64],) * 3


def test_profile_shapes_resolution_and_sequence():
    dynamic = spec(sample_shape=("batch", 4, "height", "width"), ctx_shape=("batch", "seq", 768))
    shapes = profile_shapes(dynamic, batch=(1, 1, 2), resolution=((32, 32), (64, 64), (96, 128)), seq_len=(77, 77, 154))
    assert shapes["sample"] == ([1, 4, 32, 32], [1, 4, 64, 64], [2, 4, 96, 128])
    assert shapes["encoder_hidden_states"][2] == [2, 154, 768]
    with pytest.raises(ExportError, match="pass resolution"):
        profile_shapes(dynamic, seq_len=77)
    with pytest.raises(ExportError, match="pass seq_len"):
        profile_shapes(dynamic, resolution=64)
    with pytest.raises(ExportError, match="fixed at 64"):
        profile_shapes(spec(), resolution=(96, 96))
    assert profile_shapes(spec(), resolution=64)["sample"][1] == [2, 4, 64, 64]  # same as the graph: fine
    with pytest.raises(ExportError, match="min <= opt <= max"):
        profile_shapes(spec(), batch=(4, 2, 8))


def test_profile_of_a_dynamic_resolution_export_is_its_range():
    import dataclasses

    dynamic = dataclasses.replace(spec(sample_shape=("batch", 4, "8*height_q", "8*width_q")), resolution_range=[32, 96],
                                  model_config={"in_channels": 4, "sample_size": 64})
    assert profile_shapes(dynamic, batch=(1, 2, 4))["sample"] == ([1, 4, 32, 32], [2, 4, 64, 64], [4, 4, 96, 96])
    assert profile_shapes(dynamic, resolution=48)["sample"][2] == [8, 4, 48, 48]  # an explicit profile wins


def test_profile_of_a_dynamic_text_length_export_is_its_range():
    import dataclasses

    dynamic = dataclasses.replace(spec(ctx_shape=("batch", "sequence", 768)), text_length_range=[64, 333])
    assert profile_shapes(dynamic)["encoder_hidden_states"] == ([1, 64, 768], [2, 333, 768], [8, 333, 768])
    assert profile_shapes(dynamic, seq_len=77)["encoder_hidden_states"][1] == [2, 77, 768]  # an explicit one wins


# -- the build's own code, with TensorRT and Polygraphy's TensorRT loaders faked ---------------------
class _Tensor:
    def __init__(self, name: str, shape: list[int], dtype: str) -> None:
        self.name, self.shape, self.dtype = name, shape, types.SimpleNamespace(name=dtype)


def _fake_build(monkeypatch, tmp_path: Path, *, parse_error: bool = False) -> tuple[Path, dict]:
    """An export folder and fakes recording what build_engine hands Polygraphy. What TensorRT then
    does with it (parse, build, run) is tests/gpu's; this checks dqdeploy's wiring and files."""
    import polygraphy.backend.trt as ptrt
    from polygraphy.exception import PolygraphyException

    import dqdeploy.exporters.engine as engine

    folder = tmp_path / "e"
    (folder / "unet").mkdir(parents=True)
    import dataclasses

    from dqdeploy.io.integrity import file_record

    (folder / "unet" / "model.onnx").write_bytes(b"graph")
    record = {"unet/model.onnx": file_record(folder / "unet" / "model.onnx")}
    full = dataclasses.replace(spec(), model_config={"in_channels": 4, "sample_size": 64}, files=record)
    (folder / "dqdeploy_export.json").write_text(full.to_json())
    seen: dict = {}
    trt = types.SimpleNamespace(__version__="10.8.0",
                                NetworkDefinitionCreationFlag=types.SimpleNamespace(STRONGLY_TYPED=2),
                                MemoryPoolType=types.SimpleNamespace(WORKSPACE="workspace"))
    inputs = [_Tensor("sample", [-1, 4, 64, 64], "HALF"), _Tensor("timestep", [-1], "FLOAT"),
              _Tensor("encoder_hidden_states", [-1, 77, 768], "HALF")]
    network = types.SimpleNamespace(num_inputs=3, get_input=inputs.__getitem__, num_outputs=1,
                                    get_output=lambda i: _Tensor("out_sample", [-1, 4, 64, 64], "HALF"))

    def parse(path, strongly_typed):
        seen["parse"] = (path, strongly_typed)
        if parse_error:
            raise PolygraphyException("In node 7 (Conv): unsupported")
        return lambda: ("builder", network, "parser")

    def create_config(**kw):
        seen["config"] = kw
        return "config"

    def build(net, config, save_timing_cache):
        seen["build"] = (net, config, save_timing_cache)
        return lambda: b"serialized engine"

    monkeypatch.setattr(engine, "require_tensorrt", lambda: trt)
    monkeypatch.setattr(engine, "gpu_description", lambda: ("Fake GPU", "9.0"))
    monkeypatch.setattr(ptrt, "NetworkFromOnnxPath", parse)
    monkeypatch.setattr(ptrt, "CreateConfig", create_config)
    monkeypatch.setattr(ptrt, "EngineBytesFromNetwork", build)
    return folder, seen


def test_build_engine_hands_polygraphy_a_strongly_typed_network_and_one_profile(monkeypatch, tmp_path):
    folder, seen = _fake_build(monkeypatch, tmp_path)
    cache = tmp_path / "timing.cache"
    plan = build_engine(folder, batch=(1, 2, 4), cfg=True, timing_cache=cache, workspace_gb=2, lint=False)
    assert plan == folder / ENGINE_FILE and plan.read_bytes() == b"serialized engine"
    assert seen["parse"] == (str(folder / "unet" / "model.onnx"), True)
    config = seen["config"]
    # strongly typed: types from the graph
    assert (config["fp16"], config["int8"], config["tf32"]) == (False, False, True)
    assert config["memory_pool_limits"] == {"workspace": 2 << 30} and config["load_timing_cache"] is None  # no file yet
    (profile,) = config["profiles"]
    assert ({n: (list(s.min), list(s.opt), list(s.max)) for n, s in profile.items()}
            == profile_shapes(spec(), batch=(1, 2, 4), cfg=True))
    assert seen["build"] == (("builder", seen["build"][0][1], "parser"), "config", str(cache))
    info = read_engine_info(folder)
    assert info["inputs"][0] == {"name": "sample", "shape": [-1, 4, 64, 64], "dtype": "float16"}
    assert ((info["gpu"], info["tensorrt_version"], info["batch"], info["cfg"])
            == ("Fake GPU", "10.8.0", [1, 2, 4], True))
    assert info["profile"]["timestep"] == {"min": [2], "opt": [4], "max": [8]}
    cache.write_bytes(b"cache")
    build_engine(folder, timing_cache=cache, overwrite=True, lint=False)
    assert seen["config"]["load_timing_cache"] == str(cache) and seen["config"]["memory_pool_limits"] is None


def test_polygraphy_errors_are_export_errors(monkeypatch, tmp_path):
    folder, _ = _fake_build(monkeypatch, tmp_path, parse_error=True)
    with pytest.raises(ExportError, match=r"TensorRT's ONNX parser rejected .*In node 7 \(Conv\)") as err:
        build_engine(folder, lint=False)
    assert "dqdeploy lint" in str(err.value.hint) and not (folder / ENGINE_FILE).exists()


# -- engine.json and Triton -----------------------------------------------------------------------
def _engine_folder(path: Path, info: dict = ENGINE_JSON) -> Path:
    (path / ENGINE_FILE).parent.mkdir(parents=True)
    (path / ENGINE_FILE).write_bytes(b"plan bytes")
    (path / ENGINE_SPEC_FILE).write_text(json.dumps(info))
    return path


def test_triton_config_text():
    assert triton_config(ENGINE_JSON) == TRITON_CONFIG
    two = triton_config(ENGINE_JSON, "sd15_unet", instances=2)
    assert two.startswith('name: "sd15_unet"') and "count: 2" in two
    with pytest.raises(ExportError, match="invalid Triton model name"):
        triton_config(ENGINE_JSON, "a/b")
    bad = {**ENGINE_JSON, "outputs": [{"name": "out_sample", "shape": [-1], "dtype": "int4"}]}
    with pytest.raises(ExportError, match="Triton cannot serve"):
        triton_config(bad)


def test_triton_model_is_named_after_the_graphs_folder():
    """As in optimum's ONNX layout: ``unet`` for a UNet, ``transformer`` for a diffusion transformer."""
    assert triton_config(ENGINE_JSON).startswith('name: "unet"')
    assert triton_config({**ENGINE_JSON, "model_class": "SD3Transformer2DModel"}).startswith('name: "transformer"')


def test_write_triton_repo(tmp_path):
    engine = _engine_folder(tmp_path / "e")
    model = write_triton_repo(engine, tmp_path / "repo")
    assert model == tmp_path / "repo" / "unet"
    assert (model / "config.pbtxt").read_text() == TRITON_CONFIG
    assert (model / "1" / "model.plan").read_bytes() == b"plan bytes"
    write_triton_repo(engine, tmp_path / "repo", "other")  # other models in the repo are kept
    assert sorted(p.name for p in (tmp_path / "repo").iterdir()) == ["other", "unet"]
    with pytest.raises(DQDeployError, match="already exists"):
        write_triton_repo(engine, tmp_path / "repo")
    write_triton_repo(engine, tmp_path / "repo", overwrite=True)


def test_read_engine_info_errors(tmp_path):
    with pytest.raises(ArtifactError, match="holds no TensorRT engine"):
        read_engine_info(tmp_path)
    _engine_folder(tmp_path / "old", {**ENGINE_JSON, "format_version": 99})
    with pytest.raises(ArtifactError, match="rebuild the engine"):
        read_engine_info(tmp_path / "old")
    _engine_folder(tmp_path / "bad", {**ENGINE_JSON, "inputs": [{"name": "sample"}]})
    with pytest.raises(ArtifactError, match="name, shape, dtype"):
        read_engine_info(tmp_path / "bad")


# -- the C++ example ------------------------------------------------------------------------------
def test_cmake_find_logic():
    text = (CPP / "CMakeLists.txt").read_text()
    for needle in ("find_package(CUDAToolkit", "find_path(TensorRT_INCLUDE_DIR NvInfer.h", "TensorRT_ROOT",
                   "find_library(TensorRT_LIBRARY", "return()", "CUDA::cudart"):
        assert needle in text
    source = (CPP / "run_engine.cpp").read_text()
    for call in ("createInferRuntime", "deserializeCudaEngine", "createExecutionContext", "setInputShape",
                 "setTensorAddress", "enqueueV3"):
        assert call in source


@pytest.mark.skipif(shutil.which("cmake") is None or shutil.which("c++") is None,
                    reason="cmake or a C++ compiler missing")
def test_cmake_configure_skips_without_tensorrt(tmp_path):
    if HAS_TRT:
        pytest.skip("tensorrt is installed: the configure step may find it")
    run = subprocess.run(["cmake", "-S", str(CPP), "-B", str(tmp_path / "build"),
                          "-DTensorRT_ROOT=" + str(tmp_path / "none")],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "skipping" in run.stderr + run.stdout


def test_save_inputs_round_trip(tmp_path):
    spec_path = CPP / "save_inputs.py"
    module_spec = importlib.util.spec_from_file_location("save_inputs", spec_path)
    helper = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(helper)
    export = tmp_path / "e"
    (export / "unet").mkdir(parents=True)
    (export / "dqdeploy_export.json").write_text(spec().to_json())
    (export / ENGINE_SPEC_FILE).write_text(json.dumps(ENGINE_JSON))
    arrays = helper.make_inputs(export, batch=3, timestep=501.0, seed=0)
    assert arrays["sample"].shape == (3, 4, 64, 64) and arrays["sample"].dtype == np.float16
    assert arrays["timestep"].dtype == np.float32 and set(arrays["timestep"]) == {501.0}
    helper.write_tensors(tmp_path / "in", arrays)
    back = helper.read_tensors(tmp_path / "in")
    assert back.keys() == arrays.keys() and all(np.array_equal(back[k], arrays[k]) for k in arrays)
    line = (tmp_path / "in" / "tensors.txt").read_text().splitlines()[0]
    assert line == "sample float16 4 3 4 64 64 sample.bin"
