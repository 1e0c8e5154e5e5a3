"""Issue 30, item 1: a late handler must not train the wrong model. Picking "CPU only" while Mistral-7B is selected
starts a slow hub lookup (stubbed here: the reachability probe waits until the test lets it answer); the user picks
the bundled model meanwhile. The later choice wins, in the page and in the run.yaml that Start writes.

The studio is served in this process so the hub can be stubbed; the browser drives it as a user does."""
from __future__ import annotations

import threading
from pathlib import Path

import pytest
import yaml

from tests.browser.conftest import CHROMIUM, _free_port, shot
from tests.browser.test_model_tab import pick

MISTRAL = "mistralai/Mistral-7B-Instruct-v0.3"


@pytest.fixture()
def slow_hub_studio(tmp_path, monkeypatch):
    from huggingface_hub import constants

    from studio.config.run import RunConfig
    from studio.models import hub
    from studio.ui.app import CSS, I18N, Studio, build_app

    home = tmp_path / "home"
    monkeypatch.setenv("KTO_STUDIO_HOME", str(home))
    entered, release = threading.Event(), threading.Event()

    def slow_probe(timeout):  # the hub lookup that answers late: offline, after the user has moved on
        entered.set()
        assert release.wait(300)
        return False

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "_offline", None)
    monkeypatch.setattr(hub, "_probe", slow_probe)
    studio = Studio(RunConfig().updated({"model.name_or_path": MISTRAL}))
    studio.card = "8gb"
    app = build_app(studio)
    # know when the CPU-card handler has returned (its result then is on its way to the page)
    gpu_fn = next(f for f in app.fns.values()
                  if any(getattr(app.blocks.get(b), "elem_id", None) == "gpu-preset" and ev == "input"
                         for b, ev in f.targets))
    finished, real = threading.Event(), gpu_fn.fn

    def watched(*args, **kw):
        try:
            return real(*args, **kw)
        finally:
            if args and args[0] == "cpu":
                finished.set()

    gpu_fn.fn = watched
    port = _free_port()
    app.queue(default_concurrency_limit=4).launch(server_port=port, prevent_thread_lock=True, quiet=True, css=CSS,
                                                  i18n=I18N)
    try:
        yield {"url": f"http://127.0.0.1:{port}", "home": home, "studio": studio, "entered": entered,
               "release": release, "finished": finished}
    finally:
        release.set()
        studio.engine.stop()
        studio.engine.wait()
        app.close()


def test_the_later_choice_wins_over_a_slow_handler_in_the_page_and_in_run_yaml(slow_hub_studio, bundled_model_dir):
    from playwright.sync_api import expect, sync_playwright

    from studio.config.run import BUNDLED_MODEL

    s = slow_hub_studio
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--headless", "--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(120_000)
        page.goto(s["url"])
        page.get_by_role("tab", name="Model & preset").click()
        name_box = page.locator("#cfg-model-name_or_path textarea, #cfg-model-name_or_path input").first

        pick(page, "gpu-preset", "CPU only")
        assert s["entered"].wait(120)  # the CPU plan is waiting on the hub
        pick(page, "model-preset", "SmolLM2-135M-Instruct (bundled) · 135M")
        expect(name_box).to_have_value(BUNDLED_MODEL, timeout=180_000)
        assert s["studio"].config.model.name_or_path == BUNDLED_MODEL

        s["release"].set()  # the late answer arrives
        assert s["finished"].wait(300)
        assert s["studio"].config.model.name_or_path == BUNDLED_MODEL and s["studio"].card == "cpu"
        # a round trip after the late result: the Train tab reloads what the other tabs changed
        page.get_by_role("tab", name="Train").click()
        expect(page.locator("#train-message")).to_contain_text("Settings updated from the other tabs")
        page.get_by_role("tab", name="Model & preset").click()
        expect(name_box).to_have_value(BUNDLED_MODEL, timeout=60_000)
        assert "SmolLM2" in page.locator("#model-preset input").input_value()
        shot(page, "pending-run-later-choice-wins")

        page.get_by_role("tab", name="Train").click()
        page.locator("#train-start").click()
        expect(page.locator("#train-message")).to_contain_text("Started run")
        runs = s["home"] / "runs"
        assert _wait(lambda: list(runs.glob("*/run.yaml")))
        page.locator("#train-stop").click()
        browser.close()
    s["studio"].engine.wait()
    [run_yaml] = list(runs.glob("*/run.yaml"))
    saved = yaml.safe_load(run_yaml.read_text())
    assert saved["model"]["name_or_path"] == BUNDLED_MODEL
    assert saved["data"]["train_file"] == s["studio"].config.data.train_file


def _wait(pred, timeout: float = 300) -> bool:
    from tests.conftest import wait_for

    return wait_for(pred, timeout=timeout, every=0.2)
