"""bench/quality_reference.py on a tiny zoo: the quality check's reference levels measured on tuning members only,
written through write_results and into the package's reference file, which quantize's warning then reads."""

from __future__ import annotations

import json

import pytest

from bench import common, zoo
from bench import quality_reference as qr
from bench import zoo_quality as zq
from dqdeploy.core.errors import DQDeployError
from dqdeploy.core.recipe import W8A8
from dqdeploy.stages.quality_risk import assess, load_reference
from tests.bench.test_zoo_quality import tiny_digits_unet
from tests.helpers import write_pipeline


@pytest.fixture
def tiny_zoo(tmp_path, monkeypatch):
    monkeypatch.setenv("DQDEPLOY_ZOO", str(tmp_path / "zoo"))
    members = {"tiny": zoo.ZooModel("tiny", "tuning member", steps=3),
               "hidden": zoo.ZooModel("hidden", "held-out member", steps=3, group="held-out")}
    for m in members.values():
        write_pipeline(tiny_digits_unet(), m.folder())
    monkeypatch.setattr(zoo, "ZOO", members)
    monkeypatch.setattr(common, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(qr, "RESULTS", tmp_path / "results")
    monkeypatch.setattr(qr, "REFERENCE_FILE", tmp_path / "quality_reference.json")
    monkeypatch.setitem(zq.PRESETS, "w8a8", W8A8.replace(iters=1, batch_size=8))
    monkeypatch.setattr(zq, "calibration_for", lambda m, v="default": zq.CalibrationConfig(
        scheduler="ddim", steps=3, samples=16, trajectories=4, batch_size=4))
    (tmp_path / "results").mkdir()
    return tmp_path


@pytest.mark.slow
def test_levels_from_tuning_members_only(tiny_zoo):
    with pytest.raises(DQDeployError, match="held out"):
        qr.main(["--models", "hidden", "--recipes", "w8a8"])
    qr.main(["--models", "tiny", "--recipes", "w8a8"])
    row = json.loads((tiny_zoo / "results" / "quality_reference.json").read_text())["tiny|w8a8"]
    assert row["commit"] and row["machine"]["cpu"] and row["command"].startswith("python bench/quality_reference.py")
    # the figure quantize recorded is the one measured afresh on the artifact
    assert row["recorded_mean_rel_err"] == pytest.approx(row["figure"]["mean_rel_err"], rel=1e-4)
    ref = load_reference(tiny_zoo / "quality_reference.json")
    level = ref["recipes"]["w8a8"]
    assert level["members"] == {"tiny": row["figure"]["mean_rel_err"]} and level["worst"] == level["members"]["tiny"]
    assert level["warn_above"] == pytest.approx(qr.FAR_ABOVE * level["worst"], rel=1e-4)
    assert ref["command"] and ref["commit"] and ref["machine"]["cpu"]
    figure = row["figure"]
    assert not assess(figure, W8A8, zq.calibration_for("tiny"), ref)["at_risk"]
    far = figure | {"mean_rel_err": 3 * level["worst"]}
    assert assess(far, W8A8, zq.calibration_for("tiny"), ref)["at_risk"]
