"""Reading users' files into plain records. Files are only ever read, never written.

JSONL, JSON (a list of records, or {"data"/"rows"/"train": [...]}, or column-oriented), CSV/TSV, Parquet, a folder
saved with ``datasets.save_to_disk``, or a hub dataset id (when online).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from studio.data.normalize import DataError

MAX_BYTES = int(os.environ.get("KTO_STUDIO_MAX_DATA_BYTES", str(2 * 2**30)))
SUFFIXES = {".jsonl", ".ndjson", ".json", ".csv", ".tsv", ".parquet", ".pq", ".gz"}


def read_records(source: str | Path) -> list[dict[str, Any]]:
    """Records from a file, a saved dataset folder or a hub id; DataError with a plain reason otherwise."""
    path = Path(source).expanduser()
    if path.is_dir():
        return _read_saved_dataset(path)
    if not path.exists():
        if isinstance(source, str) and source.count("/") == 1 and not source.startswith((".", "/")) and not path.suffix:
            return _read_hub(source)
        raise DataError(f"{path} does not exist")
    size = path.stat().st_size
    if size == 0:
        raise DataError(f"{path.name} is empty")
    if size > MAX_BYTES:
        raise DataError(
            f"{path.name} is {size / 2**30:.1f} GiB, more than the {MAX_BYTES / 2**30:.1f} GiB the studio loads into "
            "memory: split it, or sample it down (a KTO run rarely needs more than a few hundred thousand rows)"
        )
    name = path.name.lower()
    gz = name.endswith(".gz")
    if gz:
        name = name[:-3]
    if name.endswith((".jsonl", ".ndjson")):
        return _read_jsonl(path, gz)
    if name.endswith(".json"):
        return _read_json(path, gz)
    if name.endswith((".csv", ".tsv")):
        return _read_table(path, sep="\t" if name.endswith(".tsv") else ",")
    if name.endswith((".parquet", ".pq")):
        return _read_parquet(path)
    raise DataError(f"{path.name}: unsupported file type; use .jsonl, .json, .csv, .tsv or .parquet")


def _open_text(path: Path, gz: bool) -> str:
    raw = path.read_bytes()
    if gz:
        import gzip

        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise DataError(f"{path.name} is not a readable gzip file ({e}): it may be truncated") from None
    if b"\x00" in raw[:8192] and not raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise DataError(f"{path.name} looks like a binary file, not text: export it as JSONL or CSV")
    for enc in ("utf-8-sig", "utf-16"):
        try:
            if enc == "utf-16" and not raw.startswith((b"\xff\xfe", b"\xfe\xff")):
                continue
            return raw.decode(enc)
        except UnicodeDecodeError:
            continue
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(
            f"{path.name} is not UTF-8 text (bad byte at line {line}): re-save it as UTF-8 "
            "(in most editors: Save As → Encoding UTF-8)"
        ) from None
    raise AssertionError("unreachable")


def _read_jsonl(path: Path, gz: bool) -> list[dict[str, Any]]:
    text = _open_text(path, gz)
    rows = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            hint = " (the file may be truncated)" if n == len(text.splitlines()) else ""
            raise DataError(f"{path.name} line {n} is not valid JSON: {e.msg} at column {e.colno}{hint}") from None
        if not isinstance(obj, dict):
            raise DataError(f"{path.name} line {n} is a {type(obj).__name__}, expected an object with named fields")
        rows.append(obj)
    if not rows:
        raise DataError(f"{path.name} holds no rows")
    return rows


def _read_json(path: Path, gz: bool) -> list[dict[str, Any]]:
    text = _open_text(path, gz)
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        if text.lstrip().startswith("{") and "\n{" in text:
            return _read_jsonl(path, gz)  # JSON Lines saved as .json
        raise DataError(f"{path.name} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    if isinstance(obj, dict):
        for key in ("data", "rows", "train", "examples", "records"):
            if isinstance(obj.get(key), list):
                obj = obj[key]
                break
        else:
            lists = {k: v for k, v in obj.items() if isinstance(v, list)}
            if lists and len({len(v) for v in lists.values()}) == 1:  # column-oriented
                n = len(next(iter(lists.values())))
                obj = [{k: v[i] for k, v in lists.items()} for i in range(n)]
    if not isinstance(obj, list) or not all(isinstance(r, dict) for r in obj):
        raise DataError(f"{path.name}: expected a list of records (objects with named fields)")
    if not obj:
        raise DataError(f"{path.name} holds no rows")
    return obj


def _read_table(path: Path, sep: str) -> list[dict[str, Any]]:
    import io

    import pandas as pd

    text = _open_text(path, gz=False)
    try:
        df = pd.read_csv(io.StringIO(text), sep=sep, dtype=str, keep_default_na=False)
    except Exception as e:  # pandas raises several types for malformed tables
        raise DataError(f"{path.name} could not be read as {'TSV' if sep == chr(9) else 'CSV'}: {e}") from None
    if df.empty:
        raise DataError(f"{path.name} holds no rows")
    return _frame_records(df)


def _read_parquet(path: Path) -> list[dict[str, Any]]:
    import pandas as pd

    try:
        df = pd.read_parquet(path)
    except Exception as e:
        raise DataError(f"{path.name} is not a readable Parquet file ({type(e).__name__}): it may be truncated") from None
    if df.empty:
        raise DataError(f"{path.name} holds no rows")
    return _frame_records(df)


def _frame_records(df) -> list[dict[str, Any]]:
    records = df.to_dict(orient="records")
    for r in records:
        for k, v in r.items():
            if hasattr(v, "tolist"):  # numpy arrays of messages from Parquet
                r[k] = v.tolist()
    return records


def _read_saved_dataset(path: Path) -> list[dict[str, Any]]:
    from datasets import DatasetDict, load_from_disk

    try:
        ds = load_from_disk(str(path))
    except Exception as e:
        raise DataError(f"{path} is a folder but not a saved `datasets` dataset: {e}") from None
    if isinstance(ds, DatasetDict):
        ds = ds["train"] if "train" in ds else ds[next(iter(ds))]
    return ds.to_list()


def _read_hub(repo_id: str) -> list[dict[str, Any]]:
    from datasets import load_dataset

    try:
        ds = load_dataset(repo_id, split="train")
    except Exception as e:
        raise DataError(f"could not load the hub dataset '{repo_id}' ({type(e).__name__}): check the id and that "
                        "you are online") from None
    return ds.to_list()
