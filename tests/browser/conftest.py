"""Real-browser fixtures: the studio served on a free localhost port, driven by Debian's chromium via Playwright.

Run with `pytest tests/browser`. Chromium comes from apt (`apt-get install chromium`); `playwright install` is not
used (it downloads a browser). Screenshots go to test-artifacts/.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = os.environ.get("CHROMIUM", shutil.which("chromium") or "/usr/bin/chromium")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve_studio(home: Path, log_path: Path):
    """`python app.py` on a free port with ``home`` as its studio home; yields {url, home, log}."""
    import urllib.request

    port = _free_port()
    env = dict(os.environ, KTO_STUDIO_HOME=str(home), PYTHONUNBUFFERED="1")
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "app.py", "--port", str(port)], cwd=ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 240  # a shared, loaded 2-core machine imports torch, gradio and transformers slowly
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError("studio exited early:\n" + log_path.read_text())
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                if time.time() > deadline:
                    raise RuntimeError("studio did not start in 240 s:\n" + log_path.read_text()) from None
                time.sleep(0.5)
        yield {"url": url, "home": home, "log": log_path}
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@contextlib.contextmanager
def serve_with_trained_run(tmp_path: Path, tmp_path_factory):
    """The studio with one trained run ('tiny', 12 rows of the sample data held out) already in its home, as
    after a training session (its evaluation and exports left out, so the page makes them afresh)."""
    from tests.conftest import trained_run_dir

    home = tmp_path / "home"
    shutil.copytree(trained_run_dir(tmp_path_factory), home / "runs" / "tiny",
                    ignore=shutil.ignore_patterns("eval.json", "export"))
    with serve_studio(home, tmp_path / "server.log") as server:
        yield server


@pytest.fixture()
def studio_server(tmp_path):
    """The studio with an empty home of its own."""
    with serve_studio(tmp_path / "home", tmp_path / "server.log") as server:
        yield server


@pytest.fixture()
def page(studio_server):
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        pytest.fail(f"chromium not found at {CHROMIUM}: apt-get install chromium (.ci/run does)")
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"],
        )
        pg = browser.new_page(viewport={"width": 1400, "height": 1000})
        pg.set_default_timeout(30_000)
        pg.add_init_script(WATCH_RAW_I18N)
        pg.goto(studio_server["url"])
        pg.wait_for_selector("text=KTO Studio")
        yield pg
        browser.close()


# Records every text the page ever shows that is a raw Gradio i18n key ("common.complete": a string the frontend's
# dictionary lacks), also where it shows for a moment only (the status tracker's screen-reader line clears after 1 s).
WATCH_RAW_I18N = """
window.__rawI18n = [];
document.addEventListener('DOMContentLoaded', () => {
  new MutationObserver(mutations => {
    for (const m of mutations) {
      const hit = (m.target.textContent || '').match(/\\bcommon\\.[a-z_]+/);
      if (hit && !window.__rawI18n.includes(hit[0])) window.__rawI18n.push(hit[0]);
    }
  }).observe(document.body, {subtree: true, childList: true, characterData: true});
});
"""


def raw_i18n_seen(page) -> list[str]:
    """The raw i18n keys the page has shown since it was loaded (see WATCH_RAW_I18N); none is wanted."""
    return page.evaluate("window.__rawI18n || []")


def shot(page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)
