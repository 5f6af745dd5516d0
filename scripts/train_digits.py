#!/usr/bin/env python
"""Train the two digits models that ship in ``dqdeploy/assets`` (reproducible: fixed seeds, one thread).

1. ``digits-classifier``: a small CNN on 16x16 digits (seeded 80/20 split; held-out accuracy is
   reported). Its penultimate features define the digits-FID (``dqdeploy.eval.fid``).
2. ``digits-ddpm``: a DDPM ``UNet2DModel`` (1.6M parameters, attention at 8x8 and in the mid block,
   1000-step cosine schedule, epsilon prediction), AdamW + EMA, saved as a diffusers pipeline folder.

Then reloads the saved pipeline, samples with DDIM (50 steps) and writes to ``--out``: the loss curve
(``loss.png``), an 8x8 sample grid (``samples.png``) and ``summary.json`` (times, accuracy, FID).

Usage:  python scripts/train_digits.py                 # everything, ~20 min on one CPU thread
        python scripts/train_digits.py --stage classifier
        python scripts/train_digits.py --iters 200 --assets /tmp/a --out /tmp/r   # smoke run
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
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

from dqdeploy.atomic import atomic_dir, atomic_write_bytes  # noqa: E402
from dqdeploy.eval.digits import (  # noqa: E402
    ASSETS_DIR,
    CLASSIFIER_NAME,
    DIGITS_MODEL_NAME,
    DigitsClassifier,
    classifier_accuracy,
    digits_split,
    load_classifier,
    load_digits_images,
    load_digits_labels,
    save_classifier,
)
from dqdeploy.eval.fid import class_histogram, classifier_features, digits_fid, feature_stats, frechet_distance  # noqa: E402
from dqdeploy.eval.grid import save_grid  # noqa: E402

log = logging.getLogger("train_digits")

UNET_CONFIG = dict(
    sample_size=16, in_channels=1, out_channels=1,
    block_out_channels=(32, 64, 64), layers_per_block=2, norm_num_groups=16, attention_head_dim=32,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
)
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="epsilon")


def random_shift(x: torch.Tensor, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    """Shift each image by a random integer offset in [-max_shift, max_shift] (background -1 fills in)."""
    if max_shift <= 0:
        return x
    n, c, h, w = x.shape
    p = max_shift
    padded = F.pad(x, (p, p, p, p), value=-1.0)
    dy = torch.randint(0, 2 * p + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * p + 1, (n,), generator=gen)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None].expand(n, c, h, w + 2 * p)
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :].expand(n, c, h, w)
    return padded.gather(2, rows).gather(3, cols)


def lr_at(step: int, total: int, base: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10% of ``base``."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train_classifier(args: argparse.Namespace) -> tuple[DigitsClassifier, dict]:
    """Train the digits CNN on the seeded split; returns the model and its metrics."""
    torch.manual_seed(args.seed)
    images, labels = load_digits_images(16), load_digits_labels()
    train_idx, test_idx = digits_split(seed=args.seed, test_fraction=0.2)
    xtr, ytr = images[train_idx], labels[train_idx]
    model = DigitsClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=args.clf_lr, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(args.seed + 1)
    steps_per_epoch = math.ceil(xtr.shape[0] / args.clf_batch_size)
    total = args.clf_epochs * steps_per_epoch
    start, step = time.perf_counter(), 0
    model.train()
    bar = tqdm(range(args.clf_epochs), desc="classifier", unit="epoch")
    for _ in bar:
        perm = torch.randperm(xtr.shape[0], generator=gen)
        for i in range(0, xtr.shape[0], args.clf_batch_size):
            idx = perm[i:i + args.clf_batch_size]
            for group in opt.param_groups:
                group["lr"] = lr_at(step, total, args.clf_lr, warmup=steps_per_epoch)
            loss = F.cross_entropy(model(random_shift(xtr[idx], 2, gen)), ytr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
        bar.set_postfix(loss=f"{loss.item():.4f}")
    model.eval()
    metrics = {
        "heldout_accuracy": classifier_accuracy(model, images[test_idx], labels[test_idx]),
        "train_accuracy": classifier_accuracy(model, xtr, ytr),
        "all_accuracy": classifier_accuracy(model, images, labels),
        "train_seconds": round(time.perf_counter() - start, 2),
        "split": {"seed": args.seed, "test_fraction": 0.2, "n_train": int(train_idx.numel()),
                  "n_test": int(test_idx.numel())},
    }
    log.info("classifier: held-out accuracy %.4f (train %.4f) in %.1f s", metrics["heldout_accuracy"],
             metrics["train_accuracy"], metrics["train_seconds"])
    if metrics["heldout_accuracy"] < 0.95:
        log.warning("classifier held-out accuracy %.4f is below 0.95", metrics["heldout_accuracy"])
    return model, metrics


def build_unet(seed: int):
    """The digits UNet2DModel (seeded initialisation)."""
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(**UNET_CONFIG)


def train_unet(args: argparse.Namespace) -> tuple[torch.nn.Module, list[float], dict]:
    """DDPM training (epsilon MSE, uniform time steps); returns the EMA UNet, losses and metrics."""
    from diffusers import DDPMScheduler

    images = load_digits_images(16)
    unet = build_unet(args.seed).train()
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    sched = DDPMScheduler(**SCHEDULER_CONFIG)
    opt = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(args.seed + 2)
    params, ema_params = list(unet.parameters()), list(ema.parameters())
    losses: list[float] = []
    start = time.perf_counter()
    bar = tqdm(range(args.iters), desc="ddpm", unit="it")
    running = None
    for step in bar:
        idx = torch.randint(0, images.shape[0], (args.batch_size,), generator=gen)
        x0 = random_shift(images[idx], args.shift, gen)
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, sched.config.num_train_timesteps, (x0.shape[0],), generator=gen)
        xt = sched.add_noise(x0, noise, t)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.iters, args.lr, warmup=args.warmup)
        loss = F.mse_loss(unet(xt, t).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, [p.detach() for p in params], 1.0 - decay)
        losses.append(loss.item())
        running = losses[-1] if running is None else 0.98 * running + 0.02 * losses[-1]
        if step % 10 == 0:
            bar.set_postfix(loss=f"{running:.4f}")
    seconds = time.perf_counter() - start
    for b_ema, b in zip(ema.buffers(), unet.buffers()):
        b_ema.copy_(b)
    tail = losses[-min(200, len(losses)):]
    metrics = {"train_seconds": round(seconds, 1), "it_per_s": round(args.iters / seconds, 3),
               "final_loss_mean_last_200": round(sum(tail) / len(tail), 5)}
    log.info("ddpm: %d iterations in %.1f s (%.2f it/s), final loss %.4f", args.iters, seconds,
             metrics["it_per_s"], metrics["final_loss_mean_last_200"])
    return ema, losses, metrics


@torch.no_grad()
def ddim_sample(unet: torch.nn.Module, scheduler_dir: Path, n: int, steps: int, seed: int,
                batch_size: int = 100) -> torch.Tensor:
    """Deterministic DDIM (eta 0) samples in [-1, 1]; noise drawn batch by batch from one seeded generator."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_pretrained(scheduler_dir, subfolder="scheduler")
    sched.set_timesteps(steps)
    size = unet.config.sample_size
    gen = torch.Generator().manual_seed(seed)
    out = []
    unet.eval()
    for first in tqdm(range(0, n, batch_size), desc=f"ddim-{steps}", unit="batch"):
        x = torch.randn(min(batch_size, n - first), unet.config.in_channels, size, size, generator=gen)
        for t in sched.timesteps:
            x = sched.step(unet(x, t).sample, t, x).prev_sample
        out.append(x)
    return torch.cat(out).clamp(-1, 1)


def plot_losses(losses: list[float], path: Path) -> None:
    """Raw per-iteration loss and its 100-step moving average, log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = torch.tensor(losses)
    k = min(100, len(losses))
    smooth = torch.nn.functional.avg_pool1d(t[None, None], k, stride=1).flatten()
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot(t.numpy(), lw=0.5, alpha=0.35, label="per iteration")
    ax.plot(range(k - 1, len(losses)), smooth.numpy(), lw=1.5, label=f"{k}-iteration mean")
    ax.set_yscale("log")
    ax.set_xlabel("iteration")
    ax.set_ylabel("epsilon MSE")
    ax.set_title("digits DDPM training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def normalise_modes(path: Path) -> None:
    """Give every file the umask's default mode (safetensors writes model files as 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    for f in path.rglob("*"):
        if f.is_file():
            f.chmod(0o666 & ~umask)


def dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def real_halves_fid(classifier: DigitsClassifier, seed: int) -> float:
    """FID between two random halves of the real digits: the metric's noise floor at ~900 samples."""
    feats = classifier_features(load_digits_images(16), classifier)
    perm = torch.randperm(feats.shape[0], generator=torch.Generator().manual_seed(seed))
    half = feats.shape[0] // 2
    return frechet_distance(*feature_stats(feats[perm[:half]]), *feature_stats(feats[perm[half:]]))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", choices=["all", "classifier", "ddpm"], default="all",
                    help="ddpm: reuse the classifier already in --assets")
    ap.add_argument("--assets", type=Path, default=ASSETS_DIR, help="where the two model folders go")
    ap.add_argument("--out", type=Path, default=Path("runs/train_digits"), help="plots and summary.json")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--iters", type=int, default=4000, help="DDPM iterations (~0.27 s each on one thread)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--shift", type=int, default=0, help="max random shift (pixels) of DDPM training images")
    ap.add_argument("--clf-epochs", type=int, default=30)
    ap.add_argument("--clf-batch-size", type=int, default=64)
    ap.add_argument("--clf-lr", type=float, default=2e-3)
    ap.add_argument("--fid-samples", type=int, default=500)
    ap.add_argument("--sample-steps", type=int, default=50)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    summary: dict = {"command": "python scripts/train_digits.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                     "seed": args.seed, "threads": args.threads, "torch": torch.__version__}
    clf_dir, ddpm_dir = args.assets / CLASSIFIER_NAME, args.assets / DIGITS_MODEL_NAME

    if args.stage in ("all", "classifier"):
        model, metrics = train_classifier(args)
        with atomic_dir(clf_dir, overwrite=True) as tmp:
            save_classifier(model, tmp, extra={"metrics": metrics})
            normalise_modes(tmp)
        summary["classifier"] = {**metrics, "params": sum(p.numel() for p in model.parameters()),
                                 "bytes_on_disk": dir_size(clf_dir)}
    classifier = load_classifier(clf_dir)

    if args.stage in ("all", "ddpm"):
        from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

        ema, losses, metrics = train_unet(args)
        with atomic_dir(ddpm_dir, overwrite=True) as tmp:
            DDPMPipeline(unet=ema, scheduler=DDPMScheduler(**SCHEDULER_CONFIG)).save_pretrained(tmp, safe_serialization=True)
            normalise_modes(tmp)
        plot_losses(losses, args.out / "loss.png")
        unet = UNet2DModel.from_pretrained(ddpm_dir, subfolder="unet").eval()
        summary["ddpm"] = {**metrics, "iters": args.iters, "batch_size": args.batch_size, "lr": args.lr,
                           "ema": args.ema, "shift": args.shift,
                           "params": sum(p.numel() for p in unet.parameters()), "bytes_on_disk": dir_size(ddpm_dir)}
        grid = ddim_sample(unet, ddpm_dir, 64, args.sample_steps, seed=args.seed)
        save_grid(grid, args.out / "samples.png", nrow=8, scale=4)
        t0 = time.perf_counter()
        samples = ddim_sample(unet, ddpm_dir, args.fid_samples, args.sample_steps, seed=args.seed)
        summary["fid"] = {
            "samples": args.fid_samples, "sampler": f"ddim-{args.sample_steps}", "seed": args.seed,
            "digits_fid": round(digits_fid(samples, classifier), 4),
            "real_halves_fid": round(real_halves_fid(classifier, args.seed), 4),
            "sample_seconds": round(time.perf_counter() - t0, 1),
            "class_histogram": class_histogram(samples, classifier),
        }
        log.info("digits-FID of %d DDIM-%d samples: %.3f (real halves: %.3f)", args.fid_samples,
                 args.sample_steps, summary["fid"]["digits_fid"], summary["fid"]["real_halves_fid"])

    summary["total_seconds"] = round(time.perf_counter() - t_start, 1)
    atomic_write_bytes(args.out / "summary.json", (json.dumps(summary, indent=2) + "\n").encode())
    log.info("wrote %s", args.out / "summary.json")


if __name__ == "__main__":
    main()
