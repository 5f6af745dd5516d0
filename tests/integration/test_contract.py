"""The export contract, for every denoiser family x every export target (both registries): the
folder, the graph's input and output names and the spec are what the family's record and the
target's record say, and the graph runs on ONNX Runtime like the model it came from. ``trt`` needs
TensorRT and a GPU: without them it refuses up front and writes nothing (tests/gpu builds engines)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from diffusers import DDIMScheduler

from dqdeploy import export, load_quantized, quantize
from dqdeploy.core.denoisers import SPECS
from dqdeploy.core.errors import MissingDependencyError
from dqdeploy.core.recipe import W8A8, CalibrationConfig
from dqdeploy.io.artifact import load_calibration_inputs
from dqdeploy.io.models import load_model
from dqdeploy.runtimes import load_runtime
from dqdeploy.runtimes.spec import read_spec
from dqdeploy.runtimes.targets import TARGET_SPECS
from tests.helpers import (
    tiny_cond_unet,
    tiny_unet,
    write_cond_file,
    write_pipeline,
    write_transformer_cond,
    write_transformer_pipeline,
)

FAMILIES = {"UNet2DModel": "unet", "UNet2DConditionModel": "cond", "SD3Transformer2DModel": "sd3",
            "PixArtTransformer2DModel": "pixart", "FluxTransformer2DModel": "flux"}
PTQ = W8A8.replace(distill="none", fallback="none")


def test_every_registered_family_and_target_is_covered():
    assert set(FAMILIES) == set(SPECS) and set(TARGET_SPECS) == {"ort", "onnx", "trt", "float"}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    """(class name, FP model folder, quantized artifact) of a tiny random model of one family."""
    kind, root = FAMILIES[request.param], tmp_path_factory.mktemp(FAMILIES[request.param])
    calib = CalibrationConfig(steps=2, samples=8, trajectories=2, batch_size=4)
    if kind == "unet":
        folder, cond, extra = write_pipeline(tiny_unet(), root / "pipe"), None, {}
    elif kind == "cond":  # unet/ and scheduler/ of a Stable Diffusion folder
        folder = root / "pipe"
        tiny_cond_unet().save_pretrained(str(folder / "unet"))
        DDIMScheduler(num_train_timesteps=1000).save_pretrained(str(folder / "scheduler"))
        cond, extra = write_cond_file(root / "cond.safetensors"), {}
        calib = dataclasses.replace(calib, guidance=2.0)
    else:
        folder, extra = write_transformer_pipeline(kind, root / "pipe"), {}
        cond = write_transformer_cond(root / "cond.safetensors", pooled=kind != "pixart")
        calib = dataclasses.replace(calib, guidance=2.0, resolution=8 if kind == "flux" else None)
    artifact = quantize(folder, PTQ, calib, root / "q", cond_file=cond, **extra).path
    return request.param, folder, artifact


@pytest.mark.parametrize("target", list(TARGET_SPECS))
def test_export_contract(family, target, tmp_path):
    class_name, folder, artifact = family
    fam, rec = SPECS[class_name], TARGET_SPECS[target]
    source = artifact if rec.quantized else folder
    out = tmp_path / target
    if rec.engine:
        try:
            import tensorrt  # noqa: F401
        except ImportError:
            with pytest.raises(MissingDependencyError, match="TensorRT"):
                export(source, out, target=target)
            assert not out.exists()
            return
        pytest.skip("TensorRT is installed: tests/gpu builds and runs engines")
    export(source, out, target=target)
    spec = read_spec(out)
    assert (out / fam.subfolder / "model.onnx").is_file() and spec.model_class == class_name
    assert spec.target == rec.graph and spec.layout == rec.layout and spec.precision == "fp32"
    config = load_quantized(artifact).denoiser.config
    assert [t.name for t in spec.inputs] == fam.input_names(config) and [t.name for t in spec.outputs] == [fam.output]
    assert (spec.int8_format is not None) == rec.cpu_format
    _runs_like_its_source(out, folder, artifact, rec.quantized, fam)


def _runs_like_its_source(out, folder, artifact, quantized, fam):
    """On two calibration inputs the graph gives the simulation's output (quantized targets: within twice the
    quantization error) or the FP model's (float: within float noise), with the same shape."""
    spec = read_spec(out)
    tensors = {k: (v if k in fam.shared else v[:2]) for k, v in load_calibration_inputs(artifact).items()}
    inputs = fam.inputs_from_dict({t.name: _fit(tensors[t.name], t.shape) for t in spec.inputs})
    with torch.no_grad():
        fp = inputs.call(load_model(folder).denoiser)
        want = inputs.call(load_quantized(artifact)) if quantized else fp
        got = torch.as_tensor(inputs.call(load_runtime(out)))
    assert got.shape == want.shape
    budget = 2 * float((want - fp).norm() / fp.norm()) + 1e-3
    assert float((got - want).norm() / want.norm()) <= budget


def _fit(value, shape):
    """``value``, or random values of the graph's fixed sizes where they differ (a float graph is traced with
    the pipeline's text length, the artifact's calibration inputs have the tiny test encoder's)."""
    want = [w if isinstance(w, int) and w > 0 else g for w, g in zip(shape, value.shape)]
    if want == list(value.shape):
        return value
    if value.abs().max() == 0:  # Flux's txt_ids
        return torch.zeros(want)
    return torch.randn(want, generator=torch.Generator().manual_seed(0))
