"""Tiny real diffusers UNets exported with ``export_float_onnx`` into export folders (spec + graph)."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import onnx
import pytest
import torch

from dqdeploy.core.inputs import DenoiserInputs
from dqdeploy.exporters.onnx import export_float_onnx
from dqdeploy.io.integrity import file_record, seal
from dqdeploy.runtimes.spec import ONNX_FILE, SPEC_FILE, ExportSpec, TensorSpec
from tests.helpers import CROSS_DIM, SEQ_LEN, tiny_cond_unet, tiny_unet  # noqa: F401  (re-exported to tests)

if TYPE_CHECKING:
    from diffusers import UNet2DConditionModel, UNet2DModel

CALIBRATED = [801.0, 601.0, 401.0, 201.0, 1.0]


def _tensor_specs(values) -> list[TensorSpec]:
    out = []
    for v in values:
        t = v.type.tensor_type
        dims = [d.dim_param or d.dim_value for d in t.shape.dim]
        out.append(TensorSpec(v.name, dims, onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name))
    return out


def write_export(unet: torch.nn.Module, out: Path, *, timesteps: list[float] | None = None) -> Path:
    """An export folder (``dqdeploy_export.json`` + ``unet/model.onnx``) of ``unet``'s float graph."""
    cfg = unet.config
    context = None
    if getattr(cfg, "cross_attention_dim", None) is not None:
        context = torch.randn(2, SEQ_LEN, cfg.cross_attention_dim)
    inputs = DenoiserInputs.create(torch.randn(2, cfg.in_channels, cfg.sample_size, cfg.sample_size),
                                   torch.tensor([10.0, 500.0]), encoder_hidden_states=context)
    with tempfile.TemporaryDirectory() as scratch:
        model = export_float_onnx(unet, Path(scratch) / "float.onnx", inputs=inputs)
    (out / ONNX_FILE).parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(out / ONNX_FILE))
    inits = {i.name for i in model.graph.initializer}
    spec = ExportSpec(
        target="float", precision="fp32", opset=20, model_class=type(unet).__name__,
        model_config=json.loads(unet.to_json_string()),
        inputs=_tensor_specs([v for v in model.graph.input if v.name not in inits]),
        outputs=_tensor_specs(model.graph.output), timesteps=list(timesteps or []),
        scheduler_config={"num_train_timesteps": 1000}, files={ONNX_FILE: file_record(out / ONNX_FILE)},
    )
    (out / SPEC_FILE).write_text(spec.to_json())
    return out


@pytest.fixture(scope="session")
def uncond(tmp_path_factory) -> tuple[UNet2DModel, Path]:
    unet = tiny_unet()
    return unet, write_export(unet, tmp_path_factory.mktemp("uncond"))


@pytest.fixture(scope="session")
def uncond_calibrated(uncond, tmp_path_factory) -> tuple[UNet2DModel, Path]:
    """The same float graph with a list of calibrated steps in its spec (for the warning)."""
    unet, folder = uncond
    out = tmp_path_factory.mktemp("uncond_cal")
    shutil.copytree(folder / "unet", out / "unet")
    spec = json.loads((folder / SPEC_FILE).read_text())
    (out / SPEC_FILE).write_text(json.dumps(seal({**spec, "timesteps": CALIBRATED})))
    return unet, out


@pytest.fixture(scope="session")
def cond(tmp_path_factory) -> tuple[UNet2DConditionModel, Path]:
    unet = tiny_cond_unet()
    return unet, write_export(unet, tmp_path_factory.mktemp("cond"))
