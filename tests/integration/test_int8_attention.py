"""Quantized attention (recipe ``attention="int8"``, issue 22) end to end on tiny real models: a UNet and the
SD3, PixArt and Flux transformers -> quantize -> artifact round trip -> export in both layouts -> lint (TensorRT
rules for INT8 attention) -> check per step and per quantizer -> ONNX Runtime runs both batched matmuls of every
attention on integer kernels (asserted on the graph ONNX Runtime optimised)."""

from __future__ import annotations

import json

import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner

from dqdeploy import export, load_quantized, quantize
from dqdeploy.cli import cli
from dqdeploy.core.errors import ArtifactError, ModelLoadError, RecipeError
from dqdeploy.core.recipe import W8A8, CalibrationConfig, Recipe
from dqdeploy.exporters.lint import lint_path
from dqdeploy.quant.attention import attention_quants, is_attention
from dqdeploy.quant.modules import set_act_quant
from dqdeploy.runtimes.spec import read_spec
from dqdeploy.verify.check import check_export
from dqdeploy.verify.inspect import describe
from tests.helpers import tiny_unet, write_pipeline, write_transformer_cond, write_transformer_pipeline

KINDS = ("unet", "sd3", "pixart", "flux")
STEPS = 4
RECIPE = W8A8.replace(attention="int8", iters=4, batch_size=8)


@pytest.fixture(scope="module", params=KINDS)
def artifact(request, tmp_path_factory):
    kind = request.param
    root = tmp_path_factory.mktemp(f"attn-{kind}")
    if kind == "unet":
        folder, cond = write_pipeline(tiny_unet(), root / "pipe"), None
        calib = CalibrationConfig(steps=STEPS, samples=32, trajectories=4, batch_size=8, scheduler="DDIMScheduler")
    else:
        folder = write_transformer_pipeline(kind, root / "pipe")
        cond = write_transformer_cond(root / "cond.safetensors", pooled=kind != "pixart")
        calib = CalibrationConfig(steps=STEPS, samples=32, trajectories=4, batch_size=4, guidance=3.0,
                                  resolution=8 if kind == "flux" else None)
    result = quantize(folder, RECIPE, calib, root / "q", cond_file=cond)
    exports = {t: export(result.path, root / t, target=t) for t in ("onnx", "ort")}
    return kind, result, exports


def _inputs(result, n: int = 2):
    return {k: v if k in ("img_ids", "txt_ids") else v[:n] for k, v in result.calib_inputs.items()}


def test_every_attention_is_quantized_and_the_artifact_round_trips(artifact):
    kind, result, _ = artifact
    model = load_quantized(result.path)
    names = [n for n, m in model.denoiser.named_modules() if is_attention(m)]
    assert sorted(result.manifest.attention) == sorted(names) and names
    assert set(attention_quants(model.denoiser)) == set(names)
    manifest = json.loads((result.path / "manifest.json").read_text())
    assert manifest["recipe"]["attention"] == "int8" and manifest["attention"] == result.manifest.attention
    inputs = _inputs(result)
    out = model(**inputs, return_dict=False)[0]
    torch.testing.assert_close(out, result.model(**inputs, return_dict=False)[0], rtol=0, atol=0)
    for quant in attention_quants(model.denoiser).values():  # one positive step per time step and role
        for q in quant.quantizers().values():
            assert q.scale.shape == (STEPS,) and bool((q.scale > 0).all())


def test_the_simulation_rounds_attention(artifact):
    """With the attention quantizers off (and only them), the output changes: the matmul inputs are rounded."""
    kind, result, _ = artifact
    model = load_quantized(result.path)
    inputs = _inputs(result)
    with torch.no_grad():
        quantized = model(**inputs, return_dict=False)[0]
        for quant in attention_quants(model.denoiser).values():
            set_act_quant(quant, False)
        floating = model(**inputs, return_dict=False)[0]
    assert not torch.equal(quantized, floating)
    assert float((quantized - floating).norm() / floating.norm()) < 0.2


def test_exports_pass_lint_and_check_per_step_and_per_quantizer(artifact):
    kind, result, exports = artifact
    for target, folder in exports.items():
        spec = read_spec(folder)
        assert spec.recipe is not None and spec.recipe.attention == "int8"
        graph = folder / spec.onnx_file
        if target == "onnx":
            assert lint_path(graph, allow_attention_qdq=True) == []
            assert {v.rule for v in lint_path(graph)} == {"attention-unquantized"}  # float attention expected
            linted = CliRunner().invoke(cli, ["lint", str(folder)])  # reads the export's recipe
            assert linted.exit_code == 0 and "passes every TensorRT rule check" in linted.output, linted.output
        assert "attention    int8: Q/DQ in front of both batched matmuls" in describe(folder)
        check = check_export(result.path, folder, per_layer=True)
        assert check.ok, check.table()
        roles = [r for r in check.layers if " " in r.name]
        assert len(roles) == 3 * len(result.manifest.attention)
        assert max(r.mismatch for r in roles) < 0.1, check.table()  # the simulation's integers, but for ties


def test_onnx_runtime_runs_attention_on_integer_kernels(artifact, tmp_path):
    kind, result, exports = artifact
    folder = exports["ort"]
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    ort.InferenceSession(str(folder / read_spec(folder).onnx_file), options, providers=["CPUExecutionProvider"])
    optimized = onnx.load(str(tmp_path / "optimized.onnx"))
    ops = [n.op_type for n in optimized.graph.node]
    assert "MultiHeadAttention" not in ops  # not the float kernel
    consts = {i.name for i in optimized.graph.initializer}
    float_bmm = [n.name for n in optimized.graph.node if n.op_type in ("MatMul", "FusedMatMul")
                 and not any(i in consts for i in n.input)]
    assert float_bmm == []  # no activation x activation product left in float
    assert ops.count("MatMulIntegerToFloat") >= 2 * len(result.manifest.attention)


def test_cli_quantize_attention_and_inspect(tmp_path):
    folder = write_pipeline(tiny_unet(), tmp_path / "pipe")
    args = ["quantize", str(folder), "--out", str(tmp_path / "q"), "--steps", "2", "--calib-samples", "8",
            "--trajectories", "2", "--iters", "0", "--fallback", "none", "--attention", "int8"]
    done = CliRunner().invoke(cli, args)
    assert done.exit_code == 0, done.output
    shown = CliRunner().invoke(cli, ["inspect", str(tmp_path / "q")])
    assert shown.exit_code == 0 and "attention        int8: both batched matmuls" in shown.output, shown.output


def test_float_attention_leaves_artifacts_as_before(tmp_path):
    """The default writes no ``attention`` key in the recipe, manifest or export spec (files as before)."""
    assert "attention" not in W8A8.to_dict()
    assert Recipe.from_dict(W8A8.to_dict()).attention == "float"
    with pytest.raises(RecipeError, match="attention"):
        W8A8.replace(attention="int4")


def test_int8_attention_without_any_attention_is_refused(tmp_path):
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    plain = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32),
                        layers_per_block=1, norm_num_groups=8, down_block_types=("DownBlock2D", "DownBlock2D"),
                        up_block_types=("UpBlock2D", "UpBlock2D"), add_attention=False).eval()
    folder = write_pipeline(plain, tmp_path / "pipe")
    calib = CalibrationConfig(steps=2, samples=8, trajectories=2, scheduler="DDIMScheduler")
    with pytest.raises(ModelLoadError, match="no attention"):
        quantize(folder, RECIPE, calib, tmp_path / "q")
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize("artifact", ["unet"], indirect=True)  # one model is enough
def test_tampered_attention_steps_and_names_are_refused(artifact, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from dqdeploy.io.integrity import seal

    kind, result, _ = artifact
    bad = tmp_path / "bad"
    shutil.copytree(result.path, bad)
    state = load_file(str(bad / "model.safetensors"))
    key = next(k for k in state if k.endswith(".act_quant.value.scale"))
    state[key] = -state[key]
    save_file(state, str(bad / "model.safetensors"))
    manifest = json.loads((bad / "manifest.json").read_text())
    from dqdeploy.io.integrity import file_sha256

    manifest["files"]["model.safetensors"] = file_sha256(bad / "model.safetensors")
    manifest.pop("integrity", None)
    (bad / "manifest.json").write_text(json.dumps(seal(manifest)))
    with pytest.raises(ArtifactError, match="attention step sizes"):
        load_quantized(bad)
    manifest = json.loads((result.path / "manifest.json").read_text())
    manifest["attention"] = ["no.such.attention"]
    manifest.pop("integrity", None)
    shutil.copy(result.path / "model.safetensors", bad / "model.safetensors")
    (bad / "manifest.json").write_text(json.dumps(seal(manifest)))
    with pytest.raises(ArtifactError):
        load_quantized(bad)


def test_distillation_trains_the_attention_steps():
    """Block-wise distillation moves the query/key/value steps (at lr_quant), from the same calibration."""
    from dqdeploy.stages.quantize import quantize_denoiser
    from tests.helpers import random_calib, scheduler

    unet = tiny_unet()
    calib = random_calib(unet, n=16)
    base = RECIPE.replace(fallback="none", iters=10, batch_size=8)
    steps = {}
    for name, recipe in (("calibrated", base.replace(distill="none")), ("distilled", base),
                         ("frozen", base.replace(lr_quant=0.0))):
        model = quantize_denoiser(unet, recipe, calib, scheduler_config=dict(scheduler().config)).model
        steps[name] = torch.cat([q.scale.detach().abs() for quant in attention_quants(model.denoiser).values()
                                 for q in quant.quantizers().values()])
    assert torch.equal(steps["frozen"], steps["calibrated"])
    assert not torch.allclose(steps["distilled"], steps["calibrated"])


def test_a_score_scale_split_other_than_the_simulations_is_refused(tmp_path):
    """The simulation quantizes q * sqrt(scale) and k * sqrt(scale): a graph scaling them otherwise is refused."""
    import numpy as np
    from onnx import numpy_helper

    from dqdeploy.core.errors import ExportError
    from dqdeploy.exporters.attention_qdq import AttentionTensors, find_attention_nodes, insert_attention_qdq
    from dqdeploy.exporters.graph_index import GraphIndex
    from dqdeploy.exporters.onnx import example_inputs, export_float_onnx

    unet = tiny_unet()
    graph = export_float_onnx(unet, tmp_path / "f.onnx", inputs=example_inputs(unet))
    name = "mid_block.attentions.0"
    steps = AttentionTensors(name, *(np.full(1, 0.05, np.float32) for _ in range(3)))
    scores, _ = find_attention_nodes(graph, [name], "unet.")[name]
    ix = GraphIndex(graph)
    mul = ix.producer[scores.input[1]]
    slot = next(k for k, i in enumerate(mul.input) if ix.const_array(i) is not None)
    graph.graph.initializer.append(numpy_helper.from_array(ix.const_array(mul.input[slot]) * 2, "k_scale_doubled"))
    mul.input[slot] = "k_scale_doubled"  # (the exporter shares one constant between q and k)
    with pytest.raises(ExportError, match="sqrt"):
        insert_attention_qdq(graph, {name: steps}, [500.0])
