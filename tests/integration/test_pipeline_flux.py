"""Issue 23 for Flux: a tiny FluxPipeline folder (CLIP for the pooled projection, T5 for the sequence,
FluxTransformer2DModel with a guidance embedding, packed latents, AutoencoderKL with a shift factor, flow matching with
dynamic shift) quantized, exported with ``--pipeline``, and run prompt to image on ONNX Runtime in a process that
never imports torch, against diffusers' FluxPipeline."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from diffusers import FluxPipeline

import dqdeploy
from dqdeploy.core.errors import RuntimeInputError
from dqdeploy.exporters.export import export
from dqdeploy.runtimes.pipeline import pack, unpack
from dqdeploy.runtimes.spec import read_spec
from dqdeploy.runtimes.text import family_parts
from tests.helpers import TOKENS
from tests.integration.test_pipeline_export import PROMPTS
from tests.integration.test_pipeline_sd3 import STEPS, reference, run_without_torch


def test_the_export_is_optimum_s_flux_layout_and_sealed(flux):
    _pipe, _q, e = flux
    files = {p.relative_to(e).as_posix() for p in e.rglob("*") if p.is_file()}
    assert set(family_parts("FluxTransformer2DModel")) < files
    assert {"transformer/model.onnx", "vae_decoder/model.onnx", "tokenizer_2/tokenizer_config.json"} < files
    assert set(read_spec(e).files) == files - {"dqdeploy_export.json"}
    outputs = {part: [o.name for o in onnx.load(str(e / part / "model.onnx"), load_external_data=False).graph.output]
               for part in ("text_encoder", "text_encoder_2")}
    assert outputs == {"text_encoder": ["last_hidden_state", "pooler_output"], "text_encoder_2": ["last_hidden_state"]}
    assert json.loads((e / "model_index.json").read_text())["_class_name"] == "FluxPipeline"


def test_each_text_encoder_graph_equals_its_torch_module(flux):
    from transformers import CLIPTextModel, T5EncoderModel

    pipe, _q, e = flux
    rng = np.random.default_rng(0)
    for part, cls, length in [("text_encoder", CLIPTextModel, TOKENS), ("text_encoder_2", T5EncoderModel, 29)]:
        model = cls.from_pretrained(str(pipe / part)).eval()
        ids = rng.integers(0, model.config.vocab_size, (3, length))
        session = ort.InferenceSession(str(e / part / "model.onnx"), providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]
        with torch.no_grad():
            out = model(torch.from_numpy(ids))
        for name, value in zip(names, session.run(names, {"input_ids": ids})):
            np.testing.assert_allclose(value, out[name].numpy(), atol=1e-5, rtol=1e-5, err_msg=f"{part} {name}")


def test_prompt_to_image_without_torch_matches_diffusers(flux, tmp_path):
    pipe, q, e = flux
    latents = np.random.default_rng(0).standard_normal((2, 4, 8, 8)).astype(np.float32)  # unpacked, 16x16 images
    assert np.array_equal(unpack(pack(latents), 8, 8), latents)
    images, mine = run_without_torch(e, latents, tmp_path)

    ref = reference(pipe, FluxPipeline)
    with torch.no_grad():  # diffusers' encode_prompt: T5's sequence (512 tokens), CLIP's pooled output
        embeds, pooled, _ids = ref.encode_prompt(PROMPTS, None)
    np.testing.assert_allclose(mine["encoder_hidden_states"], embeds.numpy(), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(mine["pooled_projections"], pooled.numpy(), atol=1e-5, rtol=1e-5)

    def torch_images(transformer, **embeddings) -> np.ndarray:
        ref.transformer = transformer
        args = {"prompt": PROMPTS} if not embeddings else embeddings
        return ref(**args, latents=torch.from_numpy(pack(latents)), height=16, width=16, num_inference_steps=STEPS,
                   output_type="np").images

    fp = torch_images(ref.transformer)
    ours = {"prompt_embeds": torch.from_numpy(mine["encoder_hidden_states"]),
            "pooled_prompt_embeds": torch.from_numpy(mine["pooled_projections"])}
    # the same ONNX transformer and embeddings inside diffusers: packing, position ids, sigmas linspace(1, 1/n) with
    # the dynamic shift, guidance 3.5 as the graph's input (no CFG), t / 1000, unpacking and the VAE's shift
    assert np.abs(torch_images(dqdeploy.load_runtime(e), **ours) - images).max() < 1e-5
    simulated = torch_images(dqdeploy.load_quantized(q))
    assert np.abs(simulated - images).mean() <= np.abs(simulated - fp).mean()


def test_a_float_export_of_the_folder_runs_the_fp_pipeline(flux, tmp_path):
    pipe = flux[0]
    e = export(pipe, tmp_path / "f", target="float", pipeline=pipe)
    latents = np.random.default_rng(1).standard_normal((1, 4, 8, 8)).astype(np.float32)
    images = dqdeploy.load_pipeline(e)("a cat", latents=latents, num_inference_steps=2, guidance_scale=5.0,
                                       output_type="np").images
    expected = reference(pipe, FluxPipeline)("a cat", latents=torch.from_numpy(pack(latents)), height=16, width=16,
                                num_inference_steps=2, guidance_scale=5.0, output_type="np").images
    assert np.abs(expected - images).max() < 1e-4
    with pytest.raises(RuntimeInputError, match="guidance-distilled .* takes no negative prompt"):
        dqdeploy.load_pipeline(e)("a cat", "a dog")
    # each prompt its own guidance embedding (no CFG rows): the same image as alone
    both = dqdeploy.load_pipeline(e)(["a cat", "a cat"], latents=np.concatenate([latents, latents]),
                                     num_inference_steps=2, guidance_scale=[5.0, 1.0], output_type="np").images
    alone = dqdeploy.load_pipeline(e)("a cat", latents=latents, num_inference_steps=2, guidance_scale=1.0,
                                      output_type="np").images
    assert np.abs(both[0] - images[0]).max() < 1e-5 and np.abs(both[1] - alone[0]).max() < 1e-5
