"""Issue 30, item 8: a second app on the same studio home is told at start that another app serves it (on the
console and in the page); an app that was killed is not counted."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from studio.runs import lock
from studio.ui.app import other_apps_warning

ROOT = Path(__file__).resolve().parents[1]

ANNOUNCER = ("import sys, time; from studio.runs import lock; lock.announce_app(sys.argv[1], sys.argv[2]); "
             "print('up', flush=True); time.sleep(600)")


def announcing_app(home: Path, url: str) -> subprocess.Popen:
    """A process that serves ``home`` as an app would announce it (no web server: only the record)."""
    proc = subprocess.Popen([sys.executable, "-c", ANNOUNCER, url, str(home)], cwd=ROOT, stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "up"
    return proc


def test_a_live_app_on_the_home_is_listed_with_its_address_and_a_killed_one_is_not(tmp_path):
    home = tmp_path / "home"
    assert lock.other_apps(home) == []
    first = announcing_app(home, "http://127.0.0.1:7861")
    try:
        others = lock.other_apps(home)
        assert [(o["pid"], o["url"]) for o in others] == [(first.pid, "http://127.0.0.1:7861")]
        text = other_apps_warning(others, home)
        assert "Another KTO Studio already serves this studio home" in text
        assert str(home) in text and "http://127.0.0.1:7861" in text and str(first.pid) in text
    finally:
        first.send_signal(signal.SIGKILL)  # killed: no chance to clean up after itself
        first.wait()
    assert lock.other_apps(home) == []  # the kernel let go of its lock: stale, not another app
    assert not (home / lock.APPS / str(first.pid)).exists()  # and its record is gone
    assert other_apps_warning([], home) is None


def test_this_app_is_never_another_app(tmp_path):
    home = tmp_path / "home"
    me = lock.announce_app("http://127.0.0.1:7862", home)
    try:
        assert lock.other_apps(home) == []
        second = announcing_app(home, "http://127.0.0.1:7863")
        try:
            assert [o["url"] for o in lock.other_apps(home)] == ["http://127.0.0.1:7863"]
        finally:
            second.kill()
            second.wait()
    finally:
        lock.release(me)
