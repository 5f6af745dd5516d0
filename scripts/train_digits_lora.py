#!/usr/bin/env python
"""Train a LoRA on the shipped digits DDPM that makes it draw the digits 0-4 only: the adapter ``bench/lora_quality.py``
applies to the quantized artifacts (issue: LoRA without re-quantizing).

Rank-``--rank`` low-rank updates of every attention projection (``to_q``, ``to_k``, ``to_v``, ``to_out.0``) of
``dqdeploy/assets/digits-ddpm``, trained with the DDPM epsilon loss on the real digits 0-4 (the base weights frozen),
one thread, fixed seed; written in the diffusers/peft format (``unet.<layer>.lora_A.weight`` [r, in],
``.lora_B.weight`` [out, r], ``.alpha``).

Usage: python scripts/train_digits_lora.py --out digits-0to4.safetensors [--iters 800] [--rank 4]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from dqdeploy.eval.digits import digits_model_dir, load_digits_images, load_digits_labels  # noqa: E402
from dqdeploy.io.atomic import atomic_write_bytes  # noqa: E402
from dqdeploy.io.models import load_model  # noqa: E402

TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
KEEP = (0, 1, 2, 3, 4)


def targets(unet: torch.nn.Module) -> list[str]:
    """The attention projections a diffusers LoRA adapts."""
    return [n for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear) and n.endswith(TARGETS)]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--iters", type=int, default=800)
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from diffusers import DDPMScheduler
    from safetensors.torch import save

    loaded = load_model(digits_model_dir())
    unet = loaded.denoiser.train().requires_grad_(False)
    sched = DDPMScheduler.from_config(loaded.scheduler_config)
    g = torch.Generator().manual_seed(args.seed)
    names = targets(unet)
    params: dict[str, tuple[torch.nn.Parameter, torch.nn.Parameter]] = {}
    for name in names:
        layer = unet.get_submodule(name)
        down = torch.nn.Parameter(torch.randn(args.rank, layer.in_features, generator=g) / layer.in_features ** 0.5)
        up = torch.nn.Parameter(torch.zeros(layer.out_features, args.rank))
        params[name] = (down, up)
        layer.register_forward_hook(lambda m, a, out, d=down, u=up: out + F.linear(F.linear(a[0], d), u))
    images, labels = load_digits_images(16), load_digits_labels()
    subset = images[torch.isin(labels, torch.tensor(KEEP))]
    opt = torch.optim.AdamW([p for pair in params.values() for p in pair], lr=args.lr, weight_decay=0.0)
    start, losses = time.perf_counter(), []
    for _ in range(args.iters):
        x0 = subset[torch.randint(0, subset.shape[0], (args.batch_size,), generator=g)]
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, sched.config.num_train_timesteps, (x0.shape[0],), generator=g)
        loss = F.mse_loss(unet(sched.add_noise(x0, noise, t), t).sample, noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    tensors = {}
    for name, (down, up) in params.items():
        tensors[f"unet.{name}.lora_A.weight"] = down.detach().contiguous()
        tensors[f"unet.{name}.lora_B.weight"] = up.detach().contiguous()
        tensors[f"unet.{name}.alpha"] = torch.tensor(float(args.rank))
    atomic_write_bytes(args.out, save(tensors, metadata={"base": "dqdeploy/assets/digits-ddpm", "digits": "0-4"}))
    tail = losses[-100:]
    print(f"wrote {args.out}: {len(names)} layers, rank {args.rank}, {args.iters} iterations in "
          f"{time.perf_counter() - start:.0f} s, final loss {sum(tail) / len(tail):.4f}")


if __name__ == "__main__":
    main()
