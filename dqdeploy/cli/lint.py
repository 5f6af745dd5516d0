"""``dqdeploy lint``: an exported graph against TensorRT's explicit-quantization rules."""

from __future__ import annotations

from pathlib import Path

import click

from ..core.errors import DQDeployError


@click.command()
@click.argument("export_dir", type=click.Path(path_type=Path))
def lint(export_dir) -> None:
    """Check an exported graph against TensorRT's explicit-quantization rules (no TensorRT needed).

    Q/DQ in front of attention's batched matmuls pass only where the export's recipe quantizes attention
    (`quantize --attention int8`); then both matmuls of each attention must have them on both inputs."""
    from ..exporters.lint import lint_path
    from ..runtimes.spec import ONNX_FILE, SPEC_FILE, read_spec

    path = onnx_path = Path(export_dir)
    int8_attention = False
    if path.is_dir() and (path / SPEC_FILE).is_file():
        spec = read_spec(path)  # a missing, truncated or replaced graph is reported as corrupt
        if spec.target != "onnx":
            raise DQDeployError(
                f"{path} is a {spec.target!r} export; lint checks TensorRT's rules, "
                "which apply to TensorRT-layout graphs only",
                hint="lint the --out folder of `dqdeploy export --target onnx` (or trt)")
        onnx_path = path / spec.onnx_file
        int8_attention = spec.recipe is not None and spec.recipe.attention == "int8"
    elif path.is_dir():
        onnx_path = path / ONNX_FILE
    if not onnx_path.is_file():
        raise DQDeployError(f"{onnx_path} not found", hint="pass the --out folder of `dqdeploy export --target onnx`")
    violations = lint_path(onnx_path, allow_attention_qdq=int8_attention)  # the recipe asked for int8 attention
    for v in violations:
        click.echo(f"{v.rule}: {v.node}: {v.message}")
    if violations:
        raise DQDeployError(f"{len(violations)} TensorRT rule violation(s) in {onnx_path}")
    click.echo(f"{onnx_path}: passes every TensorRT rule check")
