"""Cleaning and saving: filters, a seeded split, a new file that never replaces the user's, and the headless
`python -m studio data` that does it all and prints a JSON summary."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from studio import paths
from studio.cli import main
from studio.config.run import RunConfig
from studio.data import DataError, prepare_training
from studio.data.clean import CleanOptions, apply_filters, save_clean, split, write_jsonl
from studio.data.inspect import inspect_rows
from studio.data.normalize import normalize

ROOT = Path(__file__).resolve().parent.parent


def write_jsonl_rows(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def digest(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


def messy_pairs():
    """8 pairs: pair 8 repeats pair 1, pairs 5-7 have blank rejected answers, pair 4's answers are equal."""
    pairs = [{"prompt": f"Question {i}?", "chosen": f"A careful answer to {i}.", "rejected": f"Wrong answer {i}."}
             for i in range(1, 8)]
    for p in pairs[4:7]:
        p["rejected"] = "   "
    pairs[3]["rejected"] = pairs[3]["chosen"]
    pairs.append(dict(pairs[0]))
    return pairs


# ---- filters and split ----------------------------------------------------------------------------------------------

def test_filters_drop_duplicates_conflicts_empties_and_unlabeled():
    norm = normalize([{"prompt": "a", "completion": "x", "label": True},
                      {"prompt": "a", "completion": "x", "label": True},
                      {"prompt": "b", "completion": "y", "label": True},
                      {"prompt": "b", "completion": "y", "label": False},
                      {"prompt": "c", "completion": " ", "label": False},
                      {"prompt": "d", "completion": "z", "label": "perhaps"},
                      {"prompt": "e", "completion": "w", "label": False}], strict=False)
    rep = inspect_rows(norm.rows)
    keep, dropped = apply_filters(norm.rows, rep)
    assert keep == [0, 6]
    assert dropped == {"unlabeled": [5], "empty_completion": [4], "conflicting_labels": [2, 3], "duplicate": [1]}
    keep, dropped = apply_filters(norm.rows, rep, CleanOptions(drop_duplicates=False, drop_empty=False))
    assert keep == [0, 1, 2, 3, 4, 6] and dropped == {"unlabeled": [5]}


def test_over_length_rows_are_dropped_only_when_asked(bundled_model_dir):
    rows = normalize([{"prompt": "hi", "completion": "hello", "label": True},
                      {"prompt": "hi", "completion": "word " * 100, "label": False},
                      {"prompt": "word " * 100, "completion": "ok", "label": False}]).rows
    rep = inspect_rows(rows, str(bundled_model_dir), max_length=40)
    keep, dropped = apply_filters(rows, rep)
    assert keep == [0, 1] and dropped == {"prompt_too_long": [2]}  # the trainer would drop row 3 anyway
    keep, dropped = apply_filters(rows, rep, CleanOptions(drop_over_length=True))
    assert keep == [0] and dropped == {"prompt_too_long": [2], "over_length": [1]}


def test_split_is_seeded_disjoint_and_keeps_the_label_mix():
    rows = [{"prompt": f"p{i}", "completion": "c", "label": i % 4 == 0} for i in range(100)]
    train, ev = split(rows, 0.2, seed=7)
    assert len(ev) == 20 and len(train) == 80
    assert sum(r["label"] for r in ev) == 5  # 25 desirable rows, 20% of them
    assert {r["prompt"] for r in train}.isdisjoint({r["prompt"] for r in ev})
    assert split(rows, 0.2, seed=7) == (train, ev)
    assert split(rows, 0.2, seed=8)[1] != ev
    assert split(rows, 0.0, seed=7) == (rows, [])


def test_cleaned_files_are_new_files_in_the_data_folder():
    rows = [{"prompt": "p", "completion": "c", "label": True}]
    a, _ = save_clean(rows, None, "my data.csv", {"note": "x"})
    b, ev = save_clean(rows, rows, "my data.csv")
    assert a != b and a.parent == paths.data_dir() == b.parent
    assert a.name.startswith("my_data-clean-") and a.suffix == ".jsonl"
    assert ev.name == b.stem + "-eval.jsonl"
    assert read_jsonl(a) == rows
    assert json.loads(a.with_suffix(".summary.json").read_text())["train_file"] == str(a)


def test_writing_over_the_input_is_refused(tmp_path):
    src = write_jsonl_rows(tmp_path / "in.jsonl", [{"prompt": "p", "completion": "c", "label": True}])
    before = digest(src)
    with pytest.raises(DataError, match="refusing to write over the input file"):
        write_jsonl([{"prompt": "q", "completion": "d", "label": False}], src, protect=[src])
    assert digest(src) == before


# ---- the headless command -------------------------------------------------------------------------------------------

def run_cli(capsys, *argv):
    code = main(["data", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_converts_cleans_balances_and_summarizes_a_paired_file(tmp_path, capsys, bundled_model_dir):
    src = write_jsonl_rows(tmp_path / "pairs.jsonl", messy_pairs())
    before = digest(src)
    out = tmp_path / "clean.jsonl"
    code, stdout, _ = run_cli(capsys, src, "--out", out, "--model", bundled_model_dir, "--max-length", 64)
    assert code == 0
    s = json.loads(stdout)
    assert s["format"] == "paired" and s["rows_in"] == 8 and s["kto_rows"] == 16
    # dropped: pair 8 (2 duplicate rows), pair 4 (chosen == rejected: 2 rows), pairs 5-7 rejected (3 empty)
    assert s["dropped"] == {"empty_completion": 3, "conflicting_labels": 2, "duplicate": 2}
    assert s["rows_out"] == 9 and s["label_counts"] == {"desirable": 6, "undesirable": 3}
    w = s["suggested_weights"]
    assert w["desirable_weight"] == 1.0 and w["in_range"] and 1 <= w["ratio"] <= 4 / 3
    assert any("8 chosen/rejected pairs unpaired into 16 KTO rows" in c for c in s["conversions"])
    problems = {p["kind"]: p for p in s["problems"]}
    assert problems["duplicate"]["rows"] == [8] and problems["duplicate"]["action"] == "dropped"
    assert problems["empty_completion"]["rows"] == [5, 6, 7]
    assert problems["conflicting_labels"]["rows"] == [4]
    assert s["token_lengths"]["max_length"] == 64 and s["token_lengths"]["total"]["max"] > 0
    written = read_jsonl(out)
    assert len(written) == 9 and sum(r["label"] for r in written) == 6
    assert all(r["completion"].strip() for r in written)
    assert digest(src) == before


def test_cli_column_mapping(tmp_path, capsys):
    src = tmp_path / "odd.csv"
    src.write_text("q,a,verdict\nHi?,Hello!,thumbs up\nHi?,Go away.,thumbs down\n", encoding="utf-8")
    code, stdout, err = run_cli(capsys, src, "--out", tmp_path / "o.jsonl")
    assert code == 1 and stdout == ""
    assert err.count("\n") == 1 and "Columns found: 'q', 'a', 'verdict'" in err and "--map" in err
    code, stdout, err = run_cli(capsys, src, "--out", tmp_path / "o.jsonl", "--map", "q=prompt", "--map",
                                "a=completion", "--map", "verdict=label")
    assert code == 0, err
    assert read_jsonl(tmp_path / "o.jsonl") == [{"prompt": "Hi?", "completion": "Hello!", "label": True},
                                                {"prompt": "Hi?", "completion": "Go away.", "label": False}]
    assert json.loads(stdout)["column_mapping"] == {"q": "prompt", "a": "completion", "verdict": "label"}
    code, _, err = run_cli(capsys, src, "--out", tmp_path / "o.jsonl", "--map", "q:prompt")
    assert code == 2 and "--map needs THEIRS=OURS" in err


def test_cli_lists_unknown_labels_and_leaves_those_rows_out(tmp_path, capsys):
    rows = [{"prompt": f"p{i}", "completion": f"c{i}", "label": v}
            for i, v in enumerate(["yes", "no", "meh", "yes", "4 stars"], start=1)]
    src = write_jsonl_rows(tmp_path / "l.jsonl", rows)
    code, stdout, _ = run_cli(capsys, src, "--out", tmp_path / "o.jsonl")
    assert code == 0
    s = json.loads(stdout)
    unknown = next(p for p in s["problems"] if p["kind"] == "unknown_label")
    assert unknown["rows"] == [3, 5] and unknown["values"] == ["meh", "4 stars"]
    assert s["rows_out"] == 3 and [r["prompt"] for r in read_jsonl(tmp_path / "o.jsonl")] == ["p1", "p2", "p4"]


def test_cli_one_label_file_still_works_and_says_so(tmp_path, capsys):
    src = write_jsonl_rows(tmp_path / "good.jsonl", [{"prompt": f"p{i}", "completion": "c", "label": True}
                                                      for i in range(4)])
    code, stdout, _ = run_cli(capsys, src, "--out", tmp_path / "o.jsonl")
    s = json.loads(stdout)
    assert code == 0 and s["label_counts"] == {"desirable": 4, "undesirable": 0}
    assert "KTO can still train on one label" in s["notes"][0]


def test_cli_refuses_to_overwrite_its_input(tmp_path, capsys):
    src = write_jsonl_rows(tmp_path / "in.jsonl", [{"prompt": "p", "completion": "c", "label": True}])
    before = digest(src)
    code, _, err = run_cli(capsys, src, "--out", src)
    assert code != 0 and "refusing to write over the input file" in err
    assert digest(src) == before


def test_cli_as_a_process_exits_nonzero_with_one_line_for_a_broken_file(tmp_path):
    src = tmp_path / "cut.jsonl"
    src.write_text('{"prompt": "p", "completion": "c", "label": true}\n{"prompt": "p", "compl', encoding="utf-8")
    proc = subprocess.run([sys.executable, "-m", "studio", "data", str(src), "--out", str(tmp_path / "o.jsonl")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        "error: cut.jsonl line 2 is not valid JSON: Unterminated string starting at column 17 "
        "(it is the last line: the file may be truncated). Add --skip-bad-lines to load the other lines (the skipped "
        "ones are listed in the summary)."]
    assert not (tmp_path / "o.jsonl").exists()


# ---- training on the cleaned file -----------------------------------------------------------------------------------

def test_prepare_training_reads_the_cleaned_file_and_warns_about_weights(tmp_path, capsys):
    src = write_jsonl_rows(tmp_path / "pairs.jsonl", messy_pairs())
    out = tmp_path / "clean.jsonl"
    assert run_cli(capsys, src, "--out", out)[0] == 0
    cfg = RunConfig().updated({"data.train_file": str(out), "train.per_device_train_batch_size": 2,
                               "data.eval_fraction": 0.0})  # every row trains (a run holds out 5% by default)
    td = prepare_training(cfg)
    assert (len(td.train), td.n_desirable, td.n_undesirable) == (9, 6, 3)
    assert "weigh 2.00 times as much as the undesirable ones, more than the KTO paper advises" in td.notes[0]
    cfg = cfg.updated({"kto.undesirable_weight": 1.5})
    assert prepare_training(cfg).notes == []


def test_cli_filter_flags_when_the_parser_offers_them(tmp_path, capsys):
    from argparse import Namespace

    from studio.cli import cmd_data as cli

    src = write_jsonl_rows(tmp_path / "pairs.jsonl", messy_pairs())
    args = Namespace(file=str(src), out=str(tmp_path / "o.jsonl"), model=None, max_length=None, map=[],
                     keep_duplicates=True, keep_empty=True)
    assert cli(args) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["rows_out"] == 16 and s["dropped"] == {}
    assert {p["kind"]: p["action"] for p in s["problems"]}["duplicate"] == "kept"


def test_cli_skip_bad_lines_loads_the_rest_and_lists_them(tmp_path, capsys):
    """Issue 30, item 9: `python -m studio data --skip-bad-lines` loads the good lines of a broken JSONL."""
    src = tmp_path / "broken.jsonl"
    src.write_text('{"prompt": "q", "completion": "a", "label": true}\nnot json\n'
                   '{"prompt": "r", "completion": "b", "label": false}\n')
    code, _, err = run_cli(capsys, src, "--out", tmp_path / "out.jsonl")
    assert code != 0 and "line 2 is not valid JSON" in err and "--skip-bad-lines" in err
    code, stdout, _ = run_cli(capsys, src, "--out", tmp_path / "out.jsonl", "--skip-bad-lines")
    s = json.loads(stdout)
    assert code == 0 and s["rows_out"] == 2 and [x["line"] for x in s["skipped_lines"]] == [2]
