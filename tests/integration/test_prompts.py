"""Prompts for every family: ``dqdeploy encode-prompts`` and ``quantize --prompts`` encode with the folder's own text
encoders through its diffusers pipeline's ``encode_prompt`` (tiny SD, SD3, PixArt and Flux pipelines built in
code), and a ``--cond`` file in diffusers' own names reads as the same conditioning."""

from __future__ import annotations

import inspect
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import dqdeploy
from dqdeploy.core.errors import DQDeployError
from dqdeploy.io.prompts import encode
from dqdeploy.quant.trajectories import load_conditioning
from tests.helpers import POOLED_DIM, TEXT_DIM, TOKENS, write_sd_pipeline, write_transformer_pipeline
from tests.hostile.runner import refused, run

PROMPTS = ["a cat", "hello dog", "the cat"]
KINDS = ["sd", "sd3", "pixart", "flux"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("prompt-pipelines")
    out = {"sd": write_sd_pipeline(root / "sd")}
    for kind in ("sd3", "pixart", "flux"):
        out[kind] = write_transformer_pipeline(kind, root / kind, text=True)
    return out


def _reference(kind: str, folder, length: int) -> dict[str, torch.Tensor]:
    """The pipeline's own encode_prompt, called directly on a pipeline built from the folder's parts."""
    import diffusers

    cls = getattr(diffusers, json.loads((folder / "model_index.json").read_text())["_class_name"])
    others = [k for k in inspect.signature(cls.__init__).parameters
              if k not in ("self", "scheduler") and "text" not in k and "token" not in k]
    pipe = cls.from_pretrained(str(folder), **dict.fromkeys(others))
    cpu = torch.device("cpu")
    with torch.no_grad():
        if kind == "sd":
            cond, uncond = pipe.encode_prompt(PROMPTS, cpu, 1, True, negative_prompt=["blurry"] * 3)
            return {"encoder_hidden_states": cond, "uncond_encoder_hidden_states": uncond[:1]}
        if kind == "sd3":
            c, u, p, up = pipe.encode_prompt(PROMPTS, None, None, device=cpu, negative_prompt="blurry",
                                             max_sequence_length=length)
            return {"encoder_hidden_states": c, "uncond_encoder_hidden_states": u[:1], "pooled_projections": p,
                    "uncond_pooled_projections": up[:1]}
        if kind == "pixart":
            c, m, u, um = pipe.encode_prompt(PROMPTS, True, negative_prompt="blurry", device=cpu,
                                             max_sequence_length=length)
            return {"encoder_hidden_states": c, "uncond_encoder_hidden_states": u[:1], "encoder_attention_mask": m,
                    "uncond_encoder_attention_mask": um[:1]}  # T5's padding mask, which PixArt's transformer takes
        c, p, _ = pipe.encode_prompt(PROMPTS, None, device=cpu, max_sequence_length=length)
        return {"encoder_hidden_states": c, "pooled_projections": p}


@pytest.mark.parametrize("kind", KINDS)
def test_encode_prompts_writes_what_the_pipeline_feeds_its_denoiser(kind, folders, tmp_path):
    (tmp_path / "p.txt").write_text("\n".join(PROMPTS) + "\n\n")
    out = tmp_path / "c.safetensors"
    result = run("encode-prompts", folders[kind], tmp_path / "p.txt", "--out", out, "--negative-prompt", "blurry",
                 "--max-sequence-length", "6")
    assert result.returncode == 0, result.stderr
    written = load_file(str(out))
    expected = _reference(kind, folders[kind], 6)
    assert sorted(written) == sorted(expected)
    for key, value in expected.items():
        assert torch.equal(written[key], value.float()), key
    width = {"sd": 24, "sd3": TEXT_DIM, "pixart": TEXT_DIM, "flux": TEXT_DIM}[kind]
    seq = {"sd": TOKENS, "sd3": TOKENS + 6, "pixart": 6, "flux": 6}[kind]
    assert tuple(written["encoder_hidden_states"].shape) == (3, seq, width)
    if kind in ("sd3", "flux"):
        assert tuple(written["pooled_projections"].shape) == (3, POOLED_DIM)
    assert ("uncond_encoder_hidden_states" in written) == (kind != "flux")  # Flux: guidance-distilled
    cond = load_conditioning(out)  # what --cond reads
    assert torch.equal(cond.cond, written["encoder_hidden_states"])
    # written by dqdeploy: --overwrite may replace it, and a second run gives the same bytes
    before = out.read_bytes()
    again = run("encode-prompts", folders[kind], tmp_path / "p.txt", "--out", out, "--negative-prompt", "blurry",
                "--max-sequence-length", "6", "--overwrite")
    assert again.returncode == 0, again.stderr
    assert out.read_bytes() == before


def test_quantize_prompts_on_a_transformer_pipeline(folders, tmp_path):
    """--prompts used to be refused for transformers ("needs its own text encoders"): SD3 now encodes with its own."""
    (tmp_path / "p.txt").write_text("a cat\nhello dog\n")
    result = run("quantize", folders["sd3"], "--out", tmp_path / "q", "--prompts", tmp_path / "p.txt",
                 "--guidance", "4", "--steps", "2", "--calib-samples", "8", "--trajectories", "2", "--no-distill",
                 "--fallback", "none", "--no-quality-check")
    assert result.returncode == 0, result.stderr
    assert dqdeploy.load_quantized(tmp_path / "q") is not None


def test_diffusers_names_read_as_the_same_conditioning(folders, tmp_path):
    ours = encode(folders["sd3"], PROMPTS, negative_prompt="blurry", max_sequence_length=6)
    theirs = {"prompt_embeds": ours["encoder_hidden_states"], "pooled_prompt_embeds": ours["pooled_projections"],
              # diffusers repeats the negative prompt's rows once per prompt
              "negative_prompt_embeds": ours["uncond_encoder_hidden_states"].expand(3, -1, -1).contiguous(),
              "negative_pooled_prompt_embeds": ours["uncond_pooled_projections"].expand(3, -1).contiguous()}
    save_file(theirs, str(tmp_path / "d.safetensors"))
    save_file(ours, str(tmp_path / "o.safetensors"))
    a, b = load_conditioning(tmp_path / "d.safetensors"), load_conditioning(tmp_path / "o.safetensors")
    for field in ("cond", "uncond", "pooled", "uncond_pooled"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field


def test_differing_negative_rows_and_double_names_are_refused(tmp_path):
    cond = torch.randn(2, 4, 8)
    save_file({"prompt_embeds": cond, "negative_prompt_embeds": torch.randn(2, 4, 8)}, str(tmp_path / "a.safetensors"))
    with pytest.raises(DQDeployError, match="rows of negative_prompt_embeds differ"):
        load_conditioning(tmp_path / "a.safetensors")
    save_file({"prompt_embeds": cond, "encoder_hidden_states": cond.clone()}, str(tmp_path / "b.safetensors"))
    with pytest.raises(DQDeployError, match="both 'prompt_embeds' and 'encoder_hidden_states'"):
        load_conditioning(tmp_path / "b.safetensors")


def test_bad_folders_and_outputs_are_refused(folders, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    bare = tmp_path / "bare"
    bare.mkdir()
    refused(run("encode-prompts", bare, prompts, "--out", tmp_path / "c.safetensors"), "model_index.json")
    assert not (tmp_path / "c.safetensors").exists()
    other = tmp_path / "other"
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({"_class_name": "DDPMPipeline"}))
    refused(run("encode-prompts", other, prompts, "--out", tmp_path / "c.safetensors"), "DDPMPipeline")
    foreign = tmp_path / "mine.safetensors"
    save_file({"x": torch.zeros(1)}, str(foreign))
    before = foreign.read_bytes()
    refused(run("encode-prompts", folders["sd"], prompts, "--out", foreign), "already exists")
    refused(run("encode-prompts", folders["sd"], prompts, "--out", foreign, "--overwrite"), "did not write")
    assert foreign.read_bytes() == before
    refused(run("encode-prompts", folders["sd"], tmp_path / "none.txt", "--out", tmp_path / "c.safetensors"),
            "not found")


def test_sample_and_eval_take_prompts(folders, tmp_path):
    """--prompts on the sampling commands: encoded by the pipeline folder's text encoders (sample: PATH; eval: --fp),
    the same images as --cond with encode-prompts' file."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\nhello dog\n")
    sd = folders["sd"]
    args = ["--n", "2", "--steps", "2", "--guidance", "3"]
    by_prompts = run("sample", sd, *args, "--prompts", prompts, "--out", tmp_path / "a.png")
    assert by_prompts.returncode == 0, by_prompts.stderr
    assert run("encode-prompts", sd, prompts, "--out", tmp_path / "c.safetensors").returncode == 0
    by_cond = run("sample", sd, *args, "--cond", tmp_path / "c.safetensors", "--out", tmp_path / "b.png")
    assert by_cond.returncode == 0, by_cond.stderr
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    evaluated = run("eval", sd, "--fp", sd, *args, "--prompts", prompts, "--step-samples", "2")
    assert evaluated.returncode == 0, evaluated.stderr
    assert json.loads(evaluated.stdout.strip().splitlines()[-1])["verdict"]["level"] == "identical"
    refused(run("sample", sd, *args, "--prompts", prompts, "--cond", tmp_path / "c.safetensors", "--out",
                tmp_path / "c.png"), "--prompts and --cond")
    assert not list(tmp_path.glob("c.png"))
