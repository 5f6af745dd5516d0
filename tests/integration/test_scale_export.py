"""The export paths of Stable-Diffusion-size models on a reduced-width SD-shaped UNet
(``bench/scale_models.reduced``): weights written as external data (the >2 GB path, forced by a low
threshold) with the same graph as the one-file export, and dynamic latent height/width
(``--dynamic-resolution``) run by the ORT runtime at sizes other than the calibration one; SD3
likewise; Flux and PixArt refused with the reason."""

from __future__ import annotations

import json
import subprocess
import sys

import onnx
import pytest
import torch

from bench.scale_models import reduced, write_folder
from dqdeploy import export, load_quantized, quantize
from dqdeploy.core.errors import ExportError, RuntimeInputError
from dqdeploy.core.recipe import W8A8, CalibrationConfig
from dqdeploy.exporters import folder as folder_mod
from dqdeploy.exporters import onnx as onnx_mod
from dqdeploy.io.artifact import load_calibration_inputs
from dqdeploy.runtimes import load_runtime
from dqdeploy.runtimes.spec import ONNX_DATA_FILE, ONNX_FILE, read_spec
from dqdeploy.verify.check import check_export
from tests.helpers import write_transformer_cond, write_transformer_pipeline

PTQ = W8A8.replace(distill="none", fallback="none")
RANGE = (16, 32)  # latent pixels; the reduced UNet's step is 8 (four blocks), its calibration size 16


@pytest.fixture(scope="module")
def sd_artifact(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd")
    folder, cond = write_folder(reduced(width=16, cross_dim=32, sample_size=16), root / "sd")
    calib = CalibrationConfig(steps=3, samples=8, trajectories=2, batch_size=4, guidance=7.5)
    return quantize(folder, PTQ, calib, root / "q", cond_file=cond).path


def _feeds(h: int, w: int, channels: int = 4, cross: int = 32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(h * 100 + w)
    return {"sample": torch.randn(2, channels, h, w, generator=g), "timestep": torch.tensor([801.0, 401.0]),
            "encoder_hidden_states": torch.randn(2, 77, cross, generator=g)}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_external_data_export_is_the_same_graph(sd_artifact, tmp_path, monkeypatch):
    one = export(sd_artifact, tmp_path / "one", target="ort")
    monkeypatch.setattr(folder_mod, "EXTERNAL_DATA_THRESHOLD", 1 << 16)
    ext = export(sd_artifact, tmp_path / "ext", target="ort")
    assert not (one / "unet" / ONNX_DATA_FILE).exists() and (ext / "unet" / ONNX_DATA_FILE).is_file()
    assert set(read_spec(ext).files) == {ONNX_FILE, f"unet/{ONNX_DATA_FILE}"}
    assert not [p.name for p in ext.iterdir() if p.name.startswith(".")]  # the scratch graph is gone
    graph = onnx.load(str(ext / ONNX_FILE), load_external_data=False)
    assert sum(t.data_location == onnx.TensorProto.EXTERNAL for t in graph.graph.initializer) > 20
    x = _feeds(16, 16)
    a, b = load_runtime(one, "ort")(**x).sample, load_runtime(ext, "ort")(**x).sample
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_float_export_with_weights_left_in_external_data(sd_artifact, tmp_path, monkeypatch):
    """``--target float`` of an artifact whose float weights stay in the scratch data file (every
    tensor of an SD-size UNet): onnx.checker checks the structure without reading that file."""
    one = export(sd_artifact, tmp_path / "one", target="float")
    monkeypatch.setattr(onnx_mod, "LOAD_BELOW", 1 << 10)
    monkeypatch.setattr(folder_mod, "EXTERNAL_DATA_THRESHOLD", 1 << 16)
    ext = export(sd_artifact, tmp_path / "ext", target="float")
    assert (ext / "unet" / ONNX_DATA_FILE).is_file()
    x = _feeds(16, 16)  # the simplifier folds in-memory and external weights in another order: float rounding only
    torch.testing.assert_close(load_runtime(ext, "ort")(**x).sample, load_runtime(one, "ort")(**x).sample,
                               rtol=1e-4, atol=1e-5)


def test_dynamic_resolution_runs_other_sizes(sd_artifact, tmp_path):
    out = tmp_path / "dyn"
    cmd = [sys.executable, "-m", "dqdeploy.cli", "export", str(sd_artifact), "--out", str(out),
           "--dynamic-resolution", "16:32"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    spec = read_spec(out)
    assert spec.resolution_range == list(RANGE)
    sample = next(t for t in spec.inputs if t.name == "sample")
    assert all(isinstance(d, str) for d in (sample.shape[0], sample.shape[2], sample.shape[3]))
    assert check_export(sd_artifact, out).ok  # the calibration size still agrees step by step
    runtime, sim = load_runtime(out, "ort"), load_quantized(sd_artifact)
    for h, w in ((24, 32), (32, 16)):
        x = _feeds(h, w)
        got = runtime(**x).sample
        assert got.shape == (2, 4, h, w)
        with torch.no_grad():
            want = sim(**x).sample
        assert _rel(got, want) < 0.15, (h, w, _rel(got, want))  # rounding flips cascade; a wrong graph is ~1
    with pytest.raises(RuntimeInputError, match="outside the range 16..32"):
        runtime(**_feeds(40, 40))
    with pytest.raises(RuntimeInputError, match="not a multiple of 8"):  # in range, but no UNet takes it
        runtime(**_feeds(17, 17))


@pytest.mark.parametrize("bad, match", [((12, 32), "multiples of 8"), ((24, 32), "does not contain the calibration"),
                                        ((8, 32), "at least 16"), ((16, 100000), "MAX above"),
                                        ((7, 9), "multiples of 8")])
def test_impossible_ranges_are_refused_with_a_hint_that_works(sd_artifact, tmp_path, bad, match):
    from dqdeploy.core.denoisers import spec_for
    from dqdeploy.runtimes.dynamic import check_range

    with pytest.raises(ExportError, match=match) as err:
        export(sd_artifact, tmp_path / "e", target="ort", dynamic_resolution=bad)
    assert not (tmp_path / "e").exists()
    hint = err.value.hint.rsplit(" ", 1)[-1]
    lo, hi = (int(v) for v in hint.split(":"))
    config = json.loads((sd_artifact / "manifest.json").read_text())["model_config"]
    check_range(spec_for("UNet2DConditionModel"), config, (16, 16), lo, hi)  # the suggested range passes every check


@pytest.fixture(scope="module")
def transformer_artifacts(tmp_path_factory):
    out = {}
    for kind in ("sd3", "pixart", "flux"):
        root = tmp_path_factory.mktemp(kind)
        folder = write_transformer_pipeline(kind, root / "pipe")
        cond = write_transformer_cond(root / "cond.safetensors", pooled=kind != "pixart")
        calib = CalibrationConfig(steps=2, samples=8, trajectories=2, batch_size=4, guidance=3.0,
                                  resolution=8 if kind == "flux" else None)
        out[kind] = quantize(folder, PTQ, calib, root / "q", cond_file=cond).path
    return out


def test_sd3_dynamic_resolution(transformer_artifacts, tmp_path):
    q = transformer_artifacts["sd3"]
    out = export(q, tmp_path / "sd3", target="ort", dynamic_resolution=(4, 16))
    graph = onnx.load(str(out / "transformer" / "model.onnx"))  # token counts computed at run time: still fused
    assert sum(n.op_type == "MultiHeadAttention" for n in graph.graph.node) == 2
    runtime, sim = load_runtime(out, "ort"), load_quantized(q)
    inputs = load_calibration_inputs(q)  # the conditioning of real calibration rows
    for h, w in ((12, 16), (4, 6)):
        x = {k: v[:2] for k, v in inputs.items()} | {
            "hidden_states": torch.randn(2, 4, h, w, generator=torch.Generator().manual_seed(h))}
        got = runtime(**x).sample
        with torch.no_grad():
            want = sim(**x).sample
        assert got.shape == (2, 4, h, w) and _rel(got, want) < 0.15, (h, w, _rel(got, want))


@pytest.mark.parametrize("kind, match", [("flux", "packed token latents"), ("pixart", "position table")])
def test_flux_and_pixart_dynamic_resolution_is_refused(transformer_artifacts, tmp_path, kind, match):
    with pytest.raises(ExportError, match=match):
        export(transformer_artifacts[kind], tmp_path / kind, target="ort", dynamic_resolution=(4, 16))
    assert not (tmp_path / kind).exists()
