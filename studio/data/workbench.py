"""One loaded data set being looked at and fixed: what the Data tab holds per browser session, without Gradio.

Rows are numbered 1..N in the order shown ("#"); ``numbers`` keeps each row's record number in the user's file.
Labels can be edited; filters, the split and the weights are applied only when saving, to a new file.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from studio.data.balance import Balance, suggest_weights
from studio.data.clean import CleanOptions, apply_filters, save_clean, split_by_prompt, summarize
from studio.data.inspect import Progress, Report, TokenLengths, inspect_rows
from studio.data.normalize import DataError, Normalized, completion_text, parse_label


def parse_row_numbers(text: str, n_rows: int) -> list[int]:
    """'3, 7-9 12' -> [3, 7, 8, 9, 12]; DataError naming the bad part or a number out of 1..n_rows."""
    out: list[int] = []
    for part in text.replace(",", " ").split():
        lo, sep, hi = part.partition("-")
        try:
            a = int(lo)
            b = int(hi) if sep else a
        except ValueError:
            raise DataError(f"'{part}' is not a row number or range like 7-9") from None
        if a > b:
            a, b = b, a
        if a < 1 or b > n_rows:
            raise DataError(f"row {a if a < 1 else b} does not exist: rows are numbered 1 to {n_rows}")
        out.extend(range(a, b + 1))
    return sorted(set(out))


@dataclass
class Workbench:
    name: str  # the file's name, for messages and the cleaned file's name
    source: str
    norm: Normalized
    rows: list[dict[str, Any]]
    lengths: TokenLengths | None = None
    length_model: str | None = None
    max_length: int | None = None
    tokenizer_note: str | None = None
    edits: int = 0  # rows whose label differs from the file's now (flips that cancel out count for nothing)
    report: Report = field(init=False)

    def __post_init__(self):
        self._loaded_labels = [r["label"] for r in self.rows]
        self.refresh()

    def _count_edits(self) -> None:
        self.edits = sum(1 for r, was in zip(self.rows, self._loaded_labels) if r["label"] is not was)

    @classmethod
    def load(cls, source: str, name: str | None = None, mapping: dict[str, str] | None = None,
             seed: int = 42, progress=None, skip_bad_lines: bool = False) -> "Workbench":
        """``progress(fraction, message)`` hears how far reading and converting got (large files).
        ``skip_bad_lines``: broken JSONL lines are left out and listed instead of refusing the file."""
        from studio.data import load_kto

        source = str(source)  # a safepaths.UserPath from the web UI, or a path the caller was given
        norm = load_kto(source, mapping, strict=False, seed=seed, progress=progress, skip_bad_lines=skip_bad_lines)
        rows = [dict(r) for r in norm.rows]
        return cls(name=name or Path(source).name, source=source, norm=norm, rows=rows)

    # ---- measuring -------------------------------------------------------------------------------------------------
    def measure(self, model: Any, max_length: int | None, progress: Progress = None) -> None:
        """Token lengths with ``model``'s tokenizer (a tokenizer, model id or path); kept when only max_length
        changes. A tokenizer that can't load leaves a note, not an error."""
        key = model if isinstance(model, str) else id(model)
        if self.lengths is None or self.length_model != key:
            self.lengths, self.tokenizer_note = None, None
            rep = inspect_rows(self.rows, model, None, progress, row_numbers=self.norm.sources)
            self.lengths, self.tokenizer_note = rep.lengths, rep.tokenizer_note
            self.length_model = key
        self.max_length = max_length
        self.refresh()

    def refresh(self) -> None:
        self.report = inspect_rows(self.rows, None, self.max_length, lengths=self.lengths,
                                   row_numbers=self.norm.sources)
        self.report.tokenizer_note = self.tokenizer_note

    # ---- fixing ----------------------------------------------------------------------------------------------------
    def set_label(self, number: int, value: Any) -> bool:
        """Set row ``number`` (1-based #) from any known spelling; DataError for anything else."""
        label = parse_label(value)
        if label is None:
            raise DataError(f"row {number}: {value!r} is not a label; use desirable/undesirable, true/false, "
                            "yes/no, 1/0, good/bad or 👍/👎")
        row = self.rows[number - 1]
        if row["label"] is label:
            return False
        row["label"] = label
        self._count_edits()
        self.refresh()
        return True

    def flip(self, numbers: list[int]) -> int:
        """Flip the label of each listed row (an unlabeled row stays unlabeled: flipping it would be a guess)."""
        n = 0
        for num in numbers:
            row = self.rows[num - 1]
            if row["label"] is not None:
                row["label"] = not row["label"]
                n += 1
        self._count_edits()
        self.refresh()
        return n

    # ---- views -----------------------------------------------------------------------------------------------------
    def issues_by_row(self) -> dict[int, list[str]]:
        rep = self.report
        tags: dict[int, list[str]] = {}
        for name, idx in (("unlabeled", [i for i, r in enumerate(self.rows) if r["label"] is None]),
                          ("duplicate", rep.duplicates), ("conflicting labels", rep.conflicts),
                          ("empty completion", rep.empty_completions), ("empty prompt", rep.empty_prompts),
                          ("over max_length", rep.truncated), ("prompt fills max_length", rep.dropped),
                          ("template mismatch", rep.mismatched)):
            for i in idx:
                tags.setdefault(i, []).append(name)
        return tags

    def table(self, page: int = 1, page_size: int = 25, only_issues: bool = False) -> tuple[list[dict], int, int]:
        """Rows of one page as plain dicts (#, source row, label, prompt, completion, tokens, issues), the page
        actually shown and the number of pages."""
        tags = self.issues_by_row()
        idx = sorted(tags) if only_issues else list(range(len(self.rows)))
        pages = max(1, -(-len(idx) // page_size))
        page = min(max(1, int(page or 1)), pages)
        out = []
        lengths = self.lengths
        for i in idx[(page - 1) * page_size: page * page_size]:
            r = self.rows[i]
            out.append({
                "#": i + 1,
                "source row": self.norm.sources[i] if self.norm.sources else i + 1,
                "label": label_word(r["label"], self._raw_label(i)),
                "prompt": _short(r["prompt"]),
                "completion": _short(r["completion"]),
                "tokens": lengths.total[i] if lengths else None,
                "issues": ", ".join(tags.get(i, [])),
            })
        return out, page, pages

    def _raw_label(self, i: int) -> Any:
        if self.rows[i]["label"] is not None:
            return None
        num = self.norm.sources[i] if self.norm.sources else i + 1
        return next((u["value"] for u in self.norm.unlabeled if u["row"] == num), None)

    # ---- cleaning and balance --------------------------------------------------------------------------------------
    def kept(self, options: CleanOptions) -> tuple[list[dict[str, Any]], dict[str, list[int]]]:
        keep, dropped = apply_filters(self.rows, self.report, options)
        return [self.rows[i] for i in keep], dropped

    def counts(self, options: CleanOptions) -> tuple[int, int]:
        kept, _ = self.kept(options)
        n_pos = sum(1 for r in kept if r["label"] is True)
        return n_pos, len(kept) - n_pos

    def balance(self, options: CleanOptions) -> Balance:
        return suggest_weights(*self.counts(options))

    def save(self, options: CleanOptions, eval_fraction: float = 0.0, seed: int = 42,
             weights: tuple[float, float] | None = None) -> dict[str, Any]:
        """Write the cleaned rows (and a seeded eval split by prompt) as new files in the data folder; the summary."""
        kept, dropped = self.kept(options)
        if not kept:
            raise DataError("no rows left to save: loosen the filters or fix the labels")
        train_idx, eval_idx = split_by_prompt(kept, eval_fraction, seed)  # a pair never straddles the split
        train, eval_rows = [kept[i] for i in train_idx], [kept[i] for i in eval_idx]
        model = self.length_model if isinstance(self.length_model, str) else None
        summary = summarize(self.norm, self.report, dropped, kept, options, model)
        summary.update(source=self.source, name=self.name, label_edits=self.edits, eval_fraction=eval_fraction,
                       split_seed=seed, train_rows=len(train), eval_rows=len(eval_rows))
        if weights:
            summary["weights"] = {"desirable_weight": weights[0], "undesirable_weight": weights[1]}
        train_path, eval_path = save_clean(train, eval_rows, self.name, summary)
        summary.update(train_file=str(train_path), eval_file=str(eval_path) if eval_path else None)
        return summary


def label_word(label: bool | None, raw: Any = None) -> str:
    if label is True:
        return "desirable"
    if label is False:
        return "undesirable"
    return f"? ({raw})" if raw not in (None, "") else "?"


def _short(value: Any, limit: int = 240) -> str:
    if isinstance(value, list):
        text = "\n".join(f"{m.get('role')}: {m.get('content')}" for m in value)
    else:
        text = completion_text(value)
    return text if len(text) <= limit else text[:limit] + "…"
