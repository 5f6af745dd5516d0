"""LoRA on a quantized artifact without quantizing again: the float branch beside the quantized layers (swap on
and off bit for bit), the fold into a new artifact (`dqdeploy lora`), the file formats and their refusals."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from dqdeploy import W8A8, CalibrationConfig, export, load_quantized, quantize
from dqdeploy.core.errors import DQDeployError
from dqdeploy.io.artifact import load_calibration_inputs
from dqdeploy.io.lora import LoraError, read_lora
from dqdeploy.io.models import load_model
from dqdeploy.verify.check import check_export
from tests.helpers import (
    random_lora,
    tiny_cond_unet,
    write_bare_unet,
    write_cond_file,
    write_transformer_cond,
    write_transformer_pipeline,
)

PTQ = W8A8.replace(distill="none", fallback="none")
CALIB = CalibrationConfig(steps=4, samples=32, trajectories=8, batch_size=8, guidance=3.0)
UNET_LAYERS = ["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
               "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v",
               "up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0",
               "up_blocks.1.attentions.0.transformer_blocks.0.ff.net.2"]
# LoCon: a strided conv, a 1x1 shortcut, a 1x1 conv whose 1/s folds into its GroupNorm, a 3x3 after SiLU, the first
# layer; with two Linears
CONV_LAYERS = ["conv_in", "down_blocks.0.downsamplers.0.conv", "down_blocks.1.resnets.0.conv_shortcut",
               "up_blocks.1.attentions.0.proj_in", "mid_block.resnets.0.conv2"]
MIXED_LAYERS = CONV_LAYERS + UNET_LAYERS[:2]


@pytest.fixture(scope="module")
def unet_case(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    unet_dir, sched_dir = write_bare_unet(tiny_cond_unet(), root)
    cond = write_cond_file(root / "cond.safetensors")
    q = quantize(unet_dir, PTQ, CALIB, root / "q", scheduler_dir=sched_dir, cond_file=cond).path
    fp = load_model(unet_dir, scheduler_dir=sched_dir).denoiser
    lora = random_lora(fp, UNET_LAYERS, root / "style.safetensors")
    other = random_lora(fp, UNET_LAYERS[:2], root / "other.safetensors", seed=1)
    # the LoCon changes the output by about half (at 0.5 it changes it by 80%: its activations leave the ranges the
    # base model was calibrated on and clip, an error of the quantized model, not of the branch)
    adapters = {"linear": (lora, other, UNET_LAYERS),
                "conv": (random_lora(fp, MIXED_LAYERS, root / "locon.safetensors", seed=2, size=0.2),
                         random_lora(fp, MIXED_LAYERS[:3], root / "locon-other.safetensors", seed=3, size=0.2),
                         MIXED_LAYERS)}
    return {"root": root, "q": q, "fp": fp, "lora": lora, "other": other, "adapters": adapters,
            "inputs": load_calibration_inputs(q)}


def _run(model, inputs):
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _merged(fp, lora_path, scale=1.0):
    """The float model with the LoRA merged into its weights: the reference a quantized LoRA should match."""
    import copy

    merged = copy.deepcopy(fp)
    with torch.no_grad():
        for name, layer in read_lora(lora_path, fp).layers.items():
            merged.get_submodule(name).weight += layer.delta(scale)
    return merged


@pytest.mark.parametrize("adapter", ["linear", "conv"])
def test_branch_follows_the_float_model_with_the_lora(unet_case, adapter):
    fp, inputs = unet_case["fp"], unet_case["inputs"]
    lora = unet_case["adapters"][adapter][0]
    base_err = _rel(_run(load_quantized(unet_case["q"]), inputs), _run(fp, inputs))
    ref = _run(_merged(fp, lora, 0.8), inputs)
    assert _rel(ref, _run(fp, inputs)) > 2 * base_err  # the LoRA changes the output beyond quantization
    with_lora = load_quantized(unet_case["q"], lora=[(lora, 0.8)])
    assert _rel(_run(with_lora, inputs), ref) < 1.5 * base_err + 1e-3


def test_conv_branch_is_the_merged_conv(unet_case):
    """Per layer, exactly: the branch on a conv of each geometry equals the conv with the update merged."""
    fp = unet_case["fp"]
    adapter = read_lora(unet_case["adapters"]["conv"][0], fp)
    g = torch.Generator().manual_seed(0)
    for name in CONV_LAYERS:
        conv, layer = fp.get_submodule(name), adapter.layers[name]
        x = torch.randn(2, conv.in_channels, 8, 8, generator=g)
        merged = torch.nn.functional.conv2d(x, conv.weight + layer.delta(0.8), conv.bias, conv.stride, conv.padding,
                                            conv.dilation)
        with torch.no_grad():
            assert torch.allclose(conv(x) + layer.branch(x, 0.8), merged, atol=1e-5), name


def test_branches_swap_on_and_off_bit_for_bit(unet_case):
    inputs = unet_case["inputs"]
    model = load_quantized(unet_case["q"])
    plain = _run(model, inputs)
    from dqdeploy.io.lora import apply_lora

    branches = apply_lora(model, unet_case["lora"])
    styled = _run(model, inputs)
    branches.remove()
    assert torch.equal(_run(model, inputs), plain)
    other = apply_lora(model, [(unet_case["other"], 1.0)])
    assert not torch.equal(_run(model, inputs), styled) and not torch.equal(_run(model, inputs), plain)
    other.remove()
    again = apply_lora(model, unet_case["lora"])
    assert torch.equal(_run(model, inputs), styled)
    again.remove()


@pytest.mark.parametrize("adapter", ["linear", "conv"])
def test_fold_writes_a_plain_artifact_that_exports_and_checks(unet_case, tmp_path, adapter):
    q, (lora, _, layers) = unet_case["q"], unet_case["adapters"][adapter]
    proc = subprocess.run([sys.executable, "-m", "dqdeploy", "lora", str(q), str(lora), "--scale", "0.8",
                           "--out", str(tmp_path / "q2")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    manifest = json.loads((tmp_path / "q2" / "manifest.json").read_text())
    assert manifest["lora"] == [{"file": lora.name, "sha256": read_lora(lora, unet_case["fp"]).sha256,
                                 "scale": 0.8, "layers": len(layers)}]
    assert "quality" in json.loads((q / "manifest.json").read_text()) and "quality" not in manifest  # not its figure
    before, after = load_file(str(q / "model.safetensors")), load_file(str(tmp_path / "q2" / "model.safetensors"))
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and {k.rsplit(".", 2)[0] if "weight_quantizer" in k else k.rsplit(".", 1)[0] for k in changed} \
        <= set(layers)  # only the adapted layers' integers and weight step sizes
    inputs = unet_case["inputs"]
    branch = _run(load_quantized(q, lora=[(lora, 0.8)]), inputs)
    folded = _run(load_quantized(tmp_path / "q2"), inputs)
    ref = _run(_merged(unet_case["fp"], lora, 0.8), inputs)
    assert _rel(folded, ref) < 2 * _rel(branch, ref) + 1e-3  # folding costs no more than the branch, give or take
    out = export(tmp_path / "q2", tmp_path / "e", target="ort")
    assert check_export(tmp_path / "q2", out).ok


def test_formats_read_the_same_adapter(unet_case, tmp_path):
    fp = unet_case["fp"]
    peft = read_lora(random_lora(fp, UNET_LAYERS[:1], tmp_path / "a.safetensors", alpha=1.0), fp)
    layer = UNET_LAYERS[0]
    raw = load_file(str(tmp_path / "a.safetensors"))
    down, up = raw[f"unet.{layer}.lora_A.weight"], raw[f"unet.{layer}.lora_B.weight"]
    attn, proj = layer.rsplit(".", 1)
    old = {f"unet.{attn}.processor.{proj}_lora.down.weight": down, f"unet.{attn}.processor.{proj}_lora.up.weight": up,
           f"unet.{attn}.processor.{proj}_lora.down.weight.alpha": torch.tensor(1.0)}
    save_file(old, str(tmp_path / "old.safetensors"))
    kohya_name = "lora_unet_" + layer.replace(".", "_")
    save_file({f"{kohya_name}.lora_down.weight": down, f"{kohya_name}.lora_up.weight": up,
               f"{kohya_name}.alpha": torch.tensor(1.0)}, str(tmp_path / "kohya.safetensors"))
    for path in (tmp_path / "old.safetensors", tmp_path / "kohya.safetensors"):
        other = read_lora(path, fp)
        assert set(other.layers) == {layer}
        assert torch.allclose(other.layers[layer].delta(), peft.layers[layer].delta())
    assert peft.layers[layer].alpha_scale == 0.5  # alpha 1 over rank 2


@pytest.mark.parametrize("layer", ["down_blocks.0.downsamplers.0.conv", "up_blocks.1.attentions.0.proj_in"])
def test_conv_formats_read_the_same_adapter(unet_case, tmp_path, layer):
    fp = unet_case["fp"]
    peft = read_lora(random_lora(fp, [layer], tmp_path / "a.safetensors", alpha=1.0), fp).layers[layer]
    assert peft.conv is not None and peft.down.dim() == 4 and peft.up.dim() == 2
    raw = load_file(str(tmp_path / "a.safetensors"))
    down, up = raw[f"unet.{layer}.lora_A.weight"], raw[f"unet.{layer}.lora_B.weight"]
    kohya_name = "lora_unet_" + layer.replace(".", "_")
    files = {"kohya": {f"{kohya_name}.lora_down.weight": down, f"{kohya_name}.lora_up.weight": up,
                       f"{kohya_name}.alpha": torch.tensor(1.0)},
             "old": {f"unet.{layer}.lora.down.weight": down, f"unet.{layer}.lora.up.weight": up,
                     f"unet.{layer}.lora.down.weight.alpha": torch.tensor(1.0)}}
    if down.shape[2:] == (1, 1):  # a 1x1 conv's adapter stored as matrices
        files["matrices"] = {f"unet.{layer}.lora_A.weight": down[:, :, 0, 0],
                             f"unet.{layer}.lora_B.weight": up[:, :, 0, 0], f"unet.{layer}.alpha": torch.tensor(1.0)}
    for name, tensors in files.items():
        other = read_lora(_save(tmp_path / f"{name}.safetensors", tensors), fp).layers
        assert set(other) == {layer}, name
        assert torch.equal(other[layer].delta(), peft.delta()) and other[layer].conv == peft.conv, name


def _save(path, tensors):
    save_file(tensors, str(path))
    return path


BAD_FILES = {
    "pickle": (lambda p: p.with_suffix(".bin").write_bytes(b"pickle") and p.with_suffix(".bin"), "safetensors"),
    "missing": (lambda p: p.with_suffix(".missing.safetensors"), "no such file"),
    "norm": (lambda p: _save(p, {"unet.conv_norm_out.lora_A.weight": torch.ones(2, 16),
                                 "unet.conv_norm_out.lora_B.weight": torch.ones(16, 2)}), "not a Linear or Conv2d"),
    "conv kernel": (lambda p: _save(p, {"unet.conv_in.lora_A.weight": torch.ones(2, 4, 1, 1),
                                        "unet.conv_in.lora_B.weight": torch.ones(16, 2, 1, 1)}), r"\[r, in, kh, kw\]"),
    "conv up": (lambda p: _save(p, {"unet.conv_in.lora_A.weight": torch.ones(2, 4, 3, 3),
                                    "unet.conv_in.lora_B.weight": torch.ones(16, 2, 3, 3)}), "do not make"),
    "foreign layer": (lambda p: _save(p, {"unet.not.a.layer.lora_A.weight": torch.ones(2, 4),
                                          "unet.not.a.layer.lora_B.weight": torch.ones(4, 2)}),
                      "not a layer of this model"),
    "unknown keys": (lambda p: _save(p, {"unet.x.weird": torch.ones(1)}), "no known LoRA format"),
    "text encoder only": (lambda p: _save(p, {"text_encoder.x.lora_A.weight": torch.ones(1, 1)}),
                          "no layer of the denoiser"),
    "half": (lambda p: _save(p, {f"unet.{UNET_LAYERS[0]}.lora_A.weight": torch.ones(2, 16)}), "no up"),
    "nan": (lambda p: _save(p, {f"unet.{UNET_LAYERS[0]}.lora_A.weight": torch.full((2, 16), float("nan")),
                                f"unet.{UNET_LAYERS[0]}.lora_B.weight": torch.ones(16, 2)}), "NaN"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_lora_files_are_refused(unet_case, tmp_path, case):
    make, match = BAD_FILES[case]
    path = make(tmp_path / "l.safetensors")
    with pytest.raises(LoraError, match=match):
        read_lora(path, unet_case["fp"])
    proc = subprocess.run([sys.executable, "-m", "dqdeploy", "lora", str(unet_case["q"]), str(path), "--out",
                           str(tmp_path / "q2")], capture_output=True, text=True)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr and "error:" in proc.stderr
    assert not (tmp_path / "q2").exists()


def test_a_lora_of_a_grouped_conv_is_refused(tmp_path):
    model = torch.nn.Module()
    model.add_module("dw", torch.nn.Conv2d(8, 8, 3, padding=1, groups=8))
    path = _save(tmp_path / "dw.safetensors", {"unet.dw.lora_A.weight": torch.ones(2, 1, 3, 3),
                                               "unet.dw.lora_B.weight": torch.ones(8, 2, 1, 1)})
    with pytest.raises(LoraError, match="groups=8"):
        read_lora(path, model)


def test_a_lora_of_another_shape_and_bad_arguments_are_refused(unet_case, tmp_path):
    fp = unet_case["fp"]
    path = tmp_path / "s.safetensors"
    save_file({f"unet.{UNET_LAYERS[0]}.lora_A.weight": torch.ones(2, 7),
               f"unet.{UNET_LAYERS[0]}.lora_B.weight": torch.ones(16, 2)}, str(path))
    with pytest.raises(LoraError, match="do not make"):
        read_lora(path, fp)
    with pytest.raises(DQDeployError, match="expected FILE"):
        load_quantized(unet_case["q"], lora=[(unet_case["lora"], "strong")])
    proc = subprocess.run([sys.executable, "-m", "dqdeploy", "lora", str(unet_case["q"]), str(unet_case["lora"]),
                           "--out", str(unet_case["q"])], capture_output=True, text=True)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr  # never over its own input
    assert (unet_case["q"] / "manifest.json").is_file()


def test_transformer_branch_follows_the_float_model(tmp_path):
    folder = write_transformer_pipeline("sd3", tmp_path / "sd3")
    cond = write_transformer_cond(tmp_path / "cond.safetensors")
    q = quantize(folder, PTQ, CalibrationConfig(steps=4, samples=16, trajectories=4, batch_size=4, guidance=2.0),
                 tmp_path / "q", cond_file=cond).path
    fp = load_model(folder).denoiser
    layers = ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.add_k_proj",
              "transformer_blocks.1.ff.net.2"]
    layers = [n for n in layers if isinstance(getattr(fp.get_submodule(n), "weight", None), torch.Tensor)]
    lora = random_lora(fp, layers, tmp_path / "l.safetensors", prefix="transformer", size=2.0)
    inputs = load_calibration_inputs(q)
    base_err = _rel(_run(load_quantized(q), inputs), _run(fp, inputs))
    ref = _run(_merged(fp, lora), inputs)
    assert _rel(ref, _run(fp, inputs)) > 2 * base_err
    assert _rel(_run(load_quantized(q, lora=lora), inputs), ref) < 1.5 * base_err + 1e-3


@pytest.mark.parametrize("target,adapter", [("ort", "linear"), ("onnx", "linear"), ("ort", "conv"), ("onnx", "conv")])
def test_graph_slots_swap_adapters_without_re_export(unet_case, tmp_path, target, adapter):
    from dqdeploy import load_runtime
    from dqdeploy.exporters.lint import lint_path
    from dqdeploy.runtimes.spec import read_spec

    q, (lora, other, layers) = unet_case["q"], unet_case["adapters"][adapter]
    plain = load_runtime(export(q, tmp_path / "plain", target=target))
    e = export(q, tmp_path / "slots", target=target, lora_slots=lora)
    spec = read_spec(e)
    assert [s["layer"] for s in spec.lora_slots] == sorted(layers)
    assert {s["layer"] for s in spec.lora_slots if "conv" in s} == set(layers) & set(CONV_LAYERS)
    assert not any(t.name.startswith("lora/") for t in spec.inputs)  # the denoiser's own inputs are unchanged
    if target == "onnx":
        assert lint_path(e / "unet" / "model.onnx") == []  # the float branch keeps TensorRT's rules
        _profile_covers_the_slots(e, spec)
    inputs = {k: v[:4] for k, v in unet_case["inputs"].items()}
    runtime = load_runtime(e)
    without = _run(runtime, inputs)
    assert torch.allclose(without, _run(plain, inputs), atol=1e-5)  # empty slots add nothing
    runtime.set_lora([(lora, 0.8)])
    styled = _run(runtime, inputs)
    branch = _run(load_quantized(q, lora=[(lora, 0.8)]), inputs)
    graph_err = _rel(without, _run(load_quantized(q), inputs))  # the graph vs its simulation, without a LoRA
    assert _rel(styled, without) > 2 * graph_err and _rel(styled, branch) < 2 * graph_err + 1e-3
    runtime.set_lora(other)
    assert not torch.equal(_run(runtime, inputs), styled)
    runtime.set_lora([(other, 0.5), (lora, 0.8)])  # two adapters at once: their ranks stacked
    assert not torch.equal(_run(runtime, inputs), styled)
    runtime.set_lora([(lora, 0.8)])
    assert torch.equal(_run(runtime, inputs), styled)  # swapping back restores the outputs bit for bit
    runtime.set_lora(None)
    assert torch.equal(_run(runtime, inputs), without)
    assert check_export(q, e, lora=[(lora, 0.8)]).ok
    assert check_export(q, e).ok
    if adapter == "conv" and target == "ort":  # the CLI's --lora too; a Triton model serves the slots' inputs
        proc = subprocess.run([sys.executable, "-m", "dqdeploy", "check", str(q), str(e), "--lora", str(lora)],
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-2000:]
        from dqdeploy.exporters.triton import write_triton_repo

        config = (write_triton_repo(e, tmp_path / "repo") / "config.pbtxt").read_text()
        slot = next(s for s in spec.lora_slots if "conv" in s)
        (kh, kw), c_in = slot["conv"]["kernel"], slot["in"]
        assert f'name: "{slot["down"]}"\n    data_type: TYPE_FP32\n    dims: [ -1, {c_in}, {kh}, {kw} ]' in config
        assert config.count('name: "lora/') == 2 * len(layers)


def _profile_covers_the_slots(e, spec):
    """The TensorRT engine's profile (checkable without TensorRT): every slot input of the graph, its fixed dims as the
    graph's, its rank dim over (1, 16, 64)."""
    import onnx

    from dqdeploy.exporters.engine import profile_shapes

    profile = profile_shapes(spec, batch=(1, 2, 4))
    graph = onnx.load(str(e / "unet" / "model.onnx"), load_external_data=False).graph
    slot_inputs = {i.name: [d.dim_value or d.dim_param for d in i.type.tensor_type.shape.dim]
                   for i in graph.input if i.name.startswith("lora/")}
    assert set(slot_inputs) == {n for s in spec.lora_slots for n in (s["down"], s["up"])} <= set(profile)
    for name, dims in slot_inputs.items():
        lo, opt, hi = profile[name]
        assert [isinstance(d, str) for d in dims].count(True) == 1, name  # the rank only
        for axis, d in enumerate(dims):
            assert (lo[axis], opt[axis], hi[axis]) == ((1, 16, 64) if isinstance(d, str) else (d, d, d)), name


def test_the_trt_graph_with_conv_slots_keeps_tensorrt_rules(unet_case, tmp_path):
    """The graph step of ``export --target trt --lora-slots`` (FP16 TensorRT layout, no TensorRT needed): lint-clean,
    and the engine profile covers its slot inputs; ONNX Runtime runs its FP16 float branches."""
    from dqdeploy import load_runtime
    from dqdeploy.exporters.export import trt_graph
    from dqdeploy.exporters.lint import lint_path
    from dqdeploy.runtimes.spec import read_spec

    lora = unet_case["adapters"]["conv"][0]
    e = trt_graph(unet_case["q"], tmp_path / "trt", lora_slots=lora)
    spec = read_spec(e)
    assert spec.precision == "fp16" and len(spec.lora_slots) == len(MIXED_LAYERS)
    assert lint_path(e / "unet" / "model.onnx") == []
    _profile_covers_the_slots(e, spec)
    runtime, inputs = load_runtime(e), {k: v[:2] for k, v in unet_case["inputs"].items()}
    without = _run(runtime, inputs)
    runtime.set_lora(lora)
    assert torch.isfinite(_run(runtime, inputs)).all() and not torch.equal(_run(runtime, inputs), without)


def test_slot_refusals(unet_case, tmp_path):
    from dqdeploy import load_runtime
    from dqdeploy.core.errors import ExportError
    from dqdeploy.exporters.engine import profile_shapes
    from dqdeploy.runtimes.spec import read_spec

    q, fp = unet_case["q"], unet_case["fp"]
    one = random_lora(fp, UNET_LAYERS[:1], tmp_path / "one.safetensors")
    e = export(q, tmp_path / "e", target="ort", lora_slots=one)
    with pytest.raises(LoraError, match="no LoRA slot"):
        load_runtime(e, lora=unet_case["lora"])  # adapts layers the export has no slot for
    with pytest.raises(DQDeployError, match="no LoRA slots"):
        load_runtime(export(q, tmp_path / "plain", target="ort"), lora=unet_case["lora"])
    if importlib.util.find_spec("tensorrt") is None:  # the engine with slots needs TensorRT, checked first
        with pytest.raises(DQDeployError, match="TensorRT"):
            export(q, tmp_path / "t", target="trt", lora_slots=unet_case["lora"])
        assert not (tmp_path / "t").exists()
    with pytest.raises(ExportError, match="lora_rank"):
        profile_shapes(read_spec(e), lora_rank=(0, 16, 64))
    proc = subprocess.run([sys.executable, "-m", "dqdeploy", "export", str(q), "--out", str(tmp_path / "x"),
                           "--lora-slots", str(tmp_path / "missing.safetensors")], capture_output=True, text=True)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr and not (tmp_path / "x").exists()
