"""The quantize stage: a diffusers model folder -> a quantized artifact (``dqdeploy.quantize``).

Steps (docs/internals.md): load -> FP trajectories -> Weight Dilation -> per-step activation
calibration -> block-wise distillation -> artifact.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..core.arguments import as_calibration, as_path, as_recipe, public
from ..core.denoisers import conditioning_dims, spec_for
from ..core.deprecation import renamed
from ..core.errors import CalibrationError, DQDeployError, RecipeError
from ..core.recipe import CalibrationConfig, Recipe
from ..io.artifact import LayerMeta, Manifest, QuantizeResult, install_quant_layers, save_quantized
from ..io.atomic import check_target, own_tempdir
from ..io.checkpoint import RunCheckpoint, fingerprint
from ..io.float_layers import FloatLayers
from ..io.models import LoadedModel, load_model, make_scheduler, portable_config
from ..quant.attention import attention_in_state, install_attention_quant
from ..quant.blocks import Block, partition
from ..quant.blockstore import BlockStore
from ..quant.calibrate import init_activation_scales, init_output_scales
from ..quant.conditioning import (
    COND_KEY,
    POOLED_KEY,
    Conditioning,
    check_conditioning,
    conditioning_from,
    load_conditioning,
)
from ..quant.distill import (
    BlockReport,
    Targets,
    block_targets,
    distill_blocks,
    distill_model,
    model_targets,
    open_store,
)
from ..quant.fallback import SearchProgress, check_fallback, fallback_candidates, fallback_layers
from ..quant.modules import QuantizedDenoiser, quant_layers
from ..quant.sensitivity import scheduler_weights
from ..quant.timestep import TimestepTable
from ..quant.trajectories import CalibrationSet, calibration_subset, collect
from ..system import distributed
from ..system.progress import stage
from .layer_plan import build_quantized, example_forward, keep_in_float, plan_attention, plan_layers  # noqa: F401  (build_quantized re-exported)
from .quality import HeldSet, collect_held, held_quality
from .quality_risk import assess, load_reference, warn_if_at_risk

log = logging.getLogger(__name__)


def _conditioning(loaded: LoadedModel, cond_file: str | Path | None, prompts: list[str] | None,
                  allow_pickle: bool = False) -> Conditioning | None:
    name = type(loaded.denoiser).__name__
    if not loaded.conditional:
        if cond_file or prompts:
            raise CalibrationError(f"{name} is unconditional: --cond/--prompts do not apply")
        return None
    if cond_file:
        cond = load_conditioning(cond_file)
    elif prompts:
        from ..io.prompts import encode

        cond = conditioning_from(encode(loaded.model_dir, prompts, allow_pickle=allow_pickle), loaded.model_dir)
    else:
        raise CalibrationError(
            f"{name} is conditional and needs calibration conditioning",
            hint="pass --cond FILE.safetensors (encoder_hidden_states [P, S, D], pooled_projections [P, D2] "
                 "for SD3/Flux) or --prompts FILE.txt (Stable Diffusion folders)",
        )
    found = {COND_KEY: cond.cond, POOLED_KEY: cond.pooled}
    for key, dim in conditioning_dims(spec_for(name), loaded.denoiser.config).items():
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


@public
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
    quality_check: bool = True,
) -> QuantizeResult:
    """Quantize the denoiser (UNet or transformer) of a diffusers folder with DilateQuant; save to
    ``out_dir`` when given (``allow_pickle``: also load pickled ``.bin`` weights, for trusted folders
    only).

    With ``out_dir``, the run keeps a checkpoint in ``OUT.checkpoint/`` (calibration set,
    calibrated model, each distilled block), deleted after the artifact is saved; ``resume``
    continues an interrupted run from it (:mod:`dqdeploy.io.checkpoint`). Under torchrun every rank runs
    this with the same arguments; the work is shared, rank 0 writes ``out_dir``, and there is no
    checkpoint (``resume`` is refused). ``micro_batches``: slices of each distillation batch per
    process, gradients accumulated (the same step in less memory; float results differ slightly,
    see :mod:`dqdeploy.quant.distill`). ``quality_check``: the closing check of :mod:`dqdeploy.stages.quality`."""
    model_dir, recipe, calibration = (as_path(model_dir, "model_dir", "quantize"), as_recipe(recipe),
                                      as_calibration(calibration))
    out_dir = None if out_dir is None else as_path(out_dir, "out_dir", "quantize")
    sources = [s for s in (model_dir, scheduler_dir) if s is not None]
    with distributed.session():
        run = {"model": model_dir, "scheduler_dir": scheduler_dir, "conditioning": cond_file}, {
            "prompts": prompts, "recipe": recipe.to_dict(), "calibration": calibration.to_dict(),
            **({"micro_batches": micro_batches} if micro_batches != 1 else {})}
        ckpt = None
        try:  # from the checkpoint's creation on: a signal right after it leaves nothing behind either
            ckpt = _start(out_dir, sources, run, overwrite=overwrite, resume=resume, micro_batches=micro_batches)
            result = _quantize_loaded(model_dir, recipe, calibration, scheduler_dir, cond_file, prompts, allow_pickle,
                                      ckpt, micro_batches, quality_check)
        except BaseException as exc:
            if ckpt is None:
                raise
            # a user error before any block is distilled would recur on resume: nothing worth keeping
            if ckpt.is_empty() or isinstance(exc, DQDeployError) and not ckpt.state["blocks"]:
                ckpt.remove()
            else:
                log.warning("the finished work is kept in %s: the same command with --resume continues from it",
                            ckpt.folder)
            raise
        with distributed.agreed("writing the artifact"):
            if out_dir is not None and distributed.is_writer():  # rank 0 writes, atomically
                with stage(log, "write the artifact"):
                    result.path = save_quantized(result, out_dir, overwrite=overwrite, sources=sources)
    if ckpt and not ckpt.remove():
        log.warning("kept %s: it holds files dqdeploy did not write", ckpt.folder)
    if distributed.is_writer():
        warn_if_at_risk(result.manifest.quality)
    return result


def _start(out_dir: str | Path | None, sources: list, run: tuple[dict, dict], *, overwrite: bool, resume: bool,
           micro_batches: int) -> RunCheckpoint | None:
    """The checks before any work, on every rank (an error on one is raised on all): the arguments,
    the output folder; then the checkpoint of a one-process run (``run``: its fingerprint's inputs)."""
    ckpt = None
    try:
        with distributed.agreed("checking the output folder"):
            _check_start(out_dir, sources, overwrite=overwrite, resume=resume, micro_batches=micro_batches)
            if out_dir is not None and not distributed.active():
                ckpt = RunCheckpoint.open(out_dir, fingerprint(*run), resume=resume)
    except BaseException:  # a signal after the checkpoint was made: an empty one is not left behind
        if ckpt is not None and ckpt.is_empty():
            ckpt.remove()
        raise
    return ckpt


def _check_start(out_dir: str | Path | None, sources: list, *, overwrite: bool, resume: bool,
                 micro_batches: int) -> None:
    """The arguments and the output folder, before any work."""
    if micro_batches < 1:
        raise RecipeError(f"micro_batches={micro_batches} (expected a whole number >= 1)",
                          hint="pass micro_batches=1 (no split)")
    if resume and distributed.active():
        raise distributed.DistributedError(
            "--resume continues one-process runs only: many-process runs keep no checkpoint",
            hint="resume without --nproc / torchrun, or start afresh without --resume")
    if out_dir is not None and distributed.is_writer():
        check_target(out_dir, overwrite=overwrite, kind="quantized", sources=sources)  # before calibration


def _quantize_loaded(model_dir: str | Path, recipe: Recipe, calibration: CalibrationConfig,
                     scheduler_dir: str | Path | None, cond_file: str | Path | None, prompts: list[str] | None,
                     allow_pickle: bool, ckpt: RunCheckpoint | None, micro_batches: int = 1,
                     quality_check: bool = True) -> QuantizeResult:
    """Load the model, collect (or restore) the calibration set, quantize."""
    with distributed.agreed("loading the model and conditioning"), stage(log, "load the model"):
        loaded = load_model(model_dir, scheduler_dir, allow_pickle=allow_pickle)
        # a pattern that fits no layer (or all) fails now, not after calibration
        check_fallback(recipe, loaded.denoiser)
        scheduler = make_scheduler(calibration.scheduler, loaded.scheduler_config, calibration.steps)
        calibration = dataclasses.replace(calibration, scheduler=calibration.scheduler or type(scheduler).__name__)
        conditioning = _conditioning(loaded, cond_file, prompts, allow_pickle)
        check_conditioning(conditioning, calibration.guidance, loaded.denoiser, cond_file)
    calib = ckpt.calibration() if ckpt else None
    if calib is not None:
        log.info("calibration set restored from the checkpoint")
    else:
        with stage(log, "calibration trajectories"):
            calib = collect(loaded.denoiser, scheduler, calibration, conditioning)
        if ckpt:
            ckpt.save_calibration(calib)
    held = None
    if quality_check:  # recorded now, while the model is still FP (it is converted in place)
        with stage(log, "held trajectories for the quality check"):
            held = collect_held(loaded.denoiser, make_scheduler(calibration.scheduler, loaded.scheduler_config),
                                calibration, conditioning)
    scheduler_config = {"_class_name": type(scheduler).__name__, **scheduler.config}  # `sample` defaults to it
    # the model loaded here is converted itself
    return quantize_denoiser(loaded.denoiser, recipe, calib, calibration, scheduler_config, checkpoint=ckpt,
                             micro_batches=micro_batches, in_place=True, sources=loaded.weight_files, held=held)


def quantize_denoiser(
    denoiser: nn.Module,
    recipe: Recipe,
    calib: CalibrationSet,
    calibration: CalibrationConfig = CalibrationConfig(),
    scheduler_config: dict | None = None,
    *,
    checkpoint: RunCheckpoint | None = None,
    micro_batches: int = 1,
    in_place: bool = False,
    sources: Mapping[str, Path] | None = None,
    held: HeldSet | None = None,
) -> QuantizeResult:
    """The in-memory pipeline: dilation, per-step calibration, distillation. ``checkpoint``: saves each
    step's result and restores what an interrupted run finished; ``micro_batches``: slices of each
    distillation batch per process (:mod:`dqdeploy.quant.distill`); ``in_place``: convert ``denoiser``
    itself, holding the weights once (else a copy, ``denoiser`` unchanged), fallback layers read back from
    ``sources`` (the file of each tensor, ``LoadedModel.weight_files``) or from the run's data folder; ``held``: FP
    calls the result is measured on (:func:`dqdeploy.stages.quality.collect_held`), the manifest's ``quality``."""
    calib.validate()
    table = TimestepTable(calib.timesteps, collapsed=recipe.timestep_scales == "collapsed")
    model = denoiser if in_place else copy.deepcopy(denoiser).eval()
    saved = checkpoint.calibrated() if checkpoint else None
    with (_workdir(checkpoint) as work,
          open_store(work) if recipe.distill == "block" else contextlib.nullcontext() as store):
        if saved is None:
            with stage(log, "input analysis and dilation"):
                metas, dilations = plan_layers(model, recipe, calib)
                attention = plan_attention(model, recipe, calib)
            fallback: list[str] = []
            planned = list(metas)
        else:
            log.info("calibrated model restored from the checkpoint")
            (state, metas, fallback), attention = saved, attention_in_state(saved[0])
            planned = [*metas, *fallback]
        with stage(log, "distillation targets"):
            blocks, targets = _targets(model, recipe, calib, calibration.seed, micro_batches, planned, store)
        if saved is None:
            floats = FloatLayers(fallback_candidates(recipe, planned), work if in_place else None,
                                 sources if in_place else None)
            qmodel, fallback, metas = _calibrated(model, (metas, dilations, table, attention), floats, recipe, calib,
                                                  calibration, scheduler_config, _search_progress(checkpoint))
            if checkpoint:
                with stage(log, "checkpoint the calibrated model"):
                    checkpoint.save_calibrated(qmodel.denoiser, metas, fallback)
        else:
            qmodel = _restored(model, metas, table, state, (attention, recipe.act_bits))
            del state
        reports = _distill(qmodel, blocks, calib, recipe, targets, calibration.seed, checkpoint)
    qmodel = _on_grid(qmodel)
    manifest = Manifest(
        recipe=recipe,
        calibration=calibration.to_dict(),
        model_class=type(denoiser).__name__, model_config=portable_config(denoiser),
        scheduler_config=json.loads(json.dumps(scheduler_config or {}, default=list)),
        timesteps=calib.timesteps, layers=metas,
        blocks=[{"name": r.name, "loss_before": r.loss_before, "loss_after": r.loss_after} for r in reports],
        fallback=fallback, quality=_closing_check(qmodel, held, recipe, calibration), attention=attention,
    )
    return QuantizeResult(qmodel, manifest, reports, calibration_subset(calib, seed=calibration.seed))


def _distill(qmodel: QuantizedDenoiser, blocks: list[Block], calib: CalibrationSet, recipe: Recipe,
             targets: Targets | None, seed: int, checkpoint: RunCheckpoint | None) -> list[BlockReport]:
    """Distil ``qmodel`` towards the FP ``targets`` as the recipe says (none: nothing to do)."""
    if targets is not None and recipe.distill == "block":
        with stage(log, "block-wise distillation"):
            return distill_blocks(qmodel, blocks, calib, recipe, targets, seed=seed, checkpoint=checkpoint)
    if targets is not None:
        return distill_model(qmodel, calib, recipe, targets, seed=seed)
    return []


def _closing_check(qmodel: QuantizedDenoiser, held: HeldSet | None, recipe: Recipe,
                   calibration: CalibrationConfig) -> dict[str, Any] | None:
    """The per-step denoiser error of ``qmodel`` on ``held``, compared with the zoo's level (None without ``held``)."""
    if held is None:
        return None
    with stage(log, "quality check on held trajectories"):
        return assess(held_quality(qmodel, held), recipe, calibration, load_reference())


@torch.no_grad()
def _on_grid(qmodel: QuantizedDenoiser) -> QuantizedDenoiser:
    """``qmodel`` in eval mode with every weight clipped to its grid: what is stored stays inside
    each layer's bit width (validation.check_state)."""
    for layer in quant_layers(qmodel.denoiser).values():
        layer.weight.copy_(layer.weight_quantizer.clip_to_grid(layer.weight))
    return qmodel.eval()


def _restored(model: nn.Module, metas: dict[str, LayerMeta], table: TimestepTable,
              state: dict[str, torch.Tensor], attention: tuple[list[str], int]) -> QuantizedDenoiser:
    """The checkpoint's calibrated model: ``model`` converted with the stored scales (nothing
    searched), its ``attention`` (names, bits) quantized, then its state."""
    scales = {n: state[f"{n}.weight_quantizer.scale"] for n in metas}
    qmodel = install_quant_layers(model, metas, table, weight_scales=scales)
    install_attention_quant(qmodel.denoiser, attention[0], table.n_rows, attention[1], qmodel.step_index)
    qmodel.denoiser.load_state_dict(state, strict=True)
    return qmodel


@contextlib.contextmanager
def _workdir(checkpoint: RunCheckpoint | None) -> Iterator[Path]:
    """Where the run keeps data on disk: the checkpoint's data folder, or a temporary folder."""
    if checkpoint is not None:
        yield checkpoint.data_dir
        return
    with own_tempdir("dqdeploy-quantize") as tmp:  # a rank killed with -9 leaves it: the next run sweeps it
        yield tmp / "data"


def _targets(model: nn.Module, recipe: Recipe, calib: CalibrationSet, seed: int, micro_batches: int,
             planned: list[str], store: BlockStore | None) -> tuple[list[Block], Targets | None]:
    """The distillation blocks and FP targets, from the float ``model`` before it is converted."""
    if recipe.distill == "block":
        assert store is not None
        blocks = partition(model, example_forward(model, calib), spec_for(type(model).__name__).blocks, layers=planned)
        return blocks, block_targets(model, blocks, calib, recipe, store, seed, micro_batches=micro_batches)
    if recipe.distill == "model":
        return [], model_targets(model, calib, recipe, seed, micro_batches=micro_batches)
    return [], None


def _search_progress(checkpoint: RunCheckpoint | None) -> SearchProgress | None:
    """The fallback search's progress kept in ``checkpoint`` (restored from it on ``--resume``), or None."""
    if checkpoint is None:
        return None
    order, gains = checkpoint.search() or (None, {})
    return SearchProgress(order, gains, checkpoint.save_search)


def _calibrated(
    model: nn.Module, plan: tuple[dict[str, LayerMeta], dict[str, torch.Tensor | None], TimestepTable, list[str]],
    floats: FloatLayers, recipe: Recipe, calib: CalibrationSet, calibration: CalibrationConfig,
    scheduler_config: dict | None, search: SearchProgress | None = None,
) -> tuple[QuantizedDenoiser, list[str], dict[str, LayerMeta]]:
    """Convert ``model`` as ``plan`` (metadata, dilations, step table, attentions) says, the replaced layers to
    ``floats``; calibrate the per-step scales, then put the fallback layers back in float (``search``: the fallback
    search's progress, saved and restored). Returns the quantized model, the fallback layers and the remaining
    layers' metadata."""
    metas, dilations, table, attention = plan
    with stage(log, "quantized layers (weight scales)"):
        qmodel = install_quant_layers(model, metas, table, dilations, replaced=floats.keep)
        install_attention_quant(qmodel.denoiser, attention, table.n_rows, recipe.act_bits, qmodel.step_index)
    with stage(log, "activation scales"):
        init_activation_scales(qmodel, calib, method=recipe.act_init, batch_size=recipe.batch_size)
        init_output_scales(qmodel, calib, batch_size=recipe.batch_size)
    weights = None
    if scheduler_config and recipe.fallback == "auto":
        weights = scheduler_weights(make_scheduler(calibration.scheduler, scheduler_config), calib.timesteps)
    with stage(log, "fallback layers"):
        fallback = fallback_layers(qmodel, recipe, calib, seed=calibration.seed, step_weights=weights, done=search)
        metas = keep_in_float(qmodel, floats, metas, fallback)
    floats.clear()
    return qmodel, fallback, metas


def _quantize_unet(*args: Any, **kwargs: Any) -> QuantizeResult:
    """The old ``quantize_unet``: :func:`quantize_denoiser`, its first argument also accepted as ``unet=``."""
    if "unet" in kwargs:
        args = (kwargs.pop("unet"), *args)
    return quantize_denoiser(*args, **kwargs)


if not TYPE_CHECKING:  # old names, kept for one release (mypy sees only the new ones)
    __getattr__ = renamed(__name__, {"quantize_unet": "quantize_denoiser"}, shims={"quantize_unet": "_quantize_unet"})
