"""Fixtures several integration modules share: tiny SD3 and Flux pipelines quantized and exported with ``--pipeline``
(built once per session: the pipeline tests and the server's tests run the same exports)."""

from __future__ import annotations

import dataclasses

import pytest

from dqdeploy.stages.quantize import quantize
from tests.helpers import write_transformer_pipeline
from tests.integration.test_cli_errors import dqdeploy as cli
from tests.integration.test_pipeline_export import CALIB, PROMPTS, RECIPE


def _exported(root, kind: str, calib) -> tuple:
    """(pipeline folder, artifact, export folder): the tiny ``kind`` pipeline quantized with ``calib`` and exported
    by the README's command."""
    pipe = write_transformer_pipeline(kind, root / "pipe", text=True, vae=True)
    q = quantize(pipe, RECIPE, calib, root / "q", prompts=PROMPTS).path
    proc = cli("export", q, "--target", "ort", "--out", root / "e", "--pipeline", pipe)
    assert proc.returncode == 0, proc.stderr
    return pipe, q, root / "e"


@pytest.fixture(scope="session")
def sd3(tmp_path_factory):
    """(pipeline folder, artifact, export folder with the pipeline) of a tiny StableDiffusion3Pipeline."""
    return _exported(tmp_path_factory.mktemp("sd3pipe"), "sd3", CALIB)


@pytest.fixture(scope="session")
def flux(tmp_path_factory):
    """(pipeline folder, artifact, export folder with the pipeline) of a tiny FluxPipeline (8x8 calibration)."""
    return _exported(tmp_path_factory.mktemp("fluxpipe"), "flux", dataclasses.replace(CALIB, resolution=8))
