"""A hobbyist brings data in whatever shape they have; the studio turns each into KTO rows (prompt, completion, label)."""
from __future__ import annotations

import gzip
import json

import pandas as pd
import pytest

from studio.data import DataError, load_kto, parse_label
from studio.data.normalize import ColumnError, normalize, parse_hh

KTO_ROWS = [
    {"prompt": "What is 2+2?", "completion": "4", "label": True},
    {"prompt": "What is 2+2?", "completion": "5", "label": False},
    {"prompt": "Capital of France?", "completion": "Paris", "label": True},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def as_tuples(rows):
    return [(r["prompt"], r["completion"], r["label"]) for r in rows]


EXPECTED = [("What is 2+2?", "4", True), ("What is 2+2?", "5", False), ("Capital of France?", "Paris", True)]


# ---- every file format ----------------------------------------------------------------------------------------------

def test_jsonl(tmp_path):
    norm = load_kto(str(write_jsonl(tmp_path / "d.jsonl", KTO_ROWS)))
    assert as_tuples(norm.rows) == EXPECTED
    assert norm.shape == "unpaired" and norm.sources == [1, 2, 3]


def test_jsonl_gzipped(tmp_path):
    p = tmp_path / "d.jsonl.gz"
    p.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in KTO_ROWS).encode()))
    assert as_tuples(load_kto(str(p)).rows) == EXPECTED


@pytest.mark.parametrize("wrap", ["list", "data", "rows", "columns"])
def test_json_list_records_and_columns(tmp_path, wrap):
    obj = {"list": KTO_ROWS, "data": {"data": KTO_ROWS}, "rows": {"rows": KTO_ROWS},
           "columns": {k: [r[k] for r in KTO_ROWS] for k in ("prompt", "completion", "label")}}[wrap]
    p = tmp_path / "d.json"
    p.write_text(json.dumps(obj), encoding="utf-8")
    assert as_tuples(load_kto(str(p)).rows) == EXPECTED


def test_json_lines_saved_as_json(tmp_path):
    assert as_tuples(load_kto(str(write_jsonl(tmp_path / "d.json", KTO_ROWS))).rows) == EXPECTED


@pytest.mark.parametrize("sep,ext", [(",", "csv"), ("\t", "tsv")])
def test_csv_and_tsv_with_text_labels(tmp_path, sep, ext):
    df = pd.DataFrame(KTO_ROWS).assign(label=["yes", "no", "yes"])
    p = tmp_path / f"d.{ext}"
    df.to_csv(p, sep=sep, index=False)
    assert as_tuples(load_kto(str(p)).rows) == EXPECTED


def test_csv_cells_holding_conversations_as_json(tmp_path):
    conv = [{"role": "user", "content": "hi"}]
    df = pd.DataFrame([{"prompt": json.dumps(conv), "completion": "hello!", "label": "good"}])
    p = tmp_path / "c.csv"
    df.to_csv(p, index=False)
    norm = load_kto(str(p))
    assert norm.rows == [{"prompt": conv, "completion": [{"role": "assistant", "content": "hello!"}], "label": True}]
    assert any("JSON text read as conversations" in c for c in norm.conversions)


def test_parquet(tmp_path):
    p = tmp_path / "d.parquet"
    pd.DataFrame(KTO_ROWS).to_parquet(p)
    assert as_tuples(load_kto(str(p)).rows) == EXPECTED


def test_parquet_with_conversations(tmp_path):
    rows = [{"prompt": [{"role": "user", "content": "hi"}], "completion": [{"role": "assistant", "content": "yo"}],
             "label": True}, {"prompt": [{"role": "user", "content": "hi"}],
                              "completion": [{"role": "assistant", "content": "go away"}], "label": False}]
    p = tmp_path / "c.parquet"
    pd.DataFrame(rows).to_parquet(p)
    assert load_kto(str(p)).rows == rows


@pytest.mark.parametrize("as_dict", [False, True])
def test_saved_datasets_folder(tmp_path, as_dict):
    from datasets import Dataset, DatasetDict

    ds = Dataset.from_list(KTO_ROWS)
    (DatasetDict({"train": ds}) if as_dict else ds).save_to_disk(str(tmp_path / "saved"))
    assert as_tuples(load_kto(str(tmp_path / "saved")).rows) == EXPECTED


def test_hub_id_offline_says_to_go_online():
    with pytest.raises(DataError, match="could not load the hub dataset 'someone/some-kto-set'.*online"):
        load_kto("someone/some-kto-set")


def test_bundled_sample_loads():
    norm = load_kto("sample")
    # 99 prompts, each with a desirable and an undesirable completion: a 10% hold-out keeps ~10 pairs to judge by
    assert len(norm.rows) == 198 and {r["label"] for r in norm.rows} == {True, False}
    by_prompt: dict[str, set] = {}
    for r in norm.rows:
        by_prompt.setdefault(json.dumps(r["prompt"], sort_keys=True), set()).add(r["label"])
    assert len(by_prompt) == 99 and all(labels == {True, False} for labels in by_prompt.values())


# ---- shapes -----------------------------------------------------------------------------------------------------------

def test_unpaired_conversational_rows_stay_conversations(tmp_path):
    rows = [{"prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
             "completion": [{"role": "assistant", "content": "hello"}], "label": "👍"},
            {"prompt": [{"role": "user", "content": "hi"}],
             "completion": [{"role": "assistant", "content": "what"}], "label": "👎"}]
    norm = load_kto(str(write_jsonl(tmp_path / "c.jsonl", rows)))
    assert [r["label"] for r in norm.rows] == [True, False]
    assert norm.rows[0]["prompt"][0] == {"role": "system", "content": "be brief"}


def test_mixed_text_and_conversation_rows_become_one_shape():
    norm = normalize([{"prompt": "hi", "completion": "hello", "label": True},
                      {"prompt": [{"role": "user", "content": "yo"}], "completion": [{"role": "assistant",
                                                                                      "content": "sup"}],
                       "label": False}])
    assert norm.rows[0] == {"prompt": [{"role": "user", "content": "hi"}],
                            "completion": [{"role": "assistant", "content": "hello"}], "label": True}
    assert any("single-turn conversations" in c for c in norm.conversions)


def test_labelled_whole_conversations_split_into_history_and_last_reply():
    msgs = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
            {"role": "user", "content": "times 3?"}, {"role": "assistant", "content": "12"}]
    norm = normalize([{"messages": msgs, "label": "desirable"}])
    assert norm.rows == [{"prompt": msgs[:3], "completion": msgs[3:], "label": True}]
    assert norm.shape == "messages"


def test_paired_text_rows_are_unpaired_with_trl_and_shuffled():
    pairs = [{"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(40)]
    norm = normalize(pairs, seed=1)
    assert len(norm.rows) == 80
    assert sum(r["label"] for r in norm.rows) == 40
    for r, src in zip(norm.rows, norm.sources):
        i = src - 1  # each row remembers its pair's record number
        assert r["prompt"] == f"q{i}"
        assert r["completion"] == (f"good {i}" if r["label"] else f"bad {i}")
    # TRL's helper emits all chosen rows first; the studio shuffles them
    first_half = [r["label"] for r in norm.rows[:40]]
    assert 5 < sum(first_half) < 35
    assert any("unpair_preference_dataset" in c for c in norm.conversions)
    assert normalize(pairs, seed=1).rows == norm.rows, "same seed, same order"


def test_paired_conversational_rows():
    prompt = [{"role": "user", "content": "tell a joke"}]
    pairs = [{"prompt": prompt, "chosen": [{"role": "assistant", "content": "knock knock"}],
              "rejected": [{"role": "assistant", "content": "no"}]}]
    norm = normalize(pairs)
    by_label = {r["label"]: r for r in norm.rows}
    assert by_label[True] == {"prompt": prompt, "completion": [{"role": "assistant", "content": "knock knock"}],
                              "label": True}
    assert by_label[False]["completion"] == [{"role": "assistant", "content": "no"}]


def test_paired_conversations_without_prompt_share_the_history():
    hist = [{"role": "user", "content": "hi"}]
    norm = normalize([{"chosen": hist + [{"role": "assistant", "content": "hello"}],
                       "rejected": hist + [{"role": "assistant", "content": "meh"}]}])
    assert {(r["label"], r["completion"][0]["content"]) for r in norm.rows} == {(True, "hello"), (False, "meh")}
    assert all(r["prompt"] == hist for r in norm.rows)


def test_anthropic_hh_transcripts_become_conversation_prompt_and_final_reply():
    chosen = "\n\nHuman: What's a good pet?\n\nAssistant: A cat.\n\nHuman: Why?\n\nAssistant: Cats are calm."
    rejected = "\n\nHuman: What's a good pet?\n\nAssistant: A cat.\n\nHuman: Why?\n\nAssistant: Dunno."
    norm = normalize([{"chosen": chosen, "rejected": rejected}])
    assert norm.shape == "hh"
    expected_prompt = [{"role": "user", "content": "What's a good pet?"}, {"role": "assistant", "content": "A cat."},
                       {"role": "user", "content": "Why?"}]
    by_label = {r["label"]: r for r in norm.rows}
    assert by_label[True]["prompt"] == expected_prompt == by_label[False]["prompt"]
    assert by_label[True]["completion"] == [{"role": "assistant", "content": "Cats are calm."}]
    assert by_label[False]["completion"] == [{"role": "assistant", "content": "Dunno."}]
    assert any("Anthropic HH" in c for c in norm.conversions)


def test_hh_with_empty_final_reply_and_non_hh_text():
    assert parse_hh("\n\nHuman: hi\n\nAssistant:") == [{"role": "user", "content": "hi"},
                                                        {"role": "assistant", "content": ""}]
    assert parse_hh("just some text") is None
    with pytest.raises(DataError, match="row 1: chosen/rejected without a prompt"):
        normalize([{"chosen": "plain", "rejected": "text"}])


# ---- column names -----------------------------------------------------------------------------------------------------

def test_common_column_names_are_guessed_and_reported():
    norm = normalize([{"question": "q", "answer": "a", "thumbs": "up"}])
    assert norm.rows == [{"prompt": "q", "completion": "a", "label": True}]
    assert norm.mapping == {"question": "prompt", "answer": "completion", "thumbs": "label"}
    assert "column 'question' read as prompt" in norm.conversions


def test_preference_columns_with_other_names_are_guessed():
    norm = normalize([{"instruction": "q", "preferred": "a", "dispreferred": "b"}])
    assert sorted(as_tuples(norm.rows)) == [("q", "a", True), ("q", "b", False)]


def test_ambiguous_columns_ask_for_a_mapping_and_list_the_columns():
    records = [{"instruction": "q", "input": "ctx", "output": "a", "ok": 1}]
    with pytest.raises(ColumnError, match=r"Columns found: 'instruction', 'input', 'output', 'ok'") as e:
        normalize(records)
    assert e.value.columns == ["instruction", "input", "output", "ok"]
    assert "--map" not in str(e.value)  # the core speaks to no front end: the UI points to its panel, the CLI to --map
    assert "--map question=prompt" in e.value.cli_hint()
    norm = normalize(records, {"instruction": "prompt", "ok": "label"})
    assert norm.rows == [{"prompt": "q", "completion": "a", "label": True}]


def test_missing_label_column_is_named():
    with pytest.raises(ColumnError, match="no label column: the rows have a prompt and a completion") as e:
        normalize([{"prompt": "q", "completion": "a"}])
    assert e.value.missing_label and "cannot tell which column is which" not in str(e.value)
    assert "--map" not in str(e.value) and "rating=label" in e.value.cli_hint()


def test_mapping_to_an_unknown_field_or_column_is_refused():
    with pytest.raises(DataError, match="cannot map a column to \\['answer'\\]"):
        normalize([{"q": "x"}], {"q": "answer"})
    with pytest.raises(ColumnError, match="doesn't have: \\['nope'\\]"):
        normalize([{"q": "x"}], {"nope": "prompt"})


# ---- labels -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("value", [True, 1, 1.0, "true", "True", "yes", "Y", "1", "good", "desirable",
                                   "thumbs up", "Thumbs Up", "thumbs_up", "👍", "👍🏽", "👍️", " positive "])
def test_desirable_spellings(value):
    assert parse_label(value) is True


@pytest.mark.parametrize("value", [False, 0, 0.0, "false", "FALSE", "no", "n", "0", "bad", "undesirable",
                                   "thumbs down", "👎", "negative"])
def test_undesirable_spellings(value):
    assert parse_label(value) is False


@pytest.mark.parametrize("value", ["maybe", "5", 3, 0.5, "", None, "good-ish", [True]])
def test_anything_else_is_not_guessed(value):
    assert parse_label(value) is None


def test_unknown_labels_are_listed_row_by_row():
    records = [{"prompt": "p", "completion": "c", "label": v} for v in ["yes", "maybe", "no", 4]]
    with pytest.raises(DataError, match=r"row 2: 'maybe'; row 4: 4"):
        normalize(records)
    norm = normalize(records, strict=False)
    assert [r["label"] for r in norm.rows] == [True, None, False, None]
    assert norm.unlabeled == [{"row": 2, "value": "maybe"}, {"row": 4, "value": 4}]
    assert "row 2: 'maybe'; row 4: 4" in norm.problems[0]


def test_question_answer_verdict_columns_are_mapped():
    # 'verdict' is a word people use for the label column (issue 30, item 9)
    norm = normalize([{"question": "q", "answer": "a", "verdict": "good"},
                      {"question": "q2", "answer": "b", "verdict": "bad"}])
    assert norm.mapping == {"question": "prompt", "answer": "completion", "verdict": "label"}
    assert [r["label"] for r in norm.rows] == [True, False]
