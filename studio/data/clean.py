"""Cleaning KTO rows and writing them out: drop filters, a seeded train/eval split, a new file (never the input),
and ``python -m studio data FILE --out CLEAN.jsonl``, which does it all headless and prints a JSON summary.
"""
from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from studio.data.balance import suggest_weights
from studio.data.inspect import Report, inspect_rows
from studio.data.normalize import FIELDS, DataError, Normalized
from studio.errors import StudioError

# reasons a row is left out, in the order they are checked (a row is counted under its first reason)
REASONS = ("unlabeled", "empty_completion", "conflicting_labels", "duplicate", "prompt_too_long", "over_length")


@dataclass
class CleanOptions:
    drop_duplicates: bool = True  # exact repeats (the first stays) and rows labelled both ways (all go)
    drop_empty: bool = True  # empty or whitespace-only completions teach nothing
    drop_over_length: bool = False  # rows longer than max_length (else the trainer truncates them)
    # rows whose prompt alone fills max_length are always dropped: the trainer would drop them anyway


def apply_filters(rows: list[dict[str, Any]], report: Report,
                  options: CleanOptions | None = None) -> tuple[list[int], dict[str, list[int]]]:
    """Indices of the rows to keep, and the dropped indices by reason."""
    options = options or CleanOptions()
    flagged: dict[str, set[int]] = {
        "unlabeled": {i for i, r in enumerate(rows) if r.get("label") is None},
        "empty_completion": set(report.empty_completions) if options.drop_empty else set(),
        "conflicting_labels": set(report.conflicts) if options.drop_duplicates else set(),
        "duplicate": set(report.duplicates) if options.drop_duplicates else set(),
        "prompt_too_long": set(report.dropped),
        "over_length": set(report.truncated) if options.drop_over_length else set(),
    }
    dropped: dict[str, list[int]] = {k: [] for k in REASONS}
    keep = []
    for i in range(len(rows)):
        reason = next((k for k in REASONS if i in flagged[k]), None)
        if reason is None:
            keep.append(i)
        else:
            dropped[reason].append(i)
    return keep, {k: v for k, v in dropped.items() if v}


def split(rows: list[dict[str, Any]], eval_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Seeded train/eval split that keeps the desirable:undesirable mix the same on both sides."""
    if eval_fraction <= 0 or len(rows) < 2:
        return list(rows), []
    rng = random.Random(seed)
    train_idx, eval_idx = [], []
    for label in (True, False):
        idx = [i for i, r in enumerate(rows) if r["label"] is label]
        rng.shuffle(idx)
        n_eval = round(len(idx) * eval_fraction)
        if len(idx) >= 2 and n_eval == 0:
            n_eval = 1
        eval_idx += idx[:n_eval]
        train_idx += idx[n_eval:]
    if not train_idx:
        raise DataError(f"an eval fraction of {eval_fraction} leaves no training rows: lower it")
    return [rows[i] for i in sorted(train_idx)], [rows[i] for i in sorted(eval_idx)]


def prompt_key(prompt: Any) -> str:
    """The identity of a prompt (text or conversation), for grouping the rows that share it."""
    return json.dumps(prompt, sort_keys=True, ensure_ascii=False)


def split_by_prompt(rows: list[dict[str, Any]], eval_fraction: float, seed: int,
                    max_rows: int | None = None) -> tuple[list[int], list[int]]:
    """Indices (train, held-out) of a seeded split that moves whole prompt groups, so a prompt's desirable and
    undesirable completions (a preference pair) are never split between training and held-out rows. The held-out
    side gets about ``eval_fraction`` of the rows, at most ``max_rows``, and at least one group when asked for any
    (unless that would leave no training rows)."""
    if eval_fraction <= 0 or len(rows) < 2:
        return list(range(len(rows))), []
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        groups.setdefault(prompt_key(r["prompt"]), []).append(i)
    order = list(groups.values())
    random.Random(seed).shuffle(order)
    target = round(len(rows) * eval_fraction)
    if max_rows is not None:
        target = min(target, max_rows)
    held: list[int] = []
    for g in order[:-1]:  # the last group in the shuffled order always trains
        if len(held) + len(g) <= target:
            held.extend(g)
            if len(held) >= target:
                break
    if not held and len(order) > 1:  # every group is bigger than the target: the smallest one
        held = list(min(order[:-1], key=len))
    held_set = set(held)
    train = [i for i in range(len(rows)) if i not in held_set]
    if not train:
        raise DataError(f"an eval fraction of {eval_fraction} leaves no training rows: lower it")
    return train, sorted(held)


def _plain(row: dict[str, Any]) -> dict[str, Any]:
    return {"prompt": row["prompt"], "completion": row["completion"], "label": bool(row["label"])}


class OutputError(StudioError):
    """The output file cannot be written (a read-only folder, no permission, a full disk): the input was fine."""


def _cannot_write(out: Path, e: OSError) -> OutputError:
    why = e.strerror or str(e)
    return OutputError(f"cannot write the output {out} ({why}); the input was read fine: choose an --out path in a "
                       "folder you can write to, or fix that folder's permissions")


def check_out(out: str | Path, overwrite: bool = False) -> Path:
    """Where ``write_jsonl`` may write: a new file, or (with ``overwrite``) an existing regular file. A folder, a
    device (/dev/full), a pipe or a socket is refused: replacing it by renaming a file over it would destroy it."""
    out = Path(out).expanduser()
    if out.is_dir():
        raise DataError(f"{out} is a folder: --out needs a file name such as {out / 'clean.jsonl'}")
    if out.exists() and not out.is_file():
        raise DataError(f"{out} is not a regular file (a device, pipe or socket): --out needs a file name such as "
                        "clean.jsonl")
    if out.is_symlink() and not out.exists():
        raise DataError(f"{out} is a link to a file that does not exist: give another --out path")
    if out.exists() and not overwrite:
        raise DataError(f"{out} already exists: pass --overwrite to replace it, or choose another --out path")
    import os

    folder = out.resolve().parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not os.access(folder, os.W_OK | os.X_OK):  # before the (maybe long) reading
        raise _cannot_write(out, PermissionError(13, f"{folder} is not writable for you"))
    return out


def write_jsonl(rows: list[dict[str, Any]], out: str | Path, protect: list[str | Path] = (),
                overwrite: bool = False) -> Path:
    """Write KTO rows as UTF-8 JSONL to ``out``; refuses to write over any path in ``protect`` (the user's input),
    over anything but a regular file, and over an existing file unless ``overwrite`` (which keeps its permissions
    and, for a link, writes the file it points to)."""
    from studio import atomic

    out = Path(out).expanduser()
    for p in protect:
        if p and Path(p).expanduser().exists() and out.resolve() == Path(p).expanduser().resolve():
            raise DataError(f"refusing to write over the input file {p}: choose another --out path")
    out = check_out(out, overwrite)
    # a crash mid-write never leaves a half file under the real name; a link's target is written, its mode kept
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        return atomic.write(out, lambda f: f.writelines(json.dumps(_plain(r), ensure_ascii=False) + "\n"
                                                        for r in rows))
    except OSError as e:
        raise _cannot_write(out, e) from None


def new_data_path(source_name: str, suffix: str = "") -> Path:
    """A fresh file name in the studio's data folder: <stem>-clean-<timestamp><suffix>.jsonl, never an existing one."""
    from studio import paths

    stem = Path(source_name).name
    for ext in (".gz", ".jsonl", ".ndjson", ".json", ".csv", ".tsv", ".parquet", ".pq"):
        stem = stem.removesuffix(ext)
    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in stem)[:60] or "data"
    base = f"{stem}-clean-{time.strftime('%Y%m%d-%H%M%S')}"
    for n in range(1000):
        p = paths.data_dir() / f"{base}{'' if n == 0 else f'-{n}'}{suffix}.jsonl"
        if not p.exists():
            return p
    raise DataError("could not find a free file name in the data folder")


def save_clean(train: list[dict[str, Any]], eval_rows: list[dict[str, Any]] | None, source_name: str,
               summary: dict[str, Any] | None = None) -> tuple[Path, Path | None]:
    """Write the cleaned train (and eval) rows as new files in the studio's data folder, with a summary beside them
    saying where they came from. Returns the paths."""
    train_path = new_data_path(source_name)
    write_jsonl(train, train_path)
    eval_path = None
    if eval_rows:
        eval_path = train_path.with_name(train_path.stem + "-eval.jsonl")
        write_jsonl(eval_rows, eval_path)
    if summary is not None:
        info = dict(summary, train_file=str(train_path), eval_file=str(eval_path) if eval_path else None)
        train_path.with_suffix(".summary.json").write_text(json.dumps(info, indent=2, ensure_ascii=False, default=str),
                                                           encoding="utf-8")
    return train_path, eval_path


def summarize(norm: Normalized, report: Report, dropped: dict[str, list[int]], kept_rows: list[dict[str, Any]],
              options: CleanOptions, model: str | None) -> dict[str, Any]:
    """The JSON summary: rows in/out, label counts, suggested weights, conversions, problems with row numbers
    (record numbers in the input file; both rows made from one pair share its number)."""
    n_pos = sum(1 for r in kept_rows if r["label"] is True)
    n_neg = len(kept_rows) - n_pos
    balance = suggest_weights(n_pos, n_neg)
    rownum = norm.sources or None
    problems = report.problems(rownum)
    unlabeled = dropped.get("unlabeled", [])
    if unlabeled:
        raw = {u["row"]: u["value"] for u in norm.unlabeled}
        nums = [rownum[i] if rownum else i + 1 for i in unlabeled]
        problems.insert(0, {"kind": "unknown_label", "count": len(nums), "rows": nums,
                            "values": [raw.get(n) for n in nums][:50],
                            "message": "label is not one of the known spellings; not guessed, row left out"})
    drop_kind = {"empty_completion": "empty_completion", "conflicting_labels": "conflicting_labels",
                 "duplicate": "duplicate", "prompt_too_long": "prompt_too_long", "over_length": "over_length",
                 "unknown_label": "unlabeled"}
    for p in problems:
        p["action"] = "dropped" if drop_kind.get(p["kind"]) in dropped else "kept"
    if report.tokenizer_note:
        problems.append({"kind": "token_lengths_unavailable", "count": 0, "rows": [], "message": report.tokenizer_note,
                         "action": "skipped"})
    notes = [balance.note] if (n_pos == 0 or n_neg == 0) else []
    out: dict[str, Any] = {
        "format": norm.shape,
        "columns": norm.columns,
        "column_mapping": norm.mapping,
        "rows_in": norm.n_records,
        "kto_rows": len(norm.rows),
        "rows_out": len(kept_rows),
        "label_counts": {"desirable": n_pos, "undesirable": n_neg},
        "suggested_weights": balance.as_dict(),
        "conversions": norm.conversions,
        "dropped": {k: len(v) for k, v in dropped.items()},
        "problems": problems,
        "filters": asdict(options),
        "notes": notes,
        "skipped_lines": norm.skipped_lines,
    }
    if report.lengths:
        out["token_lengths"] = {"model": model, "max_length": report.max_length, **report.lengths.stats(),
                                "over_length": len(report.truncated), "prompt_too_long": len(report.dropped),
                                "chat_template_mismatch": len(report.mismatched)}
    return out


def run(file: str, out: str, model: str | None = None, max_length: int | None = None,
        mapping: dict[str, str] | None = None, options: CleanOptions | None = None,
        overwrite: bool = False, progress=None, skip_bad_lines: bool = False) -> dict[str, Any]:
    """Load ``file``, convert, inspect, clean, write ``out``; the summary as a dict. DataError when unusable."""
    from studio.config.run import BUNDLED_MODEL
    from studio.data import load_kto, resolve

    options = options or CleanOptions()
    source = resolve(file)
    if Path(out).expanduser().resolve() == Path(source).expanduser().resolve():
        raise DataError(f"refusing to write over the input file {file}: choose another --out path")
    check_out(out, overwrite)  # before the (maybe long) reading
    norm = load_kto(source, mapping, strict=False, progress=progress, skip_bad_lines=skip_bad_lines)
    if max_length and not model:
        model = BUNDLED_MODEL  # the studio's default model: lengths need some tokenizer
    report = inspect_rows(norm.rows, model, max_length, row_numbers=norm.sources)
    keep, dropped = apply_filters(norm.rows, report, options)
    kept = [norm.rows[i] for i in keep]
    if not kept:
        reasons = ", ".join(f"{len(v)} {k.replace('_', ' ')}" for k, v in dropped.items())
        raise DataError(f"no usable rows left after cleaning ({reasons})")
    summary = summarize(norm, report, dropped, kept, options, model)
    path = write_jsonl(kept, out, protect=[source], overwrite=overwrite)
    return {"input": str(file), "output": str(path), **summary}


def parse_mapping(items: list[str]) -> dict[str, str]:
    """['question=prompt', ...] -> {'question': 'prompt'}; DataError for anything else."""
    mapping = {}
    for item in items or []:
        theirs, sep, ours = item.partition("=")
        theirs, ours = theirs.strip(), ours.strip()
        if not sep or not theirs or ours not in FIELDS:
            raise DataError(f"--map needs THEIRS=OURS with OURS one of {', '.join(FIELDS)}; got '{item}'")
        mapping[theirs] = ours
    return mapping
