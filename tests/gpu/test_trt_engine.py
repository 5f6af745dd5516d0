"""TensorRT engines of tiny real UNets (needs TensorRT and an NVIDIA GPU; skipped otherwise).

Float FP16 engines are compared with ONNX Runtime on the FP32 export of the same model (FP16
rounding only); the w8a8 engine is checked against the PyTorch simulation with the project's own
per-step tolerances (``check_export``), as the ONNX Runtime export is.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.gpu
trt = pytest.importorskip("tensorrt")
if not torch.cuda.is_available():
    pytest.skip("no CUDA device (TensorRT needs an NVIDIA GPU)", allow_module_level=True)

from dqdeploy.core.errors import RuntimeInputError  # noqa: E402
from dqdeploy.exporters.engine import build_engine  # noqa: E402
from dqdeploy.exporters.lint import lint_path  # noqa: E402
from dqdeploy.exporters.triton import triton_config, write_triton_repo  # noqa: E402
from dqdeploy.runtimes import load_runtime  # noqa: E402
from dqdeploy.runtimes.engine_spec import read_engine_info  # noqa: E402
from dqdeploy.runtimes.ort import OrtDenoiser  # noqa: E402
from dqdeploy.runtimes.spec import ENGINE_FILE, ONNX_FILE  # noqa: E402
from dqdeploy.runtimes.trt import TrtDenoiser  # noqa: E402

FP16_REL = 1e-2  # relative L2 error of a whole FP16 forward against FP32


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float().cpu(), b.float().cpu()
    return float((a - b).norm() / b.norm().clamp(min=1e-12))


@pytest.fixture(scope="module")
def fp16_engine(float_exports, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("eng") / "fp16"
    shutil.copytree(float_exports["fp16"], folder)
    cache = folder.parent / "timing.cache"
    build_engine(folder, batch=(1, 2, 4), timing_cache=cache)
    assert cache.is_file() and cache.stat().st_size > 0
    return folder


def test_engine_files_and_metadata(fp16_engine):
    assert (fp16_engine / ENGINE_FILE).stat().st_size > 0
    info = read_engine_info(fp16_engine)
    assert info["tensorrt_version"] == trt.__version__ and info["strongly_typed"] is True
    assert info["gpu"] == torch.cuda.get_device_name()
    assert {t["name"]: t["dtype"] for t in info["inputs"]} == {"sample": "float16", "timestep": "float32"}
    assert info["outputs"][0]["name"] == "out_sample" and info["outputs"][0]["shape"][0] == -1
    assert info["profile"]["sample"]["max"][0] == 4


@pytest.mark.parametrize("t", [torch.tensor(421), torch.tensor([5, 421, 999])])
def test_fp16_engine_matches_onnxruntime(fp16_engine, float_exports, t):
    engine, reference = TrtDenoiser(fp16_engine), OrtDenoiser(float_exports["fp32"])
    x = torch.randn(3, 1, 8, 8)
    out = engine(x, t).sample
    assert out.device.type == "cpu" and out.dtype == torch.float32  # follows the input
    assert rel(out, reference(x, t).sample) < FP16_REL
    cuda_out = engine(x.cuda(), t.cuda()).sample
    assert cuda_out.device.type == "cuda"
    torch.testing.assert_close(cuda_out.cpu(), out)


def test_profile_limits_are_input_errors(fp16_engine):
    engine = load_runtime(fp16_engine, "trt")
    with pytest.raises(RuntimeInputError, match="outside the engine's optimization profile"):
        engine(torch.randn(5, 1, 8, 8), 10)
    with pytest.raises(RuntimeInputError, match="expected channels 1"):
        engine(torch.randn(2, 2, 8, 8), 10)


def test_ddim_pipeline_on_the_engine(fp16_engine, float_exports):
    from diffusers import DDIMPipeline, DDIMScheduler

    def images(unet):
        pipe = DDIMPipeline(unet=unet, scheduler=DDIMScheduler(num_train_timesteps=1000))
        pipe.set_progress_bar_config(disable=True)
        return pipe(batch_size=2, num_inference_steps=3, generator=torch.Generator().manual_seed(0),
                    output_type="np").images

    engine = TrtDenoiser(fp16_engine)
    assert engine.dtype == torch.float32 and engine.graph_dtype == torch.float16  # FP32 latents, FP16 graph
    a, b = images(engine), images(OrtDenoiser(float_exports["fp32"]))
    assert a.shape == b.shape == (2, 8, 8, 1)
    assert np.abs(a - b).max() < 0.02


def test_rebuild_needs_overwrite_and_reuses_the_timing_cache(fp16_engine):
    from dqdeploy.core.errors import DQDeployError

    with pytest.raises(DQDeployError, match="already exists"):
        build_engine(fp16_engine)
    cache = fp16_engine.parent / "timing.cache"
    build_engine(fp16_engine, batch=(1, 2, 4), timing_cache=cache, overwrite=True, workspace_gb=1)
    assert read_engine_info(fp16_engine)["workspace_gb"] == 1


def test_fp32_graph_is_refused_for_fp16(float_exports, tmp_path):
    from dqdeploy.core.errors import ExportError

    folder = tmp_path / "e"
    shutil.copytree(float_exports["fp32"], folder)
    with pytest.raises(ExportError, match="re-export with --fp16"):
        build_engine(folder)
    assert not (folder / ENGINE_FILE).exists()


def test_conditional_engine_with_cfg_profile(cond_export, tmp_path):
    unet, export = cond_export
    folder = tmp_path / "cond"
    shutil.copytree(export, folder)
    build_engine(folder, batch=(1, 1, 2), cfg=True)  # up to 2 images -> 4 UNet rows with guidance
    # the float export's example context: 77 tokens
    seq = {t["name"]: t for t in read_engine_info(folder)["inputs"]}["encoder_hidden_states"]["shape"][1]
    assert read_engine_info(folder)["profile"]["encoder_hidden_states"]["max"] == [4, seq, 24]
    engine = TrtDenoiser(folder)
    x, ctx = torch.randn(4, 4, 8, 8), torch.randn(4, seq, 24)
    with torch.no_grad():
        ref = unet(x, torch.tensor(300), encoder_hidden_states=ctx).sample
    assert rel(engine(x, 300, encoder_hidden_states=ctx).sample, ref) < FP16_REL
    with pytest.raises(RuntimeInputError, match="encoder_hidden_states is missing"):
        engine(x, 300)


def test_w8a8_engine_passes_the_per_step_check(w8a8, tmp_path):
    from dqdeploy.verify.check import check_export

    folder = tmp_path / "w8a8"
    shutil.copytree(w8a8["fp16"], folder)
    assert lint_path(folder / ONNX_FILE) == []
    build_engine(folder, batch=(1, 4, 8))
    # FP16 rounding before each Q flips integers about as often as quantization itself: on ONNX Runtime
    # CPU the FP16 graph of this artifact sits at 0.8-1.2x the simulation's quantization error per step
    # (the FP32 graph at ~0), so the default ratio of 1.0 is too tight for any FP16 graph
    result = check_export(w8a8["q"], folder, runtime="trt", tolerance_ratio=2.0)
    assert result.ok, result.table()
    engine, reference = TrtDenoiser(folder), OrtDenoiser(w8a8["fp32"])
    x = torch.randn(4, 1, 8, 8)
    t = torch.tensor(engine.spec.timesteps[:4])  # calibrated steps (6 in the fixture)
    # FP16 vs FP32 rounding flips a few integers and the flips cascade (ORT FP16 vs FP32 graphs of this
    # artifact differ by ~6% on CPU); a broken engine would differ by ~100%
    assert rel(engine(x, t).sample, reference(x, t).sample) < 0.15


def test_triton_repo_from_a_real_engine(fp16_engine, tmp_path):
    model = write_triton_repo(fp16_engine, tmp_path / "repo")
    text = (model / "config.pbtxt").read_text()
    assert text == triton_config(read_engine_info(fp16_engine))
    assert 'platform: "tensorrt_plan"' in text and "TYPE_FP16" in text and "TYPE_FP32" in text
    assert (model / "1" / "model.plan").read_bytes() == (fp16_engine / ENGINE_FILE).read_bytes()
    # the engine's I/O (a strongly typed network: the graph's types) is the graph's own
    import onnx

    from tests.triton_config import config_io, graph_io, parse_pbtxt

    assert config_io(parse_pbtxt(text)) == graph_io(onnx.load(str(fp16_engine / ONNX_FILE)))


def test_cpp_example_if_it_builds(fp16_engine, tmp_path):
    root = Path(__file__).resolve().parents[2]
    if shutil.which("cmake") is None:
        pytest.skip("cmake not installed")
    build = tmp_path / "build"
    conf = subprocess.run(["cmake", "-S", str(root / "examples/cpp"), "-B", str(build)], capture_output=True, text=True)
    if conf.returncode != 0 or "skipping" in conf.stdout + conf.stderr:
        pytest.skip("TensorRT headers/libraries or the CUDA toolkit not found by CMake (set TensorRT_ROOT)")
    subprocess.run(["cmake", "--build", str(build)], check=True, capture_output=True)
    helper = [sys.executable, str(root / "examples/cpp/save_inputs.py")]
    subprocess.run([*helper, "save", str(fp16_engine), str(tmp_path / "in")], check=True)
    (tmp_path / "out").mkdir()
    subprocess.run([str(build / "run_engine"), str(fp16_engine / ENGINE_FILE), str(tmp_path / "in"),
                    str(tmp_path / "out")], check=True)
    run = subprocess.run([*helper, "compare", str(fp16_engine), str(tmp_path / "in"), str(tmp_path / "out")],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    assert json.loads(run.stdout)["relative_l2_error"] < FP16_REL


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_transformer_engine_passes_the_per_step_check_and_runs_in_its_pipeline(kind, tmp_path):
    """A w8a8 diffusion transformer: FP16 TensorRT-layout export -> engine (profile over every transformer
    input, Flux's position ids fixed) -> the per-step check against the simulation -> drop-in call."""
    from dqdeploy import export, quantize
    from dqdeploy.core.recipe import W8A8, CalibrationConfig
    from dqdeploy.io.artifact import load_calibration_inputs
    from dqdeploy.verify.check import check_export
    from tests.helpers import write_transformer_cond, write_transformer_pipeline

    folder = write_transformer_pipeline(kind, tmp_path / "pipe")
    cond = write_transformer_cond(tmp_path / "cond.safetensors")
    calib = CalibrationConfig(steps=4, samples=32, trajectories=4, batch_size=4, guidance=3.0,
                              resolution=8 if kind == "flux" else None)
    q = quantize(folder, W8A8.replace(iters=4, batch_size=8), calib, tmp_path / "q", cond_file=cond).path
    out = export(q, tmp_path / "e", target="trt", batch=(1, 2, 4), cfg=kind == "sd3")
    info = read_engine_info(out)
    assert (out / "transformer" / "model.plan").stat().st_size > 0 and info["model_class"].endswith("Model")
    assert "hidden_states" in info["profile"]
    result = check_export(q, out, runtime="trt", tolerance_ratio=2.0)  # FP16 graph: see the UNet test above
    assert result.ok, result.table()
    inputs = {k: v if k in ("img_ids", "txt_ids") else v[:2] for k, v in load_calibration_inputs(q).items()}
    engine = load_runtime(out, "trt")
    assert torch.isfinite(engine(**inputs, return_dict=False)[0]).all()


def test_w8a8_engine_with_lora_slots_swaps_adapters(w8a8, tmp_path):
    """``export --target trt --lora-slots``: the engine's profile covers the slots' ranks; set_lora swaps adapters
    with no rebuild, swapping back restores the output bit for bit, and the engine follows ONNX Runtime's FP32 graph
    of the same slots with the same adapter."""
    from dqdeploy import export, load_quantized
    from tests.helpers import random_lora

    model = load_quantized(w8a8["q"]).denoiser
    convs = [n for n, m in model.named_modules() if getattr(m, "kind", None) == "conv"][1:3]
    linears = [n for n, m in model.named_modules() if getattr(m, "kind", None) == "linear"
               and n.endswith(("to_q", "to_v"))][:2]
    lora = random_lora(model, convs + linears, tmp_path / "a.safetensors", size=0.2)
    other = random_lora(model, convs[:1], tmp_path / "b.safetensors", seed=1, size=0.2)
    folder = export(w8a8["q"], tmp_path / "trt", target="trt", lora_slots=lora, batch=(1, 4, 8))
    assert lint_path(folder / ONNX_FILE) == []
    profile = read_engine_info(folder)["profile"]
    assert all(profile[s["down"]]["max"][0 if "conv" in s else 1] == 64 for s in engine_slots(folder))
    engine = TrtDenoiser(folder)
    reference = OrtDenoiser(export(w8a8["q"], tmp_path / "ort", target="onnx", lora_slots=lora))
    x = torch.randn(4, 1, 8, 8)
    t = torch.tensor(engine.spec.timesteps[:4])
    without = engine(x, t).sample
    engine.set_lora(lora)
    reference.set_lora(lora)
    styled = engine(x, t).sample
    err = rel(styled, reference(x, t).sample)
    assert err < 0.15  # FP16 vs FP32 graph, as the plain engine's test
    assert rel(styled, without) > 2 * err  # the adapter changes the output well beyond that
    engine.set_lora(other)
    assert not torch.equal(engine(x, t).sample, styled)
    engine.set_lora(lora)
    assert torch.equal(engine(x, t).sample, styled)
    engine.set_lora(None)
    assert torch.equal(engine(x, t).sample, without)
    with pytest.raises(RuntimeInputError, match="outside the engine's profile"):
        engine.set_lora([(lora, 1.0)] * 40)  # 40 rank-2 adapters: rank 80 > 64


def engine_slots(folder: Path) -> list[dict]:
    from dqdeploy.runtimes.spec import read_spec

    return read_spec(folder).lora_slots
