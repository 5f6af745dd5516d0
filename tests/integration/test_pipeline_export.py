"""Issue 23, whole-pipeline export: a tiny Stable-Diffusion folder (CLIP text encoder and tokenizer, conditional
UNet, AutoencoderKL, PNDM) quantized, exported with ``--pipeline`` in optimum's ONNX layout, and run prompt to image
on ONNX Runtime in a process that never imports torch, against diffusers' pipeline on the same latents."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from diffusers import StableDiffusionPipeline

import dqdeploy
from dqdeploy.core.errors import ArtifactError, DQDeployError, PipelineError, RuntimeInputError
from dqdeploy.core.recipe import W8A8, CalibrationConfig
from dqdeploy.exporters.export import export
from dqdeploy.io.paths import OutputPathError
from dqdeploy.runtimes.pipeline import Tokenizer
from dqdeploy.runtimes.spec import read_spec
from dqdeploy.stages.quantize import quantize
from dqdeploy.verify.inspect import describe
from tests.helpers import write_cond_file, write_sd_pipeline
from tests.integration.test_cli_errors import ROOT, assert_user_error
from tests.integration.test_cli_errors import dqdeploy as cli

PROMPTS = ["hello cat", "a cat"]
CALIB = CalibrationConfig(steps=4, samples=16, trajectories=2, batch_size=2)
RECIPE = W8A8.replace(distill="none", fallback="none", layout="ort")  # the simulation rounds as the ORT graph does
RUN = """
import json, sys, time
import numpy as np
import dqdeploy
pipe = dqdeploy.load_pipeline(sys.argv[1])
latents = np.load(sys.argv[2])
start = time.perf_counter()
out = pipe({prompts}, latents=latents, output_type="np")
seconds = time.perf_counter() - start
pil = pipe("hello cat", seed=0, num_inference_steps=2).images[0]
np.save(sys.argv[3], out.images)
print(json.dumps({{"torch": "torch" in sys.modules, "seconds": seconds, "steps": pipe.default_steps,
                  "pil": [pil.mode, *pil.size]}}))
""".format(prompts=PROMPTS)


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    """(pipeline folder, artifact, export folder with the pipeline)."""
    root = tmp_path_factory.mktemp("sdpipe")
    pipe = write_sd_pipeline(root / "pipe")
    q = quantize(pipe, RECIPE, CALIB, root / "q", prompts=PROMPTS).path
    proc = cli("export", q, "--target", "ort", "--out", root / "e", "--pipeline", pipe)  # the README's command
    assert proc.returncode == 0, proc.stderr
    assert "wrote the pipeline beside it: scheduler, text_encoder, tokenizer, vae_decoder, vae_encoder, " \
           "model_index.json" in proc.stdout
    return pipe, q, root / "e"


def test_the_export_is_optimum_s_layout_and_sealed(sd):
    pipe, _q, e = sd
    files = {p.relative_to(e).as_posix() for p in e.rglob("*") if p.is_file()}
    assert files == {"dqdeploy_export.json", "model_index.json", "scheduler/scheduler_config.json",
                     "tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json", "tokenizer/vocab.json",
                     "tokenizer/merges.txt", "text_encoder/config.json",
                     "text_encoder/model.onnx", "unet/config.json", "unet/model.onnx", "vae_decoder/config.json",
                     "vae_decoder/model.onnx", "vae_encoder/config.json", "vae_encoder/model.onnx"}
    assert set(read_spec(e).files) == files - {"dqdeploy_export.json"}  # every file sealed in the spec
    assert "pipeline     scheduler, text_encoder, tokenizer, vae_decoder, vae_encoder (float;" in describe(e)
    io = {}
    for part in ("text_encoder", "vae_decoder", "vae_encoder", "unet"):
        graph = onnx.load(str(e / part / "model.onnx"), load_external_data=False).graph
        io[part] = ([i.name for i in graph.input if i.name not in {t.name for t in graph.initializer}],
                    [o.name for o in graph.output])
    assert io == {"text_encoder": (["input_ids"], ["last_hidden_state", "pooler_output"]),
                  "vae_decoder": (["latent_sample"], ["sample"]), "vae_encoder": (["sample"], ["latent_parameters"]),
                  "unet": (["sample", "timestep", "encoder_hidden_states"], ["out_sample"])}
    index = json.loads((e / "model_index.json").read_text())
    source = json.loads((pipe / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline" and index["unet"] == source["unet"]
    assert index["safety_checker"] == [None, None] and index["vae"] == ["diffusers", "AutoencoderKL"]
    unet_config = json.loads((e / "unet/config.json").read_text())
    assert unet_config["_class_name"] == "UNet2DConditionModel"
    assert unet_config["cross_attention_dim"] == json.loads((pipe / "unet/config.json").read_text())[
        "cross_attention_dim"]


def test_both_tokenizer_formats_give_the_ids_diffusers_pipelines_use(sd):
    from transformers import CLIPTokenizer

    e = sd[2]
    vocab_merges = CLIPTokenizer(vocab=str(e / "tokenizer/vocab.json"), merges=str(e / "tokenizer/merges.txt"),
                                 model_max_length=8)  # what transformers 4's slow tokenizer (optimum) reads
    texts = [*PROMPTS, "", "a much longer prompt than eight tokens"]
    expected = CLIPTokenizer.from_pretrained(str(sd[0] / "tokenizer"))(texts, padding="max_length", max_length=8,
                                                                     truncation=True).input_ids
    assert vocab_merges(texts, padding="max_length", max_length=8, truncation=True).input_ids == expected
    assert Tokenizer(e / "tokenizer")(texts).tolist() == expected


def test_optimum_loads_the_export(sd):
    """optimum's ORTStableDiffusionPipeline lives in optimum-onnx, which needs transformers < 4.58, hence
    huggingface-hub < 1.0, while diffusers 0.42 needs huggingface-hub >= 1.32: it cannot be installed beside the
    project's pins (optimum 1.17, which pip resolves instead, fails to import with transformers 5). Measured in a
    separate environment (optimum 2.1.0 + optimum-onnx 0.1.0, diffusers 0.35.2, transformers 4.57.6): it loads this
    layout and its images equal load_pipeline's to 2.4e-7."""
    optimum = pytest.importorskip("optimum.onnxruntime", reason="optimum-onnx cannot be installed beside diffusers "
                                                                "0.42 (huggingface-hub < 1.0 vs >= 1.32)")
    pipe = optimum.ORTStableDiffusionPipeline.from_pretrained(str(sd[2]))
    latents = np.random.default_rng(0).standard_normal((2, 4, 8, 8)).astype(np.float32)
    images = pipe(PROMPTS, latents=torch.from_numpy(latents), num_inference_steps=4, output_type="np").images
    ours = dqdeploy.load_pipeline(sd[2])(PROMPTS, latents=latents, output_type="np").images
    assert np.abs(images - ours).max() < 1e-5


def test_prompt_to_image_without_torch_matches_the_torch_pipeline(sd, tmp_path):
    pipe, q, e = sd
    latents = np.random.default_rng(0).standard_normal((2, 4, 8, 8)).astype(np.float32)
    np.save(tmp_path / "latents.npy", latents)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH",
                                                                                                          "")])}
    proc = subprocess.run([sys.executable, "-c", RUN, str(e), str(tmp_path / "latents.npy"), str(tmp_path / "o.npy")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.splitlines()[-1])
    assert report["torch"] is False  # tokenizer, text encoder, UNet, sampler and VAE: no PyTorch
    assert report["steps"] == 4 and report["pil"] == ["RGB", 16, 16]  # the calibrated steps; 8x8 latents -> 16x16
    images = np.load(tmp_path / "o.npy")

    ref = StableDiffusionPipeline.from_pretrained(str(pipe), safety_checker=None)
    ref.set_progress_bar_config(disable=True)

    def torch_images(unet) -> np.ndarray:
        ref.unet = unet
        return ref(PROMPTS, latents=torch.from_numpy(latents), num_inference_steps=4, output_type="np").images

    fp = torch_images(ref.unet)
    # the same ONNX denoiser inside diffusers' pipeline: the loop, sampler, text encoder and VAE are diffusers' own
    assert np.abs(torch_images(dqdeploy.load_runtime(e)) - images).max() < 1e-5
    # against the PyTorch simulation: ORT's integer kernels flip a few rounding ties, within the quantization error
    simulated = torch_images(dqdeploy.load_quantized(q))
    assert np.abs(simulated - images).mean() <= np.abs(simulated - fp).mean()


def test_a_float_export_of_the_folder_runs_the_fp_pipeline(sd, tmp_path):
    pipe = sd[0]
    e = export(pipe, tmp_path / "f", target="float", pipeline=pipe)
    latents = np.random.default_rng(1).standard_normal((1, 4, 8, 8)).astype(np.float32)
    images = dqdeploy.load_pipeline(e)("a cat", latents=latents, num_inference_steps=3, output_type="np").images
    ref = StableDiffusionPipeline.from_pretrained(str(pipe), safety_checker=None)
    ref.set_progress_bar_config(disable=True)
    expected = ref("a cat", latents=torch.from_numpy(latents), num_inference_steps=3, output_type="np").images
    assert np.abs(expected - images).max() < 1e-4


def test_hostile_pipeline_folders_are_refused_before_any_work(sd, tmp_path):
    pipe, q, _e = sd
    no_vae = shutil.copytree(pipe, tmp_path / "no_vae")
    shutil.rmtree(no_vae / "vae")
    no_schedule = shutil.copytree(pipe, tmp_path / "no_schedule")
    (no_schedule / "scheduler/scheduler_config.json").unlink()
    other = shutil.copytree(pipe, tmp_path / "other")
    config = json.loads((other / "unet/config.json").read_text())
    (other / "unet/config.json").write_text(json.dumps({**config, "layers_per_block": 2}))
    cases = [(pipe / "unet", "expected a diffusers pipeline folder, found no model_index.json in it"),
             (tmp_path / "nowhere", "found no such folder"),
             (no_vae, "expected a vae/ component, found no vae/ folder"),
             (no_schedule, "lists 'scheduler' (PNDMScheduler), but scheduler/ has no scheduler_config.json"),
             (other, "does not match the exported denoiser (layers_per_block: 2 there, 1 exported)")]
    for folder, needle in cases:
        with pytest.raises(PipelineError, match="fix: ") as err:
            export(q, tmp_path / "out", target="ort", pipeline=folder)
        assert needle in str(err.value)
        assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))
    cond = write_cond_file(tmp_path / "cond.safetensors")  # 5 tokens
    short = quantize(pipe, RECIPE, CALIB, tmp_path / "q5", cond_file=cond).path
    with pytest.raises(PipelineError, match="has 5-token conditioning; .* text encoder makes 8 tokens") as err:
        export(short, tmp_path / "out", target="ort", pipeline=pipe)
    assert "--dynamic-text-length 5:8" in err.value.hint
    # the fix it names: a graph whose text length holds the text encoder's runs the whole pipeline
    dynamic = export(short, tmp_path / "dynamic", target="ort", pipeline=pipe, dynamic_text_length=(5, 8))
    latents = np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32)
    image = dqdeploy.load_pipeline(dynamic)("a cat", latents=latents, num_inference_steps=2, output_type="np").images
    assert image.shape == (1, 16, 16, 3) and np.isfinite(image).all()
    proc = cli("export", q, "--out", tmp_path / "out", "--pipeline", no_vae)
    assert_user_error(proc, "expected a vae/ component")
    with pytest.raises(DQDeployError, match="pipeline must be a path, found int"):
        dqdeploy.export(q, tmp_path / "out", pipeline=3)
    with pytest.raises(DQDeployError, match="keyword arguments: providers"):
        dqdeploy.load_pipeline(tmp_path, thread=2)
    with pytest.raises(OutputPathError, match="already exists"):  # an existing --out without --overwrite
        export(q, other, target="ort", pipeline=pipe)
    with pytest.raises(OutputPathError, match="never replaces its inputs"):  # nor the pipeline folder, ever
        export(q, pipe, target="ort", pipeline=pipe, overwrite=True)
    assert (other / "unet/config.json").is_file() and (pipe / "vae").is_dir()


def test_load_pipeline_refuses_what_it_cannot_run(sd, tmp_path):
    _pipe, q, e = sd
    with pytest.raises(PipelineError, match="holds no whole pipeline") as err:
        dqdeploy.load_pipeline(export(q, tmp_path / "denoiser_only", target="ort"))
    assert "--pipeline MODEL_DIR" in str(err.value)
    tampered = shutil.copytree(e, tmp_path / "tampered")
    (tampered / "scheduler/scheduler_config.json").write_text(json.dumps({"_class_name": "LMSDiscreteScheduler"}))
    with pytest.raises(ArtifactError):  # every file of the pipeline is sealed in the spec
        dqdeploy.load_pipeline(tampered)
    pipe = dqdeploy.load_pipeline(e)
    with pytest.raises(RuntimeInputError, match="expected a string"):
        pipe(["a", 3])
    with pytest.raises(RuntimeInputError, match=r"expected \[2, 4, h, w\]"):
        pipe(PROMPTS, latents=np.zeros((1, 4, 8, 8), np.float32))


def test_a_tokenizer_folder_of_vocab_and_merges_gets_its_tokenizer_json(tmp_path):
    """Stable Diffusion 1.x folders hold vocab.json + merges.txt only: the export adds the tokenizer.json the
    runtime reads, and it tokenizes as transformers does."""
    from dqdeploy.exporters.pipeline import _ensure_tokenizer_json
    from tests.helpers import tiny_tokenizer

    reference = tiny_tokenizer(tmp_path / "src")
    (tmp_path / "src/tokenizer_config.json").write_text(json.dumps({"model_max_length": 8,
                                                                     "pad_token": "<|endoftext|>"}))
    dest = shutil.copytree(tmp_path / "src", tmp_path / "dest")
    _ensure_tokenizer_json(tmp_path / "src", dest, "CLIPTokenizer")
    texts = [*PROMPTS, "", "a much longer prompt than eight tokens"]
    expected = reference(texts, padding="max_length", max_length=8, truncation=True).input_ids
    assert Tokenizer(dest)(texts).tolist() == expected
