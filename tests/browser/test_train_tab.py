"""A user starts a short CPU run on the bundled model, watches the curves grow, opens a second tab that shows the
same run, stops it, finds the saved adapter in the run history, resumes it and sees it finish."""
from __future__ import annotations

import re

from playwright.sync_api import expect

from tests.browser.conftest import raw_i18n_seen, shot

MAX_STEPS = 20  # few enough that the studio skips the up-front reference pass ('auto'): the test stays short
TINY = {  # a run that takes seconds a step on a 2-core CPU
    "cfg-train-max_steps": str(MAX_STEPS), "cfg-train-save_steps": "1000", "cfg-train-per_device_train_batch_size": "2",
    "cfg-train-gradient_accumulation_steps": "1", "cfg-kto-max_length": "128", "cfg-lora-r": "4",
    "cfg-lora-lora_alpha": "8", "cfg-train-learning_rate": "0.001",
}
STEP = re.compile(r"step (\d+) / (\d+)")
TRAINING_TIMEOUT = 900_000  # ms; the CPU is shared with other work


def _set(page, elem_id: str, value: str) -> None:
    box = page.locator(f"#{elem_id} input")
    box.fill(value)
    box.press("Tab")


def _x_range(page, elem_id: str) -> tuple[float, float] | None:
    """The steps a plot's x axis spans, read from the chart's accessible description (Vega writes it)."""
    axis = page.locator(f"#{elem_id} [aria-roledescription='axis'][aria-label^='X-axis']")
    if axis.count() == 0:
        return None
    m = re.search(r"values from ([\d.]+) to ([\d.]+)", axis.first.get_attribute("aria-label") or "")
    return (float(m.group(1)), float(m.group(2))) if m else None


def _wait_plotted(page, elem_id: str, first: int, last: int, timeout=60_000) -> None:
    """Wait until the plot's x axis runs from step ``first`` to at least ``last`` (the timer redraws each second)."""
    page.wait_for_function(
        """([id, first, last]) => {
            const a = document.querySelector(`#${id} [aria-roledescription='axis'][aria-label^='X-axis']`);
            const m = a && a.getAttribute('aria-label').match(/values from ([\d.]+) to ([\d.]+)/);
            return m && parseFloat(m[1]) === first && parseFloat(m[2]) >= last;
        }""", arg=[elem_id, first, last], timeout=timeout)


def _logged_step(page) -> int:
    m = STEP.search(page.locator("#train-progress").inner_text())
    return int(m.group(1)) if m else 0


def test_start_watch_stop_then_resume_to_the_end(page, studio_server, bundled_model_dir):
    page.get_by_role("tab", name="Train").click()
    page.locator("#run-name textarea, #run-name input").first.fill("browser-run")
    for elem_id, value in TINY.items():
        _set(page, elem_id, value)
    page.locator("#cfg-train-gradient_checkpointing input[type=checkbox]").uncheck()

    # a setting KTO cannot use is refused with the reason and the fix; nothing starts
    _set(page, "cfg-train-per_device_train_batch_size", "1")
    page.locator("#train-start").click()
    expect(page.locator("#train-message")).to_contain_text("Not started")
    expect(page.locator("#train-message")).to_contain_text("KTO needs at least 2")
    expect(page.locator("#train-status")).to_contain_text("No run yet")
    _set(page, "cfg-train-per_device_train_batch_size", "2")

    page.locator("#train-start").click()
    expect(page.locator("#train-message")).to_contain_text("Started run browser-run")
    expect(page.locator("#train-status")).to_contain_text("training", timeout=TRAINING_TIMEOUT)

    # the curves grow while it trains
    page.wait_for_function("() => /step ([2-9]|\\d\\d+) \\//.test(document.querySelector('#train-progress').innerText)",
                           timeout=TRAINING_TIMEOUT)
    _wait_plotted(page, "plot-loss", 1, 2)
    _wait_plotted(page, "plot-lr", 1, 2)
    _wait_plotted(page, "plot-rewards", 1, 2)
    expect(page.locator("#train-memory")).to_contain_text("RAM")
    expect(page.locator("#train-health")).to_contain_text("KTO health")
    shot(page, "train-running")

    # a second browser tab reattaches to the running job instead of showing a blank form
    second = page.context.browser.new_page(viewport={"width": 1400, "height": 1000})
    second.goto(studio_server["url"])
    second.get_by_role("tab", name="Train").click()
    expect(second.locator("#run-name textarea, #run-name input").first).to_have_value("browser-run")
    expect(second.locator("#cfg-train-max_steps input")).to_have_value(str(MAX_STEPS))
    expect(second.locator("#train-status")).to_contain_text("run browser-run")
    expect(second.locator("#train-progress")).to_contain_text(f"/ {MAX_STEPS}")
    _wait_plotted(second, "plot-loss", 1, 2)
    # and a second start is refused while this one runs
    second.locator("#train-start").click()
    expect(second.locator("#train-message")).to_contain_text("a training job is running (browser-run)")
    second.close()

    page.locator("#train-stop").click()
    expect(page.locator("#train-status")).to_contain_text("stopped", timeout=TRAINING_TIMEOUT)
    stopped_at = _logged_step(page)
    assert 2 <= stopped_at < MAX_STEPS
    adapter = studio_server["home"] / "runs" / "browser-run" / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file()
    history = page.locator("#history-table")
    expect(history).to_contain_text("stopped")
    expect(history).to_contain_text(str(adapter))
    expect(history).to_contain_text(f"{stopped_at} / {MAX_STEPS}")
    expect(page.locator("#train-checkpoint input")).to_have_value(f"latest (checkpoint-{stopped_at})")
    shot(page, "train-stopped")

    # resume the saved run for two more steps
    _set(page, "cfg-train-max_steps", str(stopped_at + 2))
    page.locator("#train-resume").click()
    expect(page.locator("#train-message")).to_contain_text(f"Resuming browser-run from checkpoint-{stopped_at}")
    expect(page.locator("#train-status")).to_contain_text("finished", timeout=TRAINING_TIMEOUT)
    assert _logged_step(page) == stopped_at + 2
    # the plot shows the whole run, the steps before the stop included
    _wait_plotted(page, "plot-loss", 1, stopped_at + 2)
    assert _x_range(page, "plot-loss") == (1, stopped_at + 2)
    rows = page.locator("#history-table tbody tr")
    expect(rows).to_have_count(1)  # resuming continued the same run
    expect(rows.first).to_contain_text("finished")
    expect(rows.first).to_contain_text(f"{stopped_at + 2} / {stopped_at + 2}")

    # open it from the history: the details list its adapter and checkpoint
    page.locator("#history-run input").click()
    page.get_by_role("option", name=re.compile("browser-run")).click()
    page.locator("#history-open").click()
    detail = page.locator("#history-detail")
    expect(detail).to_contain_text("finished")
    expect(detail).to_contain_text(f"checkpoint-{stopped_at + 2}")
    expect(detail).to_contain_text("KTO health")
    shot(page, "train-finished")
    # starting, stopping, opening and resuming never showed a raw Gradio i18n key ("common.complete")
    assert raw_i18n_seen(page) == []


def test_settings_typed_in_the_train_form_survive_a_visit_to_another_tab(page):
    """The form is refreshed from the shared config when the tab is shown; what the user typed is in that config."""
    page.get_by_role("tab", name="Train").click()
    _set(page, "cfg-train-learning_rate", "0.00042")
    _set(page, "cfg-train-num_train_epochs", "3")
    page.wait_for_timeout(300)  # a person's pause before switching tabs: the edits' events reach the server first
    page.get_by_role("tab", name="Model & preset").click()
    page.get_by_role("tab", name="Train").click()
    expect(page.locator("#cfg-train-num_train_epochs input, #cfg-train-num_train_epochs textarea").first).to_have_value("3")
    assert float(page.locator("#cfg-train-learning_rate input").input_value()) == 0.00042
