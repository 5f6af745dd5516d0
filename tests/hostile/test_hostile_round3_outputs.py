"""Round 3, outputs: one rule for every command that writes a file or folder (analyze, eval --report/--png/--grid,
sample --out, check --report): never into an input, never over something dqdeploy did not write, ``--overwrite``
only over its own kind of output, never two outputs at one path."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.hostile.runner import has_fix, leftovers, refused, run, tree

CASE = pytest.mark.hostile("outputs", "refused")


@pytest.fixture
def user_file(tmp_path) -> Path:
    path = tmp_path / "notes.txt"
    path.write_text("precious")
    return path


# -- analyze --------------------------------------------------------------------------------------


@CASE
@pytest.mark.parametrize("victim", ["artifact", "export_dir", "user"])
def test_analyze_overwrite_never_replaces_another_kind_of_folder(victim, artifact, export_dir, copy_of, tmp_path):
    if victim == "user":
        target = tmp_path / "mine"
        target.mkdir()
        (target / "keep.txt").write_text("precious")
    else:
        target = copy_of(artifact if victim == "artifact" else export_dir, "victim")
    before = tree(target)
    result = run("analyze", artifact, "--out", target, "--overwrite")
    refused(result, "--overwrite refused")
    has_fix(result)
    assert tree(target) == before and leftovers(target.parent) == []


@CASE
def test_analyze_never_replaces_its_own_input(artifact, copy_of):
    q = copy_of(artifact, "q-in")
    before = tree(q)
    refused(run("analyze", q, "--out", q, "--overwrite"), "input")
    assert tree(q) == before


@pytest.mark.hostile("outputs", "succeeds")
def test_analyze_overwrite_replaces_its_own_report_and_default_lands_next_to_the_artifact(artifact, copy_of):
    q = copy_of(artifact, "q-an")
    first = run("analyze", ".", "--top", "3", "--no-blocks", cwd=q)  # from inside the artifact
    assert first.returncode == 0, first.stderr
    report = q.parent / "q-an-sensitivity"
    assert (report / "sensitivity.json").is_file() and json.loads((report / "sensitivity.json").read_text())["format"]
    # nothing written into the artifact, not even a hidden folder
    assert sorted(os.listdir(q)) == sorted(tree(artifact))
    refused(run("analyze", q, "--no-blocks"), "already exists")
    again = run("analyze", q, "--no-blocks", "--overwrite")
    assert again.returncode == 0, again.stderr


@CASE
@pytest.mark.parametrize("top", ["-5", "0"])
def test_analyze_top_must_be_positive(top, artifact):
    result = run("analyze", artifact, "--top", top)
    assert result.returncode == 2 and "Traceback" not in result.stderr and "--top" in result.stderr


# -- file outputs: sample, eval, check --------------------------------------------------------------


@pytest.fixture(scope="module")
def refs(tmp_path_factory) -> Path:
    """A few reference images for eval's Frechet distance."""
    import numpy as np
    from PIL import Image

    folder = tmp_path_factory.mktemp("refs")
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def _command(command: str, artifact: Path, export_dir: Path, option: str, path: Path, refs: Path) -> list:
    if command == "sample":
        return ["sample", export_dir, "--n", "2", "--steps", "2", "--out", path]
    if command == "eval":
        return ["eval", artifact, "--n", "4", "--steps", "2", "--fid-ref", refs, "--fid-extractor", "pixels",
                option, path]
    return ["check", artifact, export_dir, "--steps", "1", "--samples", "1", "--report", path]


COMMANDS = [("sample", "--out"), ("eval", "--report"), ("eval", "--grid"), ("check", "--report")]


@CASE
@pytest.mark.parametrize("command, option", COMMANDS)
def test_an_existing_user_file_is_never_replaced(command, option, artifact, export_dir, user_file, refs):
    for extra in ([], ["--overwrite"]):
        result = run(*_command(command, artifact, export_dir, option, user_file, refs), *extra)
        refused(result, "already exists" if not extra else "did not write")
        has_fix(result)
        assert user_file.read_text() == "precious"


@pytest.mark.hostile("outputs", "succeeds")
@pytest.mark.parametrize("command, option", COMMANDS)
def test_overwrite_replaces_a_file_dqdeploy_wrote(command, option, artifact, export_dir, tmp_path, refs):
    path = tmp_path / ("out.png" if option in ("--out", "--grid") else "out.json")
    first = run(*_command(command, artifact, export_dir, option, path, refs))
    assert path.is_file(), first.stderr
    refused(run(*_command(command, artifact, export_dir, option, path, refs)), "already exists")
    again = run(*_command(command, artifact, export_dir, option, path, refs), "--overwrite")
    assert again.returncode in (0, 1) and "Traceback" not in again.stderr, again.stderr  # check may fail its tolerance
    assert leftovers(tmp_path) == []


@CASE
@pytest.mark.parametrize("command, option", COMMANDS)
def test_outputs_never_go_into_an_input(command, option, artifact, export_dir, copy_of, refs):
    q, e = copy_of(artifact, "q-out"), copy_of(export_dir, "e-out")
    inside = (e if command == "sample" else q) / ("new.png" if option in ("--out", "--grid") else "new.json")
    before_q, before_e = tree(q), tree(e)
    refused(run(*_command(command, q, e, option, inside, refs)), "inside the input")
    assert tree(q) == before_q and tree(e) == before_e


@CASE
def test_two_outputs_at_one_path_are_refused(artifact, tmp_path):
    same = tmp_path / "x.png"
    result = run("eval", artifact, "--n", "2", "--fp", artifact, "--report", same, "--png", same)
    refused(result, "same file")
    assert not same.exists()
