"""What the studio may read and write, and how it writes into folders that may hold other people's files.

Two rules live here:

- **Targets the studio writes into** (exports): a folder that is new, empty, or holds an earlier studio export of
  the same kind. An earlier export is recognised by the manifest the studio wrote beside it (``export.json``: the
  format and the files it wrote); only those files are replaced, and only with an explicit overwrite choice. A file
  the studio did not write is never deleted or overwritten.
- **The web UI's allow-list**: the UI reads data only from the studio home, Gradio's upload folder, the bundled
  sample and the folders given with ``app.py --allow-path DIR``; it writes exports only under the studio home
  (relative targets land in ``<home>/exports/``) and the allowed folders. The command line is not bounded: the user
  typed the path.

This module imports no Gradio and no torch.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Iterable

from studio.errors import StudioError

MARKER = "kto-studio"  # the manifest's "written_by"
EXPORTS = "exports"
# keys of an export manifest written before the marker existed (studio.export.ExportResult + source + created)
_OLD_MANIFEST_KEYS = {"format", "path", "files", "checks", "source"}

_allowed: list[Path] = []


class PathRefused(StudioError, ValueError):
    """A path the studio will not read or write; the message says why and what to do instead."""


# ---- the one type a path from a person arrives as ---------------------------------------------------------------

_KEY = object()


class UserPath:
    """A path (or hub id) a person typed, made only by this module: by the web UI's checks (:func:`ui_read`,
    :func:`ui_model`, :func:`ui_write`), which bound it to the allowed folders, or by :func:`typed` for the command
    line (not bounded: the user typed it in their own shell). Core functions that read a user-given path take a
    ``UserPath`` (see :func:`require`), so a UI box wired straight to them fails instead of reading anything."""

    __slots__ = ("text", "hub", "origin")

    def __init__(self, text: str, *, hub: bool = False, origin: str = "ui", _key=None):
        if _key is not _KEY:
            raise TypeError("a UserPath is made only by studio.safepaths (ui_read, ui_model, ui_write, typed)")
        self.text, self.hub, self.origin = text, hub, origin

    @property
    def path(self) -> Path:
        if self.hub:
            raise TypeError(f"{self.text} is a hub id, not a path")
        return Path(self.text)

    def __fspath__(self) -> str:
        return str(self.path)

    def __str__(self) -> str:
        return self.text

    def __repr__(self) -> str:
        return f"UserPath({self.text!r}, {self.origin})"

    def __eq__(self, other) -> bool:
        return isinstance(other, UserPath) and (self.text, self.hub) == (other.text, other.hub)

    def __hash__(self) -> int:
        return hash((self.text, self.hub))


def require(value, what: str) -> UserPath | None:
    """``value`` if it is a UserPath (or None); a plain string is a programming error: pass it through safepaths."""
    if value is None or isinstance(value, UserPath):
        return value
    raise TypeError(f"{what} must be a studio.safepaths.UserPath (from safepaths.ui_read / typed), not "
                    f"{type(value).__name__}")


def typed(text: str | Path | None) -> UserPath | None:
    """A path or hub id typed on the command line: not bounded (the user runs the command on their own files)."""
    if text is None or not str(text).strip():
        return None
    s = str(text).strip()
    return UserPath(s, hub=not looks_local(s), origin="cli", _key=_KEY)


# ---- the allow-list ----------------------------------------------------------------------------------------------

def allow(paths: Iterable[str | Path]) -> list[Path]:
    """Set the extra folders the UI may read and write (``app.py --allow-path``); returns them resolved."""
    global _allowed
    out = []
    for p in paths:
        r = Path(p).expanduser().resolve()
        if not r.is_dir():
            raise PathRefused(f"--allow-path {p}: no such folder")
        out.append(r)
    _allowed = out
    return list(out)


def allowed() -> list[Path]:
    return list(_allowed)


def uploads_dir() -> Path:
    """Where Gradio keeps uploaded files (GRADIO_TEMP_DIR, default <tmp>/gradio)."""
    return Path(os.environ.get("GRADIO_TEMP_DIR") or Path(tempfile.gettempdir()) / "gradio").resolve()


def _home() -> Path:
    from studio import paths

    return paths.home()


def read_roots() -> list[Path]:
    from studio.data import SAMPLE_PATH

    return [_home(), uploads_dir(), Path(SAMPLE_PATH).resolve().parent, *_allowed]


def write_roots() -> list[Path]:
    return [_home(), *_allowed]


def _inside(path: Path, roots: list[Path]) -> bool:
    return any(path == r or path.is_relative_to(r) for r in roots)


def _where() -> str:
    return ("the studio home (" + str(_home()) + ")" +
            (", " + ", ".join(str(p) for p in _allowed) if _allowed else ""))


def looks_local(source: str) -> bool:
    """True when ``source`` names a file or folder on this machine rather than a hub dataset id."""
    s = source.strip()
    if not s:
        return False
    if s.startswith(("/", "~", ".", "\\")) or (len(s) > 1 and s[1] == ":") or ".." in Path(s).parts:
        return True
    return Path(s).suffix.lower() in {".csv", ".tsv", ".json", ".jsonl", ".parquet", ".gz", ".txt"} or \
        Path(s).expanduser().exists()


def check_read(source: str) -> str:
    """``source`` unchanged if the UI may read it (a hub id, or a path inside the read roots); else PathRefused,
    without saying anything about the file (whether it exists, what it holds)."""
    if not looks_local(source):
        return source
    p = Path(source.strip()).expanduser()
    if not p.is_absolute():
        p = Path.cwd() / p
    resolved = p.resolve()  # follows symlinks: a link inside the home to a file outside is refused
    if _inside(resolved, read_roots()):
        return str(resolved)
    raise PathRefused(f"the web UI only reads files in the studio home, uploads, the bundled sample"
                      f"{' and ' + ', '.join(str(a) for a in _allowed) if _allowed else ''}: upload the file "
                      f"instead, or start the studio with --allow-path FOLDER to let it read that folder")


def ui_read(text: str | None, *, hub: bool = True) -> UserPath | None:
    """A file or folder (or, with ``hub``, a hub dataset id) typed into a web UI box: None when empty, a bounded
    UserPath when inside the read roots, else PathRefused (which tells nothing about the file)."""
    if text is None or not str(text).strip():
        return None
    s = str(text).strip()
    if hub and not looks_local(s):
        return UserPath(s, hub=True, _key=_KEY)
    return UserPath(check_read(s if looks_local(s) else "./" + s), _key=_KEY)


def ui_model(text: str | None) -> UserPath | None:
    """A model typed into a web UI box: the bundled model or a hub id as given; a local folder or .gguf file only
    inside the read roots (else PathRefused)."""
    from studio.config.run import BUNDLED_MODEL

    if text is None or not str(text).strip():
        return None
    s = str(text).strip()
    if s == BUNDLED_MODEL:
        return UserPath(s, hub=True, _key=_KEY)
    if s.count("/") == 1 and not s.startswith(("/", ".", "~", "\\")) and ".." not in s and \
            not Path(s).suffix.lower() == ".gguf" and not (Path.cwd() / s).exists():
        return UserPath(s, hub=True, _key=_KEY)  # owner/name: a hub id (nothing on disk is read)
    return UserPath(check_read(s if looks_local(s) else "./" + s), _key=_KEY)


def ui_write(text: str | None, default_name: str) -> UserPath:
    """:func:`ui_export_target` as a UserPath."""
    return UserPath(str(ui_export_target(text, default_name)), _key=_KEY)


def ui_export_target(text: str | None, default_name: str) -> Path:
    """Where a UI export goes: empty → ``<home>/exports/<default_name>``; a relative path → under
    ``<home>/exports/``; an absolute one must be inside the home or an allowed folder."""
    text = (text or "").strip()
    base = _home() / EXPORTS
    if not text:
        target = base / default_name
    else:
        p = Path(text).expanduser()
        target = p if p.is_absolute() else base / p
    resolved = target.resolve()
    if not _inside(resolved, write_roots()):
        raise PathRefused(f"the web UI exports only into {_where()}: give a name (it goes to {base}/NAME), or "
                          f"start the studio with --allow-path FOLDER to let it write there")
    return resolved


# ---- writing into folders the user may share with the studio ------------------------------------------------
#
# An export manifest records each file the studio wrote with its size and SHA-256 ("hashes": {name: {size, sha256}},
# a file inside a sub-folder as "sub/name"). A replace deletes a file only when it still matches that record, and
# never a folder wholesale (a sub-folder goes only once the files in it were deleted and it is empty). A manifest
# without hashes (older studios, or a stray file shaped like one) proves nothing: it never leads to a deletion.

HASH_CHUNK = 1 << 20


def file_record(path: Path) -> dict:
    """{"size", "sha256"} of a regular file."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(HASH_CHUNK), b""):
            h.update(chunk)
    return {"size": path.stat().st_size, "sha256": h.hexdigest()}


def file_records(folder: Path, names: Iterable[str]) -> dict[str, dict]:
    """The records of ``names`` in ``folder`` (a listed sub-folder: each regular file in it); links are skipped."""
    out: dict[str, dict] = {}
    folder = Path(folder)
    for name in _plain_names(names):
        p = folder / name
        if p.is_symlink():
            continue
        if p.is_file():
            out[name] = file_record(p)
        elif p.is_dir():
            for root, dirs, files in os.walk(p):
                for f in files:
                    q = Path(root) / f
                    if q.is_file() and not q.is_symlink():
                        out[q.relative_to(folder).as_posix()] = file_record(q)
    return out


def studio_manifest(path: Path) -> dict | None:
    """The export manifest at ``path`` if it looks like the studio's (marked, or an older studio manifest), else
    None. Whether it may be trusted for deletion is :func:`provable`'s question."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("files"), list):
        return None
    if data.get("written_by") == MARKER or _OLD_MANIFEST_KEYS <= set(data):
        return data
    return None


def provable(manifest: dict | None) -> dict[str, dict] | None:
    """The manifest's file records when it has them (a marked manifest with sizes and hashes), else None."""
    if not manifest or manifest.get("written_by") != MARKER or not isinstance(manifest.get("hashes"), dict):
        return None
    out = {}
    for name, rec in manifest["hashes"].items():
        parts = Path(name).parts if isinstance(name, str) else ()
        if (parts and ".." not in parts and not Path(name).is_absolute() and isinstance(rec, dict)
                and isinstance(rec.get("size"), int) and isinstance(rec.get("sha256"), str)):
            out[Path(name).as_posix()] = rec
    return out


def _plain_names(names) -> set[str]:
    """File names a manifest lists, without anything that could point elsewhere (``../x``, ``/etc/x``)."""
    return {n for n in names if isinstance(n, str) and n and Path(n).name == n and n not in (".", "..")}


def _listing(names: Iterable[str], n: int = 5) -> str:
    names = sorted(names)
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def _matches(p: Path, rec: dict) -> bool:
    try:
        return (p.is_file() and not p.is_symlink() and p.stat().st_size == rec["size"]
                and file_record(p)["sha256"] == rec["sha256"])
    except OSError:
        return False


def _unproven(folder: Path, entries: dict[str, Path], records: dict[str, dict], manifest: str) -> list[str]:
    """What in ``folder`` the records do not prove the studio wrote: names not recorded, files changed since (size
    or hash), links, and anything inside a sub-folder that is not a recorded, unchanged file."""
    bad = []
    for name, p in entries.items():
        if name == manifest:
            continue
        if p.is_symlink():
            bad.append(name)
        elif p.is_dir():
            for root, dirs, files in os.walk(p):
                for d in dirs:
                    if (Path(root) / d).is_symlink():
                        bad.append((Path(root) / d).relative_to(folder).as_posix())
                for f in files:
                    key = (Path(root) / f).relative_to(folder).as_posix()
                    if key not in records or not _matches(Path(root) / f, records[key]):
                        bad.append(key)
        elif name not in records or not _matches(p, records[name]):
            bad.append(name)
    return bad


def _delete_proven(folder: Path, entries: dict[str, Path], manifest: str) -> None:
    """Delete the files (already proven to match), then sub-folders left empty; the manifest last."""
    for name, p in entries.items():
        if name == manifest:
            continue
        if p.is_dir():
            for root, dirs, files in os.walk(p, topdown=False):
                for f in files:
                    (Path(root) / f).unlink()
                os.rmdir(root)  # empty now: only files the records proved were inside
        else:
            p.unlink()
    m = folder / manifest
    if m.exists():
        m.unlink()


OLD_MANIFEST_CHOICE = ("its {manifest} was written by an older studio (or is a copy of one) and does not record "
                       "the files' sizes and hashes, so the studio cannot prove which files it wrote and deletes "
                       "nothing there. Either delete or move that earlier export yourself, or pick a new or empty "
                       "folder; nothing was changed")


def prepare_folder(out: str | Path, kind: str, manifest: str = "export.json", overwrite: bool = False) -> Path:
    """A folder to write a ``kind`` export into: new, empty, or an earlier studio export of that kind whose manifest
    records every file in it with a size and hash that still match (then, with ``overwrite``, those files are
    deleted one by one). A manifest without hashes allows writing only into a folder holding nothing else.
    Anything else is refused; nothing is changed."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise PathRefused(f"{out} is a file, not a folder: give a new or empty folder to export into")
    if not out.exists():
        out.mkdir(parents=True)
        return out
    entries = {p.name: p for p in out.iterdir()}
    if not entries:
        return out
    m = studio_manifest(out / manifest)
    if m is None:
        raise PathRefused(f"{out} already holds files the studio did not write ({_listing(entries)}): pick a new or "
                          "empty folder; nothing there was changed")
    if m.get("format") != kind:
        raise PathRefused(f"{out} holds a '{m.get('format')}' export, not '{kind}': pick another folder")
    records = provable(m)
    if records is None:
        if set(entries) == {manifest} and overwrite:  # only the manifest: writing replaces nothing else
            return out
        if set(entries) == {manifest}:
            raise PathRefused(f"{out} holds an earlier {kind} export's {manifest}: choose to overwrite it "
                              "(--overwrite on the command line, 'Replace an earlier export' in the UI) or pick "
                              "another folder")
        raise PathRefused(f"{out} holds an earlier {kind} export, but " + OLD_MANIFEST_CHOICE.format(manifest=manifest))
    foreign = _unproven(out, entries, records, manifest)
    if foreign:
        raise PathRefused(f"{out} holds an earlier {kind} export and files the studio did not write or that changed "
                          f"since ({_listing(foreign)}): move them, or pick a new or empty folder; nothing was "
                          "changed")
    if not overwrite:
        raise PathRefused(f"{out} holds an earlier {kind} export: choose to overwrite it (--overwrite on the "
                          "command line, 'Replace an earlier export' in the UI) or pick another folder")
    _delete_proven(out, entries, manifest)
    return out


def prepare_files(folder: str | Path, names: list[str], kind: str, manifest: str, overwrite: bool = False) -> Path:
    """A folder where ``names`` (the export's files, manifest included) may be written: none of them exists, or
    those that do were written by an earlier studio export of ``kind`` (recorded with matching size and hash in
    ``manifest``) and ``overwrite`` is set. Other files in the folder are left alone."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise PathRefused(f"{folder} is a file, not a folder")
    folder.mkdir(parents=True, exist_ok=True)
    existing = [n for n in names if (folder / n).exists() or (folder / n).is_symlink()]
    if not existing:
        return folder
    m = studio_manifest(folder / manifest)
    records = provable(m) if m and m.get("format") == kind else None
    if m and m.get("format") == kind and records is None and existing != [manifest]:
        raise PathRefused(f"{_listing(existing)} in {folder} belong to an earlier {kind} export, but "
                          + OLD_MANIFEST_CHOICE.format(manifest=manifest))
    records = records or {}
    foreign = [n for n in existing if n != manifest and (n not in records or not _matches(folder / n, records[n]))]
    if manifest in existing and m is None:
        foreign.append(manifest)
    if foreign:
        raise PathRefused(f"{_listing(foreign)} already exist{'s' if len(foreign) == 1 else ''} in {folder} and "
                          "the studio did not write "
                          f"{'it' if len(foreign) == 1 else 'them'} (or they changed since): pick another file name; "
                          "nothing was changed")
    if not overwrite:
        raise PathRefused(f"{_listing(existing)} in {folder} {'is' if len(existing) == 1 else 'are'} an earlier "
                          f"{kind} export: choose to overwrite (--overwrite on the command line, 'Replace an "
                          "earlier export' in the UI) or pick another file name")
    for n in existing:
        (folder / n).unlink()
    return folder
