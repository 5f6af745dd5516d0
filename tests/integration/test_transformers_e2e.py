"""Diffusion transformers end to end on tiny random configs: SD3, PixArt and Flux pipeline folders ->
quantize (folder's own scheduler, float flow-matching timesteps, pooled conditioning, Flux guidance)
-> load_quantized as a drop-in -> export in both layouts -> lint (TensorRT layout) -> check per step
and per layer -> the ORT runtime as ``pipe.transformer`` inside the matching diffusers pipeline."""

from __future__ import annotations

import onnx
import pytest
import torch
from diffusers import FluxPipeline, PixArtAlphaPipeline, StableDiffusion3Pipeline

from dqdeploy import export, load_quantized, quantize
from dqdeploy.core.errors import ExportError, MissingDependencyError, RuntimeInputError
from dqdeploy.core.recipe import W8A8, CalibrationConfig
from dqdeploy.exporters.lint import lint_path
from dqdeploy.runtimes import load_runtime
from dqdeploy.runtimes.spec import read_spec
from dqdeploy.verify.check import check_export
from tests.helpers import (
    POOLED_DIM,
    SEQ_LEN,
    TEXT_DIM,
    transformer_scheduler,
    write_transformer_cond,
    write_transformer_pipeline,
)

KINDS = ("sd3", "pixart", "flux")
STEPS = 4
INPUTS = {
    "sd3": ["hidden_states", "encoder_hidden_states", "pooled_projections", "timestep"],
    "pixart": ["hidden_states", "encoder_hidden_states", "timestep"],
    "flux": ["hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "img_ids", "txt_ids",
             "guidance"],
}
BLOCKS = {"sd3": "JointTransformerBlock", "pixart": "BasicTransformerBlock", "flux": "FluxSingleTransformerBlock"}
# one linear of each family Weight Dilation must reach: q/k/v, context projection, feed-forward, adaLN modulation
LAYERS = {
    "sd3": ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.add_k_proj", "transformer_blocks.0.ff.net.2",
            "transformer_blocks.0.norm1.linear", "context_embedder"],
    "pixart": ["transformer_blocks.0.attn1.to_v", "transformer_blocks.0.attn2.to_k",
               "transformer_blocks.0.ff.net.0.proj", "adaln_single.linear", "caption_projection.linear_1"],
    "flux": ["transformer_blocks.0.attn.to_k", "transformer_blocks.0.attn.add_q_proj",
             "single_transformer_blocks.0.proj_mlp", "single_transformer_blocks.0.norm.linear", "context_embedder"],
}


@pytest.fixture(scope="module", params=KINDS)
def artifact(request, tmp_path_factory):
    kind = request.param
    root = tmp_path_factory.mktemp(kind)
    folder = write_transformer_pipeline(kind, root / "pipe")
    cond = write_transformer_cond(root / "cond.safetensors", pooled=kind != "pixart")
    calib = CalibrationConfig(steps=STEPS, samples=32, trajectories=4, batch_size=4, guidance=3.0,
                              resolution=8 if kind == "flux" else None)
    result = quantize(folder, W8A8.replace(iters=4, batch_size=8), calib, root / "q", cond_file=cond)
    return kind, result


@pytest.fixture(scope="module")
def exports(artifact, tmp_path_factory):
    kind, result = artifact
    root = tmp_path_factory.mktemp(f"{kind}-export")
    return {t: export(result.path, root / t, target=t) for t in ("onnx", "ort")}


def test_quantize_reaches_every_linear_family_and_block(artifact):
    kind, result = artifact
    m = result.manifest
    assert set(LAYERS[kind]) <= set(m.layers)
    assert all(m.layers[n].fold in ("mul",) or m.layers[n].fold.startswith("norm:") for n in LAYERS[kind])
    names = [b["name"] for b in m.blocks]
    model = load_quantized(result.path).denoiser
    assert any(type(model.get_submodule(n)).__name__ == BLOCKS[kind] for n in names), names
    assert len(m.timesteps) == STEPS
    assert m.scheduler_config["_class_name"] == type(transformer_scheduler(kind)).__name__  # the folder's own
    if kind != "pixart":  # flow matching: float timesteps (sigma x 1000; Flux's model sees sigma)
        assert any(t != round(t) for t in m.timesteps), m.timesteps
    if kind == "flux":
        assert max(m.timesteps) <= 1.0 and torch.all(result.calib_inputs["guidance"] == 3.0)


def test_load_quantized_is_a_drop_in_with_the_class_signature(artifact):
    kind, result = artifact
    model = load_quantized(result.path)
    inputs = {k: v if k in ("img_ids", "txt_ids") else v[:2] for k, v in result.calib_inputs.items()}
    out = model(**inputs, return_dict=True).sample  # keywords, as the pipelines call it
    assert out.shape[0] == 2 and torch.isfinite(out).all()
    torch.testing.assert_close(out, result.model(**inputs, return_dict=False)[0])


def test_export_both_layouts_lint_and_check(artifact, exports):
    kind, result = artifact
    for target, folder in exports.items():
        spec = read_spec(folder)
        assert [t.name for t in spec.inputs] == INPUTS[kind]
        assert [t.name for t in spec.outputs] == ["out_hidden_states"]
        graph = onnx.load(str(folder / "transformer" / "model.onnx"))
        hidden = next(i for i in graph.graph.input if i.name == "hidden_states")
        assert hidden.type.tensor_type.shape.dim[0].dim_param  # dynamic batch
        ops = {n.op_type for n in graph.graph.node}
        assert {"QuantizeLinear", "DequantizeLinear", "ArgMin", "Gather"} <= ops  # per-step tables keyed on timestep
        if target == "onnx":
            assert lint_path(folder / "transformer" / "model.onnx") == []
        # SD3's joint and PixArt's attention: ORT's kernel (Flux: rotary, left as is)
        if target == "ort" and kind != "flux":
            assert "MultiHeadAttention" in ops and "Softmax" not in ops
        check = check_export(result.path, folder, per_layer=True)
        assert check.ok, check.table()
        assert len(check.steps) == STEPS and len(check.layers) == len(result.manifest.layers)
        if target == "onnx":  # TensorRT layout: the integers are the simulation's but for rounding ties
            assert max(r.mismatch for r in check.layers) < 0.1, check.table()


def _pipeline(kind: str, transformer):
    g = torch.Generator().manual_seed(0)
    emb, pooled = torch.randn(2, SEQ_LEN, TEXT_DIM, generator=g), torch.randn(2, POOLED_DIM, generator=g)
    run = dict(output_type="latent", num_inference_steps=STEPS, generator=torch.Generator().manual_seed(1),
               height=64, width=64)
    sched = transformer_scheduler(kind)
    if kind == "sd3":
        pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=sched, vae=None, text_encoder=None,
                                        tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None,
                                        tokenizer_3=None)
        return pipe(prompt_embeds=emb[:1], pooled_prompt_embeds=pooled[:1], negative_prompt_embeds=emb[1:],
                    negative_pooled_prompt_embeds=pooled[1:], guidance_scale=3.0, **run).images
    if kind == "pixart":
        pipe = PixArtAlphaPipeline(transformer=transformer, scheduler=sched, vae=None, text_encoder=None,
                                   tokenizer=None)
        mask = torch.ones(1, SEQ_LEN)
        return pipe(prompt_embeds=emb[:1], prompt_attention_mask=mask, negative_prompt=None,
                    negative_prompt_embeds=emb[1:], negative_prompt_attention_mask=mask, guidance_scale=3.0,
                    use_resolution_binning=False, **run).images
    pipe = FluxPipeline(transformer=transformer, scheduler=sched, vae=None, text_encoder=None, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None)
    return pipe(prompt_embeds=emb[:1], pooled_prompt_embeds=pooled[:1], guidance_scale=3.0, **run).images


def test_ort_runtime_runs_inside_the_diffusers_pipeline(artifact, exports):
    kind, result = artifact
    simulated = _pipeline(kind, load_quantized(result.path))
    for target, folder in exports.items():
        deployed = _pipeline(kind, load_runtime(folder, "ort"))
        assert deployed.shape == simulated.shape
        rel = float((deployed - simulated).norm() / simulated.norm())
        assert rel < 0.05, (target, rel)  # whole-trajectory drift stays at the quantization-noise level


def test_runtime_refuses_what_the_graph_cannot_honour(artifact, exports):
    kind, result = artifact
    rt = load_runtime(exports["ort"], "ort")
    inputs = {k: v if k in ("img_ids", "txt_ids") else v[:1] for k, v in result.calib_inputs.items()}
    out = (rt(**inputs, joint_attention_kwargs={}, return_dict=False)[0] if kind != "pixart"
           else rt(**inputs, return_dict=False)[0])
    assert out.shape[0] == 1
    with pytest.raises(RuntimeInputError, match="encoder_hidden_states"):
        rt(**{k: v for k, v in inputs.items() if k != "encoder_hidden_states"})
    bogus = {"sd3": {"skip_layers": [0]}, "pixart": {"attention_mask": torch.zeros(1, 16)},
             "flux": {"controlnet_block_samples": [torch.zeros(1)]}}[kind]
    with pytest.raises(RuntimeInputError, match=next(iter(bogus))):
        rt(**inputs, **bogus)


def test_engine_profile_covers_every_transformer_input(artifact, exports, tmp_path):
    """The TensorRT optimization profile (checked without TensorRT): batch axes get the batch range (doubled
    under CFG), the other dims their fixed sizes, Flux's position ids keep their shapes (no batch axis)."""
    import importlib.util

    from dqdeploy.exporters.engine import profile_shapes

    kind, result = artifact
    spec = read_spec(exports["onnx"])
    shapes = profile_shapes(spec, batch=(1, 2, 4), cfg=True)
    assert list(shapes) == INPUTS[kind] and spec.engine_file == "transformer/model.plan"
    for t in spec.inputs:
        lo, opt, hi = shapes[t.name]
        if t.name in ("img_ids", "txt_ids"):
            assert lo == opt == hi == list(t.shape)
        else:
            assert (lo[0], opt[0], hi[0]) == (2, 4, 8) and lo[1:] == hi[1:] == list(t.shape[1:])
    if kind == "flux":
        with pytest.raises(ExportError, match="packed latents"):
            profile_shapes(spec, resolution=16)
    if importlib.util.find_spec("tensorrt") is None:  # the engine build itself runs in tests/gpu
        with pytest.raises(MissingDependencyError):
            export(result.path, tmp_path / "engine", target="trt")
        assert not (tmp_path / "engine").exists()


def test_triton_model_is_named_transformer(artifact, exports, tmp_path):
    """As in optimum's ONNX layout, the Triton model of a transformer export is ``transformer`` (a UNet's ``unet``)."""
    from dqdeploy.exporters.triton import write_triton_repo

    model = write_triton_repo(exports["ort"], tmp_path / "repo")
    assert model == tmp_path / "repo" / "transformer" and (model / "1" / "model.onnx").is_file()
    assert (model / "config.pbtxt").read_text().startswith('name: "transformer"')


def test_ort_layout_fuses_every_layer_with_an_output_q(artifact, exports, tmp_path):
    import onnxruntime as ort

    path = exports["ort"] / "transformer" / "model.onnx"
    out_q = [n for n in onnx.load(str(path)).graph.node if n.op_type == "QuantizeLinear" and "/out_q" in n.name]
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node]
    fused = ops.count("QLinearMatMul") + ops.count("QLinearConv")
    print(f"{artifact[0]}: {fused} fused of {len(out_q)} output-quantized layers "
          f"({ops.count('QLinearMatMul')} QLinearMatMul, {ops.count('QLinearConv')} QLinearConv)")
    expected = sum(meta.output_quant for meta in artifact[1].manifest.layers.values())  # all but auto's float layers
    assert len(out_q) == expected >= 15 and fused == len(out_q)  # every token linear (and the patch conv) runs on int8


def test_sensitivity_analysis_and_auto_fallback_cover_transformers(artifact, tmp_path):
    """`dqdeploy analyze` (and the default fallback `auto`, which ran while quantizing) read the artifact's
    calibration inputs with the model's own input names (Flux's position ids without a batch axis);
    flow-matching steps are weighted by their step size |sigma_next - sigma|."""
    from dqdeploy.verify.analyze import analyze_artifact

    kind, result = artifact
    assert isinstance(result.manifest.fallback, list)  # auto ran (no longer UNet-only)
    report = analyze_artifact(result.path)
    quantized = set(result.manifest.layers)
    assert {r.name for r in report.layers} == quantized and report.full > 0
    assert any(r.gain > 0 for r in report.layers) and report.blocks
    weights = dict(zip(report.timesteps, report.step_weights))
    assert sum(weights.values()) == pytest.approx(1.0)
    if kind != "pixart":  # flow matching: weight proportional to the step to the next sigma (0 after the last)
        ts = report.timesteps
        steps = [ts[k] - (ts[k + 1] if k + 1 < len(ts) else 0.0) for k in range(len(ts))]
        assert report.step_weights == pytest.approx([s / sum(steps) for s in steps])


def test_eval_report_against_the_fp_transformer(artifact):
    """`dqdeploy eval Q --fp MODEL --cond FILE --guidance W` on a transformer: its own scheduler, pooled and
    unconditional prompts under CFG, per-step errors and image metrics (Flux: packed latents, no PNG)."""
    from dqdeploy.eval.report import EvalConfig, quality_report

    kind, result = artifact
    if kind == "flux":
        pytest.skip("Flux sampling needs a resolution the eval options do not take yet")
    root = result.path.parent
    cfg = EvalConfig(n=2, steps=STEPS, batch_size=2, step_samples=2, cond_file=root / "cond.safetensors", guidance=3.0)
    report = quality_report(result.path, root / "pipe", cfg)
    assert report["config"]["scheduler"] == type(transformer_scheduler(kind)).__name__
    assert len(report["per_step"]) == STEPS and report["per_step_summary"]["mean_rel_err"] > 0
    assert "images" not in report and report["latents"]["psnr_db"] > 0  # no VAE in this folder: latent figures
