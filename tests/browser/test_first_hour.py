"""A hobbyist's first hour on a CPU machine (issue 16): the CPU plan is what the form holds from the start, with its
expected duration shown before Start; looking at a GPU card and a 7B model and going back leaves nothing of that
plan behind, and both tabs show one config, also after a reload; auto-fit plans the installed path."""
from __future__ import annotations

import re

from playwright.sync_api import expect

from tests.browser.conftest import shot
from tests.browser.test_model_tab import pick


def _value(page, elem_id: str) -> str:
    return page.locator(f"#{elem_id} textarea, #{elem_id} input").first.input_value()


def _train_values(page, max_length: str | None = None, not_max_length: str | None = None) -> dict:
    """The Train form's planned fields, once the form has reloaded (it does so when the tab is shown)."""
    page.get_by_role("tab", name="Train").click()
    box = page.locator("#cfg-kto-max_length input")
    if max_length is not None:
        expect(box).to_have_value(max_length)
    if not_max_length is not None:
        expect(box).not_to_have_value(not_max_length)
    page.wait_for_timeout(500)
    return {k: _value(page, f"cfg-{k}") for k in ("kto-max_length", "train-per_device_train_batch_size",
                                                    "train-gradient_accumulation_steps", "train-max_steps",
                                                    "memory-micro_batch_size")}


def test_cpu_plan_from_the_start_one_plan_for_both_tabs_and_no_leaks(page):
    # a fresh studio on a CPU: 4-bit is not ticked, the form holds the CPU plan, the duration is known before Start
    page.get_by_role("tab", name="Model & preset").click()
    expect(page.locator("#device-info")).to_contain_text("unsloth: no")
    assert not page.locator("#cfg-model-load_in_4bit input[type=checkbox]").is_checked()
    expect(page.locator("#fit-settings")).to_contain_text("Expected duration")
    cpu = _train_values(page)
    assert int(cpu["kto-max_length"]) <= 512 and cpu["memory-micro_batch_size"] == ""
    assert not page.locator("#cfg-train-gradient_checkpointing input[type=checkbox]").is_checked()
    expected = page.locator("#train-expected")
    expect(expected).to_contain_text("Expected duration")
    assert re.search(r"about (\d+ s|\d+ min)", expected.inner_text()), expected.inner_text()
    # nothing runs: Stop is not offered
    expect(page.locator("#train-stop")).to_be_disabled()
    shot(page, "first-hour-cpu-plan")

    # look at an 8 GB card with Mistral-7B: on this machine (no Unsloth) the bitsandbytes plan is applied
    page.get_by_role("tab", name="Model & preset").click()
    pick(page, "gpu-preset", "8 GB card (RTX 3070 / 2070 / 4060)")
    pick(page, "model-preset", "Mistral-7B-Instruct-v0.3 · 7B · gated")
    settings = page.locator("#fit-settings")
    settings.get_by_text("for unsloth/mistral-7b-instruct-v0.3-bnb-4bit").wait_for()
    text = settings.inner_text()
    assert "Applied for the bitsandbytes 4-bit path" in text, text
    assert text.count("With Unsloth installed you could") == 1
    assert text.count("Gradients are taken") <= 1 and "common." not in text
    shot(page, "first-hour-8gb-mistral-model-tab")
    gpu = _train_values(page, not_max_length=cpu["kto-max_length"])
    assert int(gpu["kto-max_length"]) > 512
    shot(page, "first-hour-8gb-mistral")

    # back to CPU + SmolLM2: everything planned for the card and model is planned again, nothing left over
    page.get_by_role("tab", name="Model & preset").click()
    pick(page, "gpu-preset", "CPU only")
    pick(page, "model-preset", "SmolLM2-135M-Instruct (bundled) · 135M")
    expect(page.locator("#fit-settings")).to_contain_text("CPU only")
    back = _train_values(page, max_length=cpu["kto-max_length"])
    assert back == cpu, (back, cpu)

    # a reload shows the same config in both tabs, and the Model tab describes that config
    page.reload()
    page.wait_for_selector("text=KTO Studio")
    page.get_by_role("tab", name="Model & preset").click()
    expect(page.locator("#fit-settings")).to_contain_text(f"max_length **{cpu['kto-max_length']}**".replace("**", ""))
    assert _value(page, "gpu-preset") == "CPU only"
    assert _train_values(page, max_length=cpu["kto-max_length"]) == cpu
    shot(page, "first-hour-after-reload")


def test_rows_table_reads_side_by_side_a_missing_label_points_to_the_panel_and_cancelled_flips_are_no_edits(
        page, tmp_path, bundled_model_dir):
    import json

    page.get_by_role("tab", name="Data").click()
    # a file without a label column: the message says so and points to the Column mapping panel, not to CLI flags
    nolabel = tmp_path / "nolabel.csv"
    nolabel.write_text("prompt,completion\nHi,Hello\nBye,See you\n")
    page.locator("#data-upload input[type=file]").set_input_files(str(nolabel))
    summary = page.locator("#data-summary")
    expect(summary).to_contain_text("no label column", timeout=60_000)
    expect(summary).to_contain_text("Column mapping")
    assert "--map" not in summary.inner_text() and "cannot tell which column" not in summary.inner_text()
    expect(page.locator("#data-map-label")).to_be_visible()  # the panel is open

    # long prompts and completions: both visible side by side, cut short; the whole row shows when picked
    tail = "THE-END-OF-THE-PROMPT"
    rows = [{"prompt": f"Question {i}: " + "please explain this in detail " * 40 + tail,
             "completion": f"Answer {i}: " + "here is a long and careful answer " * 30, "label": i % 2 == 0}
            for i in range(6)]
    rows.append(dict(rows[0]))  # a duplicate: an issue with a reason
    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    page.locator("#data-upload button[aria-label='Clear']").click()
    page.locator("#data-upload input[type=file]").set_input_files(str(data))
    expect(summary).to_contain_text("7 KTO rows", timeout=60_000)
    table = page.locator("#data-table")
    expect(table).to_contain_text("Answer 1:")
    # on the CPU card a file is judged by the max_length the plan takes from its own lengths (~500 tokens a row),
    # not by one planned for the data before it: nothing is flagged as a prompt that fills max_length
    box = page.locator("#data-max-length input")
    assert int(box.input_value()) >= 448, box.input_value()
    assert "prompt too long" not in page.locator("#data-problems").inner_text()
    box.fill("128")  # a limit the user types: the ~250-token prompts fill it
    box.press("Enter")
    expect(page.locator("#data-problems")).to_contain_text("prompt too long", timeout=60_000)
    width = page.viewport_size["width"]
    for header in ("completion", "tokens", "issues"):
        box = table.get_by_role("columnheader", name=header).first.bounding_box()
        assert box and box["x"] + box["width"] <= width + 2, (header, box, width)
    assert tail not in table.inner_text()  # cut short in the table
    shot(page, "first-hour-rows-table")
    page.locator("#data-only-issues input").check()
    expect(page.locator("#data-page-info")).to_contain_text("page 1 of 1")
    expect(table).to_contain_text("duplicate")
    page.locator("#data-table [data-testid='cell-0-3']").click()
    detail = page.locator("#data-row-detail")
    expect(detail).to_contain_text(tail)
    expect(detail).to_contain_text("prompt fills max_length: the prompt alone fills max_length")  # the reason
    shot(page, "first-hour-row-detail")

    # flips that cancel out are no edits
    page.locator("#data-only-issues input").uncheck()
    for _ in range(2):
        page.locator("#data-flip-rows textarea, #data-flip-rows input").first.fill("1-3")
        page.locator("#data-flip").click()
        page.wait_for_timeout(1500)
    expect(summary).to_contain_text("7 KTO rows")
    assert "labels changed by you" not in summary.inner_text()
    page.locator("#data-flip-rows textarea, #data-flip-rows input").first.fill("2")
    page.locator("#data-flip").click()
    expect(summary).to_contain_text("1 labels changed by you")
