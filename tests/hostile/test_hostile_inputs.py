"""CLI inputs a careless or hostile user gives: malformed model folders, recipes, conditioning and
prompt files, impossible counts and rates, and every scheduler the help offers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from dqdeploy.io.models import SCHEDULER_ALIASES, SUPPORTED_SCHEDULERS
from tests.helpers import CROSS_DIM, SEQ_LEN
from tests.hostile.runner import has_fix, refused, run

CLI = pytest.mark.hostile("cli", "refused")


def _copy_pipe(pipe_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(pipe_dir, tmp_path / "pipe"))


def _edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    path.write_text(json.dumps(change(data)))


MODEL_CASES = {
    "config.json is a JSON list": (lambda p: (p / "unet" / "config.json").write_text("[1, 2]"), "JSON list"),
    "config.json with a wrongly typed field": (
        lambda p: _edit_json(p / "unet" / "config.json", lambda d: {**d, "block_out_channels": "wide"}),
        "could not load"),
    "config.json is binary": (lambda p: (p / "unet" / "config.json").write_bytes(b"\xff\xfe\x00binary"),
                              "not valid JSON"),
    "unknown beta_schedule": (
        lambda p: _edit_json(p / "scheduler" / "scheduler_config.json", lambda d: {**d, "beta_schedule": "wavy"}),
        "scheduler config"),
    "scheduler config is a list": (lambda p: (p / "scheduler" / "scheduler_config.json").write_text("[]"), "JSON list"),
    "pickled .bin weights only": (
        lambda p: (p / "unet" / "diffusion_pytorch_model.safetensors").rename(
            p / "unet" / "diffusion_pytorch_model.bin"),
        "--allow-pickle"),
}


@CLI
@pytest.mark.parametrize("case", list(MODEL_CASES))
def test_malformed_model_folders(case, pipe_dir, tmp_path):
    change, needle = MODEL_CASES[case]
    pipe = _copy_pipe(pipe_dir, tmp_path)
    change(pipe)
    result = run("quantize", pipe, "--out", tmp_path / "q", "--steps", "2")
    refused(result, needle)
    has_fix(result)
    assert not (tmp_path / "q").exists()


@pytest.mark.hostile("cli", "accepted")
def test_allow_pickle_is_the_explicit_opt_in(pipe_dir, tmp_path):
    pipe = _copy_pipe(pipe_dir, tmp_path)
    result = run("quantize", pipe, "--out", tmp_path / "q", "--allow-pickle", "--steps", "5000")
    refused(result, "exceeds")  # got past loading: the step count is the next check


BAD_NUMBERS = {
    "--steps 5000": (["--steps", "5000"], "exceeds"),
    "--steps 0": (["--steps", "0"], "--steps"),
    "--lr-weight nan": (["--lr-weight", "nan"], "finite"),
    "--lr-quant inf": (["--lr-quant", "inf"], "finite"),
    "--guidance -1": (["--guidance", "-1"], "finite"),
    "--batch-size 0": (["--batch-size", "0"], "--batch-size"),
    "--calib-samples -3": (["--calib-samples", "-3"], "--calib-samples"),
    "--scheduler unknown": (["--scheduler", "warp"], "unsupported scheduler"),
    "--scheduler needing a missing package": (["--scheduler", "CosineDPMSolverMultistepScheduler"],
                                              "unsupported scheduler"),
    "--scheduler EDMEulerScheduler": (["--scheduler", "EDMEulerScheduler"], "unsupported scheduler"),
    "--scheduler HeunDiscreteScheduler (second order)": (["--scheduler", "HeunDiscreteScheduler"],
                                                         "unsupported scheduler"),
}


@CLI
@pytest.mark.parametrize("case", list(BAD_NUMBERS))
def test_impossible_quantize_settings(case, pipe_dir, tmp_path):
    args, needle = BAD_NUMBERS[case]
    refused(run("quantize", pipe_dir, "--out", tmp_path / "q", *args), needle)
    assert not (tmp_path / "q").exists()


def _recipe(tmp_path: Path, content) -> Path:
    path = tmp_path / "r.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is None:
        path.mkdir()
    else:
        path.write_text(content)
    return path


RECIPES = {
    "binary file": (b"\x89PNG\r\n\x1a\n\x00\x00", "not valid JSON"),
    "a folder named r.json": (None, "is a folder"),
    "8.0 as a bit width": ('{"weight_bits": 8.0}', "weight_bits=8.0"),
    "NaN learning rate": ('{"lr_weight": NaN}', "finite"),
    "Infinity learning rate": ('{"lr_quant": Infinity}', "finite"),
    "a JSON list": ("[8, 8]", "JSON object"),
    "nested 100000 deep": ("[" * 100000 + "]" * 100000, "not valid JSON"),
}


@CLI
@pytest.mark.parametrize("case", list(RECIPES))
def test_hostile_recipe_files(case, pipe_dir, tmp_path):
    content, needle = RECIPES[case]
    refused(run("quantize", pipe_dir, "--out", tmp_path / "q", "--recipe", _recipe(tmp_path, content)), needle)


def _cond(tmp_path: Path, **tensors) -> Path:
    path = tmp_path / "cond.safetensors"
    save_file(tensors, str(path))
    return path


COND = {
    "P=0 prompts": (lambda: {"encoder_hidden_states": torch.zeros(0, SEQ_LEN, CROSS_DIM)}, "P, S, D >= 1"),
    "S=0 tokens": (lambda: {"encoder_hidden_states": torch.zeros(2, 0, CROSS_DIM)}, "P, S, D >= 1"),
    "uncond of rank 2": (lambda: {"encoder_hidden_states": torch.randn(2, SEQ_LEN, CROSS_DIM),
                                  "uncond_encoder_hidden_states": torch.randn(SEQ_LEN, CROSS_DIM)}, "rank 3"),
    "uncond of rank 4": (lambda: {"encoder_hidden_states": torch.randn(2, SEQ_LEN, CROSS_DIM),
                                  "uncond_encoder_hidden_states": torch.randn(1, 1, SEQ_LEN, CROSS_DIM)}, "rank 3"),
    "boolean embeddings": (lambda: {"encoder_hidden_states": torch.ones(2, SEQ_LEN, CROSS_DIM, dtype=torch.bool)},
                           "floating-point"),
    "integer token ids": (lambda: {"encoder_hidden_states": torch.ones(2, SEQ_LEN, CROSS_DIM, dtype=torch.int64)},
                          "floating-point"),
    "NaN embeddings": (lambda: {"encoder_hidden_states": torch.full((2, SEQ_LEN, CROSS_DIM), float("nan"))}, "NaN"),
}


@CLI
@pytest.mark.parametrize("case", list(COND))
def test_hostile_conditioning_files(case, cond_dirs, tmp_path):
    make, needle = COND[case]
    unet_dir, sched_dir = cond_dirs
    result = run("quantize", unet_dir, "--scheduler-dir", sched_dir, "--out", tmp_path / "q",
                 "--cond", _cond(tmp_path, **make()))
    refused(result, needle)
    has_fix(result)


@CLI
@pytest.mark.parametrize("case", ["missing", "binary", "empty", "a folder"])
def test_hostile_prompt_files(case, cond_dirs, tmp_path):
    unet_dir, sched_dir = cond_dirs
    path = tmp_path / "prompts.txt"
    if case == "binary":
        path.write_bytes(b"\x00\xff\xfe\x00")
    elif case == "empty":
        path.write_text("\n\n")
    elif case == "a folder":
        path.mkdir()
    result = run("quantize", unet_dir, "--scheduler-dir", sched_dir, "--out", tmp_path / "q", "--prompts", path)
    refused(result, "--prompts")
    has_fix(result)


SAMPLE_ARGS = {
    "--n 0": ["--n", "0"], "--n -5": ["--n", "-5"], "--batch-size 0": ["--batch-size", "0"],
    "--steps 0": ["--steps", "0"], "--steps 5000": ["--steps", "5000"], "--guidance nan": ["--guidance", "nan"],
    "--scheduler warp": ["--scheduler", "warp"],
}


@CLI
@pytest.mark.parametrize("case", list(SAMPLE_ARGS))
def test_impossible_sample_settings(case, artifact, tmp_path):
    result = run("sample", artifact, "--out", tmp_path / "g.png", *SAMPLE_ARGS[case])
    needle = {"--steps 5000": "exceeds", "--scheduler warp": "scheduler"}.get(case, SAMPLE_ARGS[case][0])
    refused(result, needle)
    assert not (tmp_path / "g.png").exists()


@CLI
def test_check_with_zero_samples(artifact, export_dir):
    refused(run("check", artifact, export_dir, "--samples", "0"), "--samples")


@CLI
def test_export_with_a_malformed_batch_profile(artifact, tmp_path):
    refused(run("export", artifact, "--out", tmp_path / "e", "--target", "trt", "--batch", "1:x"), "--batch")


# -- every scheduler the help names and every class name accepted works ---------------------------


@pytest.mark.hostile("cli", "succeeds")
@pytest.mark.parametrize("name", [a for a in SCHEDULER_ALIASES if a != "flow"]
                         + [s for s in SUPPORTED_SCHEDULERS
                            if s not in ("DPMSolverSDEScheduler", "FlowMatchEulerDiscreteScheduler")])
def test_every_scheduler_calibrates_and_samples(name, artifact):
    from dqdeploy.core.recipe import CalibrationConfig
    from dqdeploy.io.models import make_scheduler
    from dqdeploy.quant.trajectories import collect
    from dqdeploy.stages.generate import generate
    from tests.helpers import scheduler, tiny_unet

    calib = collect(tiny_unet(), make_scheduler(name, dict(scheduler().config), 4),
                    CalibrationConfig(scheduler=name, steps=4, samples=6, trajectories=2, batch_size=2))
    assert len(calib) >= 1 and torch.isfinite(calib.inputs.sample).all()
    images = generate(artifact, n=2, steps=4, scheduler=name, batch_size=2)
    assert images.shape == (2, 1, 8, 8) and torch.isfinite(images).all()


@pytest.mark.hostile("cli", "refused")
def test_a_scheduler_whose_package_is_missing_names_the_install(pipe_dir, tmp_path):
    try:
        import torchsde  # noqa: F401
        pytest.skip("torchsde is installed: DPMSolverSDEScheduler works")
    except ImportError:
        pass
    refused(run("quantize", pipe_dir, "--out", tmp_path / "q", "--scheduler", "DPMSolverSDEScheduler"), "torchsde")


@CLI
@pytest.mark.parametrize("kw", [{"n": 0}, {"batch_size": 0}, {"steps": 0}, {"n": 2.5}])
def test_generate_api_refuses_impossible_counts(kw, artifact):
    from dqdeploy.core.errors import DQDeployError
    from dqdeploy.stages.generate import generate

    with pytest.raises(DQDeployError, match="expected a whole number"):
        generate(artifact, **kw)
