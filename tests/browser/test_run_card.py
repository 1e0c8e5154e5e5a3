"""Issue 30, item 2: the Train tab says what will train before Start, and the card equals the run.yaml that Start
writes: model, data file, weights, max_length, batch, accumulation and steps; rows and the path are shown too."""
from __future__ import annotations

import re

import yaml
from playwright.sync_api import expect

from tests.browser.conftest import shot
from tests.browser.test_train_tab import TINY, _set
from tests.conftest import wait_for


def test_the_run_card_equals_the_run_yaml_start_writes(page, studio_server, bundled_model_dir):
    page.get_by_role("tab", name="Train").click()
    page.locator("#run-name textarea, #run-name input").first.fill("card-run")
    for elem_id, value in TINY.items():
        _set(page, elem_id, value)
    _set(page, "cfg-kto-desirable_weight", "1.25")
    card = page.locator("#train-card")
    expect(card).to_contain_text("desirable_weight 1.25", timeout=120_000)
    expect(card).to_contain_text("max_length 128")
    expect(card).to_contain_text("Expected duration")
    text = card.inner_text()
    shot(page, "train-run-card")

    page.locator("#train-start").click()
    expect(page.locator("#train-message")).to_contain_text("Started run")
    run_yaml = studio_server["home"] / "runs" / "card-run" / "run.yaml"
    assert wait_for(run_yaml.is_file, timeout=300)
    page.locator("#train-stop").click()
    saved = yaml.safe_load(run_yaml.read_text())

    def shown(label: str) -> str:
        row = next(ln for ln in text.splitlines() if ln.strip().startswith(label))
        return row.split(label, 1)[1].strip()

    assert shown("Model") == saved["model"]["name_or_path"]
    assert shown("Data").startswith(f"{saved['data']['train_file']}:")
    assert re.search(r"\d+ training rows, \d+ held out", shown("Data"))
    assert shown("Weights") == (f"desirable_weight {saved['kto']['desirable_weight']}, undesirable_weight "
                                f"{saved['kto']['undesirable_weight']}")
    assert shown("max_length") == str(saved["kto"]["max_length"])
    t = saved["train"]
    assert shown("Batch").startswith(f"{t['per_device_train_batch_size']} rows per pass x "
                                     f"{t['gradient_accumulation_steps']} accumulation")
    assert shown("Steps").startswith(str(t["max_steps"]))
    assert "full precision" in shown("Path") and "CPU" in shown("Path")
