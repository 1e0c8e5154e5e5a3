"""After training, a user asks the base and the tuned model the same question side by side, rates the replies
(which land in the feedback data set), and evaluates the run on its held-out rows."""
from __future__ import annotations

import json

import pytest
from playwright.sync_api import expect

from studio.tuned import evaluate
from tests.browser.conftest import serve_with_trained_run, shot

QUESTION = "What is the capital of France?"


@pytest.fixture()
def studio_server(tmp_path, tmp_path_factory, bundled_model_dir):
    """The studio with one trained run ('tiny') already in its home, as after a training session."""
    with serve_with_trained_run(tmp_path, tmp_path_factory) as server:
        yield server


@pytest.fixture()
def expected_replies(studio_server):
    """The greedy replies of each side, computed here with the chat core, to recognise them on the page."""
    from studio.tuned.chat import ChatModel, GenerationSettings, build_messages

    chat = ChatModel()
    chat.use(studio_server["home"] / "runs" / "tiny")
    settings = GenerationSettings(max_new_tokens=16, temperature=0.0)
    msgs = build_messages([], QUESTION)
    replies, cut = {}, {}
    for side in ("base", "tuned"):
        replies[side] = chat.reply(msgs, side == "tuned", settings)
        cut[side] = chat.cut_off  # stopped by max new tokens: the page marks it
    chat.unload()
    replies["cut"] = cut
    return replies


def test_side_by_side_chat_rate_replies_and_evaluate(page, studio_server, expected_replies):
    page.get_by_role("tab", name="Chat").click()
    expect(page.locator("#chat-adapter input")).to_have_value("tiny · final adapter")

    page.get_by_text("Prompt and sampling").click()
    for elem, value in (("#chat-max-new", "16"), ("#chat-temperature", "0")):
        box = page.locator(f"{elem} input[type=number]")
        box.fill(value)
        box.press("Enter")
    page.locator("#chat-input textarea").fill(QUESTION)
    page.locator("#chat-send").click()

    # the same question on both sides; each side answers with its own model (greedy, so the text is known)
    base_reply = page.locator("#chat-base [data-testid=bot]").last
    tuned_reply = page.locator("#chat-tuned [data-testid=bot]").last
    for side, reply in (("tuned", tuned_reply), ("base", base_reply)):
        expect(reply).to_contain_text(expected_replies[side].strip(), timeout=180_000)
        if expected_replies["cut"][side]:  # issue 16 point 9: a reply cut off at max new tokens says so
            expect(reply).to_contain_text("cut off at 16 new tokens")
        else:
            expect(reply).not_to_contain_text("cut off at")
    expect(page.locator("#chat-multi-turn")).to_contain_text("multi-turn")
    expect(page.locator("#chat-base [data-testid=user]")).to_have_text(QUESTION)
    expect(page.locator("#chat-tuned [data-testid=user]")).to_have_text(QUESTION)
    expect(page.locator("#chat-status")).to_contain_text("tuned side: tiny · final adapter")
    shot(page, "chat-side-by-side")

    # 👍 the tuned reply, 👎 the base one: two KTO rows in the studio's feedback file
    page.locator("#chat-tuned").get_by_role("button", name="Like").last.click()
    expect(page.locator("#chat-feedback")).to_contain_text("1 rows so far", timeout=30_000)
    page.locator("#chat-base").get_by_role("button", name="Dislike").last.click()
    expect(page.locator("#chat-feedback")).to_contain_text("2 rows so far", timeout=30_000)
    rows = [json.loads(line) for line in
            (studio_server["home"] / "data" / "feedback.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [(r["side"], r["label"]) for r in rows] == [("tuned", True), ("base", False)]
    assert rows[0]["prompt"] == [{"role": "user", "content": QUESTION}]
    assert rows[0]["completion"][0]["content"] == expected_replies["tuned"]
    assert rows[1]["completion"][0]["content"] == expected_replies["base"]
    shot(page, "chat-rated")

    # held-out evaluation of the run: a table and a chart, stored with the run
    page.get_by_text("Held-out evaluation: base vs tuned").click()
    expect(page.locator("#chat-eval-status")).to_contain_text("No evaluation stored")
    limit = page.locator("#chat-eval-limit input")
    expect(limit).to_be_editable()
    for attempt in range(3):  # the accordion's content can still re-mount just after it opens (the box shows 200 again)
        limit.fill("4")
        limit.press("Tab")  # commit the number before the click reads it (a click racing the edit sent the old 200)
        try:
            expect(limit).to_have_value("4", timeout=3_000)
            break
        except AssertionError:
            if attempt == 2:
                raise
    page.locator("#chat-eval-run").click()
    expect(page.locator("#chat-eval-status")).to_contain_text("held-out rows from", timeout=180_000)
    expect(page.locator("#chat-eval-table")).to_contain_text("implicit reward accuracy (pairs), %")
    expect(page.locator("#chat-eval-plot canvas, #chat-eval-plot svg").first).to_be_visible()
    # the chart beside the table has its bars (issue 16 point 9: it stayed empty while the table had numbers)
    bars = page.locator("#chat-eval-plot [aria-roledescription='bar']")
    expect(bars.first).to_be_attached(timeout=30_000)
    assert bars.count() == len(evaluate.chart_rows(json.loads(
        (studio_server["home"] / "runs" / "tiny" / "eval.json").read_text(encoding="utf-8"))))
    stored = json.loads((studio_server["home"] / "runs" / "tiny" / "eval.json").read_text(encoding="utf-8"))
    assert stored["n_rows"] <= 4
    expect(page.locator("#chat-eval-table")).to_contain_text(str(round(stored["base"]["logp_desirable"], 3)))
    shot(page, "chat-evaluated")
