"""``export --dynamic-text-length MIN:MAX``: the text axis of the graph symbolic, so a pipeline may encode prompts to
another length than the calibration conditioning's. A tiny SD3 artifact (calibrated on 5-token embeddings) runs inside
``StableDiffusion3Pipeline`` at two text lengths and equals the simulation at both; lengths outside the range, and
other lengths on a graph exported without the option, are refused with the fix; a tiny conditional UNet's float graph
takes any length in its range too."""

from __future__ import annotations

import onnx
import pytest
import torch
from diffusers import StableDiffusion3Pipeline

from dqdeploy import export, load_quantized, load_runtime, quantize
from dqdeploy.core.denoisers import SPECS
from dqdeploy.core.errors import ExportError, RuntimeInputError
from dqdeploy.core.recipe import W8A8, CalibrationConfig
from dqdeploy.runtimes.dynamic import check_text_range
from dqdeploy.runtimes.spec import read_spec
from tests.helpers import (
    CROSS_DIM,
    POOLED_DIM,
    SEQ_LEN,
    TEXT_DIM,
    tiny_cond_unet,
    transformer_scheduler,
    write_pipeline,
    write_transformer_cond,
    write_transformer_pipeline,
)
from tests.hostile.runner import refused, run

STEPS = 2
RANGE = (3, 12)  # holds the calibration conditioning's SEQ_LEN = 5 tokens
REL_TOL = 0.05  # whole-trajectory runtime vs simulation, as tests/integration/test_transformers_e2e.py


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    """A tiny SD3 artifact and its ORT exports: with the text length dynamic in RANGE, and without."""
    root = tmp_path_factory.mktemp("sd3-text")
    folder = write_transformer_pipeline("sd3", root / "pipe")
    calib = CalibrationConfig(steps=STEPS, samples=8, trajectories=2, batch_size=2, guidance=3.0)
    result = quantize(folder, W8A8.replace(distill="none", fallback="none"), calib, root / "q",
                      cond_file=write_transformer_cond(root / "cond.safetensors"), quality_check=False)
    dynamic = export(result.path, root / "dynamic", target="ort", dynamic_text_length=RANGE)
    return result, dynamic, export(result.path, root / "static", target="ort")


def _generate(transformer, tokens: int) -> torch.Tensor:
    """Latents of StableDiffusion3Pipeline from ``tokens``-token prompt embeddings (guided)."""
    g = torch.Generator().manual_seed(tokens)
    emb, pooled = torch.randn(2, tokens, TEXT_DIM, generator=g), torch.randn(2, POOLED_DIM, generator=g)
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=transformer_scheduler("sd3"), vae=None,
                                    text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                                    text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt_embeds=emb[:1], pooled_prompt_embeds=pooled[:1], negative_prompt_embeds=emb[1:],
                negative_pooled_prompt_embeds=pooled[1:], guidance_scale=3.0, output_type="latent",
                num_inference_steps=STEPS, generator=torch.Generator().manual_seed(1), height=64, width=64).images


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _fused(folder) -> int:
    graph = onnx.load(str(folder / "transformer" / "model.onnx"))
    return sum(n.op_type == "MultiHeadAttention" for n in graph.graph.node)


def test_sd3_export_runs_two_text_lengths_as_the_simulation(sd3):
    result, dynamic, static = sd3
    spec = read_spec(dynamic)
    assert spec.text_length_range == list(RANGE)
    assert next(t for t in spec.inputs if t.name == "encoder_hidden_states").shape == ["batch", "sequence", TEXT_DIM]
    assert _fused(dynamic) == _fused(static) == 2  # the joint attention still ONNX Runtime's kernel
    assert "text_length_range" not in (static / "dqdeploy_export.json").read_text()  # as before the option existed
    assert "dynamic      text 3..12 tokens" in run("inspect", dynamic).stdout
    simulation, runtime = load_quantized(result.path), load_runtime(dynamic, "ort")
    for tokens in (SEQ_LEN, 9):
        assert _rel(_generate(runtime, tokens), _generate(simulation, tokens)) < REL_TOL, tokens


def test_other_lengths_are_refused_with_the_fix(sd3):
    result, dynamic, static = sd3
    call = {k: v[:1] for k, v in result.calib_inputs.items()}
    longer = dict(call, encoder_hidden_states=torch.randn(1, RANGE[1] + 1, TEXT_DIM))
    with pytest.raises(RuntimeInputError, match=r"sequence 13 is outside the range 3\.\.12") as outside:
        load_runtime(dynamic, "ort")(**longer)
    assert "--dynamic-text-length 3:13" in outside.value.hint
    with pytest.raises(RuntimeInputError, match="expected sequence 5") as fixed:
        load_runtime(static, "ort")(**longer)
    assert "--dynamic-text-length 5:13" in fixed.value.hint and "text encoder" not in fixed.value.hint.split("(")[0]
    with pytest.raises(ExportError, match="does not contain the calibration conditioning's 5 tokens"):
        export(result.path, static.parent / "bad", target="ort", dynamic_text_length=(6, 12))
    refused(run("export", result.path, "--out", static.parent / "bad", "--dynamic-text-length", "12:3"),
            "--dynamic-text-length", code=2)


def test_families_without_one_text_axis_are_refused():
    with pytest.raises(ExportError, match="position ids"):
        check_text_range(SPECS["FluxTransformer2DModel"], ["hidden_states", "encoder_hidden_states"], 5, 3, 8)
    with pytest.raises(ExportError, match="no text input"):
        check_text_range(SPECS["UNet2DModel"], ["sample", "timestep"], 0, 3, 8)


def test_conditional_unet_float_graph_takes_any_length_in_range(tmp_path):
    unet = tiny_cond_unet()
    folder = write_pipeline(unet, tmp_path / "pipe")
    out = export(folder, tmp_path / "e", target="float", dynamic_text_length=(8, 80))  # traced at CLIP's 77
    runtime = load_runtime(out, "ort")
    g = torch.Generator().manual_seed(0)
    for tokens in (8, 77):
        x = dict(sample=torch.randn(2, 4, 8, 8, generator=g), timestep=torch.tensor([10, 500]),
                 encoder_hidden_states=torch.randn(2, tokens, CROSS_DIM, generator=g))
        with torch.no_grad():
            expected = unet(**x).sample
        torch.testing.assert_close(runtime(**x).sample, expected, rtol=1e-4, atol=1e-4)
