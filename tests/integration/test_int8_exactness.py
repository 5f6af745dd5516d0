"""ONNX Runtime's integer kernels against exact integer arithmetic, on this machine and on an emulated AVX2 CPU
without VNNI (qemu-user, where installed), and the exported ORT graph in each int8 format end to end."""

from __future__ import annotations

import json
import platform
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from dqdeploy import export, quantize
from dqdeploy.core.recipe import W8A8, CalibrationConfig
from dqdeploy.exporters.export import resolve_format
from dqdeploy.io.artifact import read_manifest
from dqdeploy.quant.modules import quant_layers
from dqdeploy.runtimes.spec import ONNX_FILE, read_spec
from dqdeploy.system.cpu import EXACT_S8_MAX, cpu_info
from dqdeploy.verify.check import check_export
from dqdeploy.verify.int8_probe import ATTENTION_PROBES, PROBES, probe, probe_attention
from tests.helpers import tiny_unet, write_pipeline

QEMU = shutil.which("qemu-x86_64")
EMULATED = "Haswell"  # AVX2 and FMA, no AVX-512, no VNNI: ORT's u8s8 kernel is vpmaddubsw there


@pytest.mark.parametrize("op", list(PROBES))
def test_integer_ops_are_exact_here_in_the_formats_export_picks(op):
    for fmt in sorted({resolve_format("auto"), "portable"}):
        result = probe(op, fmt)
        assert result.fused == PROBES[op][0], f"ORT did not fuse the {op} pattern into {PROBES[op][0]}"
        assert result.exact, f"{result} on {cpu_info().as_dict()}: the {fmt} format is not exact on this CPU"


@pytest.mark.parametrize("product", ATTENTION_PROBES)
def test_attention_products_are_exact_here_in_the_formats_export_picks(product):
    """Quantized attention's q x k^T and softmax x v (both operands activations) as ORT runs them."""
    for fmt in sorted({resolve_format("auto"), "portable"}):
        result = probe_attention(product, fmt)
        assert result.fused == "MatMulIntegerToFloat", result
        assert result.exact, f"{result} on {cpu_info().as_dict()}: the {fmt} format is not exact on this CPU"


def _emulated(code: str) -> dict:
    """The JSON ``code`` prints as its last line, run by this Python on the emulated CPU."""
    run = subprocess.run([QEMU, "-cpu", EMULATED, sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(QEMU is None or platform.machine() != "x86_64",
                    reason="needs qemu-user (apt-get install qemu-user) on x86-64")
def test_emulated_cpu_without_vnni_runs_quantized_attention_exactly_in_the_portable_format():
    """Without VNNI, q (uint8) x k^T (full-range int8) saturates; the portable format's uint8 k does not, and the
    softmax output's grid [0, 127] keeps p x v exact with any int8 v in both formats."""
    code = ("import json; from dqdeploy.verify.int8_probe import ATTENTION_PROBES, probe_attention; "
            "print(json.dumps({p: [probe_attention(p, f).mismatch for f in ('vnni', 'portable')] "
            "for p in ATTENTION_PROBES}))")
    found = _emulated(code)
    assert found["scores"][1] == 0.0 and found["scores"][0] > 0.1, found  # the emulation saturates: can fail
    assert found["mix"] == [0.0, 0.0], found


@pytest.mark.skipif(QEMU is None or platform.machine() != "x86_64",
                    reason="needs qemu-user (apt-get install qemu-user) on x86-64")
def test_emulated_cpu_without_vnni():
    """On an emulated Haswell, the full-range int8 format saturates (the bug this guards against) while
    the portable format stays exact, and the CPU is classified as such."""
    code = ("import json; from dqdeploy.system.cpu import cpu_info; "
            "from dqdeploy.verify.int8_probe import PROBES, probe; "
            "print(json.dumps({'class': cpu_info().int8_class, 'flags': cpu_info().flags, "
            "'probes': {op: [probe(op, 'portable').mismatch, probe(op, 'vnni').mismatch, "
            "probe(op, 'vnni', weight_range=64).mismatch] "
            "for op in PROBES}}))")
    found = _emulated(code)
    assert found["class"] == "avx2" and "avx512_vnni" not in found["flags"]
    for op, (portable, full_range, seven_bit) in found["probes"].items():
        assert portable == 0.0 and seven_bit == 0.0, (op, found)
        assert full_range > 0.1, (op, found)  # the emulation reproduces the saturation: this test can fail


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    root = tmp_path_factory.mktemp("int8")
    write_pipeline(tiny_unet(), root / "pipe")
    calib = CalibrationConfig(steps=4, samples=32, trajectories=8, batch_size=8)
    return quantize(root / "pipe", W8A8.replace(iters=5, batch_size=16, fallback="none"), calib, root / "q").path


def _weights(path) -> list[np.ndarray]:
    """The stored weight integers of every quantized layer of an exported graph."""
    model = onnx.load(str(path / ONNX_FILE))
    return [numpy_helper.to_array(t) for t in model.graph.initializer
            if t.name.startswith("dq/") and t.name.rsplit("/", 1)[-1].startswith(("weight_int8", "weight_uint8"))]


@pytest.mark.parametrize("cpu", ["portable", "vnni", "auto"])
def test_export_records_and_emits_its_format(artifact, cpu, tmp_path):
    out = export(artifact, tmp_path / cpu, target="ort", cpu=cpu)
    spec = read_spec(out)
    assert spec.int8_format == resolve_format(cpu)
    weights = _weights(out)
    assert weights
    if spec.int8_format == "portable":  # no int8 weight can saturate the u8s8 kernel of any CPU
        assert all(w.dtype == np.uint8 or np.abs(w.astype(np.int64)).max() <= EXACT_S8_MAX for w in weights)
        assert any(w.dtype == np.uint8 for w in weights)  # W8A8 weights reach 127: those layers go u8u8
    else:
        assert all(w.dtype == np.int8 for w in weights)
    if not cpu_info().exact(spec.int8_format):  # e.g. the vnni format on an AVX2-only CPU: the guard refuses
        from dqdeploy.core.errors import CpuFormatError

        with pytest.raises(CpuFormatError, match="has no VNNI"):
            check_export(artifact, out, per_layer=True)
        return
    result = check_export(artifact, out, per_layer=True)
    assert result.ok, result.table()


def test_cpu_format_is_for_the_ort_target_only(artifact, tmp_path):
    from dqdeploy.core.errors import ExportError

    with pytest.raises(ExportError, match="--cpu portable applies to --target ort"):
        export(artifact, tmp_path / "e", target="onnx", cpu="portable")
    with pytest.raises(ExportError, match="unknown --cpu"):
        export(artifact, tmp_path / "e", target="ort", cpu="avx9")  # type: ignore[arg-type]
    assert not (tmp_path / "e").exists()


def test_w7a8_is_exact_everywhere_whatever_cpu_says(tmp_path):
    """7-bit weights never leave [-64, 64]: the graph is portable even when exported with --cpu vnni, all int8 (the fast
    u8s8 kernels), and it agrees with its simulation; the artifact round-trips its 7-bit integers."""
    from dqdeploy import load_quantized
    from dqdeploy.core.recipe import W7A8

    write_pipeline(tiny_unet(), tmp_path / "pipe")
    calib = CalibrationConfig(steps=4, samples=32, trajectories=8, batch_size=8)
    q = quantize(tmp_path / "pipe", W7A8.replace(iters=5, batch_size=16, fallback="none"), calib, tmp_path / "q").path
    sim = load_quantized(q)
    assert all(m.weight_bits == 7 for m in read_manifest(q).layers.values())
    assert all(int(layer.weight_quantizer.integers(layer.weight).abs().max()) <= 64
               for layer in quant_layers(sim.denoiser).values())
    out = export(q, tmp_path / "e", target="ort", cpu="vnni")
    assert read_spec(out).int8_format == "portable"
    weights = _weights(out)
    assert weights and all(w.dtype == np.int8 and np.abs(w.astype(np.int64)).max() <= EXACT_S8_MAX for w in weights)
    assert check_export(q, out).ok
