"""Issue 29: one run, many viewers. A second `python app.py` on the same studio home shows a run started in the first
live (its curves from step 1) and its Stop stops it: both render the run folder's event log, and Stop is the run
folder's stop request, which the first app's trainer turns into a checkpoint and the adapter."""
from __future__ import annotations

from pathlib import Path

import pytest
from playwright.sync_api import expect

from tests.browser.conftest import CHROMIUM, serve_studio, shot
from tests.browser.test_train_tab import TINY, TRAINING_TIMEOUT, _logged_step, _set, _wait_plotted

MAX_STEPS = 200  # stopped long before: the test never waits for the end


def _browser_page(p, url):
    browser = p.chromium.launch(executable_path=CHROMIUM,
                                args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                                      "--no-first-run", "--disable-background-networking",
                                      "--disable-component-update", "--disable-sync"])
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(30_000)
    page.goto(url)
    page.wait_for_selector("text=KTO Studio")
    page.get_by_role("tab", name="Train").click()
    return browser, page


def test_a_second_app_on_the_same_home_shows_the_live_run_and_its_stop_stops_it(tmp_path, bundled_model_dir):
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        pytest.fail(f"chromium not found at {CHROMIUM}: apt-get install chromium (.ci/run does)")
    home = tmp_path / "home"
    with serve_studio(home, tmp_path / "first.log") as first, \
            serve_studio(home, tmp_path / "second.log") as second, sync_playwright() as p:
        b1, one = _browser_page(p, first["url"])
        b2, two = _browser_page(p, second["url"])
        expect(two.locator("#train-status")).to_contain_text("No run yet")

        one.locator("#run-name textarea, #run-name input").first.fill("shared-run")
        for elem_id, value in {**TINY, "cfg-train-max_steps": str(MAX_STEPS)}.items():
            _set(one, elem_id, value)
        one.locator("#cfg-train-gradient_checkpointing input[type=checkbox]").uncheck()
        one.locator("#train-start").click()
        expect(one.locator("#train-message")).to_contain_text("Started run shared-run")

        # the second app, which started nothing, shows the first app's run live, curves from step 1
        expect(two.locator("#train-status")).to_contain_text("run shared-run", timeout=TRAINING_TIMEOUT)
        expect(two.locator("#train-status")).to_contain_text("training", timeout=TRAINING_TIMEOUT)
        two.wait_for_function(
            "() => /step ([2-9]|\\d\\d+) \\//.test(document.querySelector('#train-progress').innerText)",
            timeout=TRAINING_TIMEOUT)
        expect(two.locator("#train-progress")).to_contain_text(f"/ {MAX_STEPS}")
        _wait_plotted(two, "plot-loss", 1, 2)
        expect(two.locator("#train-stop")).to_be_enabled()
        shot(two, "second-app-live")

        # its Stop stops the run the first app trains
        two.locator("#train-stop").click()
        expect(two.locator("#train-message")).to_contain_text("Stopping shared-run (trained by another process)")
        expect(one.locator("#train-status")).to_contain_text("stopped", timeout=TRAINING_TIMEOUT)
        expect(two.locator("#train-status")).to_contain_text("stopped", timeout=60_000)
        stopped_at = _logged_step(one)
        assert 2 <= stopped_at < MAX_STEPS
        run_dir = home / "runs" / "shared-run"
        assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
        assert (run_dir / f"checkpoint-{stopped_at}" / "trainer_state.json").is_file()
        expect(two.locator("#train-stop")).to_be_disabled()
        expect(two.locator("#history-table")).to_contain_text("stopped")
        shot(two, "second-app-stopped")
        b1.close()
        b2.close()


def test_an_app_started_on_a_home_another_app_serves_warns_on_its_console_and_in_its_page(tmp_path):
    """Issue 30, item 8: the second app says so at start; once the other app is gone, a reload says nothing."""
    from playwright.sync_api import sync_playwright

    from tests.test_other_apps import announcing_app

    if not Path(CHROMIUM).exists():
        pytest.fail(f"chromium not found at {CHROMIUM}: apt-get install chromium (.ci/run does)")
    home = tmp_path / "home"
    other = announcing_app(home, "http://127.0.0.1:7999")
    try:
        with serve_studio(home, tmp_path / "second.log") as second, sync_playwright() as p:
            console = second["log"].read_text()
            assert "WARNING: Another KTO Studio already serves this studio home" in console
            assert "http://127.0.0.1:7999" in console
            browser, page = _browser_page(p, second["url"])
            expect(page.locator("#other-apps")).to_contain_text("Another KTO Studio already serves this studio home")
            expect(page.locator("#other-apps")).to_contain_text("http://127.0.0.1:7999")
            shot(page, "second-app-warned")
            other.kill()
            other.wait()
            page.reload()
            page.wait_for_selector("text=KTO Studio")
            page.wait_for_timeout(1500)
            expect(page.locator("#other-apps")).not_to_contain_text("Another KTO Studio")
            browser.close()
    finally:
        other.kill()
        other.wait()
