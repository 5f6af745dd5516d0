"""Round 3, the Python API: wrong arguments are user errors (:class:`DQDeployError`) that name what was expected,
never a raw ``TypeError`` / ``AttributeError``; strings where objects are expected are read as the CLI reads them."""

from __future__ import annotations

import pytest

import dqdeploy
from dqdeploy.core.errors import DQDeployError

CASE = pytest.mark.hostile("api", "refused")


class FakePipeline:
    def save_pretrained(self, path):  # what diffusers pipelines and models have
        raise AssertionError("never called")


@CASE
@pytest.mark.parametrize("model", [None, 3, 2.5, FakePipeline(), ["a"], ""])
def test_quantize_needs_a_folder_path(model, tmp_path):
    with pytest.raises(DQDeployError, match="model_dir must be a path") as err:
        dqdeploy.quantize(model, dqdeploy.W8A8)
    if isinstance(model, FakePipeline):
        assert "save_pretrained" in str(err.value)


@CASE
@pytest.mark.parametrize("recipe, match", [(None, "recipe must be"), (8, "recipe must be"), ("w9a9", "w9a9"),
                                           ({"weight_bits": 3}, "weight_bits")])
def test_quantize_recipe_values(recipe, match, pipe_dir):
    with pytest.raises(DQDeployError, match=match):
        dqdeploy.quantize(pipe_dir, recipe)


@CASE
@pytest.mark.parametrize("calibration, match", [("fast", "calibration must be"), ({"samplez": 4}, "samplez"),
                                                (7, "calibration must be")])
def test_quantize_calibration_values(calibration, match, pipe_dir):
    with pytest.raises(DQDeployError, match=match):
        dqdeploy.quantize(pipe_dir, dqdeploy.W8A8, calibration)


@CASE
@pytest.mark.parametrize("verb, args, kwargs", [
    ("quantize", ("m",), {"recipie": "w8a8"}),
    ("export", ("q", "e"), {"targett": "ort"}),
    ("load_quantized", (), {}),
    ("export", (), {}),
])
def test_unknown_or_missing_arguments(verb, args, kwargs):
    with pytest.raises(DQDeployError, match=f"dqdeploy.{verb}") as err:
        getattr(dqdeploy, verb)(*args, **kwargs)
    assert "help(dqdeploy." in str(err.value)


@CASE
def test_recipe_replace_with_an_unknown_field():
    with pytest.raises(DQDeployError, match="no field.*nonexistent") as err:
        dqdeploy.W8A8.replace(nonexistent=1)
    assert "weight_bits" in str(err.value)


@CASE
@pytest.mark.parametrize("value", ["8", (8,), ("8", "32"), (True, 32), 8])
def test_export_dynamic_resolution_forms(value, artifact, tmp_path):
    with pytest.raises(DQDeployError, match="dynamic_resolution"):
        dqdeploy.export(artifact, tmp_path / "e", target="ort", dynamic_resolution=value)
    assert not (tmp_path / "e").exists()


@pytest.mark.hostile("api", "succeeds")
def test_presets_by_name_dicts_and_a_range_string_are_accepted(pipe_dir, tmp_path):
    from dqdeploy.core.arguments import as_recipe
    from dqdeploy.exporters.export import _resolution_range

    assert as_recipe("w4a8") is dqdeploy.W4A8 and as_recipe("W8A8") is dqdeploy.W8A8
    assert _resolution_range("16:32") == (16, 32) == _resolution_range((16, 32))
    calib = {"steps": 2, "samples": 8, "trajectories": 2, "batch_size": 4}
    result = dqdeploy.quantize(pipe_dir, {"distill": "none", "fallback": "none"}, calib, tmp_path / "q")
    assert result.manifest.recipe.distill == "none" and (tmp_path / "q" / "manifest.json").is_file()


@CASE
@pytest.mark.parametrize("kwargs, match", [
    ({"threads": "x"}, "threads='x'"),
    ({"threads": -1}, "threads=-1"),
    ({"threads": True}, "threads=True"),
    ({"options": {"sesion.typo": "1"}}, "unknown session config entries"),
    ({"options": "fast"}, "options='fast'"),
    ({"providers": [1]}, "providers="),
    ({"inexact": "sometimes"}, "inexact='sometimes'"),
    ({"provider": "CPUExecutionProvider"}, "provider"),
])
def test_runtime_arguments(kwargs, match, export_dir):
    with pytest.raises(DQDeployError, match=match):
        dqdeploy.load_runtime(export_dir, "ort", **kwargs)


@pytest.mark.hostile("api", "succeeds")
def test_one_provider_name_is_a_list_of_one(export_dir):
    runtime = dqdeploy.load_runtime(export_dir, "ort", providers="CPUExecutionProvider")
    assert runtime.session.get_providers() == ["CPUExecutionProvider"]


@CASE
@pytest.mark.parametrize("path", [None, 1, 2.5])
def test_load_functions_need_paths(path):
    with pytest.raises(DQDeployError, match="must be a path"):
        dqdeploy.load_quantized(path)
    with pytest.raises(DQDeployError, match="must be a path"):
        dqdeploy.load_runtime(path, "ort")


# -- fallback (part 7) ------------------------------------------------------------------------------

SMALL = ["--steps", "2", "--calib-samples", "8", "--trajectories", "2", "--iters", "1"]


@CASE
@pytest.mark.parametrize("pattern, match", [("*", "match every one"), ("nope.*", "match no quantized layer")])
def test_fallback_patterns_are_refused_before_calibration(pattern, match, pipe_dir, tmp_path, monkeypatch):
    import dqdeploy.stages.quantize as stage
    from tests.hostile.runner import refused, run

    monkeypatch.setattr(stage, "collect", lambda *a, **k: pytest.fail("calibrated before the patterns were checked"))
    refused(run("quantize", pipe_dir, "--out", tmp_path / "q", "--fallback", pattern, *SMALL), match, code=2)
    assert not (tmp_path / "q").exists() and not (tmp_path / "q.checkpoint").exists()


@CASE
def test_a_fallback_budget_without_auto_is_refused(pipe_dir, tmp_path):
    from tests.hostile.runner import run

    result = run("quantize", pipe_dir, "--out", tmp_path / "q", "--fallback", "none", "--fallback-budget", "0.5",
                 *SMALL)
    assert result.returncode == 2 and "--fallback-budget applies to --fallback auto" in result.stderr
    assert "Traceback" not in result.stderr
