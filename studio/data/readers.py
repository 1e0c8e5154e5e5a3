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


class BadLineError(DataError):
    """A line of a JSONL file that is not a JSON object; the other lines can still be loaded with bad lines skipped
    (``read_records(..., skipped=[])``, the Data tab's "Skip the bad lines", ``--skip-bad-lines``)."""

    def __init__(self, message: str, line: int):
        super().__init__(message)
        self.line = line

# Loading a file as Python records takes several times its size in memory (strings, dicts, then a datasets copy).
MEMORY_PER_FILE_BYTE = 5


def read_records(source: str | Path, progress=None, skipped: list | None = None) -> list[dict[str, Any]]:
    """Records from a file, a saved dataset folder or a hub id; DataError with a plain reason otherwise.
    ``progress(fraction, message)``, if given, hears how far reading a JSONL file got. ``skipped``: a list to collect
    JSONL lines that are not JSON objects ({"line": n, "error": why}) instead of refusing the file (BadLineError)."""
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
    check_size(path.name, size)
    name = path.name.lower()
    gz = name.endswith(".gz")
    if gz:
        name = name[:-3]
    if name.endswith((".jsonl", ".ndjson")):
        return _read_jsonl(path, gz, progress, skipped)
    if name.endswith(".json"):
        return _read_json(path, gz, skipped)
    if name.endswith((".csv", ".tsv")):
        return _read_table(path, sep="\t" if name.endswith(".tsv") else ",")
    if name.endswith((".parquet", ".pq")):
        return _read_parquet(path)
    hint = " (save the sheet as CSV UTF-8)" if name.endswith((".xlsx", ".xls", ".ods")) else ""
    raise DataError(f"{path.name}: unsupported file type{hint}; use .jsonl, .json, .csv, .tsv or .parquet, or a saved "
                    "`datasets` folder")


def max_bytes() -> int:
    """The largest file the studio loads: KTO_STUDIO_MAX_DATA_BYTES, else what the free memory can hold."""
    if os.environ.get("KTO_STUDIO_MAX_DATA_BYTES"):
        return int(os.environ["KTO_STUDIO_MAX_DATA_BYTES"])
    avail = available_memory()
    return avail // MEMORY_PER_FILE_BYTE if avail else 2 * 2**30


def available_memory() -> int | None:
    """Bytes of memory free for new data (MemAvailable on Linux), or None when unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except Exception:
        return None


def check_size(name: str, size: int) -> None:
    limit = max_bytes()
    if size > limit:
        raise DataError(
            f"{name} is {_human(size)}, more than the {_human(limit)} this machine can load into memory right now: "
            "split it or sample it down (a KTO run rarely needs more than a few hundred thousand rows), then load a part"
        )


def _human(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _open_text(path: Path, gz: bool) -> str:
    if gz:
        import gzip

        limit = max_bytes()
        try:
            with gzip.open(path, "rb") as f:
                raw = f.read(limit + 1)  # stop early instead of filling memory with a huge archive
        except (OSError, EOFError) as e:
            raise DataError(f"{path.name} is not a readable gzip file ({e}): it may be truncated") from None
        if len(raw) > limit:
            check_size(path.name + " (unpacked)", len(raw))
    else:
        raw = path.read_bytes()
    bom_less = _utf16_without_bom(raw)
    if bom_less:
        try:
            return raw.decode(bom_less)
        except UnicodeDecodeError:
            pass
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
        if e.start >= len(raw) - 3 and e.reason == "unexpected end of data":
            raise DataError(f"{path.name} ends in the middle of a character: the file is truncated "
                            "(copy or download it again)") from None
        raise DataError(
            f"{path.name} is not UTF-8 text (byte 0x{raw[e.start]:02x} at line {line}{_guess_encoding(raw)}): "
            "re-save it as UTF-8 (in most editors: Save As → Encoding UTF-8; in Excel: CSV UTF-8)"
        ) from None
    raise AssertionError("unreachable")


def _utf16_without_bom(raw: bytes) -> str | None:
    """'utf-16-be' / 'utf-16-le' for text saved as UTF-16 without a byte-order mark: mostly-ASCII text then has a
    zero byte in every other position (before each character in big-endian, after it in little-endian)."""
    sample = raw[:8192]
    if len(sample) < 4 or raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        return None
    even, odd = sample[0::2], sample[1::2]
    zeros_even, zeros_odd = even.count(0) / len(even), odd.count(0) / len(odd)
    if zeros_even > 0.5 and zeros_odd < 0.05:
        return "utf-16-be"
    if zeros_odd > 0.5 and zeros_even < 0.05:
        return "utf-16-le"
    return None


def _guess_encoding(raw: bytes) -> str:
    """', it looks like cp1252' when charset-normalizer has a guess; the guess only helps the message, the text is
    never decoded with it (a wrong guess would put garbled text into training)."""
    try:
        from charset_normalizer import from_bytes

        best = from_bytes(raw[:200_000]).best()
    except Exception:
        return ""
    return f", it looks like {best.encoding}" if best is not None and best.encoding != "utf_8" else ""


def _read_jsonl(path: Path, gz: bool, progress=None, skipped: list | None = None) -> list[dict[str, Any]]:
    if progress:
        progress(0.0, f"reading {path.name}")
    text = _open_text(path, gz)
    # split on newlines only: str.splitlines would also split on U+2028 inside JSON strings
    lines = text.split("\n")
    rows = []
    every = max(1, len(lines) // 50)
    for n, line in enumerate(lines, start=1):
        if progress and n % every == 0:
            progress(n / len(lines), f"reading line {n:,} of {len(lines):,}")
        if not line.strip():
            continue
        msg = None  # the whole message, as when the file is refused
        try:
            obj = _loads(line)
        except _NotJson as e:
            msg = f"{path.name} line {n}: {e}"
        except json.JSONDecodeError as e:
            last = not any(rest.strip() for rest in lines[n:])
            hint = " (it is the last line: the file may be truncated)" if last else ""
            msg = f"{path.name} line {n} is not valid JSON: {_where(e.msg)} column {e.colno}{hint}"
        else:
            if not isinstance(obj, dict):
                msg = f"{path.name} line {n} is a {type(obj).__name__}, expected an object with named fields"
        if msg is not None:
            if skipped is None:
                raise BadLineError(msg, n)
            skipped.append({"line": n, "error": msg.removeprefix(f"{path.name} line {n}").lstrip(": ")})
            continue
        rows.append(obj)
    if not rows and skipped:
        raise DataError(f"{path.name} holds no readable line: all {len(skipped)} are broken")
    if not rows:
        raise DataError(f"{path.name} holds no rows")
    return rows


class _NotJson(ValueError):
    """Text Python's json module accepts but JSON does not (NaN, Infinity), or nesting too deep to read."""


def _no_constant(name: str):
    raise _NotJson(f"{name} is not a JSON value (JSON has no NaN or Infinity): write null for a missing value, "
                   "or put the text in quotes")


def _one_each(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """An object's fields; a key given twice is an error (json keeps the last silently: "label": true, "label":
    false would become false)."""
    d = dict(pairs)
    if len(d) != len(pairs):
        seen, twice = set(), []
        for k, _ in pairs:
            if k in seen and k not in twice:
                twice.append(k)
            seen.add(k)
        raise _NotJson(f"the key {', '.join(repr(k) for k in twice)} appears more than once in one object, so "
                       "which value is meant is unclear: keep one of them")
    return d


def _loads(text: str):
    try:
        return json.loads(text, parse_constant=_no_constant, object_pairs_hook=_one_each)
    except RecursionError:
        raise _NotJson("the JSON is nested too deeply to read (thousands of levels of [ or {): a data row holds "
                       "text, a label and at most a list of messages") from None


def _where(msg: str) -> str:
    # json's messages sometimes end in "at" already ("Unterminated string starting at")
    return msg if msg.endswith(" at") else msg + " at"


def _read_json(path: Path, gz: bool, skipped: list | None = None) -> list[dict[str, Any]]:
    text = _open_text(path, gz)
    try:
        obj = _loads(text)
    except _NotJson as e:
        raise DataError(f"{path.name}: {e}") from None
    except json.JSONDecodeError as e:
        if text.lstrip().startswith("{") and "\n{" in text:
            return _read_jsonl(path, gz, skipped=skipped)  # JSON Lines saved as .json
        hint = " (the text stops early: the file may be truncated)" if e.pos >= len(text.rstrip()) - 1 else ""
        raise DataError(f"{path.name} is not valid JSON: {_where(e.msg)} line {e.lineno} column {e.colno}{hint}") from None
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
    _check_header(path, text, sep)
    try:
        df = pd.read_csv(io.StringIO(text), sep=sep, dtype=str, keep_default_na=False)
    except Exception as e:  # pandas raises several types for malformed tables
        raise DataError(f"{path.name} could not be read as {'TSV' if sep == chr(9) else 'CSV'}: {e}") from None
    if df.empty:
        raise DataError(f"{path.name} holds no rows")
    return _frame_records(df)


def _check_header(path: Path, text: str, sep: str) -> None:
    """pandas renames a repeated column ('prompt', 'prompt.1') and the second is then silently unused: refuse."""
    import csv
    import io

    try:
        header = next(csv.reader(io.StringIO(text), delimiter=sep))
    except (StopIteration, csv.Error):
        return
    seen: dict[str, int] = {}
    for i, name in enumerate(header, start=1):
        key = name.strip()
        if key and key in seen:
            raise DataError(f"{path.name}: the column '{key}' appears twice in the header (columns {seen[key]} and "
                            f"{i}): rename or remove one, so it is clear which one holds the data")
        seen.setdefault(key, i)


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
        raise DataError(f"{path} is a folder but not a saved `datasets` dataset ({type(e).__name__}): point at a "
                        "data file, or at a folder written by Dataset.save_to_disk") from None
    if isinstance(ds, DatasetDict):
        ds = ds["train"] if "train" in ds else ds[next(iter(ds))]
    check_size(path.name, int(ds.data.nbytes))
    if len(ds) == 0:
        raise DataError(f"{path.name} holds no rows")
    return ds.to_list()


def _read_hub(repo_id: str) -> list[dict[str, Any]]:
    from datasets import load_dataset

    try:
        ds = load_dataset(repo_id, split="train")
    except Exception as e:
        raise DataError(f"could not load the hub dataset '{repo_id}' ({type(e).__name__}): check the id and that "
                        "you are online") from None
    return ds.to_list()
