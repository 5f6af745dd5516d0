"""Export-folder tampering: a missing, truncated, emptied or replaced graph and every hand-edited spec
are refused (inspect, sample, runtime load, check, lint), and lint explains itself on ORT-layout graphs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import onnx
import pytest

from dqdeploy.core.errors import ArtifactError
from dqdeploy.io.integrity import seal
from dqdeploy.runtimes import load_runtime
from tests.hostile.runner import has_fix, refused, run

pytestmark = pytest.mark.hostile("export", "refused")
GRAPH = "unet/model.onnx"


def _spec(e: Path) -> dict:
    return json.loads((e / "dqdeploy_export.json").read_text())


def _write(e: Path, data, *, reseal: bool = True) -> None:
    (e / "dqdeploy_export.json").write_text(json.dumps(seal(data) if reseal and isinstance(data, dict) else data))


def _edit(change):
    def apply(e: Path) -> None:
        data = _spec(e)
        change(data)
        _write(e, data)
    return apply


def _other_graph(e: Path) -> None:
    """Another graph with the same inputs: one weight changed."""
    model = onnx.load(str(e / GRAPH))
    init = next(i for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT and len(i.raw_data) >= 4)
    raw = bytearray(init.raw_data)
    raw[0] ^= 0x40
    init.raw_data = bytes(raw)
    onnx.save(model, str(e / GRAPH))


def _truncate(e: Path) -> None:
    path = e / GRAPH
    path.write_bytes(path.read_bytes()[:1000])


def _unsealed(e: Path) -> None:
    data = _spec(e)
    data["timesteps"][0] = 5.0
    _write(e, data, reseal=False)


def _wrong_shape(e: Path) -> None:
    """The spec claims another resolution than the graph has (seal and hashes intact)."""
    data = _spec(e)
    data["inputs"][0]["shape"] = ["batch", 1, 16, 16]
    data["model_config"]["sample_size"] = 16
    _write(e, data)


CASES = {
    "graph missing": (lambda e: (e / GRAPH).unlink(), "missing"),
    "graph truncated": (_truncate, "truncated"),
    "graph emptied": (lambda e: (e / GRAPH).write_bytes(b""), "truncated"),
    "graph replaced by another with the same inputs": (_other_graph, "sha256"),
    "spec is a JSON list": (lambda e: _write(e, []), "JSON list"),
    "spec nested 100000 deep": (lambda e: (e / "dqdeploy_export.json").write_text("[" * 100000 + "]" * 100000),
                                "nested too deeply"),
    "hand edit without the seal": (_unsealed, "integrity record"),
    "spec without inputs": (_edit(lambda d: d.pop("inputs")), "missing keys"),
    "spec with an extra key": (_edit(lambda d: d.update(extra=1)), "unknown keys"),
    "spec without sample_size": (_edit(lambda d: d["model_config"].pop("sample_size")), "sample_size"),
    "string timesteps": (_edit(lambda d: d.update(timesteps=["901"])), "finite numbers"),
    "NaN timesteps": (_edit(lambda d: d.update(timesteps=[float("nan")])), "finite numbers"),
    "file name outside the folder": (_edit(lambda d: d["files"].update({"../../etc/passwd":
                                                                         {"sha256": "0" * 64, "size": 1}})),
                                     "plain relative name"),
    "files record dropped": (_edit(lambda d: d.update(files={})), "files must list"),
    "shape that does not match the graph": (_wrong_shape, "does not match its dqdeploy_export.json"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_tampered_export_is_refused_by_sample(case, export_dir, copy_of, tmp_path):
    tamper, needle = CASES[case]
    e = copy_of(export_dir)
    tamper(e)
    result = run("sample", e, "--n", "1", "--steps", "2", "--out", tmp_path / "g.png")
    refused(result, needle)
    has_fix(result)
    assert not (tmp_path / "g.png").exists()


@pytest.mark.parametrize("case", ["graph missing", "graph truncated", "graph emptied",
                                  "graph replaced by another with the same inputs"])
def test_inspect_reports_a_corrupt_export(case, export_dir, copy_of):
    tamper, needle = CASES[case]
    e = copy_of(export_dir)
    tamper(e)
    refused(run("inspect", e), needle)


@pytest.mark.parametrize("case", ["graph emptied", "graph replaced by another with the same inputs"])
def test_load_runtime_refuses_a_corrupt_export(case, export_dir, copy_of):
    tamper, needle = CASES[case]
    e = copy_of(export_dir)
    tamper(e)
    with pytest.raises(ArtifactError, match=needle):
        load_runtime(e, "ort")


def test_lint_on_an_ort_layout_export_explains_itself(export_dir):
    result = run("lint", export_dir)
    refused(result, "TensorRT-layout graphs only")
    assert result.stdout.count("\n") < 3  # not hundreds of violations


def test_lint_reports_an_emptied_graph_as_corrupt(export_dir, copy_of):
    e = copy_of(export_dir)
    data = _spec(e)
    data["target"], data["int8_format"] = "onnx", None  # a TensorRT-layout spec has no CPU integer format
    _write(e, data)
    (e / GRAPH).write_bytes(b"")
    refused(run("lint", e), "truncated")


def test_check_against_another_models_export(artifact, export_dir, copy_of):
    """An export of another artifact (here: the same model with one layer's steps changed) is refused."""
    other = copy_of(artifact, "other")
    data = json.loads((other / "manifest.json").read_text())
    data["blocks"] = [{"name": "x", "loss_before": 1.0, "loss_after": 0.5}]
    (other / "manifest.json").write_text(json.dumps(seal(data)))
    refused(run("check", other, export_dir), "was not exported from")


def test_an_export_symlinked_outside_is_refused(export_dir, copy_of, tmp_path):
    e = copy_of(export_dir)
    outside = tmp_path / "elsewhere.onnx"
    os.replace(e / GRAPH, outside)
    os.symlink(outside, e / GRAPH)
    refused(run("inspect", e), "outside")
