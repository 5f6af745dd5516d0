"""Quantize -> export (both layouts) -> Polygraphy check, on tiny conditional and unconditional
UNets; errors for artifacts that cannot be exported."""

from __future__ import annotations

import json
import subprocess

import onnx
import pytest

from dqdeploy import export, quantize
from dqdeploy.core.errors import ArtifactError, ExportError
from dqdeploy.core.recipe import W4A4, W4A8, W8A8, CalibrationConfig
from dqdeploy.exporters.lint import lint_path
from dqdeploy.runtimes.spec import ONNX_FILE, read_spec
from dqdeploy.verify.check import check_export
from tests.helpers import tiny_cond_unet, tiny_unet, write_bare_unet, write_cond_file, write_pipeline

SIMPLIFY = True
CALIB = CalibrationConfig(steps=6, samples=48, trajectories=8, batch_size=8)


@pytest.fixture(scope="module")
def uncond_artifact(tmp_path_factory):
    root = tmp_path_factory.mktemp("uncond")
    write_pipeline(tiny_unet(), root / "pipe")
    return quantize(root / "pipe", W8A8.replace(iters=10, batch_size=16), CALIB, root / "q").path


@pytest.fixture(scope="module")
def cond_artifact(tmp_path_factory):
    root = tmp_path_factory.mktemp("cond")
    unet_dir, sched_dir = write_bare_unet(tiny_cond_unet(), root)
    cond = write_cond_file(root / "cond.safetensors")
    calib = CalibrationConfig(steps=6, samples=48, trajectories=8, batch_size=8, guidance=3.0)
    res = quantize(unet_dir, W4A8.replace(iters=10, batch_size=16), calib, root / "q", scheduler_dir=sched_dir,
                   cond_file=cond)
    return res.path


@pytest.mark.parametrize("target", ["onnx", "ort"])
def test_unconditional_export_agrees_per_step(uncond_artifact, target, tmp_path):
    out = export(uncond_artifact, tmp_path / target, target=target, simplify=SIMPLIFY)
    spec = read_spec(out)
    assert [t.name for t in spec.inputs] == ["sample", "timestep"] and [t.name for t in spec.outputs] == ["out_sample"]
    model = onnx.load(str(out / ONNX_FILE))
    ops = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "ArgMin", "Gather"} <= ops
    lint = subprocess.run(["polygraphy", "check", "lint", str(out / ONNX_FILE)], capture_output=True, text=True)
    assert lint.returncode == 0 and "PASSED" in lint.stdout + lint.stderr, lint.stdout[-2000:] + lint.stderr[-2000:]
    if target == "onnx":
        assert lint_path(out / ONNX_FILE) == []
    result = check_export(uncond_artifact, out, per_layer=True)
    assert result.ok, result.table()
    assert len(result.steps) == CALIB.steps and result.unchecked == []  # every calibrated step, by default
    if target == "onnx":  # TensorRT layout: the integers are TPQ's; ties flip a few and flips cascade
        assert all(r.mismatch == 0 for r in result.layers[:5]), result.layers[:5]
        assert max(r.mismatch for r in result.layers) < 0.15  # a broken layer would differ almost everywhere


@pytest.mark.parametrize("target", ["onnx", "ort"])
def test_conditional_export_agrees_per_step(cond_artifact, target, tmp_path):
    out = export(cond_artifact, tmp_path / target, target=target, simplify=SIMPLIFY)
    assert read_spec(out).conditional
    ops = [n.op_type for n in onnx.load(str(out / ONNX_FILE)).graph.node]
    if target == "ort":  # every attention (self and cross) runs in ONNX Runtime's own attention kernel
        assert ops.count("MultiHeadAttention") == 8 and "Softmax" not in ops
    else:  # the TensorRT layout keeps the exporter's attention
        assert ops.count("Softmax") == 8 and "MultiHeadAttention" not in ops
    result = check_export(cond_artifact, out)
    assert result.ok, result.table()
    assert len(result.steps) == 6 and "6 of 6 calibrated time steps checked" in result.table()
    limited = check_export(cond_artifact, out, steps=2)
    assert [s.timestep for s in limited.steps] == [result.steps[0].timestep, result.steps[-1].timestep]
    assert len(limited.unchecked) == 4 and "2 of 6 calibrated time steps checked (not checked:" in limited.table()


def test_simulation_only_recipe_is_refused(tmp_path):
    write_pipeline(tiny_unet(), tmp_path / "pipe")
    q = quantize(tmp_path / "pipe", W4A4.replace(distill="none"), CALIB, tmp_path / "q").path
    with pytest.raises(ExportError, match="simulation-only"):
        export(q, tmp_path / "e", target="onnx")
    assert not (tmp_path / "e").exists()


def test_artifact_from_another_format_version_is_refused(uncond_artifact, tmp_path):
    import shutil

    bad = tmp_path / "old"
    shutil.copytree(uncond_artifact, bad)
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["format_version"] = 99
    (bad / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="format version 99"):
        export(bad, tmp_path / "e", target="ort")


def test_export_folder_is_not_a_source(uncond_artifact, tmp_path):
    out = export(uncond_artifact, tmp_path / "e", target="ort", simplify=SIMPLIFY)
    with pytest.raises(ExportError, match="already an export folder"):
        export(out, tmp_path / "e2", target="ort")


@pytest.mark.parametrize("target", ["ort", "onnx"])
def test_default_artifact_matches_both_graphs(target, tmp_path):
    """A default artifact (layout=ort: the simulation models the fused layers' output rounding) is
    reproduced by the --target ort graph and by the TensorRT-layout graph alike, within the strict
    check tolerance (integers exact until a tie flips)."""
    assert W8A8.layout == "ort"
    write_pipeline(tiny_unet(), tmp_path / "pipe")
    q = quantize(tmp_path / "pipe", W8A8.replace(iters=10, batch_size=16), CALIB, tmp_path / "q").path
    out = export(q, tmp_path / "e", target=target, simplify=False)
    result = check_export(q, out, per_layer=True)
    assert result.ok, result.table()
    assert all(s.tolerance == max(1e-3, s.quant_err) for s in result.steps)  # no extra budget needed
    assert all(r.mismatch == 0 for r in result.layers[:5]), result.layers[:5]
    # tie flips only: far below the quantization error (an unmodelled output rounding is about as large)
    assert sum(s.rel_err for s in result.steps) < 0.5 * sum(s.quant_err for s in result.steps), result.table()


def test_artifact_calibrated_at_another_resolution_exports(tmp_path):
    """`quantize --resolution` other than the config's sample_size: the stored calibration inputs
    are at the calibrated size, and export + check accept them."""
    write_pipeline(tiny_unet(), tmp_path / "pipe")  # sample_size 8
    calib = CalibrationConfig(steps=3, samples=16, trajectories=4, batch_size=8, resolution=12)
    q = quantize(tmp_path / "pipe", W8A8.replace(iters=2, batch_size=8, fallback="none"), calib, tmp_path / "q").path
    out = export(q, tmp_path / "ort", target="ort")
    assert read_spec(out).inputs[0].shape[-2:] == [12, 12]
    result = check_export(q, out)
    assert result.ok, result.table()
