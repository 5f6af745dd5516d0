"""``dqdeploy check``: the PyTorch simulation against the exported graph, time step by time step."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..core.vocab import GRAPH_RUNTIMES, INEXACT
from .params import OVERWRITE_FILES, POSITIVE


@click.command()
@click.argument("quant_dir", type=click.Path(path_type=Path))
@click.argument("export_dir", type=click.Path(path_type=Path))
@click.option("--runtime", type=click.Choice(GRAPH_RUNTIMES), default="ort", show_default=True,
              help="What runs EXPORT_DIR: ort (ONNX Runtime, either layout) or trt (its TensorRT engine, trt layout).")
@click.option("--per-layer", is_flag=True,
              help="Compare every quantized layer's input and output to find the first that diverges.")
@click.option("--samples", default=4, show_default=True, type=POSITIVE, help="Inputs per checked time step.")
@click.option("--steps", type=POSITIVE,
              help="Check at most this many time steps, spread over the trajectory (default: every calibrated step).")
@click.option("--report", type=click.Path(path_type=Path), help="Write the report as JSON.")
@click.option("--inexact", type=click.Choice(INEXACT), default="refuse", show_default=True,
              help="A graph whose int8 format is not exact on this CPU: refuse, run its Q/DQ as float math "
                   "(exact, slow), or allow the wrong kernels.")
@click.option("--lora", type=click.Path(path_type=Path),
              help="An export with LoRA slots: check it with this LoRA file (a float branch on both sides).")
@OVERWRITE_FILES
def check(quant_dir, export_dir, runtime, per_layer, samples, steps, report, inexact, lora, overwrite) -> None:
    """Compare the PyTorch simulation with the exported graph (Polygraphy) at every calibrated time step.

    Exits 1 when any step is outside tolerance.
    """
    from ..io.atomic import atomic_write_bytes
    from ..io.paths import check_output_files
    from ..verify.check import check_export

    check_output_files({"--report": report}, sources=[quant_dir, export_dir, lora], overwrite=overwrite)
    result = check_export(quant_dir, export_dir, runtime=runtime, per_layer=per_layer, samples=samples, steps=steps,
                          inexact=inexact, lora=lora)
    click.echo(result.table())
    if report:
        body = json.dumps({"format": "dqdeploy-check-report", **result.to_dict()}, indent=2)
        atomic_write_bytes(report, body.encode())
    result.raise_if_failed()
