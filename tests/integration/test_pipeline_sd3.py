"""Issue 23 for SD3: a tiny StableDiffusion3Pipeline folder (two CLIPs with projections, T5, SD3Transformer2DModel,
AutoencoderKL with a shift factor, flow matching) quantized, exported with ``--pipeline`` in optimum's ONNX layout, and
run prompt to image on ONNX Runtime in a process that never imports torch, against diffusers' pipeline."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from diffusers import StableDiffusion3Pipeline

import dqdeploy
from dqdeploy.core.errors import PipelineError
from dqdeploy.exporters.export import export
from dqdeploy.exporters.pipeline import PipelinePlan
from dqdeploy.runtimes.spec import read_spec
from dqdeploy.runtimes.text import family_parts
from tests.helpers import TOKENS, write_transformer_pipeline
from tests.integration.test_cli_errors import ROOT
from tests.integration.test_pipeline_export import CALIB, PROMPTS

STEPS = CALIB.steps
RUN = """
import json, sys
import numpy as np
import dqdeploy
pipe = dqdeploy.load_pipeline(sys.argv[1])
latents = np.load(sys.argv[2])
out = pipe({prompts}, latents=latents, output_type="np")
np.save(sys.argv[3], out.images)
np.savez(sys.argv[4], **{{k: v for k, v in pipe.encode({prompts}).items()}},
         **{{"negative_" + k: v for k, v in pipe.encode([""] * {n}).items()}})
pil = pipe("hello cat", seed=0, num_inference_steps=2, guidance_scale=1.0).images[0]
print(json.dumps({{"torch": "torch" in sys.modules, "steps": pipe.default_steps, "pil": [pil.mode, *pil.size]}}))
""".format(prompts=PROMPTS, n=len(PROMPTS))


def reference(pipe, cls=StableDiffusion3Pipeline):
    """diffusers' own pipeline of the folder ``pipe`` (class ``cls``), without progress bars."""
    ref = cls.from_pretrained(str(pipe))
    ref.set_progress_bar_config(disable=True)
    return ref


def test_the_export_is_optimum_s_sd3_layout_and_sealed(sd3):
    pipe, _q, e = sd3
    files = {p.relative_to(e).as_posix() for p in e.rglob("*") if p.is_file()}
    assert set(family_parts("SD3Transformer2DModel")) < files
    assert {"text_encoder_3/config.json", "tokenizer_3/tokenizer_config.json", "transformer/model.onnx",
            "vae_decoder/model.onnx", "vae_encoder/model.onnx", "scheduler/scheduler_config.json"} < files
    assert set(read_spec(e).files) == files - {"dqdeploy_export.json"}  # every file sealed in the spec
    outputs = {part: [o.name for o in onnx.load(str(e / part / "model.onnx"), load_external_data=False).graph.output]
               for part in ("text_encoder", "text_encoder_2", "text_encoder_3")}
    hidden = [f"hidden_states.{i}" for i in range(3)]  # the embeddings and both layers (optimum's names)
    assert outputs == {"text_encoder": ["text_embeds", "last_hidden_state", *hidden],
                       "text_encoder_2": ["text_embeds", "last_hidden_state", *hidden],
                       "text_encoder_3": ["last_hidden_state"]}
    index = json.loads((e / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline"
    assert index["text_encoder_3"] == ["transformers", "T5EncoderModel"]
    assert json.loads((e / "vae_decoder/config.json").read_text())["shift_factor"] == 0.0609


def test_each_text_encoder_graph_equals_its_torch_module(sd3):
    """On the same ids, another batch and (T5) another length than exported: every output within float error."""
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    pipe, _q, e = sd3
    rng = np.random.default_rng(0)
    for part, cls, length in [("text_encoder", CLIPTextModelWithProjection, TOKENS),
                              ("text_encoder_2", CLIPTextModelWithProjection, TOKENS),
                              ("text_encoder_3", T5EncoderModel, 37)]:
        model = cls.from_pretrained(str(pipe / part)).eval()
        ids = rng.integers(0, model.config.vocab_size, (3, length))
        session = ort.InferenceSession(str(e / part / "model.onnx"), providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]
        got = dict(zip(names, session.run(names, {"input_ids": ids})))
        with torch.no_grad():
            out = model(torch.from_numpy(ids), output_hidden_states=True)
        for name, value in got.items():
            ref = out.hidden_states[int(name.split(".")[1])] if name.startswith("hidden_states.") else out[name]
            np.testing.assert_allclose(value, ref.numpy(), atol=1e-5, rtol=1e-5, err_msg=f"{part} {name}")


def run_without_torch(e, latents: np.ndarray, tmp_path) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """load_pipeline(e) in a fresh process: the images of PROMPTS from ``latents`` and the embeddings it made
    (``negative_*``: the empty prompt's); asserts that torch was never imported."""
    np.save(tmp_path / "latents.npy", latents)
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    paths = [str(tmp_path / n) for n in ("latents.npy", "o.npy", "embeddings.npz")]
    proc = subprocess.run([sys.executable, "-c", RUN, str(e), *paths], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.splitlines()[-1])
    assert report["torch"] is False  # tokenizers, text encoders, denoiser, sampler and VAE: no PyTorch
    assert report["steps"] == STEPS and report["pil"] == ["RGB", 16, 16]  # calibrated steps; 8x8 latents -> 16x16
    return np.load(tmp_path / "o.npy"), dict(np.load(tmp_path / "embeddings.npz"))


def test_prompt_to_image_without_torch_matches_diffusers(sd3, tmp_path):
    pipe, q, e = sd3
    latents = np.random.default_rng(0).standard_normal((2, 4, 8, 8)).astype(np.float32)
    images, mine = run_without_torch(e, latents, tmp_path)

    ref = reference(pipe)
    with torch.no_grad():  # diffusers' encode_prompt: CLIP-L|CLIP-G penultimate states padded, then T5; pooled
        embeds = ref.encode_prompt(PROMPTS, None, None, do_classifier_free_guidance=True, negative_prompt="")
    names = ["encoder_hidden_states", "negative_encoder_hidden_states", "pooled_projections",
             "negative_pooled_projections"]
    for name, value in zip(names, embeds):
        np.testing.assert_allclose(mine[name], value.numpy(), atol=1e-5, rtol=1e-5, err_msg=name)

    def torch_images(transformer, **embeddings) -> np.ndarray:
        ref.transformer = transformer
        args = {"prompt": PROMPTS} if not embeddings else embeddings
        return ref(**args, latents=torch.from_numpy(latents), num_inference_steps=STEPS, output_type="np").images

    fp = torch_images(ref.transformer)  # before the transformer is swapped
    ours = {k: torch.from_numpy(v) for k, v in mine.items()}
    ours = {"prompt_embeds": ours[names[0]], "negative_prompt_embeds": ours[names[1]],
            "pooled_prompt_embeds": ours[names[2]], "negative_pooled_prompt_embeds": ours[names[3]]}
    # the same ONNX denoiser and the same embeddings inside diffusers' pipeline: loop, flow-matching sampler,
    # guidance (SD3's default 7.0) and the VAE's shift and scale are diffusers' own
    assert np.abs(torch_images(dqdeploy.load_runtime(e), **ours) - images).max() < 1e-5
    # from the prompts, against the PyTorch simulation: ORT's text encoders differ from torch's by ~1e-6, which
    # flips a few rounding ties of the quantized denoiser; within the quantization error, as for Stable Diffusion
    simulated = torch_images(dqdeploy.load_quantized(q))
    assert np.abs(simulated - images).mean() <= np.abs(simulated - fp).mean()


def test_a_float_export_of_the_folder_runs_the_fp_pipeline(sd3, tmp_path):
    pipe = sd3[0]
    e = export(pipe, tmp_path / "f", target="float", pipeline=pipe)
    latents = np.random.default_rng(1).standard_normal((1, 4, 8, 8)).astype(np.float32)
    images = dqdeploy.load_pipeline(e)("a cat", "a dog", latents=latents, num_inference_steps=2,
                                       output_type="np").images
    expected = reference(pipe)("a cat", negative_prompt="a dog", latents=torch.from_numpy(latents),
                                num_inference_steps=2, output_type="np").images
    assert np.abs(expected - images).max() < 1e-4


def test_families_without_a_pipeline_runtime_are_refused_naming_those_with_one(tmp_path):
    pixart = write_transformer_pipeline("pixart", tmp_path / "pixart", text=True, vae=True)
    with pytest.raises(PipelineError, match="fix: ") as err:
        export(pixart, tmp_path / "out", target="float", pipeline=pixart)
    assert ("its denoiser is a PixArtTransformer2DModel; pipelines export for StableDiffusionPipeline "
            "(UNet2DConditionModel), StableDiffusion3Pipeline (SD3Transformer2DModel), FluxPipeline "
            "(FluxTransformer2DModel)") in str(err.value)
    assert not (tmp_path / "out").exists()
    with pytest.raises(PipelineError, match="runs StableDiffusionPipeline .* found a PixArtTransformer2DModel"):
        family_parts("PixArtTransformer2DModel")


def test_an_sd3_folder_without_t5_is_refused_before_any_work(sd3, tmp_path):
    no_t5 = shutil.copytree(sd3[0], tmp_path / "no_t5")
    index = json.loads((no_t5 / "model_index.json").read_text())
    (no_t5 / "model_index.json").write_text(json.dumps({**index, "text_encoder_3": [None, None]}))
    with pytest.raises(PipelineError, match="pipeline runs with text_encoder_3, found none in model_index.json"):
        export(sd3[1], tmp_path / "out", target="ort", pipeline=no_t5)
    assert not (tmp_path / "out").exists()


def test_sd3_conditioning_lengths_the_pipeline_can_make(tmp_path):
    """CLIP's 8 tokens, then any T5 length: 9 or 264 tokens run, 8 (no T5) or 5 do not."""
    plan = PipelinePlan(tmp_path, {}, "transformer", {}, clip_length=TOKENS, t5_length=256)
    assert plan.text_length == TOKENS + 256  # diffusers' default max_sequence_length
    for found in (TOKENS + 1, TOKENS + 256):
        plan.check_length(found, "q")
    for found in (5, TOKENS):
        with pytest.raises(PipelineError, match=f"has {found}-token conditioning; .* make 8 CLIP tokens followed"):
            plan.check_length(found, "q")
