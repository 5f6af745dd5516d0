"""The int8 exactness model, independent of this machine's ISA: a numpy reference of AVX2's saturating u8s8
kernel (vpmaddubsw), the bound every weight the exporter emits as int8 must meet, the CPU classes, and the
runtime guard's decisions for each class."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from dqdeploy.core.errors import CpuFormatError
from dqdeploy.exporters.qdq import UINT8_ZERO_POINT, SurgeryOptions, stored_weight
from dqdeploy.runtimes import session as session_runtime
from dqdeploy.runtimes.spec import ExportSpec
from dqdeploy.system.cpu import EXACT_S8_MAX, CpuInfo, cpu_info, maddubs_sum, pair_bound, s8_exact_anywhere

AVX2 = CpuInfo("Haswell-like", "x86_64", ("avx2",), "test")
AVX512_NO_VNNI = CpuInfo("Skylake-X-like", "x86_64", ("avx2", "avx512f"), "test")
VNNI = CpuInfo("Zen4-like", "x86_64", ("avx2", "avx512f", "avx512_vnni"), "test")
AVX_VNNI = CpuInfo("Alder-Lake-like", "x86_64", ("avx2", "avx_vnni"), "test")
ARM = CpuInfo("Neoverse-like", "aarch64", ("asimddp",), "test")
SSE = CpuInfo("old x86", "x86_64", (), "test")


def exact(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    return x.astype(np.int64) @ w.astype(np.int64)


def test_reference_kernel_saturates_full_range_int8_weights():
    x = np.full((1, 4), 255, np.uint8)
    w = np.full((4, 1), 127, np.int8)
    assert exact(x, w)[0, 0] == 4 * 255 * 127
    assert maddubs_sum(x, w)[0, 0] == 2 * 32767  # each pair clipped to int16
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(8, 64)).astype(np.uint8)
    w = rng.integers(-127, 128, size=(64, 16)).astype(np.int8)
    assert (maddubs_sum(x, w) != exact(x, w)).mean() > 0.3  # as ORT on AVX2 without VNNI (74-79% measured)


@pytest.mark.parametrize("k", [63, 64])  # odd K pads a zero pair
def test_reference_kernel_is_exact_for_weights_within_64(k):
    rng = np.random.default_rng(1)
    for x, w in (
        (rng.integers(0, 256, size=(16, k)), rng.integers(-EXACT_S8_MAX, EXACT_S8_MAX + 1, size=(k, 8))),
        (np.full((2, k), 255), np.full((k, 2), EXACT_S8_MAX)),  # the corners of the bilinear pair sum
        (np.full((2, k), 255), np.full((k, 2), -EXACT_S8_MAX)),
    ):
        assert np.array_equal(maddubs_sum(x.astype(np.uint8), w.astype(np.int8)), exact(x, w))


def test_bound_is_tight_at_64():
    assert s8_exact_anywhere(np.array([64, -64])) and pair_bound(np.array([64, -64])) == (-32640, 32640)
    assert not s8_exact_anywhere(np.array([65])) and not s8_exact_anywhere(np.array([-65]))
    x = np.full((1, 2), 255, np.uint8)
    assert maddubs_sum(x, np.full((2, 1), 65, np.int8))[0, 0] != exact(x, np.full((2, 1), 65))[0, 0]


@pytest.mark.parametrize("layout, fmt", [("ort", "portable"), ("ort", "vnni"), ("trt", "portable")])
@pytest.mark.parametrize("reach", [8, 64, 127])  # 4-bit weights, 7-bit weights, full-range int8
def test_exporter_never_emits_saturating_int8_for_the_portable_format(layout, fmt, reach):
    rng = np.random.default_rng(reach)
    w = rng.integers(-reach, reach + 1, size=(32, 48))
    w[0, 0] = reach
    stored, zp = stored_weight(w, SurgeryOptions(layout=layout, int8_format=fmt))
    assert np.array_equal(stored.astype(np.int64) - zp, w)  # lossless either way
    if layout == "ort" and fmt == "portable" and reach > EXACT_S8_MAX:
        assert stored.dtype == np.uint8 and zp == UINT8_ZERO_POINT  # u8u8: widening kernels, exact everywhere
    else:
        assert stored.dtype == np.int8 and zp == 0
    # every int8 it emits is exact under AVX2's kernel
    if stored.dtype == np.int8 and (layout, fmt) == ("ort", "portable"):
        x = rng.integers(0, 256, size=(16, 48)).astype(np.uint8)
        assert np.array_equal(maddubs_sum(x, stored.T), exact(x, stored.T))
        assert np.array_equal(maddubs_sum(np.full_like(x, 255), stored.T), exact(np.full_like(x, 255), stored.T))


def test_cpu_classes_and_formats():
    assert ([c.int8_class for c in (AVX2, AVX512_NO_VNNI, VNNI, AVX_VNNI, ARM, SSE)]
            == ["avx2", "avx2", "vnni", "vnni", "arm64", "sse"])
    for c in (AVX2, AVX512_NO_VNNI, VNNI, AVX_VNNI, ARM, SSE):
        assert c.exact("portable")
        assert c.exact("vnni") == (c.int8_class != "avx2")
    assert AVX2.as_dict() == {"cpu": "Haswell-like", "arch": "x86_64", "int8_class": "avx2", "int8_flags": "avx2"}


def test_this_machine_is_read_from_cpuid_and_agrees_with_the_kernel():
    info = cpu_info()
    assert info.model and info.arch
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    found = re.search(r"^flags\s*:\s*(.*)$", text, re.M)
    if info.source == "cpuid" and found:  # the CPUID instruction and the kernel agree on every flag we use
        kernel = set(found.group(1).split())
        assert ({f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f in kernel}
                == set(info.flags) - {"asimddp", "i8mm"})


def _spec(target: str, fmt: str | None) -> ExportSpec:
    return ExportSpec(target=target, precision="fp32", opset=20, model_class="UNet2DModel", model_config={}, inputs=[],
                      outputs=[], int8_format=fmt)  # type: ignore[arg-type]


@pytest.mark.parametrize("cpu", [AVX2, VNNI, ARM])
def test_runtime_guard(monkeypatch, cpu):
    monkeypatch.setattr(session_runtime, "cpu_info", lambda: cpu)
    entries = session_runtime.exactness_entries
    assert entries(_spec("ort", "portable")) == {}
    assert entries(_spec("onnx", None)) == session_runtime.QDQ_AS_FLOAT  # TensorRT layout: float math on every CPU
    assert entries(_spec("float", None)) == {} and entries(None) == {}
    for fmt in ("vnni", None):  # None: an ort graph exported before the format was recorded (full-range int8)
        if cpu is AVX2:
            with pytest.raises(CpuFormatError, match="no VNNI") as err:
                entries(_spec("ort", fmt))
            assert "--cpu portable" in str(err.value) and "Haswell-like" in str(err.value)
            assert entries(_spec("ort", fmt), "float") == session_runtime.QDQ_AS_FLOAT
            assert entries(_spec("ort", fmt), "allow") == {}
        else:
            assert entries(_spec("ort", fmt)) == {}
    with pytest.raises(Exception, match="inexact='sometimes'"):
        entries(_spec("ort", "vnni"), "sometimes")  # type: ignore[arg-type]
