"""OrtDenoiser on real exported tiny diffusers UNets: agreement with PyTorch, diffusers pipelines,
input errors, provider checks, session settings."""

from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import onnxruntime as ort
import pytest
import torch
from diffusers import DDIMPipeline, DDIMScheduler

from dqdeploy.core.errors import ArtifactError, DQDeployError, MissingDependencyError, RuntimeInputError
from dqdeploy.core.sampling import denoise
from dqdeploy.io.integrity import seal
from dqdeploy.runtimes import load_runtime
from dqdeploy.runtimes.base import CalibratedStepWarning
from dqdeploy.runtimes.ort import OrtDenoiser
from dqdeploy.runtimes.session import session_options
from dqdeploy.runtimes.spec import ONNX_FILE, SPEC_FILE

ATOL = 1e-4
CROSS_DIM, SEQ_LEN = 24, 5  # the conditional fixture's context (conftest.tiny_cond_unet)


@torch.no_grad()
def torch_out(unet, x, t, ctx=None):
    kw = {} if ctx is None else {"encoder_hidden_states": ctx}
    return unet(x, t, return_dict=False, **kw)[0]


@pytest.mark.parametrize("t", [torch.tensor(421), 421, torch.tensor([5, 421, 999])])
def test_matches_torch_unconditional(uncond, t):
    unet, folder = uncond
    rt = OrtDenoiser(folder)
    x = torch.randn(3, 1, 8, 8)
    torch.testing.assert_close(rt(x, t).sample, torch_out(unet, x, t), atol=ATOL, rtol=0)


@pytest.mark.parametrize("t", [torch.tensor(37.0), torch.tensor([37, 640])])
def test_matches_torch_conditional(cond, t):
    unet, folder = cond
    rt = OrtDenoiser(folder)
    x, ctx = torch.randn(2, 4, 8, 8), torch.randn(2, SEQ_LEN, CROSS_DIM)
    out = rt(x, t, encoder_hidden_states=ctx, return_dict=False)[0]
    torch.testing.assert_close(out, torch_out(unet, x, t, ctx), atol=ATOL, rtol=0)


def test_batch_size_is_dynamic(uncond):
    unet, folder = uncond
    rt = OrtDenoiser(folder)
    for b in (1, 5):
        x = torch.randn(b, 1, 8, 8)
        torch.testing.assert_close(rt(x, 300).sample, torch_out(unet, x, torch.tensor(300)), atol=ATOL, rtol=0)


def _ddim_images(unet, steps: int = 2) -> np.ndarray:
    pipe = DDIMPipeline(unet=unet, scheduler=DDIMScheduler(num_train_timesteps=1000))
    pipe.set_progress_bar_config(disable=True)
    return pipe(batch_size=2, num_inference_steps=steps, generator=torch.Generator().manual_seed(0),
                output_type="np").images


def test_runs_inside_a_ddim_pipeline(uncond):
    unet, folder = uncond
    rt = OrtDenoiser(folder)
    images = _ddim_images(rt)
    assert images.shape == (2, 8, 8, 1)
    np.testing.assert_allclose(images, _ddim_images(unet), atol=1e-4)


def test_denoise_with_classifier_free_guidance(cond):
    unet, folder = cond
    rt = OrtDenoiser(folder)
    g = torch.Generator().manual_seed(1)
    noise, c, u = (torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, SEQ_LEN, CROSS_DIM, generator=g),
                   torch.randn(1, SEQ_LEN, CROSS_DIM, generator=g))
    outs = [denoise(m, DDIMScheduler(num_train_timesteps=1000), noise, 2, cond=c, uncond=u, guidance=3.0)
            for m in (rt, unet)]
    torch.testing.assert_close(outs[0], outs[1], atol=1e-4, rtol=0)


def test_calibrated_step_warning_in_pipeline(uncond_calibrated):
    _, folder = uncond_calibrated
    rt = OrtDenoiser(folder)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _ddim_images(rt, steps=3)  # DDIM steps 666, 333, 0: none calibrated
    hits = [w for w in caught if issubclass(w.category, CalibratedStepWarning)]
    assert len(hits) == 1 and "nearest calibrated step" in str(hits[0].message)


def test_input_errors(uncond, cond):
    rt_u, rt_c = OrtDenoiser(uncond[1]), OrtDenoiser(cond[1])
    with pytest.raises(RuntimeInputError, match="expected channels 1"):
        rt_u(torch.randn(2, 3, 8, 8), 10)
    with pytest.raises(RuntimeInputError, match="expected height 8"):
        rt_u(torch.randn(2, 1, 16, 8), 10)
    with pytest.raises(RuntimeInputError, match="encoder_hidden_states is missing"):
        rt_c(torch.randn(2, 4, 8, 8), 10)
    with pytest.raises(RuntimeInputError, match="expected sequence 5"):
        rt_c(torch.randn(2, 4, 8, 8), 10, encoder_hidden_states=torch.randn(2, 7, CROSS_DIM))


def test_onnx_file_paths(uncond, tmp_path):
    unet, folder = uncond
    inside = OrtDenoiser(folder / ONNX_FILE)  # unet/model.onnx of an export folder: its spec is found
    assert inside.spec.model_class == "UNet2DModel"
    bare = tmp_path / "bare.onnx"
    shutil.copyfile(folder / ONNX_FILE, bare)
    rt = OrtDenoiser(bare)  # any ONNX file with the UNet I/O names: config inferred from the graph
    assert rt.config.sample_size == 8 and rt.config.in_channels == 1 and rt.spec.timesteps == []
    x = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(rt(x, 3).sample, torch_out(unet, x, torch.tensor(3)), atol=ATOL, rtol=0)


@pytest.mark.parametrize("provider", ["CUDAExecutionProvider", "TensorrtExecutionProvider"])
def test_gpu_provider_missing_is_an_error_not_a_fallback(uncond, provider):
    assert provider not in ort.get_available_providers()  # this suite runs on CPU-only onnxruntime
    with pytest.raises(MissingDependencyError) as err:
        OrtDenoiser(uncond[1], providers=(provider, "CPUExecutionProvider"))
    msg = str(err.value)
    assert provider in msg and "CPUExecutionProvider" in msg and "pip install 'dqdeploy[gpu]'" in msg


def test_unknown_provider(uncond):
    with pytest.raises(MissingDependencyError, match="NoSuchExecutionProvider"):
        OrtDenoiser(uncond[1], providers=("NoSuchExecutionProvider",))


def test_session_settings(uncond):
    rt = OrtDenoiser(uncond[1], threads=1, options={"session.intra_op.allow_spinning": "0"})
    assert rt.session.get_providers() == ["CPUExecutionProvider"]
    so = session_options(threads=1)
    assert so.intra_op_num_threads == 1 and so.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    mine = ort.SessionOptions()
    mine.intra_op_num_threads = 1
    assert session_options(options=mine) is mine


def test_folder_errors(uncond, tmp_path):
    with pytest.raises(ArtifactError, match="not a dqdeploy export folder"):
        OrtDenoiser(tmp_path)
    with pytest.raises(ArtifactError, match="does not exist"):
        OrtDenoiser(tmp_path / "missing.onnx")
    bad = tmp_path / "bad"
    shutil.copytree(uncond[1], bad)
    spec = json.loads((bad / SPEC_FILE).read_text())
    spec["inputs"][0]["dtype"] = "float16"
    (bad / SPEC_FILE).write_text(json.dumps(seal(spec)))  # even with a recomputed seal
    with pytest.raises(ArtifactError, match="does not match its dqdeploy_export.json"):
        OrtDenoiser(bad)


def test_load_runtime(uncond):
    assert isinstance(load_runtime(uncond[1], "ort"), OrtDenoiser)
    with pytest.raises(DQDeployError, match="unknown runtime 'tvm'"):
        load_runtime(uncond[1], "tvm")


def test_cpp_example_compare_helper(uncond, tmp_path):
    """examples/cpp/save_inputs.py: the inputs it writes and its ONNX Runtime comparison."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[3] / "examples" / "cpp" / "save_inputs.py"
    module_spec = importlib.util.spec_from_file_location("save_inputs", path)
    helper = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(helper)
    unet, folder = uncond
    assert helper.main(["save", str(folder), str(tmp_path / "in"), "--batch", "3"]) == 0
    inputs = helper.read_tensors(tmp_path / "in")
    out = torch_out(unet, torch.from_numpy(inputs["sample"]), torch.from_numpy(inputs["timestep"]))
    helper.write_tensors(tmp_path / "out", {"out_sample": out.numpy()})  # what run_engine would write
    result = helper.compare(folder, tmp_path / "in", tmp_path / "out")
    assert result["finite"] and result["relative_l2_error"] < 1e-5
    helper.write_tensors(tmp_path / "bad", {"out_sample": out.numpy() * 1.5})
    assert helper.main(["compare", str(folder), str(tmp_path / "in"), str(tmp_path / "bad")]) == 1
