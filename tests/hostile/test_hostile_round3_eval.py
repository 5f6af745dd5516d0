"""Round 3, eval inputs: reference images and feature extractors are opened and tried before any sampling; odd
files, broken images and broken extractors give a clear error (or are skipped), never a traceback or a hang; an
extractor that cannot tell images apart is refused; ``--fp`` of another model is called out."""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.hostile.runner import has_fix, refused, run

CASE = pytest.mark.hostile("eval", "refused")


def _png(path: Path, seed: int) -> None:
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (8, 8), dtype=np.uint8)).save(path)


@pytest.fixture
def refs(tmp_path) -> Path:
    folder = tmp_path / "refs"
    folder.mkdir()
    for i in range(4):
        _png(folder / f"{i}.png", i)
    return folder


def _eval(artifact: Path, refs: Path, *extra):
    return run("eval", artifact, "--n", "4", "--steps", "2", "--fid-ref", refs, *extra)


def _bomb_header(path: Path) -> None:
    """A valid PNG signature and IHDR announcing 50000 x 50000 pixels (no pixel data)."""
    ihdr = struct.pack(">IIBBBBB", 50000, 50000, 8, 0, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk)))


BAD_IMAGES = {
    "text named .png": lambda p: p.write_text("not an image"),
    "truncated png": lambda p: p.write_bytes((p.parent / "0.png").read_bytes()[:30]),
    "decompression bomb header": _bomb_header,
}


@CASE
@pytest.mark.parametrize("bad", list(BAD_IMAGES))
def test_an_unreadable_reference_image_is_named_before_sampling(bad, artifact, refs, monkeypatch):
    BAD_IMAGES[bad](refs / "zz.png")
    import dqdeploy.eval.report as report

    monkeypatch.setattr(report, "generate_from", lambda *a, **k: pytest.fail("sampled before the inputs were checked"))
    result = _eval(artifact, refs)
    refused(result, "zz.png", code=2)
    has_fix(result)


@pytest.mark.hostile("eval", "succeeds")
@pytest.mark.parametrize("odd", ["fifo", "folder", "symlink loop", "dangling link"])
def test_entries_that_are_not_files_are_skipped_without_a_hang(odd, artifact, refs):
    target = refs / "odd.png"
    if odd == "fifo":
        os.mkfifo(target)
    elif odd == "folder":
        target.mkdir()
    elif odd == "symlink loop":
        target.symlink_to(target)
    else:
        target.symlink_to(refs / "missing.png")
    result = _eval(artifact, refs, "--fid-extractor", "pixels")
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr


EXTRACTORS = [":", "..x:y", "os:", ":getcwd", "nonexistent_pkg_xyz:f", "os:getcwd", "builtins:len", "math:pi"]


@CASE
@pytest.mark.parametrize("spec", EXTRACTORS)
def test_a_broken_extractor_is_refused_before_sampling(spec, artifact, refs, monkeypatch):
    import dqdeploy.eval.report as report

    monkeypatch.setattr(report, "generate_from", lambda *a, **k: pytest.fail("sampled before the extractor was tried"))
    result = _eval(artifact, refs, "--fid-extractor", spec)
    refused(result, "feature extractor", code=2)


@CASE
@pytest.mark.parametrize("returns", ["scalar", "zeros", "wrong rows"])
def test_a_torchscript_extractor_with_useless_output_is_refused(returns, artifact, refs, tmp_path):
    class Scalar(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.mean()

    class Zeros(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.zeros(x.shape[0], 4)

    class WrongRows(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.ones(3, 4)

    module = {"scalar": Scalar, "zeros": Zeros, "wrong rows": WrongRows}[returns]()
    path = tmp_path / "extractor.pt"
    torch.jit.save(torch.jit.script(module), str(path))
    result = _eval(artifact, refs, "--fid-extractor", path)
    refused(result, "feature extractor", code=2)
    assert "FID" not in result.stdout


@pytest.mark.hostile("eval", "warned")
def test_fp_of_another_model_is_called_out(artifact, tmp_path):
    from tests.helpers import tiny_unet, write_pipeline

    torch.manual_seed(123)
    other = tiny_unet()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn_like(p))  # same config, other weights
    write_pipeline(other, tmp_path / "other")
    result = run("eval", artifact, "--fp", tmp_path / "other", "--n", "2", "--steps", "2", "--step-samples", "1")
    assert result.returncode == 0, result.stderr
    assert "probably not the folder it was quantized from" in result.stdout + result.stderr
