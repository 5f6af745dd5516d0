#!/usr/bin/env python
"""Train the two digits models that ship in ``dqdeploy/assets`` (reproducible: fixed seeds, one thread).

1. ``digits-classifier``: a small CNN on 16x16 digits (seeded 80/20 split; held-out accuracy is
   reported). Its penultimate features define the digits-FID (``dqdeploy.eval.fid``).
2. ``digits-ddpm``: a DDPM ``UNet2DModel`` (1.6M parameters, attention at 8x8 and in the mid block,
   1000-step cosine schedule, epsilon prediction), AdamW + EMA, saved as a diffusers pipeline folder.

Then reloads the saved pipeline, samples with DDIM (50 steps) and writes to ``--out``: the loss curve
(``loss.png``), an 8x8 sample grid (``samples.png``) and ``summary.json`` (times, accuracy, FID).

Options for the development model zoo (``bench/zoo.py``, ``scripts/train_zoo.py``):
``--unet JSON`` overrides the UNet config (width, norm groups, attention head size),
``--stop-at K`` keeps the model after K iterations of an ``--iters`` schedule (an early checkpoint),
``--conditional`` trains a class-conditional ``UNet2DConditionModel``: a learned class table (10
digits + a null row) is the 1-token ``encoder_hidden_states``; the null row replaces the class with
probability ``--p-uncond`` so classifier-free guidance works. The table is saved next to the
pipeline as ``class_cond.safetensors`` in the ``--cond`` file format (``encoder_hidden_states`` [10, 1, D],
``uncond_encoder_hidden_states`` [1, 1, D]); sample ``i`` of a seeded run is digit ``i % 10``.

Usage:  python scripts/train_digits.py                 # everything, ~20 min on one CPU thread
        python scripts/train_digits.py --stage classifier
        python scripts/train_digits.py --iters 200 --assets /tmp/a --out /tmp/r   # smoke run
        python scripts/train_digits.py --stage ddpm --conditional --iters 200 --assets /tmp/a --out /tmp/r
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
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

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
from dqdeploy.io.atomic import atomic_dir, atomic_write_bytes  # noqa: E402

log = logging.getLogger("train_digits")

UNET_CONFIG = dict(
    sample_size=16, in_channels=1, out_channels=1,
    block_out_channels=(32, 64, 64), layers_per_block=2, norm_num_groups=16, attention_head_dim=32,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
)
COND_UNET_CONFIG = dict(
    sample_size=16, in_channels=1, out_channels=1,
    block_out_channels=(32, 64, 64), layers_per_block=2, norm_num_groups=16, attention_head_dim=8,
    cross_attention_dim=64,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
)
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="epsilon")
CLASS_COND_FILE = "class_cond.safetensors"
NUM_CLASSES = 10


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


def build_unet(seed: int, overrides: dict | None = None, conditional: bool = False) -> torch.nn.Module:
    """The digits UNet (``UNet2DModel``, or ``UNet2DConditionModel`` if ``conditional``), seeded,
    with ``overrides`` merged over the default config."""
    from diffusers import UNet2DConditionModel, UNet2DModel

    torch.manual_seed(seed)
    config = {**(COND_UNET_CONFIG if conditional else UNET_CONFIG), **(overrides or {})}
    return (UNet2DConditionModel if conditional else UNet2DModel)(**config)


def class_table(unet: torch.nn.Module, seed: int) -> torch.nn.Embedding:
    """Learned class 'prompts' of a conditional UNet: rows 0-9 the digits, row 10 the null (uncond) token."""
    torch.manual_seed(seed + 3)
    return torch.nn.Embedding(NUM_CLASSES + 1, unet.config.cross_attention_dim)


def save_class_cond(table: torch.nn.Embedding, path: Path) -> None:
    """Write the class table in the ``--cond`` file format (one 1-token 'prompt' per digit + the null one)."""
    from safetensors.torch import save_file

    from dqdeploy.quant.trajectories import COND_KEY, UNCOND_KEY

    w = table.weight.detach().float()
    save_file({COND_KEY: w[:NUM_CLASSES, None].contiguous(), UNCOND_KEY: w[NUM_CLASSES:, None].contiguous()}, str(path))


def denoiser_and_loss(args: argparse.Namespace) -> tuple[torch.nn.ModuleDict, Any, Callable]:
    """The module trained (``denoiser`` [+ a learned class ``table``]), the class prompts a DiT keeps
    fixed (else None), and ``loss(net, x0, labels, gen)`` of one batch."""
    if args.transformer:
        from digits_dit import build_dit, class_prompts, flow_loss

        dit = build_dit(args.seed, args.unet).train()
        prompts = class_prompts(dit.config, args.seed)
        return (torch.nn.ModuleDict({"denoiser": dit}), prompts,
                lambda net, x0, y, gen: flow_loss(net["denoiser"], prompts, x0, y, gen, args.p_uncond))
    from diffusers import DDPMScheduler

    unet = build_unet(args.seed, args.unet, args.conditional).train()
    net = torch.nn.ModuleDict({"denoiser": unet})
    if args.conditional:
        net["table"] = class_table(unet, args.seed)
    sched = DDPMScheduler(**SCHEDULER_CONFIG)

    def loss(net: torch.nn.ModuleDict, x0: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, sched.config.num_train_timesteps, (x0.shape[0],), generator=gen)
        xt = sched.add_noise(x0, noise, t)
        if "table" not in net:
            return F.mse_loss(net["denoiser"](xt, t).sample, noise)
        drop = torch.rand(x0.shape[0], generator=gen) < args.p_uncond
        classes = torch.where(drop, torch.full_like(y, NUM_CLASSES), y)
        return F.mse_loss(net["denoiser"](xt, t, encoder_hidden_states=net["table"](classes)[:, None]).sample, noise)

    return net, None, loss


def train_unet(args: argparse.Namespace) -> tuple[torch.nn.Module, Any, list[float], dict]:
    """Train the denoiser (DDPM epsilon MSE with uniform time steps, or rectified flow for
    ``--transformer``); returns the EMA denoiser, its class conditioning (the EMA class table of a
    conditional UNet, the fixed prompts of the DiT, else None), losses and metrics."""
    images, labels = load_digits_images(16), load_digits_labels()
    net, prompts, loss_fn = denoiser_and_loss(args)
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    params, ema_params = list(net.parameters()), list(ema.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(args.seed + 2)
    losses: list[float] = []
    start = time.perf_counter()
    stop = args.stop_at or args.iters
    bar = tqdm(range(stop), desc="ddpm", unit="it")
    running = None
    for step in bar:
        idx = torch.randint(0, images.shape[0], (args.batch_size,), generator=gen)
        x0 = random_shift(images[idx], args.shift, gen)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.iters, args.lr, warmup=args.warmup)
        loss = loss_fn(net, x0, labels[idx], gen)
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
    for b_ema, b in zip(ema.buffers(), net.buffers()):
        b_ema.copy_(b)
    tail = losses[-min(200, len(losses)):]
    metrics = {"train_seconds": round(seconds, 1), "it_per_s": round(stop / seconds, 3),
               "final_loss_mean_last_200": round(sum(tail) / len(tail), 5)}
    log.info("training: %d iterations in %.1f s (%.2f it/s), final loss %.4f", stop, seconds,
             metrics["it_per_s"], metrics["final_loss_mean_last_200"])
    return (ema["denoiser"], prompts if prompts is not None else ema["table"] if "table" in ema else None, losses,
            metrics)


def ddim_sample(model_dir: Path, n: int, steps: int, seed: int, guidance: float = 1.0,
                scheduler: str | None = "ddim") -> torch.Tensor:
    """Deterministic DDIM (eta 0) samples in [-1, 1] of a saved pipeline folder (``dqdeploy.stages.generate``:
    noise drawn batch by batch from one seeded generator; conditional: sample i is digit i % 10);
    ``scheduler=None``: the folder's own sampler (the DiT's flow-matching Euler)."""
    from dqdeploy.stages.generate import generate

    cond = model_dir / CLASS_COND_FILE
    return generate(model_dir, n=n, steps=steps, scheduler=scheduler, seed=seed, batch_size=100, runtime="torch",
                    cond_file=cond if cond.is_file() else None, guidance=guidance)


def save_pipeline(unet: torch.nn.Module, table: Any, path: Path) -> None:
    """Write ``unet/`` (or ``transformer/``), ``scheduler/`` and ``model_index.json`` (+ the class
    table of a conditional UNet, the class prompts of the DiT)."""
    from diffusers import DDPMPipeline, DDPMScheduler

    if isinstance(table, dict):  # the DiT's fixed class prompts
        from digits_dit import save_dit_pipeline

        save_dit_pipeline(unet, table, path, CLASS_COND_FILE)
        return
    sched = DDPMScheduler(**SCHEDULER_CONFIG)
    if table is None:
        DDPMPipeline(unet=unet, scheduler=sched).save_pretrained(path, safe_serialization=True)
        return
    unet.save_pretrained(path / "unet", safe_serialization=True)
    sched.save_pretrained(path / "scheduler")
    import diffusers

    index = {"_class_name": "DiffusionPipeline", "_diffusers_version": diffusers.__version__,
             "scheduler": ["diffusers", "DDPMScheduler"], "unet": ["diffusers", type(unet).__name__]}
    (path / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    save_class_cond(table, path / CLASS_COND_FILE)


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
    ap.add_argument("--classifier", type=Path, help="classifier folder for --stage ddpm (default: the one in --assets, "
                    "else the shipped one)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--iters", type=int, default=4000, help="DDPM iterations (~0.27 s each on one thread)")
    ap.add_argument("--stop-at", type=int,
                    help="stop after this many iterations of the --iters schedule (early checkpoint)")
    ap.add_argument("--unet", type=json.loads, default={}, help="JSON overrides of the UNet config")
    ap.add_argument("--conditional", action="store_true", help="class-conditional UNet2DConditionModel (CFG)")
    ap.add_argument("--transformer", action="store_true",
                    help="class-conditional SD3-style diffusion transformer, rectified flow (scripts/digits_dit.py; "
                    "--unet then overrides its config)")
    ap.add_argument("--p-uncond", type=float, default=0.1, help="conditional: probability of the null class")
    ap.add_argument("--guidance", type=float, default=2.0, help="conditional: CFG scale of the summary samples")
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
    args.conditional = args.conditional or args.transformer
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    summary: dict = {"command": "python scripts/train_digits.py "
                                + " ".join(argv if argv is not None else sys.argv[1:]),
                     "seed": args.seed, "threads": args.threads, "torch": torch.__version__}
    clf_dir, ddpm_dir = args.assets / CLASSIFIER_NAME, args.assets / DIGITS_MODEL_NAME

    if args.stage in ("all", "classifier"):
        model, metrics = train_classifier(args)
        with atomic_dir(clf_dir, overwrite=True, owned=lambda p: any(p.glob("*.safetensors"))) as tmp:
            save_classifier(model, tmp, extra={"metrics": metrics})
            normalise_modes(tmp)
        summary["classifier"] = {**metrics, "params": sum(p.numel() for p in model.parameters()),
                                 "bytes_on_disk": dir_size(clf_dir)}
    if args.stage == "ddpm":
        clf_dir = args.classifier or (clf_dir if clf_dir.is_dir() else ASSETS_DIR / CLASSIFIER_NAME)
    classifier = load_classifier(clf_dir)

    if args.stage in ("all", "ddpm"):
        ema, table, losses, metrics = train_unet(args)
        with atomic_dir(ddpm_dir, overwrite=True, owned=lambda p: (p / "model_index.json").is_file()) as tmp:
            save_pipeline(ema, table, tmp)
            normalise_modes(tmp)
        plot_losses(losses, args.out / "loss.png")
        summary["ddpm"] = {**metrics, "iters": args.iters, "stop_at": args.stop_at, "batch_size": args.batch_size,
                           "lr": args.lr, "ema": args.ema, "shift": args.shift, "unet_overrides": args.unet,
                           "conditional": args.conditional, "p_uncond": args.p_uncond if args.conditional else None,
                           "params": sum(p.numel() for p in ema.parameters()), "bytes_on_disk": dir_size(ddpm_dir)}
        guidance = args.guidance if args.conditional else 1.0
        sampler = None if args.transformer else "ddim"  # the DiT: its folder's flow-matching Euler
        summary["ddpm"]["transformer"] = args.transformer
        grid = ddim_sample(ddpm_dir, 64, args.sample_steps, seed=args.seed, guidance=guidance, scheduler=sampler)
        save_grid(grid, args.out / "samples.png", nrow=8, scale=4)
        t0 = time.perf_counter()
        samples = ddim_sample(ddpm_dir, args.fid_samples, args.sample_steps, seed=args.seed, guidance=guidance,
                              scheduler=sampler)
        summary["fid"] = {
            "samples": args.fid_samples, "sampler": f"{sampler or 'flow-euler'}-{args.sample_steps}", "seed": args.seed,
            "guidance": guidance,
            "digits_fid": round(digits_fid(samples, classifier), 4),
            "real_halves_fid": round(real_halves_fid(classifier, args.seed), 4),
            "sample_seconds": round(time.perf_counter() - t0, 1),
            "class_histogram": class_histogram(samples, classifier),
        }
        if args.conditional:
            digit = torch.arange(samples.shape[0]) % NUM_CLASSES  # sample i was asked for digit i % 10
            summary["fid"]["class_accuracy"] = classifier_accuracy(classifier, samples, digit)
        log.info("digits-FID of %d samples, %d steps: %.3f (real halves: %.3f)", args.fid_samples,
                 args.sample_steps, summary["fid"]["digits_fid"], summary["fid"]["real_halves_fid"])

    summary["total_seconds"] = round(time.perf_counter() - t_start, 1)
    atomic_write_bytes(args.out / "summary.json", (json.dumps(summary, indent=2) + "\n").encode())
    log.info("wrote %s", args.out / "summary.json")


if __name__ == "__main__":
    main()
