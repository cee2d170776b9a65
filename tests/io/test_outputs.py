"""Output folders as transactions (unireg.io.outputs): all files appear at once or none, the
previous result survives failures and kills, a second run is refused, permissions follow the
umask."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from unireg.io.outputs import (
    MANIFEST,
    OutputFolder,
    OutputInUseError,
    OutputPathError,
    manifest_problems,
    publish_files,
)

NAMES = ("a.txt", "b.txt", "c.txt")


def _run(target: Path, files: dict[str, str], **provenance) -> dict[str, Path]:
    with OutputFolder(target, NAMES, command="test") as folder:
        for name, text in files.items():
            (folder.stage / name).write_text(text)
        return folder.commit(provenance)


def _contents(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".unireg-" in p.name)


def test_commit_publishes_every_file_with_a_manifest_that_matches(tmp_path):
    out = tmp_path / "deep" / "out"
    written = _run(out, {"a.txt": "1", "b.txt": "2"}, command=["unireg", "x"])
    assert set(written) == {"a.txt", "b.txt", MANIFEST}
    assert manifest_problems(out) == []
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["command"] == ["unireg", "x"] and set(manifest["files"]) == {"a.txt", "b.txt"}
    assert _leftovers(out.parent) == []  # no lock, no staging folder
    (out / "a.txt").write_text("changed")  # the manifest notices
    assert manifest_problems(out) == ["a.txt: size or checksum differs from the manifest"]


def test_a_rerun_replaces_the_whole_result_and_drops_files_it_did_not_write(tmp_path):
    out = tmp_path / "out"
    _run(out, {"a.txt": "1", "b.txt": "2", "c.txt": "3"})
    _run(out, {"a.txt": "new"})
    assert set(_contents(out)) == {"a.txt", MANIFEST}
    assert (out / "a.txt").read_text() == "new" and manifest_problems(out) == []


def test_a_failing_run_leaves_the_previous_result_untouched_and_no_staging(tmp_path):
    out = tmp_path / "out"
    _run(out, {"a.txt": "1", "b.txt": "2"})
    before = _contents(out)
    with pytest.raises(RuntimeError, match="boom"):
        with OutputFolder(out, NAMES) as folder:
            (folder.stage / "a.txt").write_text("half")
            raise RuntimeError("boom")
    assert _contents(out) == before and _leftovers(tmp_path) == []
    # nothing at all when there was no previous result, and no parent folders made
    fresh = tmp_path / "x" / "y" / "out"
    with pytest.raises(RuntimeError):
        with OutputFolder(fresh, NAMES):
            raise RuntimeError("boom")
    assert not (tmp_path / "x").exists()


def test_paths_that_cannot_take_the_outputs_are_refused_before_work(tmp_path):
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    with pytest.raises(OutputPathError, match="file.txt: exists and is not a folder"):
        OutputFolder(a_file, NAMES).open()
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.md").write_text("mine")
    with pytest.raises(OutputPathError, match="notes.md"):
        OutputFolder(theirs, NAMES).open()
    assert (theirs / "notes.md").read_text() == "mine"
    below_file = a_file / "out"
    with pytest.raises(OutputPathError):
        OutputFolder(below_file, NAMES).open()
    assert _leftovers(tmp_path) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_an_unwritable_parent_is_refused(tmp_path):
    locked = tmp_path / "ro"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(OutputPathError, match="no permission"):
            OutputFolder(locked / "out", NAMES).open()
    finally:
        locked.chmod(0o700)


def test_a_second_run_into_a_folder_in_use_is_refused_with_the_holders_pid(tmp_path):
    out = tmp_path / "out"
    first = OutputFolder(out, NAMES)
    first.open()
    try:
        with pytest.raises(OutputInUseError, match=f"pid {os.getpid()}"):
            OutputFolder(out, NAMES).open()
    finally:
        first.__exit__(None, None, None)
    _run(out, {"a.txt": "after"})  # free again once the first is done
    assert (out / "a.txt").read_text() == "after"


def test_leftovers_of_killed_runs_are_cleaned_and_a_result_moved_aside_is_put_back(tmp_path):
    out = tmp_path / "out"
    _run(out, {"a.txt": "good"})
    # a run killed while staging, and one killed between its two renames (no RENAME_EXCHANGE)
    (tmp_path / ".out.unireg-stage-1-ab").mkdir()
    (tmp_path / ".out.unireg-stage-1-ab" / "a.txt").write_text("partial")
    os.rename(out, tmp_path / ".out.unireg-old-2-cd")
    with OutputFolder(out, NAMES) as folder:
        assert (out / "a.txt").read_text() == "good"  # put back before anything else
        assert [p.name for p in tmp_path.iterdir() if "stage" in p.name] == [folder.stage.name]
    assert _leftovers(tmp_path) == [] and manifest_problems(out) == []


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_outputs_follow_the_umask(tmp_path, mask):
    old = os.umask(mask)
    try:
        out = tmp_path / "out"
        _run(out, {"a.txt": "1"})
        from unireg.io.files import write_atomic

        single = write_atomic(tmp_path / "single.txt", lambda t: t.write_text("x"))
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~mask
    for f in (out / "a.txt", out / MANIFEST, single):
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~mask


def test_publish_files_writes_all_or_none(tmp_path):
    one, two = tmp_path / "one.txt", tmp_path / "two.txt"

    def broken(tmp: Path) -> None:
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        publish_files([(one, lambda t: t.write_text("1")), (two, broken)])
    assert list(tmp_path.iterdir()) == []
    publish_files([(one, lambda t: t.write_text("1")), (two, lambda t: t.write_text("2"))])
    assert one.read_text() + two.read_text() == "12"


# a run that SIGKILLs itself at a chosen point of the transaction
KILLER = textwrap.dedent(
    """
    import os, signal, shutil, sys
    from unireg.io import outputs

    target, point, text = sys.argv[1], sys.argv[2], sys.argv[3]
    die = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
    if point == "exchange-unsupported":  # the two-rename path, killed between the renames
        outputs._exchange = lambda a, b: False
        real = os.rename
        calls = []
        def rename(a, b):
            calls.append(a)
            if len(calls) == 2:
                die()
            real(a, b)
        outputs.os.rename = rename
    if point == "after-swap":
        outputs.shutil.rmtree = die
    with outputs.OutputFolder(target, ["a.txt", "b.txt"]) as folder:
        (folder.stage / "a.txt").write_text(text)
        if point == "mid-write":
            die()
        (folder.stage / "b.txt").write_text(text)
        if point == "before-manifest":
            die()
        folder.commit({"run": text})
    """
)


@pytest.mark.parametrize(
    "point", ["mid-write", "before-manifest", "after-swap", "exchange-unsupported"]
)
def test_a_sigkill_anywhere_leaves_one_whole_result(tmp_path, point):
    out = tmp_path / "out"
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    done = subprocess.run([sys.executable, str(script), str(out), "none", "old"])
    assert done.returncode == 0 and manifest_problems(out) == []
    killed = subprocess.run([sys.executable, str(script), str(out), point, "new"])
    assert killed.returncode == -signal.SIGKILL
    # the next run (here: one that only opens and leaves) restores and cleans
    with OutputFolder(out, ["a.txt", "b.txt"]):
        pass
    assert _leftovers(tmp_path) == [] and manifest_problems(out) == []
    texts = {(out / n).read_text() for n in ("a.txt", "b.txt")}
    assert texts == ({"new"} if point == "after-swap" else {"old"})


def test_temporaries_of_killed_writers_are_removed_by_the_next_write(tmp_path):
    from unireg.io.files import write_atomic

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()  # fmt: skip
    stale = tmp_path / f".out.nii.gz.{dead}.abc123.tmp.nii.gz"
    stale.write_bytes(b"half")
    mine = tmp_path / f".out.nii.gz.{os.getpid()}.def456.tmp.nii.gz"  # a live writer's
    mine.write_bytes(b"writing")
    write_atomic(tmp_path / "out.nii.gz", lambda t: t.write_bytes(b"whole"))
    assert not stale.exists() and mine.exists()
    assert (tmp_path / "out.nii.gz").read_bytes() == b"whole"
