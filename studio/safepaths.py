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

def studio_manifest(path: Path) -> dict | None:
    """The export manifest at ``path`` if the studio wrote it (marked, or an older studio manifest), else None."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("files"), list):
        return None
    if data.get("written_by") == MARKER or _OLD_MANIFEST_KEYS <= set(data):
        return data
    return None


def _plain_names(names) -> set[str]:
    """File names a manifest lists, without anything that could point elsewhere (``../x``, ``/etc/x``)."""
    return {n for n in names if isinstance(n, str) and n and Path(n).name == n and n not in (".", "..")}


def _listing(names: Iterable[str], n: int = 5) -> str:
    names = sorted(names)
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def prepare_folder(out: str | Path, kind: str, manifest: str = "export.json", overwrite: bool = False) -> Path:
    """A folder to write a ``kind`` export into: new, empty, or an earlier studio export of that kind (then, with
    ``overwrite``, only the files its manifest lists are removed). Anything else is refused; nothing is changed."""
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
    ours = (_plain_names(m["files"]) | {manifest}) & set(entries)
    foreign = set(entries) - ours
    if foreign:
        raise PathRefused(f"{out} holds an earlier {kind} export and files the studio did not write "
                          f"({_listing(foreign)}): move them, or pick a new or empty folder; nothing was changed")
    if not overwrite:
        raise PathRefused(f"{out} holds an earlier {kind} export: choose to overwrite it (--overwrite on the "
                          "command line, 'Replace an earlier export' in the UI) or pick another folder")
    for name in ours:
        p = entries[name]
        if p.is_dir() and not p.is_symlink():
            import shutil

            shutil.rmtree(p)
        else:
            p.unlink()
    return out


def prepare_files(folder: str | Path, names: list[str], kind: str, manifest: str, overwrite: bool = False) -> Path:
    """A folder where ``names`` (the export's files, manifest included) may be written: none of them exists, or
    those that do were written by an earlier studio export of ``kind`` (listed in ``manifest``) and ``overwrite``
    is set. Other files in the folder are left alone."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise PathRefused(f"{folder} is a file, not a folder")
    folder.mkdir(parents=True, exist_ok=True)
    existing = [n for n in names if (folder / n).exists() or (folder / n).is_symlink()]
    if not existing:
        return folder
    m = studio_manifest(folder / manifest)
    ours = (_plain_names(m["files"]) | {manifest}) if m and m.get("format") == kind else set()
    foreign = [n for n in existing if n not in ours]
    if foreign:
        raise PathRefused(f"{_listing(foreign)} already exist{'s' if len(foreign) == 1 else ''} in {folder} and "
                          "the studio did not write "
                          f"{'it' if len(foreign) == 1 else 'them'}: pick another file name; nothing was changed")
    if not overwrite:
        raise PathRefused(f"{_listing(existing)} in {folder} {'is' if len(existing) == 1 else 'are'} an earlier "
                          f"{kind} export: choose to overwrite (--overwrite on the command line, 'Replace an "
                          "earlier export' in the UI) or pick another file name")
    for n in existing:
        (folder / n).unlink()
    return folder
