"""Messy and broken files get a plain message that says what is wrong and what to do; the file is never touched."""
from __future__ import annotations

import gzip
import hashlib
import json

import pandas as pd
import pytest

from studio.data import DataError, load_kto
from studio.data.balance import suggest_weights

ROWS = [{"prompt": f"question {i}", "completion": f"answer {i}", "label": i % 2 == 0} for i in range(6)]


def jsonl_text(rows):
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


@pytest.fixture
def untouched():
    """Check, after the test, that every file handed to it still has the same bytes and modification time."""
    seen = []

    def watch(path):
        seen.append((path, hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns))
        return str(path)

    yield watch
    for path, digest, mtime in seen:
        assert hashlib.sha256(path.read_bytes()).hexdigest() == digest, f"{path} was modified"
        assert path.stat().st_mtime_ns == mtime


def fails(source, pattern):
    with pytest.raises(DataError, match=pattern):
        load_kto(source)


def test_wrong_encoding_names_the_line_and_the_fix(tmp_path, untouched):
    p = tmp_path / "excel.csv"
    p.write_bytes("prompt,completion,label\nCafé?,Crème brûlée,yes\n".encode("cp1252"))
    fails(untouched(p), r"excel.csv is not UTF-8 text \(byte 0xe9 at line 2.*re-save it as UTF-8")


def test_utf16_with_bom_is_read(tmp_path, untouched):
    p = tmp_path / "u16.jsonl"
    p.write_bytes(jsonl_text(ROWS).encode("utf-16"))
    assert len(load_kto(untouched(p)).rows) == 6


def test_binary_file(tmp_path, untouched):
    p = tmp_path / "photo.jsonl"
    p.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)) * 4)
    fails(untouched(p), "photo.jsonl looks like a binary file, not text")


def test_truncated_jsonl_says_which_line(tmp_path, untouched):
    text = jsonl_text(ROWS)
    p = tmp_path / "cut.jsonl"
    p.write_text(text[: len(text) - 15], encoding="utf-8")
    fails(untouched(p), r"cut.jsonl line 6 is not valid JSON: .* \(it is the last line: the file may be truncated\)")


def test_bad_jsonl_line_in_the_middle(tmp_path, untouched):
    lines = jsonl_text(ROWS).splitlines()
    lines[2] = '{"prompt": "q", "completion": "a", "label": true,}'
    p = tmp_path / "bad.jsonl"
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(DataError) as e:
        load_kto(untouched(p))
    assert str(e.value).startswith("bad.jsonl line 3 is not valid JSON")
    assert "truncated" not in str(e.value)


def test_jsonl_line_that_is_not_an_object(tmp_path, untouched):
    p = tmp_path / "arr.jsonl"
    p.write_text(jsonl_text(ROWS[:1]) + '["a", "b"]\n', encoding="utf-8")
    fails(untouched(p), "arr.jsonl line 2 is a list, expected an object with named fields")


def test_truncated_json(tmp_path, untouched):
    p = tmp_path / "cut.json"
    p.write_text(json.dumps(ROWS)[:-30], encoding="utf-8")
    fails(untouched(p), r"cut.json is not valid JSON: .*the file may be truncated")


def test_truncated_parquet(tmp_path, untouched):
    full = tmp_path / "full.parquet"
    pd.DataFrame(ROWS).to_parquet(full)
    p = tmp_path / "cut.parquet"
    p.write_bytes(full.read_bytes()[:200])
    fails(untouched(p), "cut.parquet is not a readable Parquet file .*truncated")


def test_truncated_gzip(tmp_path, untouched):
    p = tmp_path / "cut.jsonl.gz"
    p.write_bytes(gzip.compress(jsonl_text(ROWS * 50).encode())[:120])
    fails(untouched(p), "cut.jsonl.gz is not a readable gzip file .*truncated")


def test_text_cut_inside_a_character(tmp_path, untouched):
    p = tmp_path / "cut.jsonl"
    p.write_bytes(jsonl_text(ROWS).encode() + '{"prompt": "é'.encode()[:-1])
    fails(untouched(p), "ends in the middle of a character: the file is truncated")


@pytest.mark.parametrize("name,content,pattern", [
    ("empty.jsonl", "", "empty.jsonl is empty"),
    ("blank.jsonl", "\n  \n\n", "blank.jsonl holds no rows"),
    ("empty.json", "[]", "empty.json holds no rows"),
    ("header.csv", "prompt,completion,label\n", "header.csv holds no rows"),
])
def test_empty_files(tmp_path, untouched, name, content, pattern):
    p = tmp_path / name
    p.write_text(content, encoding="utf-8")
    fails(untouched(p), pattern)


def test_empty_parquet(tmp_path, untouched):
    p = tmp_path / "none.parquet"
    pd.DataFrame({"prompt": pd.Series([], dtype=str)}).to_parquet(p)
    fails(untouched(p), "none.parquet holds no rows")


def test_missing_columns(tmp_path, untouched):
    p = tmp_path / "cols.csv"
    pd.DataFrame([{"text": "hello", "score": 3}]).to_csv(p, index=False)
    fails(untouched(p), r"cannot tell which column is which: KTO needs prompt \+ completion \+ label.*"
                        r"Columns found: 'text', 'score'")


def test_missing_file_and_unsupported_type(tmp_path, untouched):
    fails(str(tmp_path / "nope.jsonl"), "nope.jsonl does not exist")
    p = tmp_path / "sheet.xlsx"
    p.write_bytes(b"PK\x03\x04 not really a sheet")
    fails(untouched(p), r"sheet.xlsx: unsupported file type \(save the sheet as CSV UTF-8\)")


def test_folder_that_is_not_a_saved_dataset(tmp_path):
    (tmp_path / "folder").mkdir()
    fails(str(tmp_path / "folder"), "is a folder but not a saved `datasets` dataset")


def test_a_file_of_one_label_loads_and_says_kto_can_still_train(tmp_path, untouched):
    p = tmp_path / "all_good.jsonl"
    p.write_text(jsonl_text([dict(r, label=True) for r in ROWS]), encoding="utf-8")
    norm = load_kto(untouched(p))
    assert {r["label"] for r in norm.rows} == {True}
    advice = suggest_weights(len(norm.rows), 0)
    assert (advice.desirable_weight, advice.undesirable_weight) == (1.0, 1.0)
    assert "every row is desirable. KTO can still train on one label" in advice.note


def test_every_label_unknown_is_an_error_even_when_lenient(tmp_path, untouched):
    p = tmp_path / "stars.jsonl"
    p.write_text(jsonl_text([dict(r, label=5) for r in ROWS[:2]]), encoding="utf-8")
    with pytest.raises(DataError, match="row 1: 5; row 2: 5"):
        load_kto(untouched(p), strict=False)


def test_file_larger_than_memory_allows_is_refused(tmp_path, untouched, monkeypatch):
    p = tmp_path / "huge.jsonl"
    p.write_text(jsonl_text(ROWS * 100), encoding="utf-8")
    monkeypatch.setenv("KTO_STUDIO_MAX_DATA_BYTES", "4096")
    fails(untouched(p), r"huge.jsonl is \d+\.\d KiB, more than the 4.0 KiB this machine can load into memory right "
                        "now: split it or sample it down")


def test_the_limit_follows_free_memory(tmp_path, untouched, monkeypatch):
    from studio.data import readers

    monkeypatch.delenv("KTO_STUDIO_MAX_DATA_BYTES", raising=False)
    monkeypatch.setattr(readers, "available_memory", lambda: 10_000)
    p = tmp_path / "big.jsonl"
    p.write_text(jsonl_text(ROWS * 20), encoding="utf-8")
    fails(untouched(p), "more than the 2.0 KiB this machine can load")


def test_gzip_bomb_stops_at_the_limit(tmp_path, untouched, monkeypatch):
    p = tmp_path / "bomb.jsonl.gz"
    p.write_bytes(gzip.compress(jsonl_text(ROWS * 2000).encode()))
    monkeypatch.setenv("KTO_STUDIO_MAX_DATA_BYTES", str(p.stat().st_size * 2))
    fails(untouched(p), r"bomb.jsonl.gz \(unpacked\) is .* more than the")
