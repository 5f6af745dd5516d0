"""Parameter types and shared option groups of the ``dqdeploy`` command line (:mod:`dqdeploy.cli`)."""

from __future__ import annotations

import math
from pathlib import Path

import click

from ..core.vocab import RUNTIMES

POSITIVE = click.IntRange(min=1)


class FiniteFloat(click.ParamType):
    """A finite number >= 0 (learning rates, guidance): NaN and Inf are refused."""

    name = "number"

    def convert(self, value, param, ctx):
        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        if not math.isfinite(number) or number < 0:
            self.fail(f"{value!r} is not a finite number >= 0", param, ctx)
        return number


class PositiveFloat(click.ParamType):
    """A finite number > 0 (seconds): zero, negatives, NaN and Inf are refused."""

    name = "seconds"

    def convert(self, value, param, ctx):
        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        if not math.isfinite(number) or number <= 0:
            self.fail(f"{value!r} is not a finite number > 0", param, ctx)
        return number


RATE = FiniteFloat()
SECONDS = PositiveFloat()
OVERWRITE_FILES = click.option("--overwrite", is_flag=True,
                               help="Replace output files that dqdeploy wrote earlier (never other files).")


VAE_OPTION = click.option(
    "--vae", type=click.Path(path_type=Path),
    help="Latent models (e.g. Stable Diffusion's 4 channels): the AutoencoderKL folder that decodes the samples to "
         "images, or the diffusers pipeline folder holding it in vae/ (default: the vae/ beside the diffusers "
         "folder's denoiser; artifacts and exports keep none).")


def sample_options(f):
    """The options every sampling command takes (sample, eval)."""
    for opt in reversed([
        click.option("--n", default=64, show_default=True, type=POSITIVE, help="Number of images."),
        click.option("--steps", type=POSITIVE, help="Sampling steps (default: the calibrated count, else 50)."),
        click.option("--scheduler",
                     help="Sampler (default: the calibrated one, else the model folder's own, else ddim)."),
        click.option("--seed", default=0, show_default=True),
        click.option("--batch-size", default=64, show_default=True, type=POSITIVE),
        click.option("--runtime", type=click.Choice(RUNTIMES), default="auto", show_default=True,
                     help="torch simulation, ONNX Runtime or TensorRT "
                          "(exports only; a quantized artifact is exported on the fly)."),
        click.option("--cond", "cond_file", type=click.Path(path_type=Path),
                     help="Conditional models: embeddings file (as for quantize)."),
        click.option("--prompts", "prompts_file", type=click.Path(path_type=Path),
                     help="Conditional models, instead of --cond: a text file, one prompt per line, encoded by the "
                          "text encoders of the pipeline folder (eval: --fp; sample: PATH or --vae)."),
        click.option("--guidance", default=1.0, show_default=True, type=RATE),
    ]):
        f = opt(f)
    return f


def batch_profile(text: str) -> tuple[int, int, int]:
    """``--batch MIN:OPT:MAX`` as three ints, or click's usage error."""
    try:
        lo, opt, hi = (int(v) for v in text.split(":"))
    except ValueError:
        raise click.BadParameter(f"{text!r}: expected MIN:OPT:MAX batch sizes, e.g. 1:2:8",
                                 param_hint="--batch") from None
    if not 1 <= lo <= opt <= hi:
        raise click.BadParameter(f"{text!r}: expected 1 <= MIN <= OPT <= MAX", param_hint="--batch")
    return lo, opt, hi


def check_before_launch(nproc: int, out_dir: Path, overwrite: bool, sources: list) -> None:
    """What ``quantize --nproc N`` refuses before it starts N processes (each would print the same error): more
    processes than cores, an unsafe ``--out``, a one-process checkpoint beside it, a bad collective timeout."""
    import os

    from ..io.checkpoint import refuse_with_checkpoint
    from ..io.paths import check_output_dir
    from ..system.distributed import DistributedError, collective_timeout

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if nproc > cores:
        raise DistributedError(f"--nproc {nproc} asks for more processes than the {cores} CPU cores this process "
                               "may use: each runs one thread, so the extra ones only slow the run down",
                               hint=f"--nproc {cores} or fewer here; use torchrun across machines for more")
    check_output_dir(out_dir, overwrite=overwrite, kind="quantized", sources=sources)
    refuse_with_checkpoint(out_dir)
    collective_timeout()
