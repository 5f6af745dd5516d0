"""The hostile-input corpus: shared tiny folders (built once per session) and the report hook.

Every case is marked ``@pytest.mark.hostile(category, expected)``; with ``DQDEPLOY_RELIABILITY_OUT``
set, the session writes the corpus size by category and the outcome counts there as JSON
(``python bench/reliability.py`` runs it and renders BENCHMARKS.md's RELIABILITY section).
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from pathlib import Path

import pytest

from tests.helpers import scheduler, tiny_unet, write_pipeline

_RESULTS: list[dict] = []


def pytest_configure(config):
    config.addinivalue_line("markers", "hostile(category, expected): a case of the hostile-input corpus")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    marker = item.get_closest_marker("hostile")
    if marker is None or report.when != "call" and not (report.when == "setup" and report.outcome != "passed"):
        return
    category, expected = (list(marker.args) + ["?", "?"])[:2]
    _RESULTS.append({"case": item.nodeid, "category": category, "expected": expected, "outcome": report.outcome})


def pytest_sessionfinish(session, exitstatus):
    out = os.environ.get("DQDEPLOY_RELIABILITY_OUT")
    if not out or not _RESULTS:
        return
    by_cat = Counter(r["category"] for r in _RESULTS)
    summary = {
        "cases": len(_RESULTS),
        "by_category": dict(sorted(by_cat.items())),
        "by_expected": dict(sorted(Counter(r["expected"] for r in _RESULTS).items())),
        "outcomes": dict(sorted(Counter(r["outcome"] for r in _RESULTS).items())),
        "by_category_outcome": {c: dict(Counter(r["outcome"] for r in _RESULTS if r["category"] == c))
                                for c in sorted(by_cat)},
        "failed": [r["case"] for r in _RESULTS if r["outcome"] != "passed"],
    }
    Path(out).write_text(json.dumps(summary, indent=2) + "\n")


@pytest.fixture(scope="session")
def hostile_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("hostile")


@pytest.fixture(scope="session")
def pipe_dir(hostile_root) -> Path:
    """A tiny DDPM pipeline folder (model_index.json, unet/, scheduler/)."""
    return write_pipeline(tiny_unet(), hostile_root / "pipe")


@pytest.fixture(scope="session")
def artifact(hostile_root) -> Path:
    """One tiny W8A8 artifact (post-training, random calibration inputs) for the whole session."""
    from dqdeploy.core.recipe import W8A8
    from dqdeploy.io.artifact import save_quantized
    from dqdeploy.stages.quantize import quantize_denoiser
    from tests.helpers import random_calib

    unet = tiny_unet()
    result = quantize_denoiser(unet, W8A8.replace(distill="none", act_init="minmax", fallback="none"),
                               random_calib(unet, n=8), scheduler_config=dict(scheduler().config))
    return save_quantized(result, hostile_root / "q")


@pytest.fixture(scope="session")
def export_dir(artifact, hostile_root) -> Path:
    """The artifact exported for ONNX Runtime (no onnxsim: faster, same contract)."""
    from dqdeploy.exporters.export import export_graph

    return export_graph(artifact, hostile_root / "e-ort", target="ort", simplify=False)


@pytest.fixture
def copy_of(tmp_path):
    """``copy_of(folder)``: a private copy to tamper with."""

    def make(folder: Path, name: str | None = None) -> Path:
        return Path(shutil.copytree(folder, tmp_path / (name or folder.name)))

    return make


@pytest.fixture(scope="session")
def cond_dirs(hostile_root) -> tuple[Path, Path]:
    """A bare conditional UNet folder and its scheduler folder."""
    from tests.helpers import tiny_cond_unet, write_bare_unet

    return write_bare_unet(tiny_cond_unet(), hostile_root / "cond")
