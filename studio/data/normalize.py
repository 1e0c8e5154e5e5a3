"""Turning rows of any supported shape into KTO rows: prompt, completion, label (bool).

Shapes recognised:
- unpaired KTO rows (prompt / completion / label), as text or as conversations (lists of role/content messages);
- whole conversations with a label (``messages`` + label) -> the history as prompt, the final assistant reply as
  completion;
- paired preference rows (prompt + chosen / rejected) -> two unpaired rows, via TRL's ``unpair_preference_dataset``,
  then shuffled so the table and the trainer don't see all good rows first;
- Anthropic HH transcripts ("\\n\\nHuman: ... \\n\\nAssistant: ..." in chosen / rejected) -> conversational prompt +
  the final assistant reply.

Column names that differ (question/answer, instruction/output, preferred/dispreferred, ...) are mapped when exactly
one candidate exists; when none or several do, a ``ColumnError`` lists the columns so the user can map them.
Labels are parsed from the obvious spellings only; anything else is reported row by row, never guessed.
"""
from __future__ import annotations

import contextlib
import json
import math
import random
import re
from dataclasses import dataclass, field
from typing import Any

from studio.errors import StudioError
from studio.data.trl_data import unpair_preference_dataset

LABEL_WORDS = {
    True: {"true", "t", "yes", "y", "1", "1.0", "good", "desirable", "positive", "pos", "chosen", "accept",
           "accepted", "thumbs up", "thumbs_up", "thumbs-up", "thumbsup", "up", "👍", "+", "+1"},
    False: {"false", "f", "no", "n", "0", "0.0", "bad", "undesirable", "negative", "neg", "rejected", "reject",
            "thumbs down", "thumbs_down", "thumbs-down", "thumbsdown", "down", "👎", "-", "-1"},
}
LABEL_HELP = "true/false, yes/no, 1/0, good/bad, desirable/undesirable, thumbs up/down or 👍/👎"

# The names KTO rows use, and the other names files commonly give the same thing. A name is taken only when exactly
# one candidate is present; otherwise the user maps it.
FIELDS = ("prompt", "completion", "label", "chosen", "rejected", "messages")
ALIASES = {
    "prompt": ["prompt", "question", "instruction", "query", "input", "user", "human", "context", "prompt_text"],
    "completion": ["completion", "response", "answer", "output", "reply", "assistant", "generation", "completion_text",
                   "model_response"],
    "label": ["label", "labels", "desirable", "is_desirable", "is_good", "good", "thumbs", "thumb", "feedback",
              "rating", "kto_label", "preference", "verdict", "judgement", "judgment", "grade", "approved"],
    "chosen": ["chosen", "preferred", "better", "winner", "chosen_response", "response_chosen", "accepted",
               "positive"],
    "rejected": ["rejected", "dispreferred", "worse", "loser", "rejected_response", "response_rejected",
                 "negative"],
    "messages": ["messages", "conversation", "conversations", "chat", "dialog", "dialogue"],
}


class DataError(StudioError, ValueError):
    """Data that cannot be used as it is; the message says which rows and what to do."""


class ColumnError(DataError):
    """The columns don't say which is the prompt, completion, label (or chosen / rejected): the user must map them."""

    def __init__(self, message: str, columns: list[str], missing_label: bool = False):
        super().__init__(message)
        self.columns = columns
        self.missing_label = missing_label  # prompt and completion are there; only the label column is not

    def cli_hint(self) -> str:
        """How to map columns on the command line (the Data tab has its Column mapping panel instead)."""
        return ("Map them with --map THEIRS=OURS, e.g. --map rating=label" if self.missing_label else
                "Map them, e.g. --map question=prompt --map answer=completion --map rating=label")


@dataclass
class Normalized:
    rows: list[dict[str, Any]]
    conversions: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    sources: list[int] = field(default_factory=list)  # 1-based record number in the input, one per row
    columns: list[str] = field(default_factory=list)  # the input's own column names
    mapping: dict[str, str] = field(default_factory=dict)  # their column -> our field, given or guessed
    shape: str = ""  # "unpaired" | "messages" | "paired" | "hh"
    n_records: int = 0
    unlabeled: list[dict[str, Any]] = field(default_factory=list)  # {"row": n, "value": raw} (non-strict mode)
    skipped_lines: list[dict[str, Any]] = field(default_factory=list)  # {"line": n, "error": why}: bad JSONL lines


# ---- labels --------------------------------------------------------------------------------------------------------

_EMOJI_NOISE = re.compile("[\ufe0e\ufe0f\U0001f3fb-\U0001f3ff]")  # variation selectors and skin tones: 👍🏽 == 👍


def parse_label(value: Any) -> bool | None:
    """True / False for the obvious spellings, None for anything else (never guessed)."""
    if hasattr(value, "item") and not isinstance(value, (list, dict, str)):
        value = value.item()  # numpy / pandas scalars
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        v = " ".join(_EMOJI_NOISE.sub("", value).strip().lower().split())
        for label, words in LABEL_WORDS.items():
            if v in words:
                return label
    return None


# ---- conversations -------------------------------------------------------------------------------------------------

def is_conversation(value: Any) -> bool:
    return (isinstance(value, list) and len(value) > 0
            and all(isinstance(m, dict) and "role" in m and "content" in m for m in value))


def _maybe_json_conversation(value: Any) -> Any:
    """CSV cells hold conversations as JSON text: '[{"role": "user", "content": "hi"}]'."""
    if isinstance(value, str):
        s = value.strip()
        if s.startswith("[") and s.endswith("]") and '"role"' in s:
            try:
                parsed = json.loads(s)
            except json.JSONDecodeError:
                return value
            if is_conversation(parsed):
                return [{"role": str(m["role"]), "content": _text(m["content"])} for m in parsed]
    return value


_HH_TURN = re.compile(r"\n\n(Human|Assistant): ")


def parse_hh(transcript: str) -> list[dict[str, str]] | None:
    """'\\n\\nHuman: hi\\n\\nAssistant: hello' -> messages; None when the text is not an HH transcript."""
    if not isinstance(transcript, str) or "\n\nHuman: " not in "\n\n" + transcript.lstrip("\n") \
            or "\n\nAssistant:" not in transcript:
        return None
    text = transcript if transcript.startswith("\n\n") else "\n\n" + transcript.lstrip("\n")
    # an empty final reply renders as "\n\nAssistant:" without the trailing space
    if text.endswith("\n\nAssistant:"):
        text += " "
    parts = _HH_TURN.split(text)
    if parts[0].strip():
        return None
    messages = []
    for speaker, content in zip(parts[1::2], parts[2::2]):
        messages.append({"role": "user" if speaker == "Human" else "assistant", "content": content.strip()})
    return messages or None


def _hh_split(chosen: Any, rejected: Any) -> tuple[list, list, list] | None:
    c, r = parse_hh(chosen), parse_hh(rejected)
    if not c or not r or c[-1]["role"] != "assistant" or r[-1]["role"] != "assistant":
        return None
    return c[:-1], [c[-1]], [r[-1]]


# ---- columns -------------------------------------------------------------------------------------------------------

def detect_shape(columns: set[str]) -> str | None:
    if {"prompt", "completion", "label"} <= columns:
        return "unpaired"
    if {"messages", "label"} <= columns:
        return "messages"
    if {"chosen", "rejected"} <= columns:
        return "paired"
    return None


def guess_mapping(columns: list[str], given: dict[str, str] | None = None) -> tuple[dict[str, str], list[str]]:
    """Their column -> our field for the fields still missing after ``given``; and notes on what was guessed.

    A field is filled only when exactly one column (compared case-insensitively) is a known alias for it."""
    mapping = dict(given or {})
    taken = set(mapping.values()) | {c for c in columns if c in FIELDS and c not in mapping}
    used = set(mapping)
    notes = []
    for ours in FIELDS:
        if ours in taken:
            continue
        candidates = [c for c in columns if c not in used and c.strip().lower() in ALIASES[ours]
                      and c not in FIELDS]
        if len(candidates) == 1:
            mapping[candidates[0]] = ours
            used.add(candidates[0])
            taken.add(ours)
            notes.append(f"column '{candidates[0]}' read as {ours}")
    return mapping, notes


def _missing_columns_message(columns: list[str]) -> str:
    cols = set(columns)
    found = ", ".join(repr(c) for c in columns) or "none"
    if {"prompt", "completion"} <= cols:
        return (f"no label column: the rows have a prompt and a completion, but no column says whether each "
                f"completion is good or bad (true = desirable, false = undesirable; 👍/👎, yes/no … work too). "
                f"Columns found: {found}. If one of them holds the label under another name, say which; otherwise "
                "add a label column to a copy of your file.")
    if "chosen" in cols or "rejected" in cols:
        need = "paired data needs both 'chosen' and 'rejected'"
    else:
        need = ("KTO needs prompt + completion + label, or prompt + chosen + rejected (or HH chosen/rejected "
                "transcripts)")
    return f"cannot tell which column is which: {need}. Columns found: {found}. Say which column holds what."


# ---- normalize -----------------------------------------------------------------------------------------------------

def normalize(records: list[dict[str, Any]], mapping: dict[str, str] | None = None, *, strict: bool = True,
              seed: int = 42, progress=None) -> Normalized:
    """KTO rows from raw records. ``mapping`` renames columns ({'question': 'prompt', ...}) first; missing names are
    guessed from common aliases. ``strict``: unknown labels raise; otherwise those rows get label None and are listed
    in ``unlabeled`` so a person can set them. ``seed`` shuffles rows made from pairs."""
    if not records:
        raise DataError("the file holds no rows")
    columns: list[str] = []
    for r in records[:1000]:
        for k in r:
            if k not in columns:
                columns.append(k)
    bad_map = {ours for ours in (mapping or {}).values() if ours not in FIELDS}
    if bad_map:
        raise DataError(f"cannot map a column to {sorted(bad_map)}: the fields are {', '.join(FIELDS)}")
    unknown = [theirs for theirs in (mapping or {}) if theirs not in columns]
    if unknown:
        raise ColumnError(f"the mapping names columns the file doesn't have: {unknown}; columns: {columns}", columns)
    full_map, guessed = guess_mapping(columns, {k: v for k, v in (mapping or {}).items() if k != v})
    if full_map:
        # a mapped column replaces a same-named one (mapping 'answer' to completion hides an old 'completion')
        targets = set(full_map.values())
        records = [{full_map.get(k, k): v for k, v in r.items() if k in full_map or k not in targets}
                   for r in records]
    mapped_cols = {full_map.get(c, c) for c in columns}
    shape = detect_shape(mapped_cols)
    if shape is None:
        raise ColumnError(_missing_columns_message(columns), columns,
                          missing_label={"prompt", "completion"} <= mapped_cols)
    out = Normalized(rows=[], columns=columns, mapping=full_map, shape=shape, n_records=len(records))
    out.conversions.extend(guessed)
    if progress:
        progress(0.0, f"converting {len(records):,} records")
    records = [{k: _clean_value(v) for k, v in r.items()} for r in records]
    n_json = sum(1 for r in records for k in ("prompt", "completion", "chosen", "rejected", "messages")
                 if isinstance(r.get(k), str) and is_conversation(_maybe_json_conversation(r[k])))
    if n_json:
        records = [{k: _maybe_json_conversation(v) if k in FIELDS else v for k, v in r.items()} for r in records]
        out.conversions.append(f"{n_json} cells of JSON text read as conversations")
    if progress:
        progress(0.4, f"turning {len(records):,} records into KTO rows")
    if shape in ("unpaired", "messages"):
        _labelled(records, out, strict)
    else:
        _unpair(records, out, seed)
    if progress:
        progress(0.8, f"giving {len(out.rows):,} rows one format")
    _unify_format(out)
    return out


def _clean_value(v: Any) -> Any:
    if isinstance(v, float) and math.isnan(v):
        return None  # empty cells in Parquet/pandas
    return v


def _labelled(records: list[dict[str, Any]], out: Normalized, strict: bool) -> None:
    n_split = 0
    for i, r in enumerate(records, start=1):
        label = parse_label(r.get("label"))
        if label is None:
            out.unlabeled.append({"row": i, "value": r.get("label")})
        if out.shape == "messages":
            msgs = r.get("messages")
            if not is_conversation(msgs) or msgs[-1].get("role") != "assistant":
                raise DataError(f"row {i}: 'messages' must be a list of role/content messages ending with the "
                                "assistant reply to be judged")
            prompt, completion = msgs[:-1], msgs[-1:]
            n_split += 1
        else:
            prompt, completion = r.get("prompt"), r.get("completion")
        out.rows.append({"prompt": prompt, "completion": completion, "label": label})
        out.sources.append(i)
    if n_split:
        out.conversions.append(f"{n_split} conversations split into history (prompt) + final assistant reply")
    if out.unlabeled:
        shown = "; ".join(f"row {u['row']}: {u['value']!r}" for u in out.unlabeled[:20])
        more = f"; … and {len(out.unlabeled) - 20} more" if len(out.unlabeled) > 20 else ""
        msg = f"labels must be {LABEL_HELP}; these rows have something else: {shown}{more}"
        if strict or len(out.unlabeled) == len(records):
            raise DataError(msg)
        out.problems.append(msg)


@contextlib.contextmanager
def _quiet_datasets():
    from datasets.utils import logging as ds_logging

    was_on = ds_logging.is_progress_bar_enabled()
    ds_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            ds_logging.enable_progress_bar()


def _unpair(records: list[dict[str, Any]], out: Normalized, seed: int) -> None:
    from datasets import Dataset

    paired, hh = [], 0
    for i, r in enumerate(records, start=1):
        chosen, rejected, prompt = r.get("chosen"), r.get("rejected"), r.get("prompt")
        if prompt is None and isinstance(chosen, str):
            split = _hh_split(chosen, rejected)
            if split is None:
                raise DataError(f"row {i}: chosen/rejected without a prompt, and not HH 'Human:/Assistant:' "
                                "transcripts: add a prompt column or map one")
            prompt, chosen, rejected = split
            hh += 1
        elif prompt is None and is_conversation(chosen) and is_conversation(rejected):
            # conversational pairs that share the history: the prompt is everything before the last reply
            prompt, chosen, rejected = chosen[:-1], chosen[-1:], rejected[-1:]
        if prompt is None:
            raise DataError(f"row {i}: no prompt")
        paired.append({"prompt": prompt, "chosen": chosen, "rejected": rejected, "_row": i})
    if hh:
        out.shape = "hh"
        out.conversions.append(f"{hh} Anthropic HH transcripts split into conversation prompt + final reply")
    # datasets can't hold a column mixing text and message lists: unpair each kind on its own
    conv_prompt = [is_conversation(p["prompt"]) for p in paired]
    groups = ([p for p, c in zip(paired, conv_prompt) if not c],
              [_coerce_pair(p) for p, c in zip(paired, conv_prompt) if c])
    unpaired = []
    with _quiet_datasets():
        for group in groups:
            if group:
                # TRL decides which rows come out in which order and with which label; it is handed row numbers, not
                # the texts, so the (large, nested) texts never make the round trip through Arrow
                ids = list(range(len(group)))
                plan = unpair_preference_dataset(Dataset.from_dict({"prompt": ids, "chosen": ids, "rejected": ids}))
                for r in plan.to_list():
                    p = group[r["prompt"]]
                    completion = p["chosen"] if r["label"] else p["rejected"]
                    prompt = [dict(m) for m in p["prompt"]] if isinstance(p["prompt"], list) else p["prompt"]
                    unpaired.append({"prompt": prompt, "completion": _none_to_empty(completion),
                                     "label": r["label"], "_row": p["_row"]})
    random.Random(seed).shuffle(unpaired)
    for r in unpaired:
        out.sources.append(r.pop("_row"))
        out.rows.append({"prompt": r["prompt"], "completion": r["completion"], "label": bool(r["label"])})
    out.conversions.append(f"{len(paired)} chosen/rejected pairs unpaired into {len(out.rows)} KTO rows "
                           f"(TRL unpair_preference_dataset), shuffled with seed {seed}")


def _none_to_empty(v: Any) -> Any:
    return "" if v is None else v


def _coerce_pair(p: dict[str, Any]) -> dict[str, Any]:
    p = dict(p)
    for k in ("chosen", "rejected"):
        if not is_conversation(p[k]):
            p[k] = [{"role": "assistant", "content": _text(p[k])}]
    return p


def _unify_format(out: Normalized) -> None:
    """One dataset holds one shape: if any row is a conversation, text rows become single-turn conversations;
    otherwise every prompt and completion is a string."""
    # each cell is looked at once: (prompt is a conversation, completion is a conversation) per row
    kinds = [(is_conversation(r["prompt"]), is_conversation(r["completion"])) for r in out.rows]
    conv = [p or c for p, c in kinds]
    as_conversations = any(conv)  # once: inside the loop it made loading quadratic in the number of rows
    if as_conversations and not all(conv):
        out.conversions.append(f"{conv.count(False)} text rows turned into single-turn conversations to match the "
                               "other rows")
    for i, (r, kind) in enumerate(zip(out.rows, kinds)):
        for key, is_conv in zip(("prompt", "completion"), kind):
            if not is_conv and not _scalar(r[key]):
                row = out.sources[i] if i < len(out.sources) else i + 1
                shown = repr(r[key])
                raise DataError(f"row {row}: the {key} is a {type(r[key]).__name__} ({shown[:80]}"
                                f"{'…' if len(shown) > 80 else ''}), not text or a list of role/content messages: "
                                "map another column to it, or turn that column into text first")
        if as_conversations:
            if not kind[0]:
                r["prompt"] = [{"role": "user", "content": _text(r["prompt"]).strip()}]
            if not kind[1]:
                r["completion"] = [{"role": "assistant", "content": _text(r["completion"]).strip()}]
        else:
            r["prompt"] = _text(r["prompt"])
            r["completion"] = _text(r["completion"])


def _scalar(value: Any) -> bool:
    """Text, a number or empty: a cell that reads as text without guessing (a dict or list does not)."""
    return value is None or isinstance(value, (str, int, float, bool))


def _text(value: Any) -> str:
    if is_conversation(value):
        return "\n".join(str(m["content"]) for m in value)
    return "" if value is None else str(value)


def completion_text(value: Any) -> str:
    return _text(value)
