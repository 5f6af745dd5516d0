"""``dqdeploy encode-prompts``: a ``--cond`` file from prompts, by the pipeline folder's own text encoders."""

from __future__ import annotations

from pathlib import Path

import click

from .params import POSITIVE

_PATH = click.Path(path_type=Path)


@click.command(name="encode-prompts")
@click.argument("model_dir", type=_PATH)
@click.argument("prompts_file", type=_PATH)
@click.option("--out", "out_file", required=True, type=_PATH, help="The .safetensors conditioning file to write.")
@click.option("--negative-prompt", default="", show_default=True,
              help="The prompt classifier-free guidance steers away from (its embeddings are the unconditional "
                   "rows; not for Flux, which has none).")
@click.option("--max-sequence-length", type=POSITIVE,
              help="T5 text length for SD3, PixArt and Flux (default: the pipeline's own).")
@click.option("--allow-pickle", is_flag=True,
              help="Also load pickled .bin text-encoder weights (they can run code: trusted folders only).")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it is a conditioning file dqdeploy wrote.")
def encode_prompts(model_dir, prompts_file, out_file, negative_prompt, max_sequence_length, allow_pickle,
                   overwrite) -> None:
    """Encode PROMPTS_FILE (one prompt per line) with the text encoders of the pipeline folder MODEL_DIR and write
    the conditioning file quantize, sample, eval and check read with --cond.

    Every family is encoded by its own diffusers pipeline's encode_prompt: Stable Diffusion (CLIP), SD3 (two CLIPs
    and T5, pooled projections), PixArt (T5) and Flux (CLIP and T5). The file holds encoder_hidden_states [P, S, D],
    pooled_projections [P, D2] where the model takes them, and the negative prompt's uncond_* rows [1, ...] for
    guidance. A file written by diffusers' encode_prompt outputs (prompt_embeds, negative_prompt_embeds,
    pooled_prompt_embeds, negative_pooled_prompt_embeds) is read by --cond as well.

    \b
    dqdeploy encode-prompts sd3-folder/ prompts.txt --out cond.safetensors
    dqdeploy quantize sd3-folder/ --cond cond.safetensors --guidance 7 --out q/
    """
    from ..io.paths import check_output_files
    from ..io.prompts import encode, write_conditioning
    from ..quant.conditioning import read_prompts

    check_output_files({"--out": out_file}, sources=[model_dir, prompts_file], overwrite=overwrite)
    tensors = encode(model_dir, read_prompts(prompts_file), negative_prompt=negative_prompt,
                     max_sequence_length=max_sequence_length, allow_pickle=allow_pickle)
    write_conditioning(tensors, out_file)
    shapes = ", ".join(f"{k} {list(v.shape)}" for k, v in tensors.items())
    click.echo(f"wrote {out_file}: {shapes}")
