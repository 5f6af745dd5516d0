"""``dqdeploy analyze``: per-layer and per-block quantization sensitivity of an artifact."""

from __future__ import annotations

import os
from pathlib import Path

import click

from .params import POSITIVE


@click.command()
@click.argument("quant_dir", type=click.Path(path_type=Path))
@click.option("--out", "out_dir", type=click.Path(path_type=Path),
              help="Report folder to write (default: QUANT_DIR-sensitivity).")
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
    from ..io.atomic import check_target
    from ..verify.analyze import analyze_artifact, write_report

    source = Path(os.path.abspath(quant_dir))  # `analyze .` inside the artifact: the report goes next to it
    out_dir = out_dir or source.with_name(source.name + "-sensitivity")
    check_target(out_dir, overwrite=overwrite, kind="sensitivity", sources=[quant_dir])
    report = analyze_artifact(quant_dir, blocks=not no_blocks)
    write_report(report, out_dir, top=top, overwrite=overwrite)
    click.echo(report.table(top=top))
    click.echo(f"wrote {out_dir}/sensitivity.md, .json, .png")
