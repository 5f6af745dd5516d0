"""Round 3, checkpoints: a resume verifies every file of ``OUT.checkpoint/`` (sha256 and size recorded when it was
written) and the state's schema, refuses symlinks, and never continues from a damaged checkpoint; many processes
are not started beside a one-process checkpoint; outputs never go inside the model folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from dqdeploy.io import checkpoint as checkpoint_module
from tests.hostile.runner import has_fix, refused, run, tree

RUN = ["--recipe", "w8a8", "--steps", "3", "--trajectories", "4", "--calib-samples", "16", "--iters", "2",
       "--batch-size", "4", "--fallback", "none"]
CASE = pytest.mark.hostile("resume", "refused")


@pytest.fixture(scope="module")
def interrupted(pipe_dir, tmp_path_factory) -> Path:
    """The checkpoint of a run interrupted (Ctrl-C) after three distilled blocks."""
    root = tmp_path_factory.mktemp("interrupted")
    real_save, calls = checkpoint_module.RunCheckpoint.save, []

    def save(self, *args, **kwargs):
        real_save(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt

    mp = pytest.MonkeyPatch()
    mp.setattr(checkpoint_module.RunCheckpoint, "save", save)
    try:
        result = run("quantize", pipe_dir, "--out", root / "q", *RUN)
    finally:
        mp.undo()
    assert result.returncode == 130, result.stderr
    state = json.loads((root / "q.checkpoint" / "checkpoint.json").read_text())
    assert len(state["blocks"]) == 3 and len(state["files"]) == 5  # calibration, calibrated, three blocks
    return root / "q.checkpoint"


@pytest.fixture
def ckpt(interrupted, tmp_path) -> Path:
    return Path(shutil.copytree(interrupted, tmp_path / "q.checkpoint", symlinks=True))


def _state(ckpt: Path) -> dict:
    return json.loads((ckpt / "checkpoint.json").read_text())


def _write_state(ckpt: Path, state: dict) -> None:
    (ckpt / "checkpoint.json").write_text(json.dumps(state))


def _resume(pipe_dir: Path, ckpt: Path):
    return run("quantize", pipe_dir, "--out", ckpt.with_name("q"), *RUN, "--resume")


def _flip(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.hostile("resume", "resumed")
def test_an_intact_checkpoint_resumes(pipe_dir, ckpt):
    result = _resume(pipe_dir, ckpt)
    assert result.returncode == 0, result.stderr
    assert (ckpt.with_name("q") / "manifest.json").is_file() and not ckpt.exists()


DAMAGE = {
    "flipped bit in a block": lambda c: _flip(c / "block-00001.safetensors", -3),
    "flipped bit in the calibration set": lambda c: _flip(c / "calibration.safetensors", -5),
    "flipped bit in the calibrated model": lambda c: _flip(c / "calibrated.safetensors", -7),
    "block copied over another": lambda c: shutil.copyfile(c / "block-00000.safetensors",
                                                           c / "block-00002.safetensors"),
    "truncated block": lambda c: (c / "block-00001.safetensors").write_bytes(
        (c / "block-00001.safetensors").read_bytes()[:40]),
    "empty calibration set": lambda c: (c / "calibration.safetensors").write_bytes(b""),
    "missing block": lambda c: (c / "block-00002.safetensors").unlink(),
    "block symlinked to a system file": lambda c: ((c / "block-00001.safetensors").unlink(),
                                                   (c / "block-00001.safetensors").symlink_to("/etc/hostname")),
}


@CASE
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_file_is_refused(damage, pipe_dir, ckpt):
    DAMAGE[damage](ckpt)
    before = tree(ckpt) if "symlink" not in damage else None
    result = _resume(pipe_dir, ckpt)
    refused(result, "damaged", code=2)
    has_fix(result)
    assert not ckpt.with_name("q").exists()
    if before is not None:
        assert tree(ckpt) == before  # a refusal touches nothing


STATE_DAMAGE = {
    "extra key": lambda s: s.update(extra=1),
    "blocks not a list": lambda s: s.update(blocks={"0": 1}),
    "block index a string": lambda s: s["blocks"][0].update(index="0"),
    "non-numeric loss": lambda s: s["blocks"][-1].update(loss_after="nan"),
    "infinite loss": lambda s: s["blocks"][-1].update(loss_after=float("inf")),
    "curve with a string": lambda s: s["blocks"][0].update(curve=[0.1, "x"]),
    "fingerprint of numbers": lambda s: s.update(fingerprint={"model": 1}),
    "files outside the folder": lambda s: s["files"].update({"../x": {"sha256": "0" * 64, "size": 1}}),
    "files record mangled": lambda s: s["files"].update({"calibration.safetensors": "abc"}),
    "block recorded without its file": lambda s: s["files"].pop("block-00002.safetensors"),
    "search gain of a layer not searched": lambda s: s.update(search={"order": ["conv_in"], "gains": {"x": 0.1}}),
    "search gain not a number": lambda s: s.update(search={"order": ["conv_in"], "gains": {"conv_in": "0.1"}}),
    "search order not a list": lambda s: s.update(search={"order": "conv_in", "gains": {}}),
}


@CASE
@pytest.mark.parametrize("damage", list(STATE_DAMAGE))
def test_a_damaged_state_is_refused(damage, pipe_dir, ckpt):
    state = _state(ckpt)
    STATE_DAMAGE[damage](state)
    _write_state(ckpt, state)
    result = _resume(pipe_dir, ckpt)
    refused(result, "damaged", code=2)
    assert not ckpt.with_name("q").exists()


@CASE
def test_a_checkpoint_without_file_hashes_cannot_prove_it_continues_the_run(pipe_dir, ckpt):
    state = _state(ckpt)
    state["format_version"] = 1
    del state["files"]
    _write_state(ckpt, state)
    refused(_resume(pipe_dir, ckpt), "format version 1", code=2)


@CASE
def test_a_symlinked_data_folder_is_refused_and_the_target_untouched(pipe_dir, ckpt, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "keep.txt").write_text("precious")
    shutil.rmtree(ckpt / "data", ignore_errors=True)
    (ckpt / "data").symlink_to(mine, target_is_directory=True)
    refused(_resume(pipe_dir, ckpt), "symlink", code=2)
    assert tree(mine) == {"keep.txt": b"precious"}


@CASE
def test_many_processes_are_not_started_beside_a_one_process_checkpoint(pipe_dir, ckpt):
    before = tree(ckpt)
    result = run("quantize", pipe_dir, "--out", ckpt.with_name("q"), *RUN, "--nproc", "2")
    refused(result, "one-process run", code=2)
    has_fix(result)
    assert tree(ckpt) == before


@pytest.mark.hostile("outputs", "refused")
@pytest.mark.parametrize("command", ["quantize", "export"])
def test_output_inside_the_input_folder_is_refused(command, pipe_dir, artifact, copy_of):
    source = copy_of(pipe_dir if command == "quantize" else artifact, "src")
    before = tree(source)
    result = run(command, source, "--out", source / "out", *(RUN if command == "quantize" else []))
    refused(result, "inside the input", code=2)
    assert tree(source) == before and not (source / "out").exists()
