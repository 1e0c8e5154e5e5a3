"""A user uploads a messy paired preference file, sees it converted to KTO rows and balanced, and saves a clean copy."""
from __future__ import annotations

import json

from playwright.sync_api import expect

from tests.browser.conftest import shot
from tests.test_data_clean import messy_pairs


def test_upload_pairs_see_them_converted_and_balanced_then_save(page, studio_server, tmp_path, bundled_model_dir):
    src = tmp_path / "pairs.jsonl"
    src.write_text("".join(json.dumps(p) + "\n" for p in messy_pairs()), encoding="utf-8")
    original = src.read_bytes()

    page.get_by_role("tab", name="Data").click()
    # a file cut off mid-download first: a message, and the tab keeps working
    cut = tmp_path / "cut.jsonl"
    cut.write_bytes(original[:-25])
    page.locator("#data-upload input[type=file]").set_input_files(str(cut))
    expect(page.locator("#data-summary")).to_contain_text("cut.jsonl line 8 is not valid JSON", timeout=60_000)
    expect(page.locator("#data-summary")).to_contain_text("the file may be truncated")

    page.locator("#data-upload button[aria-label='Clear']").click()
    page.locator("#data-upload input[type=file]").set_input_files(str(src))

    # converted: 8 pairs -> 16 unpaired KTO rows, with the problems listed by row
    expect(page.locator("#data-summary")).to_contain_text("8 chosen/rejected pairs unpaired into 16 KTO rows",
                                                          timeout=60_000)
    problems = page.locator("#data-problems")
    expect(problems).to_contain_text("duplicate (2)")
    expect(problems).to_contain_text("empty completion (3)")
    expect(page.locator("#data-table")).to_contain_text("A careful answer to 2.")
    expect(page.locator("#data-lengths")).to_contain_text("Measured with bundled:smollm2-135m")
    expect(page.locator("#data-length-plot img, #data-length-plot svg").first).to_be_visible()

    # balanced: after dropping 7 bad rows, 6 desirable vs 3 undesirable; the undesirable weight goes up
    balance = page.locator("#data-balance")
    expect(balance).to_contain_text("After the filters: 6 desirable, 3 undesirable")
    expect(balance).to_contain_text("in the range the studio accepts")
    undesirable_weight = float(page.locator("#data-undesirable-weight input").input_value())
    assert 6 / (undesirable_weight * 3) <= 4 / 3 and 6 / (undesirable_weight * 3) >= 1
    expect(page.locator("#data-gauge img, #data-gauge svg").first).to_be_visible()
    shot(page, "data-tab-balanced")

    page.locator("#data-save").click()
    saved = page.locator("#data-saved")
    expect(saved).to_contain_text("Saved 9 rows", timeout=30_000)
    expect(saved).to_contain_text(f"undesirable_weight = {undesirable_weight}")
    files = sorted((studio_server["home"] / "data").glob("pairs-clean-*.jsonl"))
    assert len(files) == 1
    rows = [json.loads(line) for line in files[0].read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 9 and sum(r["label"] for r in rows) == 6
    assert all(r["completion"].strip() for r in rows)
    assert src.read_bytes() == original
    shot(page, "data-tab-saved")


def test_odd_columns_are_mapped_and_labels_fixed_in_the_table(page, studio_server, tmp_path, bundled_model_dir):
    src = tmp_path / "ratings.csv"
    src.write_text("q,a,verdict\n"
                   "Hi?,Hello! How can I help?,thumbs up\n"
                   "Hi?,Go away.,thumbs down\n"
                   "2+2?,Four.,maybe\n"
                   "Capital of Peru?,Lima.,thumbs up\n"
                   "Capital of Peru?,Quito.,thumbs down\n"
                   "Say thanks,Thank you!,thumbs up\n", encoding="utf-8")

    page.locator("#data-upload input[type=file]").set_input_files(str(src))
    expect(page.locator("#data-summary")).to_contain_text("Cannot use this data", timeout=60_000)
    expect(page.locator("#data-summary")).to_contain_text("Columns found: 'q', 'a', 'verdict'")

    for field, column in (("prompt", "q"), ("completion", "a"), ("label", "verdict")):
        page.locator(f"#data-map-{field} input").click()
        page.locator(f"[role=option][aria-label='{column}']:visible").last.click()
        page.locator("#data-summary").click()  # close the list
    page.locator("#data-map-apply").click()
    summary = page.locator("#data-summary")
    expect(summary).to_contain_text("6 KTO rows: 3 desirable, 2 undesirable, 1 without a usable label",
                                    timeout=60_000)  # the first load also loads the tokenizer
    expect(page.locator("#data-problems")).to_contain_text("No usable label (1): #3")

    # row 3's label "maybe" was not guessed: the user types one into the table
    page.locator("#data-table [data-testid='cell-2-2']").dblclick()
    page.keyboard.press("Control+A")
    page.keyboard.type("good")
    page.keyboard.press("Enter")
    expect(summary).to_contain_text("6 KTO rows: 4 desirable, 2 undesirable")
    expect(page.locator("#data-problems")).not_to_contain_text("No usable label")

    # and flips row 1 by number
    page.locator("#data-flip-rows input, #data-flip-rows textarea").first.fill("1")
    page.locator("#data-flip").click()
    expect(summary).to_contain_text("6 KTO rows: 3 desirable, 3 undesirable")
    expect(summary).to_contain_text("2 labels changed by you")
    shot(page, "data-tab-mapped-and-fixed")

    page.locator("#data-save").click()
    expect(page.locator("#data-saved")).to_contain_text("Saved 6 rows", timeout=30_000)
    saved = sorted((studio_server["home"] / "data").glob("ratings-clean-*.jsonl"))
    rows = [json.loads(line) for line in saved[0].read_text(encoding="utf-8").splitlines()]
    assert [(r["prompt"], r["label"]) for r in rows] == [("Hi?", False), ("Hi?", False), ("2+2?", True),
                                                         ("Capital of Peru?", True), ("Capital of Peru?", False),
                                                         ("Say thanks", True)]


def test_chat_ratings_load_as_the_next_runs_data(page, studio_server):
    data = studio_server["home"] / "data"
    page.get_by_role("tab", name="Data").click()
    page.locator("#data-use-ratings").click()
    expect(page.get_by_text("No ratings yet")).to_be_visible(timeout=30_000)

    data.mkdir(parents=True, exist_ok=True)
    rows = [{"prompt": [{"role": "user", "content": "Hi?"}], "completion": [{"role": "assistant", "content": c}],
             "label": label, "side": side} for c, label, side in (("Hello!", True, "tuned"), ("Go away.", False, "base"))]
    (data / "feedback.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    page.locator("#data-use-ratings").click()
    expect(page.locator("#data-summary")).to_contain_text("2 KTO rows: 1 desirable, 1 undesirable", timeout=60_000)
    expect(page.locator("#data-path textarea, #data-path input").first).to_have_value(str(data / "feedback.jsonl"))
