"""``dqdeploy export``: a quantized artifact to a QDQ ONNX graph of one layout (and a TensorRT engine)."""

from __future__ import annotations

from pathlib import Path

import click

from ..core.vocab import CPU_CHOICES
from ..runtimes.targets import TARGET_SPECS, targets_help
from .params import batch_profile

_PATH = click.Path(path_type=Path)


@click.command()
@click.argument("source", type=_PATH)
@click.option("--out", "out_dir", required=True, type=_PATH, help="Export folder to write.")
@click.option("--target", type=click.Choice(list(TARGET_SPECS)), default="ort", show_default=True,
              help="What to write, by layout (trt: int8, zero point 0, input Q/DQ, for TensorRT; ort: uint8, "
                   "zero point 128, fused output Q/DQ, for ONNX Runtime on CPU). " + targets_help()
                   + " (float: SOURCE may be a diffusers folder).")
@click.option("--fp16", is_flag=True, help="FP16 graph (targets onnx and float; trt is always FP16).")
@click.option("--int4-linear", is_flag=True, help="Pack 4-bit Linear weights as INT4 blocks (opset 21, weight-only).")
@click.option("--no-simplify", is_flag=True, help="Skip onnxsim.")
@click.option("--batch", default="1:2:8", show_default=True, help="trt: min:opt:max batch of the optimization profile.")
@click.option("--cfg", is_flag=True, help="trt: double the batch profile for classifier-free guidance.")
@click.option("--timing-cache", type=_PATH, help="trt: timing cache file to reuse.")
@click.option("--workspace-gb", type=float, help="trt: builder workspace limit.")
@click.option("--triton-repo", type=_PATH,
              help="Also write a Triton model repository here (trt: the engine; other targets: the ONNX graph, for "
                   "Triton's ONNX Runtime backend), its model named like the graph's folder: unet or transformer.")
@click.option("--dynamic-resolution", "dyn_res", metavar="MIN:MAX",
              help="Dynamic latent height and width, each in MIN..MAX (latent pixels, like quantize --resolution; "
                   "multiples of the model's step).")
@click.option("--dynamic-text-length", "dyn_text", metavar="MIN:MAX",
              help="Dynamic text length: encoder_hidden_states (and PixArt's text mask) take MIN..MAX tokens, not only "
                   "the calibration conditioning's count.")
@click.option("--cpu", type=click.Choice(CPU_CHOICES), default="auto", show_default=True,
              help="ort: CPUs the int8 graph is exact on. vnni: fastest, x86 with VNNI/AMX and ARM64 only; portable: "
                   "every CPU (x86 without VNNI too), slower; auto: this machine's.")
@click.option("--lora-slots", type=str, metavar="LORA_FILE|attention",
              help="Float LoRA branches whose matrices are graph inputs, on the layers of LORA_FILE (or on every "
                   "attention projection): load_runtime(E, lora=FILE) swaps adapters without re-exporting.")
@click.option("--pipeline", "pipeline", type=_PATH, metavar="MODEL_DIR",
              help="Also write the rest of this diffusers pipeline (the one quantized; Stable Diffusion, SD3, Flux) "
                   "beside the denoiser, in float, in optimum's ONNX layout: text encoders, VAE decoder/encoder, "
                   "tokenizers, scheduler, model_index.json (dqdeploy.load_pipeline runs it without PyTorch).")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
def export(source, out_dir, target, fp16, int4_linear, no_simplify, batch, cfg, timing_cache, workspace_gb, triton_repo,
           dyn_res, dyn_text, cpu, lora_slots, pipeline, overwrite) -> None:
    """Export a quantized artifact SOURCE to a QDQ ONNX graph of one layout and, for --target trt, a TensorRT engine."""
    from ..exporters.export import export as run_export
    from ..runtimes.spec import read_spec

    lo, opt, hi = batch_profile(batch)
    res_range = _range_option(dyn_res, "--dynamic-resolution", "latent sizes", "32:96")
    text_range = _range_option(dyn_text, "--dynamic-text-length", "text tokens", "64:333")
    run_export(source, out_dir, target=target, fp16=fp16, int4_linear=int4_linear, simplify=not no_simplify,
               overwrite=overwrite, batch=(lo, opt, hi), cfg=cfg, timing_cache=timing_cache, workspace_gb=workspace_gb,
               triton_repo=triton_repo, dynamic_resolution=res_range, cpu=cpu, lora_slots=lora_slots, pipeline=pipeline,
               dynamic_text_length=text_range)
    spec = read_spec(out_dir)
    fmt = f"; int8 format {spec.int8_format}: `dqdeploy inspect` says where it is exact" if spec.int8_format else ""
    click.echo(f"wrote {Path(out_dir) / spec.onnx_file} ({target}{fmt})")
    if target == "trt":
        click.echo(f"wrote {Path(out_dir) / spec.engine_file}")
    if triton_repo:
        click.echo(f"wrote {Path(triton_repo) / Path(spec.onnx_file).parent.name}")
    if pipeline:
        click.echo(f"wrote the pipeline beside it: {', '.join(spec.pipeline_parts)}, model_index.json")


def _range_option(text: str | None, option: str, unit: str, example: str) -> tuple[int, int] | None:
    """A ``MIN:MAX`` option's value (None when not given), or click's usage error."""
    from ..runtimes.dynamic import parse_range

    try:
        return None if text is None else parse_range(text)
    except ValueError:
        raise click.BadParameter(f"{text!r}: expected MIN:MAX {unit} with 1 <= MIN <= MAX, e.g. {example}",
                                 param_hint=option) from None
