"""``dqdeploy quantize``: DilateQuant on the denoiser of a diffusers folder, written as an artifact."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from ..core.vocab import LAYOUTS, SCALINGS
from .params import POSITIVE, RATE, SECONDS, check_before_launch

_PATH = click.Path(path_type=Path)
# --preset: run settings for a purpose, keyed by this command's parameter names; options on the command line win.
# quick: a first try of a new model in about a minute at tiny size (few steps and samples, no distillation, no
# sensitivity search); default: the defaults shown by --help.
PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    "quick": {"steps": 10, "calib_samples": 128, "trajectories": 8, "distill_mode": "none", "fallback": "none"},
}
# options that ask for what a preset value turns off: given, the preset leaves that value alone
IMPLIED_BY = {"distill_mode": ("no_distill", "iters", "lr_weight", "lr_quant"),
              "fallback": ("fallback_budget", "fallback_time", "fallback_candidates")}
_FLAGS = {"steps": "--steps", "calib_samples": "--calib-samples", "trajectories": "--trajectories",
          "distill_mode": "--distill", "fallback": "--fallback"}


def _preset_help() -> str:
    quick = " ".join(f"{_FLAGS[k]} {v}" for k, v in PRESETS["quick"].items())
    return (f"quick: try dqdeploy on a new model in about a minute at tiny size ({quick}); default: the defaults "
            "shown here. Options given on the command line win; the artifact records the values used.")


def preset_values(ctx: click.Context, preset: str) -> dict[str, Any]:
    """The values ``--preset`` sets in this run: those of its table whose option (or one in ``IMPLIED_BY``) is not
    on the command line."""
    given = {name for name in ctx.params if ctx.get_parameter_source(name) not in (ParameterSource.DEFAULT, None)}
    return {k: v for k, v in PRESETS[preset].items() if k not in given and not given & set(IMPLIED_BY.get(k, ()))}


@click.command()
@click.argument("model_dir", type=_PATH)
@click.option("--out", "out_dir", required=True, type=_PATH, help="Artifact folder to write.")
@click.option("--preset", type=click.Choice(list(PRESETS)), default="default", show_default=True,
              help=_preset_help())
@click.option("--recipe", default="w8a8", show_default=True,
              help="Preset (w8a8; w7a8: 7-bit weights, fast exact int8 on CPUs without VNNI too; w4a8, w4a4) "
                   "or a recipe .json file.")
@click.option("--scheduler",
              help="Sampler of the calibration trajectories (ddim, ddpm, pndm, euler, dpm, flow or a diffusers class "
                   "name; default: the model folder's own scheduler). Use the one you will deploy with.")
@click.option("--scheduler-dir", type=_PATH, help="Scheduler folder, when MODEL_DIR is a bare denoiser folder.")
@click.option("--steps", default=50, show_default=True, type=POSITIVE,
              help="Sampling steps of the trajectories (one activation scale per step).")
@click.option("--calib-samples", default=1024, show_default=True, type=POSITIVE,
              help="(x_t, t, cond) samples drawn at random across steps.")
@click.option("--trajectories", default=64, show_default=True, type=POSITIVE,
              help="Full-precision sampling runs to draw them from.")
@click.option("--iters", type=click.IntRange(min=0),
              help="Distillation iterations per block (recipe default otherwise).")
@click.option("--batch-size", type=POSITIVE, help="Distillation batch size.")
@click.option("--lr-weight", type=RATE, help="Adam learning rate of weights and biases.")
@click.option("--lr-quant", type=RATE, help="Adam learning rate of step sizes.")
@click.option("--seed", default=0, show_default=True)
@click.option("--cond", "cond_file", type=_PATH,
              help="Conditional models: safetensors with 'encoder_hidden_states' [P,S,D], 'pooled_projections' [P,D2] "
                   "(SD3, Flux), optional 'uncond_encoder_hidden_states' [1,S,D] and 'uncond_pooled_projections' "
                   "[1,D2].")
@click.option("--resolution", type=int,
              help="Latent height = width of the calibration trajectories (default: the model's sample_size; "
                   "Flux needs it).")
@click.option("--prompts", "prompts_file", type=_PATH,
              help="Conditional UNets in a full SD pipeline folder: a text file, one prompt per line.")
@click.option("--guidance", default=1.0, show_default=True, type=RATE,
              help="Classifier-free guidance scale of the calibration trajectories (Flux: the guidance embedding's "
                   "value).")
@click.option("--no-dilation", is_flag=True, help="Ablation: no Weight Dilation.")
@click.option("--scaling", type=click.Choice(SCALINGS),
              help="Equivalent scaling: Weight Dilation (default), SmoothQuant, none.")
@click.option("--timestep-scales", type=click.Choice(["per-step", "collapsed"]),
              help="Ablation: 'collapsed' keeps one activation scale for all steps.")
@click.option("--no-distill", is_flag=True, help="Ablation: calibration only (post-training quantization).")
@click.option("--distill", "distill_mode", type=click.Choice(["block", "model", "none"]),
              help="Block-wise (default), whole-model (an ablation: Adam over every weight at once, about 4x the "
                   "model's memory), or none.")
@click.option("--layout", type=click.Choice(LAYOUTS),
              help="Layout whose rounding the simulation models: 'ort' (default: also the output rounding of ONNX "
                   "Runtime's fused QLinearConv; both layouts' graphs reproduce it exactly) or 'trt' (input Q/DQ only: "
                   "exact for the trt-layout graph, the ort-layout graph adds unmodelled output rounding).")
@click.option("--fallback",
              help="Layers kept in float in both graphs: 'auto' (the most costly by sensitivity, within "
                   "--fallback-budget of the MACs), 'none', or comma-separated module-name patterns. "
                   "Recipe default otherwise.")
@click.option("--fallback-budget", type=float,
              help="auto fallback: at most this fraction of the MACs stays in float.")
@click.option("--fallback-time", type=SECONDS,
              help="auto fallback: stop the sensitivity search after this many seconds; the layers not scored by "
                   "then stay quantized (default: no limit).")
@click.option("--fallback-candidates", type=click.IntRange(min=0),
              help="auto fallback: score by leave-one-out only the N layers a first-order screen ranks highest; 0: "
                   "the screen's estimates choose (default: every layer of a model with at most 192 quantized layers, "
                   "else 0 -- at SD-1.5 size each scored layer costs minutes).")
@click.option("--attention", type=click.Choice(["float", "int8"]),
              help="Attention's two batched matmuls (q k^T, softmax x v): 'float' (default) or 'int8' (quantized "
                   "inputs: q, k, v with per-step scales, the softmax output on a fixed 8-bit grid; the paper's "
                   "setting; see docs/SUPPORT_MATRIX.md for its measured cost and speed).")
@click.option("--no-quality-check", is_flag=True,
              help="Skip the closing quality check (the per-step denoiser error vs full precision on a few held "
                   "trajectories, recorded in the manifest and compared with the development zoo's level).")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it is an artifact dqdeploy wrote.")
@click.option("--allow-pickle", is_flag=True,
              help="Also load pickled .bin weights (they can run code: trusted folders only).")
@click.option("--resume", is_flag=True,
              help="Continue an interrupted run from OUT.checkpoint/ (same command and inputs): calibration and "
                   "finished blocks are not redone.")
@click.option("--nproc", default=1, show_default=True, type=POSITIVE,
              help="Processes on this machine (runs the command under torchrun; the same work shared, see README).")
def quantize(model_dir, out_dir, preset, recipe, scheduler, scheduler_dir, steps, calib_samples, trajectories, iters,
             batch_size, lr_weight, lr_quant, seed, cond_file, resolution, prompts_file, guidance, no_dilation, scaling,
             timestep_scales, no_distill, distill_mode, layout, fallback, fallback_budget, fallback_time,
             fallback_candidates, attention,
             no_quality_check, overwrite, allow_pickle, resume, nproc) -> None:
    """Quantize the denoiser (UNet or transformer) of a diffusers folder MODEL_DIR with DilateQuant.

    MODEL_DIR is a pipeline folder (model_index.json, unet/, scheduler/) or a bare denoiser folder plus
    --scheduler-dir. Writes OUT (manifest.json, model.safetensors, distillation report and plot).
    While it runs, OUT.checkpoint/ keeps what is finished (calibration, each distilled block); after
    an interruption (even kill -9) the same command with --resume continues from there and writes
    the same artifact. It is deleted when OUT is written.
    Many processes: --nproc N here, or `torchrun --nproc-per-node N -m dqdeploy quantize ...`.
    """
    if nproc > 1:
        from ..system.distributed import launch_many

        check_before_launch(nproc, out_dir, overwrite, [model_dir, scheduler_dir, cond_file, prompts_file])

        sys.exit(launch_many(nproc, resume, sys.argv[1:]))
    from ..core.recipe import CalibrationConfig, resolve_recipe
    from ..core.terminal import say
    from ..quant.conditioning import read_prompts
    from ..stages.quantize import quantize as run_quantize

    chosen = preset_values(click.get_current_context(), preset)
    if chosen:
        say(f"--preset {preset}: " + " ".join(f"{_FLAGS[k]} {v}" for k, v in chosen.items()))
    steps, calib_samples, trajectories = (chosen.get(k, v) for k, v in (
        ("steps", steps), ("calib_samples", calib_samples), ("trajectories", trajectories)))
    distill_mode, fallback = chosen.get("distill_mode", distill_mode), chosen.get("fallback", fallback)
    r = resolve_recipe(recipe)
    changes = {k: v for k, v in dict(iters=iters, batch_size=batch_size, lr_weight=lr_weight, lr_quant=lr_quant,
                                     fallback=fallback, fallback_budget=fallback_budget, fallback_time=fallback_time,
                                     fallback_candidates=fallback_candidates,
                                     timestep_scales=timestep_scales, layout=layout, attention=attention).items()
               if v is not None}
    _auto_only(fallback or r.fallback, {"--fallback-budget": fallback_budget, "--fallback-time": fallback_time,
                                        "--fallback-candidates": fallback_candidates})
    if no_dilation and scaling not in (None, "none"):
        raise click.UsageError("--no-dilation contradicts --scaling " + scaling)
    if no_dilation or scaling:
        changes["scaling"] = "none" if no_dilation else scaling
    if no_distill and distill_mode not in (None, "none"):
        raise click.UsageError("--no-distill contradicts --distill " + distill_mode)
    if no_distill or distill_mode:
        changes["distill"] = "none" if no_distill else distill_mode
    r = r.replace(**changes)
    calib = CalibrationConfig(scheduler=scheduler, steps=steps, samples=calib_samples, trajectories=trajectories,
                              seed=seed, guidance=guidance, batch_size=r.batch_size, resolution=resolution)
    prompts = read_prompts(prompts_file) if prompts_file else None
    result = run_quantize(model_dir, r, calib, out_dir, scheduler_dir=scheduler_dir, cond_file=cond_file,
                          prompts=prompts, overwrite=overwrite, allow_pickle=allow_pickle, resume=resume,
                          quality_check=not no_quality_check)
    from ..system.distributed import is_writer

    if is_writer():  # rank 0 reports
        _report(result, r.name, r.fallback, out_dir)


def _auto_only(fallback: str, options: dict[str, object]) -> None:
    """Refuse the options given (not None) that apply to ``--fallback auto`` only, when the fallback is another."""
    for option, value in options.items():
        if value is not None and fallback != "auto":
            raise click.UsageError(f"{option} applies to --fallback auto; this run's fallback is {fallback!r}")


def _report(result, recipe: str, fallback: str, out_dir: Path) -> None:
    """What the run made: layers, fallback, distillation losses, the closing quality check."""
    click.echo(f"quantized {len(result.manifest.layers)} layers of {result.manifest.model_class} "
               f"with recipe {recipe} -> {out_dir}")
    if result.manifest.fallback:
        click.echo(f"kept in float (fallback {fallback}): {', '.join(result.manifest.fallback)}")
    if result.reports:
        before = sum(b.loss_before for b in result.reports) / len(result.reports)
        after = sum(b.loss_after for b in result.reports) / len(result.reports)
        click.echo(f"mean block MSE vs full precision: {before:.3e} before distillation, {after:.3e} after")
    if result.manifest.quality:
        from ..stages.quality_risk import quality_text

        click.echo(quality_text(result.manifest.quality))
