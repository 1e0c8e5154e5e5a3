"""A user rates replies in the Chat tab; the ratings become KTO rows the Data tab loads for the next run."""
from __future__ import annotations

import json

from studio.data import feedback
from studio.data import load_kto

CONVO = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Capital of France?"}]


def test_thumbs_up_and_down_land_in_the_feedback_file_as_kto_rows(studio_home):
    feedback.record(CONVO, "Paris.", True, side="tuned", adapter="run · final adapter", base_model="m")
    feedback.record(CONVO, "Lyon, obviously.", False, side="base", adapter="run · final adapter", base_model="m")

    path = studio_home / "data" / "feedback.jsonl"
    assert feedback.feedback_path() == path
    lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert [(r["completion"][0]["content"], r["label"], r["side"]) for r in lines] == [
        ("Paris.", True, "tuned"), ("Lyon, obviously.", False, "base")]
    assert lines[0]["prompt"] == CONVO

    # the Data tab's loader reads the file as ordinary conversational KTO rows
    rows = load_kto(str(path)).rows
    assert rows == [
        {"prompt": CONVO, "completion": [{"role": "assistant", "content": "Paris."}], "label": True},
        {"prompt": CONVO, "completion": [{"role": "assistant", "content": "Lyon, obviously."}], "label": False},
    ]
    assert feedback.counts() == {"rows": 2, "desirable": 1, "undesirable": 1}


def test_rating_a_reply_again_relabels_it_and_taking_it_back_removes_it(studio_home):
    first = feedback.record(CONVO, "Paris.", True, side="tuned")
    feedback.record(CONVO, "Paris.", True, side="base")  # the same text on the other side is another reply
    again = feedback.record(CONVO, "Paris.", False, side="tuned")
    assert again["id"] == first["id"]
    rows = feedback.load_rows()
    assert [(r["side"], r["label"]) for r in rows] == [("tuned", False), ("base", True)]

    assert feedback.remove(first["id"]) is True
    assert [(r["side"], r["label"]) for r in feedback.load_rows()] == [("base", True)]
    assert feedback.remove(first["id"]) is False


def test_models_without_a_chat_template_store_plain_text_rows(studio_home):
    feedback.record("Q: capital of France?\nA:", " Paris.", True, side="tuned")
    rows = load_kto(str(feedback.feedback_path())).rows
    assert rows == [{"prompt": "Q: capital of France?\nA:", "completion": " Paris.", "label": True}]


def test_a_half_written_last_line_does_not_lose_the_other_ratings(studio_home):
    feedback.record(CONVO, "Paris.", True, side="tuned")
    with open(feedback.feedback_path(), "a", encoding="utf-8") as f:
        f.write('{"prompt": [{"role": "us')  # the studio was killed mid-write
    assert len(feedback.load_rows()) == 1
    feedback.record(CONVO, "Marseille.", False, side="tuned")
    assert [r["label"] for r in feedback.load_rows()] == [True, False]
