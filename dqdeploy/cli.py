"""The ``dqdeploy`` command line: quantize -> export -> check / lint -> sample / eval.

Typical use::

    dqdeploy quantize MODEL_DIR --recipe w8a8 --out q/ && dqdeploy export q/ --target trt --out e/
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import click

from .cli_params import OVERWRITE_FILES, POSITIVE, RATE, batch_profile, check_before_launch, sample_options
from .errors import DQDeployError, as_user_error
from .interrupts import Terminated, install_signal_handlers
from .launch import local_peer, under_launcher
from .vocab import CPU_CHOICES, GRAPH_RUNTIMES, INEXACT, LAYOUTS, SCALINGS, TARGETS


def _setup(verbose: bool) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if os.environ.get("RANK", "0") != "0":  # under torchrun, rank 0 alone shows progress
        os.environ.setdefault("TQDM_DISABLE", "1")
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("diffusers", "torch.onnx", "onnxscript", "onnx_ir"):  # onnx_ir logs every initializer it deduplicates
        logging.getLogger(noisy).setLevel(logging.ERROR)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("-v", "--verbose", is_flag=True, help="Log progress details.")
@click.version_option(package_name="dqdeploy")
def cli(verbose: bool) -> None:
    """Ship low-bit diffusion denoisers (UNets and diffusion transformers) with DilateQuant.

    \b
    1. dqdeploy quantize MODEL_DIR --recipe w8a8 --out Q     # Weight Dilation + per-step scales + BKD
    2. dqdeploy export Q --target ort --out E                 # ort-layout int8 QDQ ONNX (ONNX Runtime, CPU)
       dqdeploy export Q --target onnx --out E                # trt-layout int8 QDQ ONNX
       dqdeploy export Q --target trt --out E                 # trt-layout ONNX in FP16 + TensorRT engine (GPU)
    3. dqdeploy check Q E                                     # simulation vs exported graph
    4. dqdeploy sample E --n 64 --out grid.png                # images through the deployed graph

    \b
    Words: a layout (trt | ort) is the int8 graph's conventions, i.e. the runtime it is shaped for;
    a target (onnx | trt | ort | float) is what export writes: a layout, a precision, an engine or not;
    a runtime (ort | trt) is what runs an export: ONNX Runtime runs both layouts, TensorRT the trt layout.
    """
    _setup(verbose)


@cli.command()
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path), help="Artifact folder to write.")
@click.option("--recipe", default="w8a8", show_default=True, help="Preset (w8a8; w7a8: 7-bit weights, fast exact int8 on CPUs without VNNI too; w4a8, w4a4) or a recipe .json file.")
@click.option("--scheduler", help="Sampler of the calibration trajectories (ddim, ddpm, pndm, euler, dpm, flow or a diffusers class name; default: the model folder's own scheduler). Use the one you will deploy with.")
@click.option("--scheduler-dir", type=click.Path(path_type=Path), help="Scheduler folder, when MODEL_DIR is a bare denoiser folder.")
@click.option("--steps", default=50, show_default=True, type=POSITIVE, help="Sampling steps of the trajectories (one activation scale per step).")
@click.option("--calib-samples", default=1024, show_default=True, type=POSITIVE, help="(x_t, t, cond) samples drawn at random across steps.")
@click.option("--trajectories", default=64, show_default=True, type=POSITIVE, help="Full-precision sampling runs to draw them from.")
@click.option("--iters", type=click.IntRange(min=0), help="Distillation iterations per block (recipe default otherwise).")
@click.option("--batch-size", type=POSITIVE, help="Distillation batch size.")
@click.option("--lr-weight", type=RATE, help="Adam learning rate of weights and biases.")
@click.option("--lr-quant", type=RATE, help="Adam learning rate of step sizes.")
@click.option("--seed", default=0, show_default=True)
@click.option("--cond", "cond_file", type=click.Path(path_type=Path), help="Conditional models: safetensors with 'encoder_hidden_states' [P,S,D], 'pooled_projections' [P,D2] (SD3, Flux), optional 'uncond_encoder_hidden_states' [1,S,D] and 'uncond_pooled_projections' [1,D2].")
@click.option("--resolution", type=int, help="Latent height = width of the calibration trajectories (default: the model's sample_size; Flux needs it).")
@click.option("--prompts", "prompts_file", type=click.Path(path_type=Path), help="Conditional UNets in a full SD pipeline folder: a text file, one prompt per line.")
@click.option("--guidance", default=1.0, show_default=True, type=RATE, help="Classifier-free guidance scale of the calibration trajectories (Flux: the guidance embedding's value).")
@click.option("--no-dilation", is_flag=True, help="Ablation: no Weight Dilation.")
@click.option("--scaling", type=click.Choice(SCALINGS), help="Equivalent scaling: Weight Dilation (default), SmoothQuant, none.")
@click.option("--timestep-scales", type=click.Choice(["per-step", "collapsed"]), help="Ablation: 'collapsed' keeps one activation scale for all steps.")
@click.option("--no-distill", is_flag=True, help="Ablation: calibration only (post-training quantization).")
@click.option("--distill", "distill_mode", type=click.Choice(["block", "model", "none"]),
              help="Block-wise (default), whole-model (an ablation: Adam over every weight at once, about 4x the model's memory), or none.")
@click.option("--layout", type=click.Choice(LAYOUTS), help="Layout whose rounding the simulation models: 'ort' (default: also the output rounding of ONNX Runtime's fused QLinearConv; both layouts' graphs reproduce it exactly) or 'trt' (input Q/DQ only: exact for the trt-layout graph, the ort-layout graph adds unmodelled output rounding).")
@click.option("--fallback", help="Layers kept in float in both graphs: 'auto' (the most costly by sensitivity, within --fallback-budget of the MACs), 'none', or comma-separated module-name patterns. Recipe default otherwise.")
@click.option("--fallback-budget", type=float, help="auto fallback: at most this fraction of the MACs stays in float.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it is an artifact dqdeploy wrote.")
@click.option("--allow-pickle", is_flag=True, help="Also load pickled .bin weights (they can run code: trusted folders only).")
@click.option("--resume", is_flag=True, help="Continue an interrupted run from OUT.checkpoint/ (same command and inputs): calibration and finished blocks are not redone.")
@click.option("--nproc", default=1, show_default=True, type=POSITIVE, help="Processes on this machine (runs the command under torchrun; the same work shared, see README).")
def quantize(model_dir, out_dir, recipe, scheduler, scheduler_dir, steps, calib_samples, trajectories, iters, batch_size,
             lr_weight, lr_quant, seed, cond_file, resolution, prompts_file, guidance, no_dilation, scaling, timestep_scales,
             no_distill, distill_mode, layout, fallback, fallback_budget, overwrite, allow_pickle, resume, nproc) -> None:
    """Quantize the denoiser (UNet or transformer) of a diffusers folder MODEL_DIR with DilateQuant.

    MODEL_DIR is a pipeline folder (model_index.json, unet/, scheduler/) or a bare denoiser folder plus
    --scheduler-dir. Writes OUT (manifest.json, model.safetensors, distillation report and plot).
    While it runs, OUT.checkpoint/ keeps what is finished (calibration, each distilled block); after
    an interruption (even kill -9) the same command with --resume continues from there and writes
    the same artifact. It is deleted when OUT is written.
    Many processes: --nproc N here, or `torchrun --nproc-per-node N -m dqdeploy quantize ...`.
    """
    if nproc > 1:
        from .distributed import launch_many

        check_before_launch(nproc, out_dir, overwrite, [model_dir, scheduler_dir, cond_file, prompts_file])

        sys.exit(launch_many(nproc, resume, sys.argv[1:]))
    from .quant.trajectories import read_prompts
    from .quantize_stage import quantize as run_quantize
    from .recipe import CalibrationConfig, resolve_recipe

    r = resolve_recipe(recipe)
    changes = {k: v for k, v in dict(iters=iters, batch_size=batch_size, lr_weight=lr_weight, lr_quant=lr_quant, fallback=fallback,
                                     fallback_budget=fallback_budget, timestep_scales=timestep_scales, layout=layout).items()
               if v is not None}
    if fallback_budget is not None and (fallback or r.fallback) != "auto":
        raise click.UsageError(f"--fallback-budget applies to --fallback auto; this run's fallback is {fallback or r.fallback!r}")
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
                          prompts=prompts, overwrite=overwrite, allow_pickle=allow_pickle, resume=resume)
    from .distributed import is_writer

    if not is_writer():  # rank 0 reports
        return
    click.echo(f"quantized {len(result.manifest.layers)} layers of {result.manifest.model_class} with recipe {r.name} -> {out_dir}")
    if result.manifest.fallback:
        click.echo(f"kept in float (fallback {r.fallback}): {', '.join(result.manifest.fallback)}")
    if result.reports:
        before = sum(b.loss_before for b in result.reports) / len(result.reports)
        after = sum(b.loss_after for b in result.reports) / len(result.reports)
        click.echo(f"mean block MSE vs full precision: {before:.3e} before distillation, {after:.3e} after")


@cli.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the raw metadata.")
def inspect(path, as_json) -> None:
    """Describe a quantized artifact or an export folder."""
    from .describe import describe

    click.echo(describe(path, as_json=as_json))


def _generate(path, n, steps, scheduler, seed, batch_size, runtime, cond_file, guidance):
    from .generate import generate

    return generate(path, n=n, steps=steps, scheduler=scheduler, seed=seed, batch_size=batch_size,
                    runtime=runtime, cond_file=cond_file, guidance=guidance)


@cli.command()
@click.argument("path", type=click.Path(path_type=Path))
@sample_options
@click.option("--out", "out_png", required=True, type=click.Path(path_type=Path), help="PNG grid to write.")
@OVERWRITE_FILES
def sample(path, out_png, overwrite, **kw) -> None:
    """Generate images from a diffusers folder, a quantized artifact or an export folder."""
    from .eval.grid import save_grid
    from .paths import check_output_files

    check_output_files({"--out": out_png}, sources=[path, kw["cond_file"]], overwrite=overwrite)  # before sampling
    images = _generate(path, **kw)
    save_grid(images, out_png, scale=max(1, 64 // images.shape[-1]))  # small images are shown enlarged
    click.echo(f"wrote {images.shape[0]} samples to {out_png}")


@cli.command(name="eval")
@click.argument("path", type=click.Path(path_type=Path))
@sample_options
@click.option("--fp", "fp_dir", type=click.Path(path_type=Path), help="The full-precision diffusers folder PATH was quantized from: enables the full quality report.")
@click.option("--report", "report_path", type=click.Path(path_type=Path), help="Write the report as JSON (atomically).")
@click.option("--png", type=click.Path(path_type=Path), help="With --fp: FP and quantized samples side by side.")
@click.option("--step-samples", default=8, show_default=True, help="With --fp: FP trajectories for the per-step denoiser error.")
@click.option("--fid-ref", type=click.Path(path_type=Path), help="Folder of reference images for a Frechet distance.")
@click.option("--fid-extractor", help="Features for the Frechet distance: digits, pixels, a TorchScript .pt file or module:function (default: digits for 1x16x16 models, else pixels).")
@click.option("--scheduler-dir", type=click.Path(path_type=Path), help="With --fp: scheduler folder, when --fp is a bare denoiser folder.")
@click.option("--grid", type=click.Path(path_type=Path), help="Without --fp: save the samples as a PNG grid.")
@OVERWRITE_FILES
def eval_cmd(path, fp_dir, report_path, png, step_samples, fid_ref, fid_extractor, scheduler_dir, grid, overwrite, **kw) -> None:
    """Quality of PATH. With --fp (any supported model): per-step denoiser error along FP trajectories,
    PSNR/SSIM of samples from the same noise, FID if --fid-ref/--fid-extractor, a side-by-side PNG.
    Without --fp: digits-FID (digits models) or FID against --fid-ref of PATH's samples."""
    from .eval.report import EvalConfig, quality_report, sample_quality, write_report
    from .paths import check_output_files

    check_output_files({"--report": report_path, "--png": png, "--grid": grid}, overwrite=overwrite,  # before any sampling
                       sources=[path, fp_dir, fid_ref, scheduler_dir, kw["cond_file"]])
    if fp_dir is not None:
        cfg = EvalConfig(step_samples=step_samples, fid_ref=fid_ref, fid_extractor=fid_extractor,
                         scheduler_dir=scheduler_dir, **kw)
        report = quality_report(path, fp_dir, cfg, png=png)
    else:
        if png:
            raise DQDeployError("--png shows FP and quantized samples side by side and needs --fp MODEL_DIR",
                                hint="add --fp, or use --grid for a grid of PATH's samples")
        report = sample_quality(path, fid_ref=fid_ref, fid_extractor=fid_extractor, grid=grid, **kw)
    if report_path:
        write_report(report, report_path)
    summary = {k: v for k, v in report.items() if k not in ("per_step", "config")}
    click.echo(json.dumps(summary, default=str))


@cli.command()
@click.argument("source", type=click.Path(path_type=Path))
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path), help="Export folder to write.")
@click.option("--target", type=click.Choice(TARGETS), default="ort", show_default=True,
              help="What to write, by layout (trt: int8, zero point 0, input Q/DQ, for TensorRT; ort: uint8, zero point 128, "
                   "fused output Q/DQ, for ONNX Runtime on CPU). onnx: the trt-layout int8 QDQ graph, FP32 (FP16 with --fp16); "
                   "trt: the trt-layout graph in FP16 plus a TensorRT engine built from it on this GPU; ort: the ort-layout int8 "
                   "QDQ graph, FP32; float: the unquantized graph (SOURCE may be a diffusers folder).")
@click.option("--fp16", is_flag=True, help="FP16 graph (targets onnx and float; trt is always FP16).")
@click.option("--int4-linear", is_flag=True, help="Pack 4-bit Linear weights as INT4 blocks (opset 21, weight-only).")
@click.option("--no-simplify", is_flag=True, help="Skip onnxsim.")
@click.option("--batch", default="1:2:8", show_default=True, help="trt: min:opt:max batch of the optimization profile.")
@click.option("--cfg", is_flag=True, help="trt: double the batch profile for classifier-free guidance.")
@click.option("--timing-cache", type=click.Path(path_type=Path), help="trt: timing cache file to reuse.")
@click.option("--workspace-gb", type=float, help="trt: builder workspace limit.")
@click.option("--triton-repo", type=click.Path(path_type=Path), help="Also write a Triton model repository here (trt: the engine; other targets: the ONNX graph, for Triton's ONNX Runtime backend), its model named like the graph's folder: unet or transformer.")
@click.option("--dynamic-resolution", "dyn_res", metavar="MIN:MAX",
              help="Dynamic latent height and width, each in MIN..MAX (latent pixels, like quantize --resolution; multiples of the model's step).")
@click.option("--cpu", type=click.Choice(CPU_CHOICES), default="auto", show_default=True, help="ort: CPUs the int8 graph is exact on. vnni: fastest, x86 with VNNI/AMX and ARM64 only; portable: every CPU (x86 without VNNI too), slower; auto: this machine's.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
def export(source, out_dir, target, fp16, int4_linear, no_simplify, batch, cfg, timing_cache, workspace_gb, triton_repo, dyn_res,
           cpu, overwrite) -> None:
    """Export a quantized artifact SOURCE to a QDQ ONNX graph of one layout and, for --target trt, a TensorRT engine."""
    from .exporters.dynamic import parse_range
    from .exporters.export import export as run_export
    from .exporters.spec import read_spec

    lo, opt, hi = batch_profile(batch)
    try:
        res_range = None if dyn_res is None else parse_range(dyn_res)
    except ValueError:
        raise click.BadParameter(f"{dyn_res!r}: expected MIN:MAX latent sizes with 1 <= MIN <= MAX, e.g. 32:96", param_hint="--dynamic-resolution") from None
    run_export(source, out_dir, target=target, fp16=fp16, int4_linear=int4_linear, simplify=not no_simplify,
               overwrite=overwrite, batch=(lo, opt, hi), cfg=cfg, timing_cache=timing_cache, workspace_gb=workspace_gb,
               triton_repo=triton_repo, dynamic_resolution=res_range, cpu=cpu)
    spec = read_spec(out_dir)
    fmt = f"; int8 format {spec.int8_format}: `dqdeploy inspect` says where it is exact" if spec.int8_format else ""
    click.echo(f"wrote {Path(out_dir) / spec.onnx_file} ({target}{fmt})")
    if target == "trt":
        click.echo(f"wrote {Path(out_dir) / spec.engine_file}")
    if triton_repo:
        click.echo(f"wrote {Path(triton_repo) / Path(spec.onnx_file).parent.name}")


@cli.command()
@click.argument("quant_dir", type=click.Path(path_type=Path))
@click.argument("export_dir", type=click.Path(path_type=Path))
@click.option("--runtime", type=click.Choice(GRAPH_RUNTIMES), default="ort", show_default=True,
              help="What runs EXPORT_DIR: ort (ONNX Runtime, either layout) or trt (its TensorRT engine, trt layout).")
@click.option("--per-layer", is_flag=True, help="Compare every quantized layer's input and output to find the first that diverges.")
@click.option("--samples", default=4, show_default=True, type=POSITIVE, help="Inputs per checked time step.")
@click.option("--steps", type=POSITIVE, help="Check at most this many time steps, spread over the trajectory (default: every calibrated step).")
@click.option("--report", type=click.Path(path_type=Path), help="Write the report as JSON.")
@click.option("--inexact", type=click.Choice(INEXACT), default="refuse", show_default=True,
              help="A graph whose int8 format is not exact on this CPU: refuse, run its Q/DQ as float math (exact, slow), or allow the wrong kernels.")
@OVERWRITE_FILES
def check(quant_dir, export_dir, runtime, per_layer, samples, steps, report, inexact, overwrite) -> None:
    """Compare the PyTorch simulation with the exported graph (Polygraphy) at every calibrated time step.

    Exits 1 when any step is outside tolerance.
    """
    from .atomic import atomic_write_bytes
    from .check import check_export
    from .paths import check_output_files

    check_output_files({"--report": report}, sources=[quant_dir, export_dir], overwrite=overwrite)
    result = check_export(quant_dir, export_dir, runtime=runtime, per_layer=per_layer, samples=samples, steps=steps,
                          inexact=inexact)
    click.echo(result.table())
    if report:
        atomic_write_bytes(report, json.dumps({"format": "dqdeploy-check-report", **result.to_dict()}, indent=2).encode())
    result.raise_if_failed()


@cli.command()
@click.argument("quant_dir", type=click.Path(path_type=Path))
@click.option("--out", "out_dir", type=click.Path(path_type=Path), help="Report folder to write (default: QUANT_DIR-sensitivity).")
@click.option("--top", default=20, show_default=True, type=POSITIVE, help="Layers and blocks listed (and plotted).")
@click.option("--no-blocks", is_flag=True, help="Per-layer only (skip the per-block rows).")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
def analyze(quant_dir, out_dir, top, no_blocks, overwrite) -> None:
    """Which layers cost the most: quantize one layer (or block) at a time, weights vs activations,
    per time step, and measure the denoiser output error vs the float model on the artifact's
    calibration inputs. Writes sensitivity.md (tables), .json and .png. Artifacts store integer
    weights, so the float reference holds the dequantized weights: weight-only errors read 0 for
    them (format-1 artifacts kept the float weights).
    """
    from .analyze import analyze_artifact, write_report
    from .atomic import check_target

    source = Path(os.path.abspath(quant_dir))  # `analyze .` inside the artifact: the report goes next to it
    out_dir = out_dir or source.with_name(source.name + "-sensitivity")
    check_target(out_dir, overwrite=overwrite, kind="sensitivity", sources=[quant_dir])
    report = analyze_artifact(quant_dir, blocks=not no_blocks)
    write_report(report, out_dir, top=top, overwrite=overwrite)
    click.echo(report.table(top=top))
    click.echo(f"wrote {out_dir}/sensitivity.md, .json, .png")


@cli.command()
@click.argument("export_dir", type=click.Path(path_type=Path))
def lint(export_dir) -> None:
    """Check an exported graph against TensorRT's explicit-quantization rules (no TensorRT needed)."""
    from .exporters.lint import lint_path
    from .exporters.spec import ONNX_FILE, SPEC_FILE, read_spec

    path = onnx_path = Path(export_dir)
    if path.is_dir() and (path / SPEC_FILE).is_file():
        spec = read_spec(path)  # a missing, truncated or replaced graph is reported as corrupt
        if spec.target != "onnx":
            raise DQDeployError(
                f"{path} is a {spec.target!r} export; lint checks TensorRT's rules, which apply to TensorRT-layout graphs only",
                hint="lint the --out folder of `dqdeploy export --target onnx` (or trt)")
        onnx_path = path / spec.onnx_file
    elif path.is_dir():
        onnx_path = path / ONNX_FILE
    if not onnx_path.is_file():
        raise DQDeployError(f"{onnx_path} not found", hint="pass the --out folder of `dqdeploy export --target onnx`")
    violations = lint_path(onnx_path)
    for v in violations:
        click.echo(f"{v.rule}: {v.node}: {v.message}")
    if violations:
        raise DQDeployError(f"{len(violations)} TensorRT rule violation(s) in {onnx_path}")
    click.echo(f"{onnx_path}: passes every TensorRT rule check")


def _interrupted() -> None:
    if not under_launcher():
        click.echo("interrupted: no output was left behind", err=True)
    # A KeyboardInterrupt that surfaced inside a string exec (dataclasses, lazy imports) leaves
    # CPython's "unhandled KeyboardInterrupt" flag set, and `python -m` then dies by SIGINT instead
    # of exiting 130; a string exec resets that flag.
    exec("None")
    sys.exit(130)


def main() -> None:
    """Console entry point: user errors (a full disk included) print one message and exit non-zero, without a
    traceback. SIGINT exits 130 and SIGTERM 143, both after temporary folders are removed."""
    install_signal_handlers()
    try:
        cli.main(standalone_mode=False)
    except Terminated:
        if not under_launcher():  # under --nproc the launcher says it, once
            click.echo("terminated: no output was left behind", err=True)
        sys.exit(143)
    except click.exceptions.Abort:  # click's form of KeyboardInterrupt
        _interrupted()
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        _interrupted()
    except Exception as exc:
        if (error := as_user_error(exc)) is None:
            raise  # a bug: its traceback is the report
        if not local_peer():  # under --nproc every rank has the error (distributed.agree) on one terminal: rank 0 says it
            click.echo(f"error: {error}", err=True)
        sys.exit(error.exit_code)


if __name__ == "__main__":
    main()
