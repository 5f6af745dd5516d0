"""The zoo registry and the training script's zoo options (conditional, early stop, config overrides)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import zoo
from dqdeploy.core.errors import DQDeployError
from dqdeploy.io.models import load_model
from dqdeploy.quant.trajectories import load_conditioning

ROOT = Path(__file__).resolve().parents[2]


def test_registry_names_commands_and_cache_layout(tmp_path, monkeypatch):
    monkeypatch.setenv("DQDEPLOY_ZOO", str(tmp_path))
    assert len(zoo.names()) >= 5 and zoo.names()[0] == "shipped"
    assert zoo.get("shipped").available() and zoo.ensure("shipped") == zoo.get("shipped").folder()
    seeds = {m.seed for m in zoo.ZOO.values()}
    assert seeds >= {0, 1}
    cond = [m for m in zoo.ZOO.values() if m.conditional]
    assert {m.name for m in cond} == {"cond", "dit"}
    assert all(m.guidance > 1 and m.cond_file().name == "class_cond.safetensors" for m in cond)
    early = zoo.get("early")
    assert early.folder() == tmp_path / "early" / "digits-ddpm" and not early.available()
    cmd = early.train_command()
    assert cmd[1].endswith("scripts/train_digits.py") and "--stop-at" in cmd and str(tmp_path / "early") in cmd
    with pytest.raises(DQDeployError, match="unknown zoo model 'nope'"):
        zoo.get("nope")


@pytest.mark.slow
def test_training_script_conditional_early_stop_and_overrides(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "PYTHONPATH": str(ROOT)}
    args = ["--stage", "ddpm", "--conditional", "--iters", "8", "--stop-at", "2", "--batch-size", "4",
            "--unet", '{"norm_num_groups": 8, "block_out_channels": [16, 32, 32], "cross_attention_dim": 16}',
            "--fid-samples", "10", "--sample-steps", "2", "--assets", str(tmp_path / "a"), "--out", str(tmp_path / "r")]
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "train_digits.py"), *args], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    model = tmp_path / "a" / "digits-ddpm"
    loaded = load_model(model)
    assert type(loaded.denoiser).__name__ == "UNet2DConditionModel" and loaded.conditional
    assert (loaded.denoiser.config.norm_num_groups == 8
            and list(loaded.denoiser.config.block_out_channels) == [16, 32, 32])
    cond = load_conditioning(model / "class_cond.safetensors")
    assert tuple(cond.cond.shape) == (10, 1, 16) and tuple(cond.uncond.shape) == (1, 1, 16)
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["ddpm"]["stop_at"] == 2 and summary["ddpm"]["iters"] == 8
    assert 0.0 <= summary["fid"]["class_accuracy"] <= 1.0 and summary["fid"]["guidance"] == 2.0


@pytest.mark.slow
def test_training_script_transformer_rectified_flow_with_class_prompts(tmp_path):
    """--transformer: an SD3Transformer2DModel pipeline with its flow-matching scheduler, and the fixed class
    prompts (2 tokens + pooled, null prompt) as a --cond file that the zoo's DiT member points at."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "PYTHONPATH": str(ROOT)}
    args = ["--stage", "ddpm", "--transformer", "--iters", "3", "--batch-size", "4",
            "--unet", '{"num_layers": 1, "num_attention_heads": 2, "attention_head_dim": 8, '
                      '"caption_projection_dim": 16}',
            "--fid-samples", "10", "--sample-steps", "2", "--assets", str(tmp_path / "a"), "--out", str(tmp_path / "r")]
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "train_digits.py"), *args], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    loaded = load_model(tmp_path / "a" / "digits-ddpm")
    assert type(loaded.denoiser).__name__ == "SD3Transformer2DModel" and loaded.denoiser.config.num_layers == 1
    assert loaded.scheduler_config["_class_name"] == "FlowMatchEulerDiscreteScheduler"
    cond = load_conditioning(tmp_path / "a" / "digits-ddpm" / "class_cond.safetensors")
    d, d2 = loaded.denoiser.config.joint_attention_dim, loaded.denoiser.config.pooled_projection_dim
    assert tuple(cond.cond.shape) == (10, 2, d) and tuple(cond.pooled.shape) == (10, d2)
    assert tuple(cond.uncond.shape) == (1, 2, d) and tuple(cond.uncond_pooled.shape) == (1, d2)
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["ddpm"]["transformer"] and summary["fid"]["sampler"] == "flow-euler-2"
    assert 0.0 <= summary["fid"]["class_accuracy"] <= 1.0
    dit = zoo.get("dit")
    assert dit.scheduler is None and dit.conditional and "--transformer" in dit.train_command()


def test_held_out_members_are_only_evaluated_with_the_defaults(tmp_path, monkeypatch):
    from bench import zoo_quality as zq

    monkeypatch.setenv("DQDEPLOY_ZOO", str(tmp_path))
    held = zoo.names("held-out")
    assert held and set(held).isdisjoint(zoo.names("tuning"))
    assert all(zoo.get(n).alt_trainer and "train_digits_alt.py" in zoo.get(n).train_command()[1] for n in held)
    for what in (held[0], tmp_path / held[0] / "digits-ddpm", tmp_path / "bench" / held[0] / "w8a8-x" / "q"):
        with pytest.raises(DQDeployError, match="held out"):
            zoo.refuse_held_out(what, "an ablation")
    zoo.refuse_held_out("seed1", "an ablation")  # tuning members and paths outside the zoo are fine
    zoo.refuse_held_out(tmp_path / "seed1" / "digits-ddpm", "an ablation")
    zoo.refuse_held_out(tmp_path.parent / "elsewhere", "an ablation")
    with pytest.raises(DQDeployError, match="held out"):
        zq.plan([held[0]], ["w8a8"], ["default", "no-distill"], ["sim"], [0], [0])
    with pytest.raises(DQDeployError, match="held out"):
        zq.calibration_for(held[0], "calib-seed1")
    rows = zq.plan([held[0]], ["fp32", "w8a8"], ["default"], ["sim", "ort"], [0], [0])
    assert {r[2] for r in rows} == {"default"} and len(rows) == 3


def test_alt_trainer_trains_a_v_prediction_pipeline(tmp_path):
    out = tmp_path / "m"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "train_digits_alt.py"), "--out", str(out),
                           "--epochs", "1", "--batch-size", "256", "--warmup", "2", "--prediction-type",
                           "v_prediction", "--beta-schedule", "scaled_linear", "--ema-max-decay", "0",
                           "--config", '{"block_out_channels": [16, 16, 16], "norm_num_groups": 8}'],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    config = json.loads((out / "digits-ddpm" / "scheduler" / "scheduler_config.json").read_text())
    assert config["prediction_type"] == "v_prediction" and config["beta_schedule"] == "scaled_linear"
    assert load_model(out / "digits-ddpm").denoiser.config.block_out_channels == [16, 16, 16]
    assert (out / "run" / "samples.png").is_file()
    assert json.loads((out / "run" / "summary.json").read_text())["iterations"] == 8
