"""Writing files so that a crash never leaves half of one: the studio's one atomic-write helper.

``write(path, data)`` writes a temporary file next to ``path``, flushes and fsyncs it, gives it the permissions the
file had (a new file: what a plain ``open`` would give), renames it over ``path`` and fsyncs the folder, so after a
crash or a power cut the file is the old one or the new one, whole. ``publish_dir(tmp, final)`` does the same for a
folder written under a temporary name (a checkpoint, the converted bundled model). A link stays a link: the file it
points to is replaced.
"""
from __future__ import annotations

import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import IO, Callable

PART_SUFFIX = ".part"


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # a platform without directory handles (Windows): the rename is what it offers
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write(path: str | Path, data: str | bytes | Callable[[IO], None], encoding: str = "utf-8") -> Path:
    """Replace ``path`` with ``data`` (text, bytes, or a function writing into the open file) atomically and
    durably. Returns ``path``."""
    path = Path(path)
    if path.exists():
        path = path.resolve()  # a link stays a link
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = stat.S_IMODE(path.stat().st_mode) if path.exists() else None
    binary = isinstance(data, bytes)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=PART_SUFFIX, dir=path.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": encoding})) as f:
            if callable(data):
                data(f)
            else:
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if mode is None:  # a new file: the permissions a plain open() would give (mkstemp makes it 0600)
            umask = os.umask(0)
            os.umask(umask)
            mode = 0o666 & ~umask
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def publish_dir(tmp: str | Path, final: str | Path) -> Path:
    """Move the folder ``tmp`` (written whole) to ``final`` (replacing an existing one) and make it durable."""
    tmp, final = Path(tmp), Path(final)
    for f in tmp.rglob("*"):
        if f.is_file():
            try:
                with open(f, "rb+") as fh:
                    os.fsync(fh.fileno())
            except OSError:
                pass
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    return final
