"""After training, a user compares the base model and the tuned adapter blind: prompts drawn from the run's held-out
rows (and one typed), the two replies shown as A and B in a random order, a vote, the names revealed, the win rate and
its interval updated; then the votes load as KTO rows in the Data tab."""
from __future__ import annotations

import re

import pytest
from playwright.sync_api import expect

from tests.browser.conftest import serve_with_trained_run, shot

TUNED = "tiny · final adapter"
TYPED = "Write one word that rhymes with cat."  # not a prompt of the sample data, so never also drawn
# (how the prompt is given, the vote): three drawn from the held-out prompts and one typed
PLAN = [("draw", "A"), ("draw", "B"), ("type", "both_bad"), ("draw", "tie")]
BUTTON = {"A": "#ab-vote-a", "B": "#ab-vote-b", "tie": "#ab-vote-tie", "both_bad": "#ab-vote-bad"}


@pytest.fixture()
def studio_server(tmp_path, tmp_path_factory, bundled_model_dir):
    """The studio with one trained run ('tiny', 12 rows of the sample data held out) in its home."""
    with serve_with_trained_run(tmp_path, tmp_path_factory) as server:
        yield server


def _stored_votes(home):
    from studio.runs.history import History

    h = History(home / "history.sqlite")
    try:
        return h.votes()
    finally:
        h.close()


def _plain(text: str) -> str:
    """A reply as text, without the Markdown marks the chat box renders (the page shows **cat** as bold cat)."""
    return " ".join(re.sub(r"[*_`#>]", "", text).split())


def _bot_text(page, box: str) -> str:
    return page.locator(f"{box} [data-testid=bot]").last.inner_text().strip()


def test_blind_votes_reveal_tally_and_load_as_kto_rows(page, studio_server):
    from studio.data import feedback
    from studio.tuned import votes

    home = studio_server["home"]
    page.get_by_role("tab", name="Chat").click()
    page.get_by_role("tab", name="A/B (blind)").click()
    expect(page.locator("#ab-first input")).to_have_value("base model (adapter off)")
    expect(page.locator("#ab-second input")).to_have_value(TUNED)
    expect(page.locator("#ab-tally")).to_contain_text("No votes yet")

    page.get_by_text("Prompts and sampling").click()
    for elem, value in (("#ab-max-new", "8"), ("#ab-seed", "7")):
        box = page.locator(f"{elem} input[type=number]")
        box.fill(value)
        box.press("Tab")
        expect(box).to_have_value(value)

    for i, (how, choice) in enumerate(PLAN, start=1):
        if how == "draw":
            page.locator("#ab-next").click()
        else:
            page.locator("#ab-input textarea").fill(TYPED)
            page.locator("#ab-ask").click()
        # both replies are written before a vote is possible; until then nothing says who is who
        expect(page.locator(BUTTON[choice])).to_be_enabled(timeout=300_000)
        expect(page.locator("#ab-status")).to_contain_text("Both have answered")
        for box in ("#ab-a", "#ab-b", "#ab-status", "#ab-reveal"):
            expect(page.locator(box)).not_to_contain_text("tiny ·")
            expect(page.locator(box)).not_to_contain_text("adapter off")
        shown = {"A": _bot_text(page, "#ab-a"), "B": _bot_text(page, "#ab-b")}
        if i == 1:
            shot(page, "ab-before-vote")

        page.locator(BUTTON[choice]).click()
        reveal = page.locator("#ab-reveal")
        expect(reveal).to_contain_text(f"Vote #{i} stored", timeout=30_000)
        for btn in BUTTON.values():  # one vote per prompt
            expect(page.locator(btn)).to_be_disabled()

        stored = _stored_votes(home)
        assert len(stored) == i
        v = stored[-1]
        # the reveal names the sides exactly as the hidden assignment was stored
        assert {v["label_a"], v["label_b"]} == {TUNED, votes.base_label("bundled:smollm2-135m")}
        expect(reveal).to_contain_text(f"A was {v['label_a']}; B was {v['label_b']}")
        expect(page.locator("#ab-a")).to_contain_text(f"A · {v['label_a']}")
        assert v["choice"] == choice
        assert (_plain(v["reply_a"]), _plain(v["reply_b"])) == (_plain(shown["A"]), _plain(shown["B"]))
        assert v["settings"]["max_new_tokens"] == 8 and v["settings"]["seed"] == 7
        assert v["settings"]["temperature"] == pytest.approx(0.7)
        if how == "type":
            assert v["prompt"] == [{"role": "user", "content": TYPED}]
        else:
            assert v["prompt"] not in [p["prompt"] for p in stored[:-1]]  # a new held-out prompt each time

        # the tally and its interval follow every vote
        base_id = next(x for x in (v["model_a"], v["model_b"]) if x.startswith("base:"))
        tuned_id = v["model_b"] if v["model_a"] == base_id else v["model_a"]
        t = votes.tally(stored, base_id, tuned_id)
        assert t.votes == i
        expect(page.locator("#ab-tally")).to_contain_text(t.sentence())
        expect(page.locator("#ab-plot img").first).to_be_visible()
        if i == 2:
            shot(page, "ab-revealed")

    t = votes.tally(stored, base_id, tuned_id)
    assert (t.wins + t.losses, t.ties, t.both_bad) == (2, 1, 1)
    expect(page.locator("#ab-tally")).to_contain_text(re.compile(r"wins \d of 2 .*interval \d+–\d+%"))
    page.get_by_text("All pairs voted on").click()
    expect(page.locator("#ab-pairs")).to_contain_text(TUNED)
    expect(page.locator("#ab-pairs")).to_contain_text(f"{100 * t.interval[0]:.0f}–{100 * t.interval[1]:.0f}%")
    shot(page, "ab-tally")

    page.locator("#ab-export").click()  # every vote as CSV
    expect(page.locator("#ab-csv")).to_contain_text("votes.csv")
    assert (home / "data" / "votes.csv").read_text(encoding="utf-8").count("\n") >= len(PLAN) + 1

    # the votes are KTO rows now: the Data tab's "use my chat ratings" loads them
    # one row per reply: a reply voted on again (same prompt and text) is re-labelled, never written twice
    by_reply = {feedback.reply_id(v["prompt"], r["completion"], votes.FEEDBACK_SIDE): r
                for v in stored for r in votes.kto_rows(v)}
    rows = list(by_reply.values())
    good = sum(r["label"] for r in rows)
    assert len(rows) >= 1  # 'both bad' always makes at least one row
    page.get_by_role("tab", name="Data").click()
    page.locator("#data-use-ratings").click()
    expect(page.locator("#data-summary")).to_contain_text(
        f"{len(rows)} KTO rows: {good} desirable, {len(rows) - good} undesirable", timeout=120_000)
    shot(page, "ab-data-tab")
