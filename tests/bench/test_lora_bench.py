"""scripts/train_digits_lora.py: a LoRA of the shipped model that dqdeploy reads, and that starts as a no-op."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from dqdeploy.eval.digits import digits_model_dir
from dqdeploy.io.lora import read_lora
from dqdeploy.io.models import load_model

ROOT = Path(__file__).resolve().parents[2]


def test_the_digits_lora_trainer_writes_an_adapter_of_the_attention_projections(tmp_path):
    out = tmp_path / "l.safetensors"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "train_digits_lora.py"), "--out", str(out),
                           "--iters", "2", "--batch-size", "8"], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    unet = load_model(digits_model_dir()).denoiser
    adapter = read_lora(out, unet)
    assert adapter.layers and all(n.endswith(("to_q", "to_k", "to_v", "to_out.0")) for n in adapter.layers)
    layer = next(iter(adapter.layers.values()))
    assert layer.down.shape[0] == 4 and layer.alpha_scale == 1.0
    assert float(layer.delta().abs().max()) > 0  # two steps of training moved the zero-initialised up matrices
    assert torch.isfinite(layer.delta()).all()
