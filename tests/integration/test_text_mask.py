"""PixArt's text attention mask end to end: prompts encoded by a tiny PixArt pipeline's own T5 (padded to the
pipeline's length, the padding masked) -> quantize (calibration trajectories see the mask) -> an export whose graph
takes ``encoder_attention_mask`` -> lint and check -> the ORT runtime as ``pipe.transformer`` of a
``PixArtAlphaPipeline`` generating from a prompt, equal to the simulation in the same pipeline. Conditioning files
in diffusers' names carry the mask too, and a mask where it cannot apply is refused."""

from __future__ import annotations

import onnx
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline
from safetensors.torch import save_file

from dqdeploy import export, load_quantized, load_runtime, quantize
from dqdeploy.core.errors import CalibrationError, RuntimeInputError
from dqdeploy.core.recipe import W8A8, CalibrationConfig
from dqdeploy.quant.conditioning import check_text_mask, load_conditioning
from dqdeploy.runtimes.spec import read_spec
from tests.helpers import TEXT_DIM, tiny_sd3, write_transformer_pipeline
from tests.hostile.runner import run

STEPS = 2
MASK = "encoder_attention_mask"
REL_TOL = 0.05  # whole-trajectory runtime vs simulation, as tests/integration/test_transformers_e2e.py


@pytest.fixture(scope="module")
def pixart(tmp_path_factory):
    """A tiny PixArt pipeline with its T5, quantized from prompts, exported in both layouts."""
    root = tmp_path_factory.mktemp("pixart-mask")
    folder = write_transformer_pipeline("pixart", root / "pipe", text=True)
    calib = CalibrationConfig(steps=STEPS, samples=8, trajectories=2, batch_size=2, guidance=3.0)
    result = quantize(folder, W8A8.replace(distill="none", fallback="none"), calib, root / "q",
                      prompts=["a cat", "hello dog the cat"], quality_check=False)
    exports = {t: export(result.path, root / t, target=t) for t in ("ort", "onnx")}
    return folder, result, exports


def _generate(folder, transformer) -> torch.Tensor:
    """Latents of ``PixArtAlphaPipeline`` from a prompt (its T5 pads to 120 tokens and masks the padding)."""
    from transformers import T5EncoderModel, T5TokenizerFast

    pipe = PixArtAlphaPipeline(tokenizer=T5TokenizerFast.from_pretrained(str(folder / "tokenizer")),
                               text_encoder=T5EncoderModel.from_pretrained(str(folder / "text_encoder")), vae=None,
                               transformer=transformer,
                               scheduler=DPMSolverMultistepScheduler.from_pretrained(str(folder / "scheduler")))
    pipe.set_progress_bar_config(disable=True)
    return pipe("a cat", negative_prompt="", num_inference_steps=STEPS, guidance_scale=3.0, height=64, width=64,
                output_type="latent", use_resolution_binning=False, clean_caption=False,
                generator=torch.Generator().manual_seed(1)).images


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_calibration_and_graph_carry_the_mask_and_pass_lint_and_check(pixart):
    _, result, exports = pixart
    mask = result.calib_inputs[MASK]
    assert mask.shape == result.calib_inputs["encoder_hidden_states"].shape[:2]
    assert bool((mask == 0).any()) and bool((mask[:, 0] == 1).all())  # T5's padding is masked, the tokens are not
    graph = onnx.load(str(exports["ort"] / "transformer" / "model.onnx"))  # every attention ORT's own kernel, the
    assert sum(n.op_type == "MultiHeadAttention" for n in graph.graph.node) == 4  # masked cross-attentions too
    for target, folder in exports.items():
        spec = read_spec(folder)
        assert [t.name for t in spec.inputs] == ["hidden_states", "encoder_hidden_states", MASK, "timestep"]
        assert next(t for t in spec.inputs if t.name == MASK).shape == ["batch", mask.shape[1]]
        checked = run("check", result.path, folder)
        assert checked.returncode == 0, checked.stdout + checked.stderr
    linted = run("lint", exports["onnx"])
    assert linted.returncode == 0, linted.stdout + linted.stderr


def test_pixart_pipeline_from_a_prompt_runs_the_ort_runtime_as_the_simulation(pixart):
    folder, result, exports = pixart
    simulated = _generate(folder, load_quantized(result.path))
    for target, export_dir in exports.items():
        deployed = _generate(folder, load_runtime(export_dir, "ort"))
        assert _rel(deployed, simulated) < REL_TOL, target


def test_the_mask_changes_the_output(pixart):
    """Masked padding vs the same padding attended to: the graph must not ignore its mask input."""
    _, result, exports = pixart
    inputs = {k: v[:4] for k, v in result.calib_inputs.items()}
    unmasked = dict(inputs, **{MASK: torch.ones_like(inputs[MASK])})
    sim, rt = load_quantized(result.path), load_runtime(exports["ort"], "ort")
    masked_rt, unmasked_rt = (rt(**x, return_dict=False)[0] for x in (inputs, unmasked))
    with torch.no_grad():
        masked_sim = sim(**inputs, return_dict=False)[0]
    assert _rel(masked_rt, masked_sim) < REL_TOL
    assert _rel(unmasked_rt, masked_rt) > REL_TOL  # measured: 0.13 (runtime vs simulation: 1e-7)
    no_mask = {k: v for k, v in inputs.items() if k != MASK}  # as the model reads None: every token attended to
    assert torch.equal(rt(**no_mask, return_dict=False)[0], unmasked_rt)
    with pytest.raises(RuntimeInputError, match="0 \\(padding\\) and 1"):
        rt(**dict(inputs, **{MASK: inputs[MASK] * 0.5}))


def test_diffusers_mask_names_read_as_the_mask_and_bad_masks_are_refused(tmp_path):
    cond = torch.randn(2, 5, TEXT_DIM)
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 0, 0]])
    negative = torch.tensor([[1, 0, 0, 0, 0]]).expand(2, -1).contiguous()  # diffusers repeats it per prompt
    save_file({"prompt_embeds": cond, "prompt_attention_mask": mask,
               "negative_prompt_embeds": cond[:1].expand(2, -1, -1).contiguous(),
               "negative_prompt_attention_mask": negative}, str(tmp_path / "d.safetensors"))
    read = load_conditioning(tmp_path / "d.safetensors")
    assert torch.equal(read.mask, mask.float()) and torch.equal(read.uncond_mask, negative[:1].float())
    assert torch.equal(read.for_batch(1, 1)[MASK], mask[1:].float())
    assert torch.equal(read.unconditional()[MASK], negative[:1].float())
    for bad, match in ((mask[:, :4].contiguous(), r"must be \[2, 5\]"), (mask * 2, "other than 0 and 1")):
        save_file({"encoder_hidden_states": cond, MASK: bad}, str(tmp_path / "b.safetensors"))
        with pytest.raises(CalibrationError, match=match):
            load_conditioning(tmp_path / "b.safetensors")
    save_file({"encoder_hidden_states": cond, MASK: mask, "uncond_encoder_hidden_states": cond[:1].clone()},
              str(tmp_path / "u.safetensors"))
    with pytest.raises(CalibrationError, match="no uncond_encoder_attention_mask"):
        load_conditioning(tmp_path / "u.safetensors").unconditional()
    with pytest.raises(CalibrationError, match="SD3Transformer2DModel takes none"):
        check_text_mask(read, tiny_sd3())
