"""A user starts a run whose learning rate is far too high: the Train tab plots the held-out watch live, and says
that the collapse guard stopped the run, rolled it back, and what to change (issue 15)."""
from __future__ import annotations

from playwright.sync_api import expect

from tests.browser.conftest import shot
from tests.browser.test_train_tab import TRAINING_TIMEOUT, _set

UNSTABLE = {  # the sample data's default held-out split (5% of the rows, whole pairs), a learning rate 50x too high
    "cfg-train-max_steps": "12", "cfg-train-save_steps": "1000", "cfg-train-per_device_train_batch_size": "2",
    "cfg-train-gradient_accumulation_steps": "1", "cfg-kto-max_length": "64", "cfg-lora-r": "4",
    "cfg-lora-lora_alpha": "8", "cfg-train-learning_rate": "0.05",
}


def test_a_collapsing_run_is_plotted_stopped_and_explained(page, studio_server, bundled_model_dir):
    page.get_by_role("tab", name="Train").click()
    page.locator("#run-name textarea, #run-name input").first.fill("too-hot")
    for elem_id, value in UNSTABLE.items():
        _set(page, elem_id, value)
    page.locator("#cfg-train-gradient_checkpointing input[type=checkbox]").uncheck()
    page.locator("#train-start").click()
    expect(page.locator("#train-message")).to_contain_text("Started run too-hot")
    expect(page.locator("#train-status")).to_contain_text("finished", timeout=TRAINING_TIMEOUT)
    status = page.locator("#train-status")
    expect(status).to_contain_text("Collapse guard")
    expect(status).to_contain_text("Lower train.learning_rate (now 0.05)")
    expect(status).not_to_contain_text("Raise train.learning_rate")
    # the held-out checks are drawn beside the training curves
    for plot in ("plot-heldout-drift", "plot-heldout-accuracy"):
        expect(page.locator(f"#{plot} [aria-roledescription='axis']").first).to_be_attached(timeout=30_000)
        # each check is a dot: a line through the one or two checks of a short run would draw nothing
        expect(page.locator(f"#{plot} [aria-roledescription='point']").first).to_be_attached(timeout=30_000)
    health = page.locator("#train-health")
    expect(health).to_contain_text("The model collapsed")
    expect(health).not_to_contain_text("Raise train.learning_rate")
    shot(page, "train-collapse-guard")
