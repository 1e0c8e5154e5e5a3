"""Claiming a run folder: one training process at a time writes into it, and whether its trainer still lives.

``claim(run_dir)`` takes an exclusive ``flock`` on ``run_dir/.run.lock`` and writes the owner (pid, host, when) into
it; the trainer holds it for the whole run. The kernel releases the lock when the holding process ends, however it
ends (a crash, kill -9, the machine's power), so there is no stale lock to recognise: ``held(run_dir)`` is true
exactly while a trainer lives, which is how every viewer (a second app, the CLI, the history after a restart) tells a
running run from an interrupted one. A second claim while the owner lives is refused with who holds it.

The same lock tells which apps serve a studio home: ``announce_app`` claims ``<home>/.apps/<pid>`` for the app's
whole life (with its address), and ``other_apps`` lists the claims a live process still holds. An app that was killed
leaves its folder behind but no holder, so it is never listed (and its folder is removed on the next look).
"""
from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from studio.config.run import ConfigError

LOCK = ".run.lock"

try:  # POSIX: flock, released by the kernel with the process
    import fcntl
except ImportError:  # pragma: no cover - Windows: filelock's msvcrt lock, also released with the process
    fcntl = None


class RunBusy(ConfigError):
    """The run folder is being written by another live process."""


@dataclass
class Claim:
    """A held run-folder lock (keep it for the run; ``release`` or the process's end frees it)."""

    run_dir: Path
    handle: object  # the open file descriptor (POSIX) or the filelock object


_held: dict[str, Claim] = {}  # this process's claims, by run folder


def _key(run_dir: str | Path) -> str:
    return str(Path(run_dir).resolve())


def read(run_dir: str | Path) -> dict | None:
    """Who claimed the folder last (pid, host, claimed); None when nobody wrote one. Says nothing about liveness:
    ask ``held``."""
    try:
        data = json.loads((Path(run_dir) / LOCK).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("pid") else None


def held(run_dir: str | Path) -> bool:
    """Whether a live process (this one included) holds the run folder's lock."""
    path = Path(run_dir) / LOCK
    if not path.is_file():
        return False
    if _key(run_dir) in _held:
        return True
    if fcntl is None:  # pragma: no cover
        from filelock import FileLock, Timeout

        probe = FileLock(str(path) + ".flock")
        try:
            probe.acquire(timeout=0)
        except Timeout:
            return True
        probe.release()
        return False
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)  # closing drops the probe's shared lock too
    return False


def claim(run_dir: str | Path, **about) -> Claim:
    """Take ``run_dir`` for this process; RunBusy if a live process holds it. ``about``: more to record beside the
    owner (``read`` returns it)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK
    if _key(run_dir) in _held:
        raise RunBusy(f"run folder {run_dir} is in use by this studio (process {os.getpid()}): stop that run first")
    me = {"pid": os.getpid(), "host": socket.gethostname(), "claimed": time.strftime("%Y-%m-%dT%H:%M:%S"), **about}
    if fcntl is None:  # pragma: no cover
        from filelock import FileLock, Timeout

        handle = FileLock(str(path) + ".flock")
        try:
            handle.acquire(timeout=0)
        except Timeout:
            raise _busy(run_dir) from None
        path.write_text(json.dumps(me), encoding="utf-8")
    else:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # no O_TRUNC: the owner's info stays until we hold it
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise _busy(run_dir) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode("utf-8"), 0)
        handle = fd
    c = Claim(run_dir, handle)
    _held[_key(run_dir)] = c
    return c


def _busy(run_dir: Path) -> RunBusy:
    info = read(run_dir) or {}
    return RunBusy(f"run folder {run_dir} is in use by process {info.get('pid', '?')} on {info.get('host', '?')} "
                   f"(since {info.get('claimed', '?')}): wait for it or stop it (python -m studio stop "
                   f"{run_dir}), or train under another name")


def release(run_dir: str | Path | Claim) -> None:
    """Let go of the folder if this process holds it (the file stays: it records who trained here last)."""
    key = _key(run_dir.run_dir if isinstance(run_dir, Claim) else run_dir)
    c = _held.pop(key, None)
    if c is None:
        return
    if fcntl is None:  # pragma: no cover
        c.handle.release()
        return
    try:
        fcntl.flock(c.handle, fcntl.LOCK_UN)
    finally:
        os.close(c.handle)


# ---- the apps serving one studio home ------------------------------------------------------------------------------

APPS = ".apps"


def _apps_dir(home: str | Path | None) -> Path:
    from studio import paths

    return Path(home) if home is not None else paths.home()


def announce_app(url: str, home: str | Path | None = None) -> Claim:
    """Record that this process serves the studio home (default: ``paths.home()``) at ``url``, for as long as it
    lives: other apps on the same home list it (``other_apps``)."""
    return claim(_apps_dir(home) / APPS / str(os.getpid()), url=url)


def other_apps(home: str | Path | None = None) -> list[dict]:
    """The other live apps serving the studio home: [{pid, host, claimed, url}], oldest first. Folders of apps that
    ended (killed too: the kernel let go of their lock) are not listed, and are removed."""
    folder = _apps_dir(home) / APPS
    out = []
    try:
        entries = sorted(folder.iterdir())
    except OSError:
        return []
    for d in entries:
        if not d.is_dir() or _key(d) in _held:
            continue
        if held(d):
            info = read(d)
            if info:
                out.append(info)
        else:
            _remove_stale(d)
    return sorted(out, key=lambda i: str(i.get("claimed", "")))


def _remove_stale(d: Path) -> None:
    """Remove an ended app's folder, holding its lock meanwhile (so a process that claims it now keeps it)."""
    try:
        c = claim(d)
    except (RunBusy, OSError):
        return
    try:
        (d / LOCK).unlink(missing_ok=True)
        d.rmdir()
    except OSError:
        pass
    finally:
        release(c)
