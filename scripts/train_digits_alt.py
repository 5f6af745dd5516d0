#!/usr/bin/env python
"""A second, independently written digits DDPM trainer, after diffusers' ``train_unconditional.py`` example:
the zoo's held-out members come from it, so that they differ from the tuning members in how they were trained,
not only in seed or width (``bench/zoo.py``, group ``held-out``).

What differs from ``scripts/train_digits.py``: the noise schedule (``--beta-schedule``: linear, scaled_linear
or squaredcos_cap_v2) and the prediction target (``--prediction-type``: epsilon or v_prediction, trained on
``scheduler.get_velocity``); the optimizer (``--optimizer adam|adamw``) and its learning-rate schedule from
``diffusers.optimization.get_scheduler`` (``--lr-schedule``: cosine, constant_with_warmup, linear); EMA through
``diffusers.training_utils.EMAModel`` or none (``--ema-max-decay 0``); no augmentation; the UNet's whole config
from ``--config JSON``; epochs over a shuffled dataset instead of random batches.

Writes ``OUT/digits-ddpm/`` (a DDPMPipeline folder, atomically), ``OUT/run/summary.json`` and
``OUT/run/samples.png`` (64 DDIM-50 samples). One thread, fixed seeds: the same command gives the same model.

Usage: python scripts/train_digits_alt.py --out DIR [--prediction-type v_prediction] [--beta-schedule scaled_linear]
           [--config '{"block_out_channels": [48, 96, 96]}'] [--epochs 40] ...
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from dqdeploy.eval.digits import load_digits_images  # noqa: E402
from dqdeploy.eval.grid import save_grid  # noqa: E402
from dqdeploy.io.atomic import atomic_dir, atomic_write_bytes  # noqa: E402

BASE_CONFIG = dict(
    sample_size=16, in_channels=1, out_channels=1, block_out_channels=(32, 64, 64), layers_per_block=2,
    norm_num_groups=32, attention_head_dim=8,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
)
BETAS = {"linear": (1e-4, 0.02), "scaled_linear": (0.00085, 0.012), "squaredcos_cap_v2": (1e-4, 0.02)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--config", type=json.loads, default={}, help="JSON overrides of the UNet2DModel config")
    ap.add_argument("--beta-schedule", choices=sorted(BETAS), default="linear")
    ap.add_argument("--prediction-type", choices=("epsilon", "v_prediction"), default="epsilon")
    ap.add_argument("--optimizer", choices=("adam", "adamw"), default="adamw")
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--lr-schedule", choices=("cosine", "constant_with_warmup", "linear"), default="cosine")
    ap.add_argument("--warmup", type=int, default=200, help="warm-up steps")
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=48)
    ap.add_argument("--ema-max-decay", type=float, default=0.9999, help="0: no EMA")
    return ap.parse_args(argv)


def target_of(scheduler, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What the UNet learns to predict: the noise, or the velocity ``alpha_t * noise - sigma_t * x0``."""
    if scheduler.config.prediction_type == "v_prediction":
        return scheduler.get_velocity(x0, noise, t)
    return noise


def train(args: argparse.Namespace):
    """The trained UNet (EMA weights when EMA is on), its scheduler, and the per-step losses."""
    from diffusers import DDPMScheduler, UNet2DModel
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    torch.manual_seed(args.seed)
    unet = UNet2DModel(**{**BASE_CONFIG, **args.config})
    beta_start, beta_end = BETAS[args.beta_schedule]
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule=args.beta_schedule, beta_start=beta_start,
                              beta_end=beta_end, prediction_type=args.prediction_type)
    data = load_digits_images(16)
    batches = (data.shape[0] + args.batch_size - 1) // args.batch_size
    opt_class = torch.optim.AdamW if args.optimizer == "adamw" else torch.optim.Adam
    opt = opt_class(unet.parameters(), lr=args.lr, **({"weight_decay": 1e-2} if args.optimizer == "adamw" else {}))
    lr_sched = get_scheduler(args.lr_schedule, optimizer=opt, num_warmup_steps=args.warmup,
                             num_training_steps=args.epochs * batches)
    ema = EMAModel(unet.parameters(), decay=args.ema_max_decay, use_ema_warmup=True, power=3 / 4) \
        if args.ema_max_decay > 0 else None
    gen = torch.Generator().manual_seed(args.seed + 1)
    losses: list[float] = []
    unet.train()
    for _ in tqdm(range(args.epochs), desc="epochs"):
        for idx in torch.randperm(data.shape[0], generator=gen).split(args.batch_size):
            x0 = data[idx]
            noise = torch.randn(x0.shape, generator=gen)
            t = torch.randint(0, scheduler.config.num_train_timesteps, (x0.shape[0],), generator=gen)
            pred = unet(scheduler.add_noise(x0, noise, t), t).sample
            loss = F.mse_loss(pred, target_of(scheduler, x0, noise, t))
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
            opt.step()
            lr_sched.step()
            if ema is not None:
                ema.step(unet.parameters())
            losses.append(loss.item())
    if ema is not None:
        ema.copy_to(unet.parameters())
    return unet.eval(), scheduler, losses


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    from diffusers import DDIMScheduler, DDPMPipeline

    start = time.perf_counter()
    unet, scheduler, losses = train(args)
    seconds = time.perf_counter() - start
    folder = args.out / "digits-ddpm"
    with atomic_dir(folder, overwrite=True, owned=lambda p: (p / "model_index.json").is_file()) as tmp:
        DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(tmp, safe_serialization=True)
    from dqdeploy.stages.generate import generate

    samples = generate(folder, n=64, steps=50, scheduler="ddim", seed=0)
    run = args.out / "run"
    run.mkdir(parents=True, exist_ok=True)
    save_grid(samples, run / "samples.png", scale=2)
    tail = losses[-200:]
    summary = {"command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
               "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
               "iterations": len(losses), "train_seconds": round(seconds, 1),
               "final_loss_mean_last_200": round(sum(tail) / len(tail), 5),
               "params": sum(p.numel() for p in unet.parameters()), "sampler": DDIMScheduler.__name__}
    atomic_write_bytes(run / "summary.json", (json.dumps(summary, indent=2) + "\n").encode())
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
