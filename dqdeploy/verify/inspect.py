"""What `dqdeploy inspect` prints: a short description of an artifact or an export folder."""

from __future__ import annotations

from pathlib import Path

from ..core.errors import DQDeployError


def describe(path: Path, *, as_json: bool = False) -> str:
    """Describe the quantized artifact or export folder at ``path`` (its raw metadata with ``as_json``)."""
    from ..stages.sources import detect

    kind = detect(path)
    if kind == "quantized":
        return _describe_artifact(path, as_json)
    if kind == "export":
        return _describe_export(path, as_json)
    raise DQDeployError(f"{path} is neither a quantized artifact nor an export folder",
                        hint="inspect takes the --out folder of `dqdeploy quantize` or `dqdeploy export`")


def _describe_artifact(path: Path, as_json: bool) -> str:
    from ..io.artifact import read_manifest, verify_files

    m = read_manifest(path)
    verify_files(path, m)  # a corrupted artifact must not be described as if it were sound
    if as_json:
        return m.to_json()
    r, c = m.recipe, m.calibration
    bits: dict[int, int] = {}
    for meta in m.layers.values():
        bits[meta.weight_bits] = bits.get(meta.weight_bits, 0) + 1
    folds = sum(1 for meta in m.layers.values() if meta.fold != "mul")
    lines = [
        f"quantized artifact  {path}",
        f"  model            {m.model_class} (dqdeploy {m.dqdeploy_version}, format v{m.format_version})",
        f"  recipe           {r.name}: W{r.weight_bits}A{r.act_bits} "
        f"{'symmetric' if r.act_symmetric else 'asymmetric'} activations, scaling={r.scaling}, "
        f"timestep scales={r.timestep_scales}, distill={r.distill}, layout={r.layout}",
        f"  calibration      {c['scheduler']} x {c['steps']} steps"
        + ("" if len(m.timesteps) == c["steps"] else f" ({len(m.timesteps)} denoiser calls)")
        + f", {c['samples']} samples, seed {c['seed']}",
        f"  timesteps        {timesteps_text(m.timesteps)}",
        f"  layers           {len(m.layers)} ({', '.join(f'{v} at {k}-bit' for k, v in sorted(bits.items()))}); "
        f"1/s folds into a norm for {folds}",
        f"  fallback         {', '.join(m.fallback) if m.fallback else 'none'} "
        f"(recipe fallback={r.fallback}; kept in float in both graphs)",
        f"  attention        {_attention_text(m.attention)}",
    ]
    lines.append(_weights_line(path, m.format_version))
    if m.blocks:
        worst = max(m.blocks, key=lambda b: b["loss_after"])
        lines.append(f"  distillation     {len(m.blocks)} blocks; worst {worst['name']} MSE {worst['loss_after']:.3e}")
    lines.append(_quality_line(m.quality))
    return "\n".join(lines)


def _attention_text(names: list[str]) -> str:
    """Which attention matmuls run on integers."""
    if not names:
        return "float (q k^T and softmax x v in float; quantize --attention int8 to quantize them)"
    return (f"int8: both batched matmuls of {len(names)} attention modules on integers "
            "(q, k, v per step; softmax output on the grid k/127)")


def _quality_line(quality: dict | None) -> str:
    """The quantize stage's closing quality check, as the manifest records it."""
    if not quality:
        return "  quality          not recorded (quantized before the check existed, or with --no-quality-check)"
    from ..stages.quality_risk import quality_text

    verdict = " -- AT RISK: try " + quality["next_step"] if quality.get("at_risk") else ""
    return f"  quality          {quality_text(quality)}{verdict}"


def timesteps_text(timesteps: list[float], shown: int = 6) -> str:
    """The calibrated timesteps, each value once (PNDM calls the denoiser twice at one timestep: the
    manifest keeps a row per call), the repeated ones named."""
    unique = list(dict.fromkeys(timesteps))  # sampling order
    if not unique:
        return "none recorded"
    values = ", ".join(f"{t:g}" for t in unique[:shown]) + (", ..." if len(unique) > shown else "")
    text = f"{len(unique)} calibrated ({values})"
    repeated = [t for t in unique if timesteps.count(t) > 1]
    if repeated:
        text += (f"; {len(timesteps)} denoiser calls: the sampler calls it more than once at "
                 + ", ".join(f"{t:g}" for t in repeated))
    return text


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def _weights_line(path: Path, version: int) -> str:
    from ..io.artifact import WEIGHTS
    from ..io.storage import file_header, weight_bytes

    sizes = weight_bytes(file_header(path / WEIGHTS))
    if version < 2:
        return (f"  weights          {WEIGHTS} {_mb(sum(sizes.values()))}, "
                "float (format v1; re-quantize for integer storage)")
    fp32 = 4 * sizes["int8"] + 8 * sizes["int4"] + sizes["float"]  # float tensors as stored (float32)
    return (f"  weights          {WEIGHTS} {_mb(sum(sizes.values()))}: 8-bit integers {_mb(sizes['int8'])}, "
            f"4-bit packed {_mb(sizes['int4'])}, float {_mb(sizes['float'])} (about {_mb(fp32)} as float32)")


def _describe_export(path: Path, as_json: bool) -> str:
    from ..runtimes.spec import read_spec

    spec = read_spec(path)
    if as_json:
        return spec.to_json()
    lines = [
        f"export folder  {path}",
        f"  target       {spec.target} ({spec.precision}, opset {spec.opset}), model {spec.model_class}",
        *(f"  {t.name:<22} {t.dtype} {t.shape}" for t in spec.inputs + spec.outputs),
        f"  timesteps    {timesteps_text(spec.timesteps)}",
    ]
    if spec.recipe is not None and spec.layout is not None:
        lines.append("  attention    " + ("int8: Q/DQ in front of both batched matmuls of every quantized attention"
                                          if spec.recipe.attention == "int8" else "float"))
    ranges = [f"{what} {r[0]}..{r[1]}{unit}" for what, r, unit in (("latent H/W", spec.resolution_range, " pixels"),
                                                                   ("text", spec.text_length_range, " tokens")) if r]
    if ranges:  # --dynamic-resolution, --dynamic-text-length: what the runtime takes
        lines.append(f"  dynamic      {', '.join(ranges)}")
    if spec.pipeline_parts:  # exported with --pipeline
        lines.append(f"  pipeline     {', '.join(spec.pipeline_parts)} "
                     "(float; dqdeploy.load_pipeline runs it prompt to image)")
    return "\n".join(lines + _int8_lines(spec))


def _int8_lines(spec) -> list[str]:
    """Which CPUs the graph's integer kernels are exact on, and whether this one is among them."""
    from ..system.cpu import cpu_info, exact_on

    fmt = spec.weight_format
    if fmt is None:
        return ["  int8 kernels none on ONNX Runtime (" + ("float graph)" if spec.layout is None else
                                                          "TensorRT layout: ONNX Runtime runs its Q/DQ as float math)")]
    info = cpu_info()
    verdict = "exact" if info.exact(fmt) else "NOT exact (re-export with --cpu portable)"
    recorded = "" if spec.int8_format else " (exported before the format was recorded)"
    return [f"  int8 format  {fmt}{recorded}: exact on {exact_on(fmt)}",
            f"  this CPU     {info.model} ({' '.join(info.flags) or 'no int8 flags'}; {info.int8_class}): {verdict}"]
