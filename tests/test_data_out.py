"""Issue 18, point 6: `python -m studio data --out` never replaces a device, pipe or existing file silently."""
from __future__ import annotations

import contextlib
import io
import json
import os
import stat

import pytest

from studio.cli import main
from studio.data.clean import write_jsonl
from studio.data.normalize import DataError

ROWS = [{"prompt": "p", "completion": "c", "label": True}, {"prompt": "q", "completion": "d", "label": False}]


def _src(tmp_path):
    f = tmp_path / "in.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return f


def _data(argv):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(["data", *map(str, argv)])
    return code, err.getvalue()


def test_a_device_or_pipe_is_never_replaced_by_a_file(tmp_path):
    src = _src(tmp_path)
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    targets = [fifo] + ([__import__("pathlib").Path("/dev/full")] if os.path.exists("/dev/full") else [])
    for target in targets:
        before = os.stat(target).st_mode
        code, err = _data([src, "--out", target, "--overwrite"])
        assert code == 1 and "not a regular file" in err, err
        assert os.stat(target).st_mode == before  # still the device / pipe


def test_an_existing_output_is_kept_unless_overwrite_and_then_keeps_its_permissions(tmp_path):
    src = _src(tmp_path)
    out = tmp_path / "clean.jsonl"
    out.write_text("my earlier file\n")
    os.chmod(out, 0o640)
    code, err = _data([src, "--out", out])
    assert code == 1 and "already exists" in err and "--overwrite" in err
    assert out.read_text() == "my earlier file\n"
    code, err = _data([src, "--out", out, "--overwrite"])
    assert code == 0, err
    assert len(out.read_text().splitlines()) == 2
    assert stat.S_IMODE(out.stat().st_mode) == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clean.jsonl", "in.jsonl"]  # no temp file left


def test_overwriting_through_a_link_keeps_the_link(tmp_path):
    real = tmp_path / "real.jsonl"
    real.write_text("old\n")
    link = tmp_path / "link.jsonl"
    link.symlink_to(real)
    write_jsonl(ROWS, link, overwrite=True)
    assert link.is_symlink() and len(real.read_text().splitlines()) == 2
    with pytest.raises(DataError, match="already exists"):
        write_jsonl(ROWS, link)
