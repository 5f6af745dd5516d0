"""``dqdeploy lora``: a LoRA folded into a quantized artifact."""

from __future__ import annotations

from pathlib import Path

import click


@click.command()
@click.argument("quant_dir", type=click.Path(path_type=Path))
@click.argument("lora_file", type=click.Path(path_type=Path))
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path), help="Artifact folder to write.")
@click.option("--scale", default=1.0, show_default=True, type=float, help="Strength of the adapter.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it is an artifact dqdeploy wrote.")
def lora(quant_dir, lora_file, out_dir, scale, overwrite) -> None:
    """Fold the LoRA LORA_FILE (diffusers/peft or kohya .safetensors) into the artifact QUANT_DIR without
    quantizing again: the update is added to the adapted layers' weights and only their weight step sizes are
    searched again (seconds). OUT is a plain artifact: export it to any target.

    To run a LoRA beside the quantized layers instead (a float branch, swappable at run time), use
    dqdeploy.load_quantized(QUANT_DIR, lora=[(LORA_FILE, scale)]) in Python.
    """
    from ..stages.lora import fold_lora_artifact

    fold_lora_artifact(quant_dir, lora_file, out_dir, scale=scale, overwrite=overwrite)
    click.echo(f"wrote {out_dir} ({lora_file.name} folded in at scale {scale:g})")
