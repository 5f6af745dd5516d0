"""GPU tests: everything here needs TensorRT and a CUDA device, and is skipped cleanly without them.

Fixtures write tiny real diffusers models to disk and export them the way users do (float FP16 /
FP32 exports, and a quantized w8a8 artifact exported in the TensorRT layout).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).parent


def _why_skip() -> str | None:
    if importlib.util.find_spec("tensorrt") is None:
        return "TensorRT is not installed (pip install 'dqdeploy[trt]')"
    if not torch.cuda.is_available():
        return "no CUDA device (TensorRT needs an NVIDIA GPU)"
    return None


def pytest_collection_modifyitems(config, items) -> None:
    reason = _why_skip()
    if reason is None:
        return
    for item in items:
        if HERE in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def uncond_pipeline(tmp_path_factory) -> Path:
    from tests.helpers import tiny_unet, write_pipeline

    return write_pipeline(tiny_unet(), tmp_path_factory.mktemp("gpu") / "pipe")


@pytest.fixture(scope="session")
def float_exports(uncond_pipeline, tmp_path_factory) -> dict[str, Path]:
    """FP16 and FP32 float exports of the same unconditional UNet."""
    from dqdeploy import export

    root = tmp_path_factory.mktemp("float")
    return {
        "fp16": export(uncond_pipeline, root / "fp16", target="float", fp16=True),
        "fp32": export(uncond_pipeline, root / "fp32", target="float"),
    }


@pytest.fixture(scope="session")
def w8a8(uncond_pipeline, tmp_path_factory) -> dict[str, Path]:
    """A w8a8 artifact and its TensorRT-layout exports (FP16 for the engine, FP32 for ONNX Runtime)."""
    from dqdeploy import export, quantize
    from dqdeploy.core.recipe import W8A8, CalibrationConfig

    root = tmp_path_factory.mktemp("w8a8")
    calib = CalibrationConfig(steps=6, samples=48, trajectories=8, batch_size=8)
    q = quantize(uncond_pipeline, W8A8.replace(iters=10, batch_size=16), calib, root / "q").path
    return {
        "q": q,
        "fp16": export(q, root / "fp16", target="onnx", fp16=True),
        "fp32": export(q, root / "fp32", target="onnx"),
    }


@pytest.fixture(scope="session")
def cond_export(tmp_path_factory) -> tuple[torch.nn.Module, Path]:
    """A conditional UNet (cross-attention, [B, 5, 24] context) and its FP16 float export."""
    from diffusers import DDIMScheduler

    from dqdeploy import export
    from tests.helpers import tiny_cond_unet

    root = tmp_path_factory.mktemp("cond")
    unet = tiny_cond_unet()
    unet.save_pretrained(str(root / "pipe" / "unet"))
    DDIMScheduler(num_train_timesteps=1000).save_pretrained(str(root / "pipe" / "scheduler"))
    return unet, export(root / "pipe", root / "fp16", target="float", fp16=True)
