"""``dqdeploy eval``: quality of a quantized artifact or an export, against its full-precision model or not."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..core.errors import DQDeployError
from .params import OVERWRITE_FILES, VAE_OPTION, sample_options

_PATH = click.Path(path_type=Path)


@click.command(name="eval")
@click.argument("path", type=_PATH)
@sample_options
@click.option("--fp", "fp_dir", type=_PATH,
              help="The full-precision diffusers folder PATH was quantized from: enables the full quality report.")
@click.option("--report", "report_path", type=_PATH, help="Write the report as JSON (atomically).")
@click.option("--png", type=_PATH, help="With --fp: FP and quantized samples side by side.")
@click.option("--step-samples", default=8, show_default=True,
              help="With --fp: FP trajectories for the per-step denoiser error.")
@click.option("--fid-ref", type=_PATH, help="Folder of reference images for a Frechet distance.")
@click.option("--fid-extractor",
              help="Features for the Frechet distance: digits, pixels, a TorchScript .pt file or module:function "
                   "(default: digits for 1x16x16 models, else pixels).")
@click.option("--scheduler-dir", type=_PATH, help="With --fp: scheduler folder, when --fp is a bare denoiser folder.")
@click.option("--grid", type=_PATH, help="Without --fp: save the samples as a PNG grid.")
@VAE_OPTION
@OVERWRITE_FILES
def eval_cmd(path, fp_dir, report_path, png, step_samples, fid_ref, fid_extractor, scheduler_dir, grid, vae,
             overwrite, **kw) -> None:
    """Quality of PATH. With --fp (any supported model): per-step denoiser error along FP trajectories,
    PSNR/SSIM of images from the same noise (latent models: both models' latents decoded by the pipeline's VAE,
    the latent figures beside them), FID if --fid-ref/--fid-extractor, a side-by-side PNG, and a one-line
    verdict on stderr. Without --fp: digits-FID (digits models) or FID against --fid-ref of PATH's samples (latent
    models: decoded by --vae)."""
    from ..eval.report import write_report
    from ..io.paths import check_output_files
    from ..io.prompts import prompts_file_as_cond, text_folder

    check_output_files({"--report": report_path, "--png": png, "--grid": grid}, overwrite=overwrite,  # before sampling
                       sources=[path, fp_dir, fid_ref, scheduler_dir, kw["cond_file"], vae, kw["prompts_file"]])
    if png and fp_dir is None:
        raise DQDeployError("--png shows FP and quantized samples side by side and needs --fp MODEL_DIR",
                            hint="add --fp, or use --grid for a grid of PATH's samples")
    with prompts_file_as_cond(kw.pop("prompts_file"), kw.pop("cond_file"), text_folder(fp_dir, path, vae)) as cond:
        report = _report(path, fp_dir, png, step_samples, fid_ref, fid_extractor, scheduler_dir, grid, vae,
                         cond_file=cond, **kw)
    if report_path:
        write_report(report, report_path)
    if "verdict" in report:
        click.echo(report["verdict"]["text"], err=True)
    summary = {k: v for k, v in report.items() if k not in ("per_step", "config")}
    click.echo(json.dumps(summary, default=str))


def _report(path, fp_dir, png, step_samples, fid_ref, fid_extractor, scheduler_dir, grid, vae, **kw) -> dict:
    from ..eval.report import EvalConfig, quality_report, sample_quality

    if fp_dir is not None:
        cfg = EvalConfig(step_samples=step_samples, fid_ref=fid_ref, fid_extractor=fid_extractor,
                         scheduler_dir=scheduler_dir, vae=vae, **kw)
        report = quality_report(path, fp_dir, cfg, png=png)
    else:
        report = sample_quality(path, fid_ref=fid_ref, fid_extractor=fid_extractor, grid=grid, vae=vae, **kw)
    return report
