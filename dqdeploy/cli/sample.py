"""``dqdeploy sample``: a PNG grid of images from a model folder, an artifact or an export."""

from __future__ import annotations

from pathlib import Path

import click

from .params import OVERWRITE_FILES, VAE_OPTION, sample_options


def _generate(path, n, steps, scheduler, seed, batch_size, runtime, cond_file, guidance, vae):
    from ..stages.generate import generate

    return generate(path, n=n, steps=steps, scheduler=scheduler, seed=seed, batch_size=batch_size,
                    runtime=runtime, cond_file=cond_file, guidance=guidance, images=True, vae=vae)


@click.command()
@click.argument("path", type=click.Path(path_type=Path))
@sample_options
@click.option("--out", "out_png", required=True, type=click.Path(path_type=Path), help="PNG grid to write.")
@VAE_OPTION
@OVERWRITE_FILES
def sample(path, out_png, overwrite, **kw) -> None:
    """Generate images from a diffusers folder, a quantized artifact or an export folder.

    Latent models' samples are decoded by their VAE (--vae) before the PNG is written."""
    from ..eval.grid import save_grid
    from ..io.paths import check_output_files
    from ..io.prompts import prompts_file_as_cond, text_folder

    check_output_files({"--out": out_png}, sources=[path, kw["cond_file"], kw["vae"], kw["prompts_file"]],
                       overwrite=overwrite)  # before sampling
    prompts = kw.pop("prompts_file")
    with prompts_file_as_cond(prompts, kw.pop("cond_file"), text_folder(path, kw["vae"])) as cond_file:
        images = _generate(path, cond_file=cond_file, **kw)
    save_grid(images, out_png, scale=max(1, 64 // images.shape[-1]))  # small images are shown enlarged
    click.echo(f"wrote {images.shape[0]} samples to {out_png}")
