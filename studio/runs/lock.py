"""Claiming a run folder: one training process at a time writes into it.

``claim(run_dir)`` creates ``run_dir/.run.lock`` atomically (O_EXCL) holding the owner's pid, its start time and the
host. A second claim while the owner lives is refused with who holds it; a lock left by a process that is gone (a
crash, kill -9) is recognised by its pid and start time on this host and replaced. ``release`` removes it only if
it is still ours.
"""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from studio.config.run import ConfigError

LOCK = ".run.lock"


class RunBusy(ConfigError):
    """The run folder is being written by another live process."""


def _start_time(pid: int) -> float | None:
    try:
        import psutil

        return psutil.Process(pid).create_time()
    except Exception:  # no such process, or psutil missing
        return None


def _alive(info: dict) -> bool:
    """Whether the process that wrote ``info`` still runs (pid reuse is caught by the start time)."""
    if info.get("host") != socket.gethostname():
        return True  # another machine's process: cannot tell, assume it runs
    pid = info.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    started, recorded = _start_time(pid), info.get("started")
    if started is not None and isinstance(recorded, (int, float)) and abs(started - recorded) > 1.0:
        return False  # the pid now belongs to another process
    return True


def read(run_dir: str | Path) -> dict | None:
    try:
        return json.loads((Path(run_dir) / LOCK).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def claim(run_dir: str | Path) -> Path:
    """Take ``run_dir`` for this process; RunBusy if a live process holds it. Returns the lock file."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = run_dir / LOCK
    me = {"pid": os.getpid(), "started": _start_time(os.getpid()), "host": socket.gethostname(),
          "claimed": time.strftime("%Y-%m-%dT%H:%M:%S")}
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            info = read(run_dir)
            if info is None:
                # being written this instant, or an empty file left by a crash mid-claim
                time.sleep(0.2)
                info = read(run_dir)
                if info is None and time.time() - _mtime(lock) < 5:
                    raise RunBusy(f"run folder {run_dir} is being claimed by another process") from None
            if info is not None and _alive(info):
                raise RunBusy(f"run folder {run_dir} is in use by process {info.get('pid')} on "
                              f"{info.get('host')} (since {info.get('claimed')}): wait for it or stop it, or train "
                              f"under another name. If no such run exists, delete {lock}") from None
            _clear_stale(lock, info)
            continue
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(me, f)
        return lock
    raise RunBusy(f"could not claim run folder {run_dir}: another process keeps taking it")


def _mtime(p: Path) -> float:
    try:
        return p.stat().st_mtime
    except OSError:
        return 0.0


def _clear_stale(lock: Path, info: dict | None) -> None:
    """Remove a dead owner's lock, unless someone replaced it meanwhile (rename first, then check what we took)."""
    aside = lock.with_name(f"{LOCK}.stale-{os.getpid()}")
    try:
        os.replace(lock, aside)
    except FileNotFoundError:
        return
    try:
        taken = json.loads(aside.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        taken = None
    if taken is not None and taken != info and _alive(taken):
        os.replace(aside, lock)  # a live process claimed it between our read and the rename: give it back
        raise RunBusy(f"run folder {lock.parent} was just claimed by process {taken.get('pid')}")
    aside.unlink(missing_ok=True)


def release(run_dir: str | Path) -> None:
    """Remove the lock if this process holds it."""
    info = read(run_dir)
    if info and info.get("pid") == os.getpid() and info.get("host") == socket.gethostname():
        try:
            (Path(run_dir) / LOCK).unlink()
        except FileNotFoundError:
            pass
