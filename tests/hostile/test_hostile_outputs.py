"""Outputs: --overwrite only replaces what dqdeploy wrote; bad output paths are refused before any work;
the atomic writer re-checks at the rename and sweeps its own stale temporary folders."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from dqdeploy.core.errors import DQDeployError
from dqdeploy.io.atomic import PARTIAL_MARKER, atomic_dir, sweep_stale
from tests.hostile.runner import has_fix, leftovers, refused, run, tree

CLI = pytest.mark.hostile("cli", "refused")


@pytest.fixture
def user_folder(tmp_path) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "holiday.jpg").write_bytes(b"precious")
    return folder


@CLI
@pytest.mark.parametrize("command", ["quantize", "export"])
def test_overwrite_refuses_a_folder_dqdeploy_did_not_write(command, pipe_dir, artifact, user_folder):
    source = pipe_dir if command == "quantize" else artifact
    result = run(command, source, "--out", user_folder, "--overwrite")
    refused(result, "did not write", "never deletes")
    has_fix(result)
    assert tree(user_folder) == {"holiday.jpg": b"precious"}
    assert leftovers(user_folder.parent) == []


@CLI
def test_quantize_never_replaces_its_source(pipe_dir):
    before = tree(pipe_dir)
    refused(run("quantize", pipe_dir, "--out", pipe_dir, "--overwrite"), "input")
    assert tree(pipe_dir) == before


@CLI
def test_export_never_replaces_the_artifact_it_reads(artifact):
    before = tree(artifact)
    refused(run("export", artifact, "--out", artifact, "--overwrite"), "input")
    assert tree(artifact) == before


@CLI
def test_export_never_replaces_an_artifact_with_an_export(artifact, copy_of, tmp_path):
    other = copy_of(artifact, "other-q")
    before = tree(other)
    refused(run("export", artifact, "--out", other, "--overwrite"), "quantized folder", "dqdeploy export")
    assert tree(other) == before


@CLI
@pytest.mark.parametrize("out", [".", "..", "../inner"])
def test_the_working_directory_and_its_ancestors_are_never_replaced(out, pipe_dir, tmp_path):
    inner = tmp_path / "inner"
    inner.mkdir()
    (inner / "notes.txt").write_text("mine")
    refused(run("quantize", pipe_dir, "--out", out, "--overwrite", cwd=inner), "working directory")
    assert (inner / "notes.txt").read_text() == "mine"


@CLI
@pytest.mark.parametrize("overwrite", [False, True])
def test_out_naming_a_file_is_refused_and_kept(overwrite, pipe_dir, tmp_path):
    target = tmp_path / "report.txt"
    target.write_text("keep me")
    refused(run("quantize", pipe_dir, "--out", target, *(["--overwrite"] if overwrite else [])), "not a folder")
    assert target.read_text() == "keep me" and leftovers(tmp_path) == []


BAD_PARENTS = {
    "under-a-file": lambda tmp: tmp / "file.txt" / "out",
    "proc": lambda tmp: Path("/proc/dqdeploy-hostile/out"),
    "sys": lambda tmp: Path("/sys/dqdeploy-hostile"),
}


@CLI
@pytest.mark.parametrize("where", list(BAD_PARENTS))
@pytest.mark.parametrize("command", ["quantize", "export"])
def test_unwritable_out_folders_are_refused_before_any_work(command, where, pipe_dir, artifact, tmp_path):
    (tmp_path / "file.txt").write_text("x")
    source = pipe_dir if command == "quantize" else artifact
    result = run(command, source, "--out", BAD_PARENTS[where](tmp_path),
                 "--recipe" if command == "quantize" else "--target", "w8a8" if command == "quantize" else "ort")
    refused(result, "cannot be")
    has_fix(result)


@CLI
@pytest.mark.parametrize("where", ["under-a-file", "proc", "a-folder"])
@pytest.mark.parametrize("command", ["sample", "eval", "check"])
def test_unwritable_output_files_are_refused_before_any_work(command, where, artifact, export_dir, tmp_path):
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "folder.png").mkdir()
    path = {"under-a-file": tmp_path / "file.txt" / "x.png", "proc": Path("/proc/dqdeploy-hostile.png"),
            "a-folder": tmp_path / "folder.png"}[where]
    args = {"sample": ["sample", artifact, "--out", path], "eval": ["eval", artifact, "--grid", path],
            "check": ["check", artifact, export_dir, "--report", path]}[command]
    result = run(*args)
    refused(result, str(path.name) if where == "a-folder" else "cannot be")


@CLI
def test_report_never_overwrites_an_input_file(artifact, export_dir, copy_of):
    q = copy_of(artifact)
    before = tree(q)
    refused(run("check", q, export_dir, "--report", q / "manifest.json"), "input")
    assert tree(q) == before


@pytest.mark.hostile("cli", "succeeds")
def test_overwrite_replaces_a_previous_export_without_leftovers(export_dir, copy_of, tmp_path):
    import onnx

    from dqdeploy.exporters.folder import save_export
    from dqdeploy.runtimes.spec import ONNX_FILE, read_spec

    old = copy_of(export_dir, "e")
    (old / "unet" / "stale.txt").write_text("from an older export")
    save_export(onnx.load(str(export_dir / ONNX_FILE)), old, read_spec(export_dir), overwrite=True)
    assert not (old / "unet" / "stale.txt").exists() and leftovers(tmp_path) == []


# -- the atomic writer ---------------------------------------------------------------------------


@pytest.mark.hostile("concurrency", "refused")
def test_a_folder_appearing_during_the_work_is_not_replaced(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(DQDeployError, match="appeared while dqdeploy was working"):
        with atomic_dir(target, overwrite=True, kind="quantized") as tmp:
            (tmp / "manifest.json").write_text("{}")
            target.mkdir()
            (target / "theirs.txt").write_text("another process")
    assert tree(target) == {"theirs.txt": b"another process"} and leftovers(tmp_path) == []


@pytest.mark.hostile("interruption", "cleaned")
def test_stale_temporary_folders_of_dead_runs_are_swept(tmp_path):
    dead = 2 ** 22 + 12345  # above the kernel's default pid_max: never a live process
    ours = tmp_path / f".out.tmp-{dead}-abc"
    ours.mkdir()
    (ours / PARTIAL_MARKER).write_text(str(dead))
    foreign = tmp_path / f".out.tmp-{dead}-user"  # same name pattern but not ours: kept
    foreign.mkdir()
    alive = tmp_path / f".out.tmp-{os.getpid()}-abc"  # a live run's folder: kept
    alive.mkdir()
    (alive / PARTIAL_MARKER).write_text(str(os.getpid()))
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "x").write_text("1")
    assert not ours.exists() and foreign.exists() and alive.exists()


@pytest.mark.hostile("interruption", "cleaned")
def test_an_interrupted_replacement_is_rolled_back(artifact, copy_of, tmp_path):
    old = copy_of(artifact, f".q.old-{2 ** 22 + 7}")  # killed between the two renames: q is missing
    sweep_stale(tmp_path / "q")
    assert (tmp_path / "q" / "manifest.json").is_file() and leftovers(tmp_path) == []
    assert not old.exists()


@pytest.mark.hostile("interruption", "kept")
def test_a_users_old_named_copy_is_never_swept(artifact, copy_of, tmp_path):
    copy_of(artifact, "q")
    users = copy_of(artifact, f".q.old-{2 ** 22 + 9}")  # the user's own backup: no dqdeploy marker
    sweep_stale(tmp_path / "q")
    assert (users / "manifest.json").is_file() and (tmp_path / "q" / "manifest.json").is_file()


@pytest.mark.hostile("cli", "succeeds")
def test_written_files_get_ordinary_modes(artifact, export_dir):
    umask = os.umask(0)
    os.umask(umask)
    for folder in (artifact, export_dir):
        for p in folder.rglob("*"):
            if p.is_file():
                assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~umask, p
