"""What the Data tab does for a user, without a browser: load, look through pages, fix labels, balance, save."""
from __future__ import annotations

import json

import pytest

from studio.config.run import BUNDLED_MODEL
from studio.data import DataError
from studio.data.clean import CleanOptions
from studio.data.workbench import Workbench, parse_row_numbers


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def labelled(tmp_path):
    rows = [{"prompt": f"Question {i}?", "completion": f"Answer {i}.", "label": "yes" if i % 3 else "no"}
            for i in range(1, 61)]
    rows[9]["label"] = "kinda"
    rows[19]["completion"] = ""
    return write_jsonl(tmp_path / "mine.jsonl", rows)


def test_rows_are_shown_a_page_at_a_time_with_their_issues(labelled):
    wb = Workbench.load(str(labelled))
    page, shown, pages = wb.table(page=1, page_size=25)
    assert (shown, pages, len(page)) == (1, 3, 25)
    assert page[9] == {"#": 10, "source row": 10, "label": "? (kinda)", "prompt": "Question 10?",
                       "completion": "Answer 10.", "tokens": None, "issues": "unlabeled"}
    assert wb.table(page=3, page_size=25)[0][-1]["#"] == 60
    assert wb.table(page=99, page_size=25)[1] == 3  # past the end shows the last page
    issues, _, _ = wb.table(page=1, page_size=25, only_issues=True)
    assert [(r["#"], r["issues"]) for r in issues] == [(10, "unlabeled"), (20, "empty completion")]


def test_labels_can_be_set_and_flipped_but_not_guessed(labelled):
    wb = Workbench.load(str(labelled))
    assert wb.report.n_unlabeled == 1
    wb.set_label(10, "👍")
    assert wb.rows[9]["label"] is True and wb.report.n_unlabeled == 0
    with pytest.raises(DataError, match="row 4: 'sort of' is not a label"):
        wb.set_label(4, "sort of")
    before = [r["label"] for r in wb.rows]
    assert wb.flip(parse_row_numbers("1, 3-5", len(wb.rows))) == 4
    after = [r["label"] for r in wb.rows]
    assert [i for i, (a, b) in enumerate(zip(before, after)) if a != b] == [0, 2, 3, 4]
    assert wb.edits == 5


def test_flips_that_cancel_out_are_no_edits(labelled):
    """Issue 16 point 10: '6 labels changed by you' after flips that cancelled out."""
    wb = Workbench.load(str(labelled))
    wb.flip([1, 2, 3])
    assert wb.edits == 3
    wb.flip([1, 2, 3])
    assert wb.edits == 0
    wb.set_label(1, "yes" if wb.rows[0]["label"] is False else "no")
    wb.set_label(1, "no" if wb.rows[0]["label"] is True else "yes")
    assert wb.edits == 0
    wb.flip([2])
    assert wb.edits == 1


def test_row_number_parsing():
    assert parse_row_numbers("3, 7-9 12 9", 20) == [3, 7, 8, 9, 12]
    with pytest.raises(DataError, match="row 21 does not exist: rows are numbered 1 to 20"):
        parse_row_numbers("20-21", 20)
    with pytest.raises(DataError, match="'x' is not a row number"):
        parse_row_numbers("1, x", 20)


def test_balance_follows_filters_and_label_edits(labelled):
    wb = Workbench.load(str(labelled))
    # 60 rows: 40 "yes", 20 "no"; row 10 ("kinda") is unlabeled, row 20 (a "yes") has an empty completion
    assert wb.counts(CleanOptions()) == (38, 20)
    b = wb.balance(CleanOptions())
    assert b.desirable_weight == 1.0 and b.undesirable_weight > 1.0 and b.in_range
    assert wb.counts(CleanOptions(drop_empty=False)) == (39, 20)
    wb.flip([3, 6, 9])  # three "no" rows become desirable
    assert wb.counts(CleanOptions()) == (41, 17)


def test_saving_writes_a_cleaned_copy_with_its_story(labelled, bundled_model_dir):
    original = labelled.read_bytes()
    wb = Workbench.load(str(labelled), name="mine.jsonl")
    wb.measure(BUNDLED_MODEL, 512)
    assert wb.lengths is not None and len(wb.lengths.total) == 60
    wb.set_label(10, "good")
    s = wb.save(CleanOptions(), eval_fraction=0.1, seed=3, weights=(1.0, 2.0))
    train = [json.loads(x) for x in open(s["train_file"], encoding="utf-8")]
    ev = [json.loads(x) for x in open(s["eval_file"], encoding="utf-8")]
    assert len(train) + len(ev) == 59 and len(ev) == 6
    assert all(isinstance(r["label"], bool) for r in train + ev)
    story = json.loads(open(s["train_file"].replace(".jsonl", ".summary.json"), encoding="utf-8").read())
    assert story["source"] == str(labelled) and story["label_edits"] == 1
    assert story["weights"] == {"desirable_weight": 1.0, "undesirable_weight": 2.0}
    assert story["dropped"] == {"empty_completion": 1}
    assert labelled.read_bytes() == original


def test_nothing_left_to_save_is_an_error(tmp_path):
    p = write_jsonl(tmp_path / "e.jsonl", [{"prompt": "p", "completion": " ", "label": True},
                                           {"prompt": "q", "completion": "", "label": False}])
    wb = Workbench.load(str(p))
    with pytest.raises(DataError, match="no rows left to save"):
        wb.save(CleanOptions())
