"""Issue 29: one atomic-write helper (studio/atomic.py: temporary file, fsync, rename, fsync of the folder) replaces
the five copies the studio had (run folder files, cleaned data, feedback, the bundled model, checkpoints)."""
from __future__ import annotations

import ast
import os
import stat
from pathlib import Path

import pytest

from studio import atomic

STUDIO = Path(__file__).resolve().parents[1] / "studio"


@pytest.fixture
def fsyncs(monkeypatch):
    seen = []
    real = os.fsync

    def spy(fd):
        seen.append(os.path.realpath(f"/proc/self/fd/{fd}") if os.path.exists(f"/proc/self/fd/{fd}") else fd)
        return real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    return seen


def test_write_replaces_the_file_whole_and_durably_keeping_its_mode(tmp_path, fsyncs):
    f = tmp_path / "run.json"
    f.write_text("old")
    f.chmod(0o640)
    assert atomic.write(f, "new") == f
    assert f.read_text() == "new" and stat.S_IMODE(f.stat().st_mode) == 0o640
    assert any(str(p).endswith(".part") for p in fsyncs)  # the data reached the disk before the rename
    assert str(tmp_path) in [str(p) for p in fsyncs]  # and the rename itself (the folder)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.json"]
    atomic.write(tmp_path / "new.bin", b"\x00\x01")
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((tmp_path / "new.bin").stat().st_mode) == 0o666 & ~umask  # not mkstemp's 0600


def test_a_failure_mid_write_leaves_the_old_file_and_no_temporary(tmp_path):
    f = tmp_path / "rows.jsonl"
    f.write_text("kept\n")

    def half(out):
        out.write("half a ")
        raise OSError("disk went away")

    with pytest.raises(OSError, match="disk went away"):
        atomic.write(f, half)
    assert f.read_text() == "kept\n" and sorted(p.name for p in tmp_path.iterdir()) == ["rows.jsonl"]


def test_a_link_stays_a_link(tmp_path):
    target = tmp_path / "real.jsonl"
    target.write_text("a")
    link = tmp_path / "link.jsonl"
    link.symlink_to(target)
    atomic.write(link, "b")
    assert link.is_symlink() and target.read_text() == "b"


def test_publish_dir_replaces_a_folder_whole(tmp_path):
    tmp, final = tmp_path / ".checkpoint-3.part", tmp_path / "checkpoint-3"
    final.mkdir()
    (final / "stale").write_text("x")
    tmp.mkdir()
    (tmp / "trainer_state.json").write_text("{}")
    atomic.publish_dir(tmp, final)
    assert sorted(p.name for p in final.iterdir()) == ["trainer_state.json"] and not tmp.exists()


def test_the_studio_writes_files_atomically_through_the_one_helper():
    """No module but studio/atomic.py renames a temporary file over another (os.replace, Path.replace/rename of a
    temporary, mkstemp): the five copies are gone."""
    offenders = []
    for f in sorted(STUDIO.rglob("*.py")):
        rel = f.relative_to(STUDIO).as_posix()
        if rel == "atomic.py":
            continue
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
                continue
            owner = node.func.value
            if node.func.attr in ("replace", "mkstemp") and isinstance(owner, ast.Name) and owner.id in ("os",
                                                                                                          "tempfile"):
                offenders.append(f"{rel}:{node.lineno} {owner.id}.{node.func.attr}")
            elif node.func.attr == "replace" and isinstance(owner, ast.Name) and owner.id in ("tmp", "temp", "part"):
                offenders.append(f"{rel}:{node.lineno} {owner.id}.replace")
    assert not offenders, "atomic writes outside studio/atomic.py:\n" + "\n".join(offenders)
    from studio.runs import folder

    assert folder._write_atomic.__doc__ and "studio.atomic" in folder._write_atomic.__doc__
