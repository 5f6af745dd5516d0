"""The quantize stage: a diffusers model folder -> a quantized artifact (``dqdeploy.quantize``).

Steps (ARCHITECTURE.md): load -> FP trajectories -> Weight Dilation -> per-step activation
calibration -> block-wise distillation -> artifact.
"""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import cast

import torch
from torch import nn

from . import distributed
from .artifact import LayerMeta, Manifest, QuantizeResult, install_quant_layers, save_quantized
from .atomic import check_target
from .checkpoint import RunCheckpoint, fingerprint
from .denoisers import conditioning_dims, spec_for
from .errors import CalibrationError, DQDeployError, ModelLoadError, RecipeError
from .models import LoadedModel, encode_prompts, load_model, make_scheduler, portable_config
from .quant.analysis import analyze_inputs
from .quant.blocks import partition
from .quant.calibrate import init_activation_scales, init_output_scales, input_channel_absmax
from .quant.dilation import dilation_factors, smoothquant_factors
from .quant.distill import BlockReport, distill_blocks, distill_model
from .quant.modules import QUANTIZABLE, QuantizedUNet, quant_layers, quantizes_output, replace_module
from .quant.sensitivity import analyze, choose_fallback, scheduler_weights
from .quant.timestep import TimestepTable
from .quant.trajectories import COND_KEY, POOLED_KEY, CalibrationSet, Conditioning, collect, load_conditioning
from .recipe import CalibrationConfig, Recipe
from .stages import stage

log = logging.getLogger(__name__)


def example_forward(unet: nn.Module, calib: CalibrationSet, n: int = 2) -> Callable[[], torch.Tensor]:
    """One forward of ``unet`` on the first ``n`` calibration inputs (traced by analysis and partition)."""
    inputs = calib.batch(torch.arange(min(n, len(calib))))
    return lambda: inputs.call(unet)


def _dilations(
    unet: nn.Module, names: list[str], info: dict, recipe: Recipe, calib: CalibrationSet
) -> dict[str, torch.Tensor | None]:
    """Per-layer ``s`` vectors: one per input-sharing group."""
    if recipe.scaling == "none":
        return {n: None for n in names}
    groups: dict[str, list[str]] = {}
    for n in names:
        groups.setdefault(info[n].group, []).append(n)
    absmax = input_channel_absmax(unet, [g[0] for g in groups.values()], calib) if recipe.scaling == "smoothquant" else {}
    result: dict[str, torch.Tensor | None] = {}
    for members in groups.values():
        weights = [cast(torch.Tensor, unet.get_submodule(m).weight) for m in members]
        if any(getattr(unet.get_submodule(m), "groups", 1) != 1 for m in members):
            s = None  # grouped convs mix channels per group: leave them undilated
        elif recipe.scaling == "wd":
            s = dilation_factors(weights)
        else:
            s = smoothquant_factors(absmax[members[0]], weights, recipe.smoothquant_alpha)
        for m in members:
            result[m] = s
    return result


def build_quantized(
    unet: nn.Module, recipe: Recipe, table: TimestepTable, calib: CalibrationSet
) -> tuple[QuantizedUNet, dict[str, LayerMeta]]:
    """Replace the recipe's Conv2d/Linear layers of a copy of ``unet`` with QuantLayers, computing
    the dilation vectors (WD from the FP weights, SmoothQuant from the calibration activations)."""
    qunet = copy.deepcopy(unet).eval()
    names = [n for n, m in qunet.named_modules() if isinstance(m, QUANTIZABLE) and recipe.selects(n)]
    if not names:
        raise ModelLoadError("the recipe selects no Conv2d/Linear layer", hint="check the recipe's include/exclude patterns")
    info = analyze_inputs(qunet, example_forward(qunet, calib), names)
    names = [n for n in names if n in info]  # layers never called keep FP weights
    dil = _dilations(qunet, names, info, recipe, calib)
    ends = spec_for(type(unet).__name__).ends
    metas = {
        name: LayerMeta(
            "conv" if isinstance(qunet.get_submodule(name), nn.Conv2d) else "linear",
            recipe.weight_bits_for(name, ends), recipe.act_bits_for(name, ends), recipe.act_symmetric, info[name].group, info[name].fold,
            recipe.layout == "ort" and quantizes_output(name, info[name].rank),  # output Q on the fused layers
        )
        for name in names
    }
    return install_quant_layers(qunet, metas, table, dil), metas


def _conditioning(loaded: LoadedModel, cond_file: str | Path | None, prompts: list[str] | None) -> Conditioning | None:
    name = type(loaded.unet).__name__
    if not loaded.conditional:
        if cond_file or prompts:
            raise CalibrationError(f"{name} is unconditional: --cond/--prompts do not apply")
        return None
    if cond_file:
        cond = load_conditioning(cond_file)
    elif prompts:
        if spec_for(name).is_transformer:
            raise CalibrationError(f"--prompts encodes CLIP prompts for Stable Diffusion UNets; {name} needs its own text encoders",
                                   hint="pass precomputed embeddings with --cond FILE.safetensors")
        cond = Conditioning(*encode_prompts(loaded, prompts))
    else:
        raise CalibrationError(
            f"{name} is conditional and needs calibration conditioning",
            hint="pass --cond FILE.safetensors (encoder_hidden_states [P, S, D], pooled_projections [P, D2] "
                 "for SD3/Flux) or --prompts FILE.txt (Stable Diffusion folders)",
        )
    found = {COND_KEY: cond.cond, POOLED_KEY: cond.pooled}
    for key, dim in conditioning_dims(spec_for(name), loaded.unet.config).items():
        tensor = found[key]
        if tensor is None:
            raise CalibrationError(f"{name} takes {key} [P, {dim}], the conditioning file has none",
                                   hint=f"add {key} to the --cond file")
        if tensor.shape[-1] != dim:
            raise CalibrationError(
                f"conditioning {key} has hidden size {tensor.shape[-1]}, {name} expects {dim}",
                hint="use embeddings from this model's text encoder(s)",
            )
    return cond


def quantize(
    model_dir: str | Path,
    recipe: Recipe,
    calibration: CalibrationConfig = CalibrationConfig(),
    out_dir: str | Path | None = None,
    *,
    scheduler_dir: str | Path | None = None,
    cond_file: str | Path | None = None,
    prompts: list[str] | None = None,
    overwrite: bool = False,
    allow_pickle: bool = False,
    resume: bool = False,
    micro_batches: int = 1,
) -> QuantizeResult:
    """Quantize the UNet of a diffusers folder with DilateQuant; save to ``out_dir`` when given
    (``allow_pickle``: also load pickled ``.bin`` weights, for trusted folders only).

    With ``out_dir``, the run keeps a checkpoint in ``OUT.checkpoint/`` (calibration set,
    calibrated model, each distilled block), deleted after the artifact is saved; ``resume``
    continues an interrupted run from it (:mod:`dqdeploy.checkpoint`). Under torchrun every rank runs
    this with the same arguments; the work is shared, rank 0 writes ``out_dir``, and there is no
    checkpoint (``resume`` is refused). ``micro_batches``: slices of each distillation batch per
    process, gradients accumulated (the same step in less memory; float results differ slightly,
    see :mod:`dqdeploy.quant.distill`)."""
    sources = [s for s in (model_dir, scheduler_dir) if s is not None]
    with distributed.session():
        run = {"model": model_dir, "scheduler_dir": scheduler_dir, "conditioning": cond_file}, {
            "prompts": prompts, "recipe": recipe.to_dict(), "calibration": calibration.to_dict(),
            **({"micro_batches": micro_batches} if micro_batches != 1 else {})}
        ckpt = _start(out_dir, sources, run, overwrite=overwrite, resume=resume, micro_batches=micro_batches)
        try:
            result = _quantize_loaded(model_dir, recipe, calibration, scheduler_dir, cond_file, prompts, allow_pickle, ckpt,
                                      micro_batches)
        except BaseException as exc:
            if ckpt is None:
                raise
            # a user error before any block is distilled would recur on resume: nothing worth keeping
            if ckpt.is_empty() or isinstance(exc, DQDeployError) and not ckpt.state["blocks"]:
                ckpt.remove()
            else:
                log.warning("the finished work is kept in %s: the same command with --resume continues from it", ckpt.folder)
            raise
        with distributed.agreed("writing the artifact"):
            if out_dir is not None and distributed.is_writer():  # rank 0 writes, atomically
                with stage(log, "write the artifact"):
                    result.path = save_quantized(result, out_dir, overwrite=overwrite, sources=sources)
    if ckpt and not ckpt.remove():
        log.warning("kept %s: it holds files dqdeploy did not write", ckpt.folder)
    return result


def _start(out_dir: str | Path | None, sources: list, run: tuple[dict, dict], *, overwrite: bool, resume: bool,
           micro_batches: int) -> RunCheckpoint | None:
    """The checks before any work, on every rank (an error on one is raised on all): the arguments,
    the output folder; then the checkpoint of a one-process run (``run``: its fingerprint's inputs)."""
    ckpt = None
    with distributed.agreed("checking the output folder"):
        if micro_batches < 1:
            raise RecipeError(f"micro_batches={micro_batches} (expected a whole number >= 1)", hint="pass micro_batches=1 (no split)")
        if resume and distributed.active():
            raise distributed.DistributedError("--resume continues one-process runs only: many-process runs keep no checkpoint",
                                               hint="resume without --nproc / torchrun, or start afresh without --resume")
        if out_dir is not None and distributed.is_writer():
            check_target(out_dir, overwrite=overwrite, kind="quantized", sources=sources)  # before calibration
        if out_dir is not None and not distributed.active():
            ckpt = RunCheckpoint.open(out_dir, fingerprint(*run), resume=resume)
    return ckpt


def _quantize_loaded(model_dir: str | Path, recipe: Recipe, calibration: CalibrationConfig, scheduler_dir: str | Path | None,
                     cond_file: str | Path | None, prompts: list[str] | None, allow_pickle: bool,
                     ckpt: RunCheckpoint | None, micro_batches: int = 1) -> QuantizeResult:
    """Load the model, collect (or restore) the calibration set, quantize."""
    with distributed.agreed("loading the model and conditioning"), stage(log, "load the model"):
        loaded = load_model(model_dir, scheduler_dir, allow_pickle=allow_pickle)
        scheduler = make_scheduler(calibration.scheduler, loaded.scheduler_config, calibration.steps)
        calibration = dataclasses.replace(calibration, scheduler=calibration.scheduler or type(scheduler).__name__)
        conditioning = _conditioning(loaded, cond_file, prompts)
    calib = ckpt.calibration() if ckpt else None
    if calib is not None:
        log.info("calibration set restored from the checkpoint")
    else:
        with stage(log, "calibration trajectories"):
            calib = collect(loaded.unet, scheduler, calibration, conditioning)
        if ckpt:
            ckpt.save_calibration(calib)
    scheduler_config = {"_class_name": type(scheduler).__name__, **scheduler.config}  # `sample` defaults to it
    return quantize_unet(loaded.unet, recipe, calib, calibration, scheduler_config, checkpoint=ckpt, micro_batches=micro_batches)


def quantize_unet(
    unet: nn.Module,
    recipe: Recipe,
    calib: CalibrationSet,
    calibration: CalibrationConfig = CalibrationConfig(),
    scheduler_config: dict | None = None,
    *,
    checkpoint: RunCheckpoint | None = None,
    micro_batches: int = 1,
) -> QuantizeResult:
    """The in-memory pipeline: dilation, per-step calibration, distillation (``checkpoint``: saves
    each step's result and restores what an interrupted run finished; ``micro_batches``: slices of
    each distillation batch per process, gradients accumulated, see :mod:`dqdeploy.quant.distill`)."""
    calib.validate()
    table = TimestepTable(calib.timesteps, collapsed=recipe.timestep_scales == "collapsed")
    saved = checkpoint.calibrated() if checkpoint else None
    if saved is None:
        qmodel, metas, fallback = _calibrated(unet, recipe, table, calib, calibration, scheduler_config)
        if checkpoint:
            with stage(log, "checkpoint the calibrated model"):
                checkpoint.save_calibrated(qmodel.unet, metas, fallback)
    else:
        log.info("calibrated model restored from the checkpoint")
        state, metas, fallback = saved
        scales = {n: state[f"{n}.weight_quantizer.scale"] for n in metas}  # stored: no weight-scale search
        qmodel = install_quant_layers(copy.deepcopy(unet).eval(), metas, table, weight_scales=scales)
        qmodel.unet.load_state_dict(state, strict=True)
    reports: list[BlockReport] = []
    if recipe.distill == "block":
        blocks = partition(qmodel.unet, example_forward(qmodel, calib), spec_for(type(unet).__name__).blocks)
        with stage(log, "block-wise distillation"):
            reports = distill_blocks(qmodel, unet, blocks, calib, recipe, seed=calibration.seed, checkpoint=checkpoint,
                                     workdir=checkpoint.data_dir if checkpoint else None, micro_batches=micro_batches)
    elif recipe.distill == "model":
        reports = distill_model(qmodel, unet, calib, recipe, seed=calibration.seed, micro_batches=micro_batches)
    qmodel.eval()
    with torch.no_grad():  # what is stored stays inside each layer's bit width (validation.check_state)
        for layer in quant_layers(qmodel.unet).values():
            layer.weight.copy_(layer.weight_quantizer.clip_to_grid(layer.weight))
    manifest = Manifest(
        recipe=recipe,
        calibration=calibration.to_dict(),
        model_class=type(unet).__name__,
        model_config=portable_config(unet),
        scheduler_config=json.loads(json.dumps(scheduler_config or {}, default=list)),
        timesteps=calib.timesteps,
        layers=metas,
        blocks=[{"name": r.name, "loss_before": r.loss_before, "loss_after": r.loss_after} for r in reports],
        fallback=fallback,
    )
    return QuantizeResult(qmodel, manifest, reports, calibration_subset(calib, seed=calibration.seed))


def _calibrated(
    unet: nn.Module, recipe: Recipe, table: TimestepTable, calib: CalibrationSet, calibration: CalibrationConfig,
    scheduler_config: dict | None,
) -> tuple[QuantizedUNet, dict[str, LayerMeta], list[str]]:
    """Quantized model with calibrated per-step scales and the fallback layers back in float."""
    with stage(log, "quantized layers (input analysis, dilation, weight scales)"):
        qmodel, metas = build_quantized(unet, recipe, table, calib)
    with stage(log, "activation scales"):
        init_activation_scales(qmodel, calib, method=recipe.act_init, batch_size=recipe.batch_size)
        init_output_scales(qmodel, calib, batch_size=recipe.batch_size)
    weights = None
    if scheduler_config and recipe.fallback == "auto":
        weights = scheduler_weights(make_scheduler(calibration.scheduler, scheduler_config), calib.timesteps)
    with stage(log, "fallback layers"):
        fallback = fallback_layers(qmodel, recipe, calib, seed=calibration.seed, step_weights=weights)
    return qmodel, keep_in_float(qmodel, unet, metas, fallback), fallback


def fallback_layers(
    qmodel: QuantizedUNet, recipe: Recipe, calib: CalibrationSet, *, seed: int = 0, step_weights: dict[float, float] | None = None
) -> list[str]:
    """The layers ``recipe.fallback`` keeps in float: by sensitivity on a calibration subset
    (``auto``, needs calibrated scales; steps weighted by ``step_weights``), by module-name
    pattern, or none."""
    if recipe.fallback == "none":
        return []
    names = list(quant_layers(qmodel.unet))
    if recipe.fallback == "auto":
        subset = calibration_subset(calib, steps=8, per_step=8, seed=seed)  # the analysis subset (named tensors, read with the model's spec)
        mine = [names[i] for i in distributed.shard(len(names))]  # ranks measure every world-th layer
        report = analyze(qmodel, subset, step_weights=step_weights, detail=False, blocks=False, only=mine)
        rows = {r.name: r for part in distributed.all_gather(report.layers) for r in part}
        report = dataclasses.replace(report, layers=[rows[n] for n in names if n in rows])
        chosen = choose_fallback(report, recipe.fallback_budget)
        log.info("fallback auto: %s", ", ".join(chosen) or "no layer")
        return chosen
    chosen = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in recipe.fallback_patterns)]
    if not chosen:
        raise RecipeError(
            f"fallback patterns {recipe.fallback!r} match no quantized layer",
            hint=f"use module names such as {', '.join(names[:3])} (wildcards allowed), or auto / none",
        )
    return chosen


def keep_in_float(
    qmodel: QuantizedUNet, fp_unet: nn.Module, metas: dict[str, LayerMeta], names: list[str]
) -> dict[str, LayerMeta]:
    """Put the FP layers ``names`` back into ``qmodel``; returns the remaining layers' metadata. A
    layer whose input is shared with a float layer can no longer fold ``1/s`` into the norm."""
    groups = {metas[n].group for n in names}
    for name in names:
        replace_module(qmodel.unet, name, copy.deepcopy(fp_unet.get_submodule(name)))
    return {
        n: dataclasses.replace(m, fold="mul") if m.group in groups and m.fold != "mul" else m
        for n, m in metas.items() if n not in names
    }


SUBSET_SAMPLES = 64  # the stored subset's size when the steps allow (at least MIN_PER_STEP per step)
MIN_PER_STEP = 2


def calibration_subset(
    calib: CalibrationSet, steps: int | None = None, per_step: int | None = None, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Calibration inputs kept in the artifact (export calibration, accuracy checks): up to
    ``per_step`` seeded samples at each of ``steps`` time steps spread over the trajectory. By
    default every step that has calibration samples, with ``SUBSET_SAMPLES / steps`` samples each
    (between 2 and 8), so ``check`` covers every calibrated step and the artifact stays small."""
    gen = torch.Generator().manual_seed(seed)
    present = calib.rows.unique()
    count = len(present) if steps is None else min(steps, len(present))
    per_step = per_step or max(MIN_PER_STEP, min(8, SUBSET_SAMPLES // max(count, 1)))
    chosen = present[torch.linspace(0, len(present) - 1, count).round().long().unique()]
    idx = []
    for row in chosen:
        members = (calib.rows == row).nonzero().flatten()
        idx.append(members[torch.randperm(len(members), generator=gen)[:per_step]])
    return calib.batch(torch.cat(idx)).to_dict()
