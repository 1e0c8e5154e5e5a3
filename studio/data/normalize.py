"""Turning rows of any supported shape into KTO rows: prompt, completion, label (bool).

Shapes recognised:
- unpaired KTO rows (prompt / completion / label), as text or as conversations (lists of role/content messages);
- paired preference rows (prompt + chosen / rejected) -> two unpaired rows, via TRL's ``unpair_preference_dataset``;
- Anthropic HH transcripts ("\\n\\nHuman: ... \\n\\nAssistant: ..." in chosen / rejected) -> conversational prompt +
  the final assistant reply.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

LABEL_WORDS = {
    True: {"true", "yes", "y", "1", "good", "desirable", "positive", "pos", "chosen", "accept", "accepted",
           "thumbs up", "thumbs_up", "thumbsup", "up", "👍", "+", "+1"},
    False: {"false", "no", "n", "0", "bad", "undesirable", "negative", "neg", "rejected", "reject",
            "thumbs down", "thumbs_down", "thumbsdown", "down", "👎", "-", "-1"},
}


class DataError(ValueError):
    """Data that cannot be used as it is; the message says which rows and what to do."""


@dataclass
class Normalized:
    rows: list[dict[str, Any]]
    conversions: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def parse_label(value: Any) -> bool | None:
    """True / False for the obvious spellings, None for anything else (never guessed)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        v = value.strip().lower()
        for label, words in LABEL_WORDS.items():
            if v in words:
                return label
    return None


def is_conversation(value: Any) -> bool:
    return (isinstance(value, list) and len(value) > 0
            and all(isinstance(m, dict) and "role" in m and "content" in m for m in value))


_HH_TURN = re.compile(r"\n\n(Human|Assistant): ")


def parse_hh(transcript: str) -> list[dict[str, str]] | None:
    """'\\n\\nHuman: hi\\n\\nAssistant: hello' -> messages; None when the text is not an HH transcript."""
    if not isinstance(transcript, str) or "\n\nHuman: " not in transcript or "\n\nAssistant:" not in transcript:
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


def _hh_split(chosen: str, rejected: str) -> tuple[list, list, list] | None:
    c, r = parse_hh(chosen), parse_hh(rejected)
    if not c or not r or c[-1]["role"] != "assistant" or r[-1]["role"] != "assistant":
        return None
    return c[:-1], [c[-1]], [r[-1]]


def detect_shape(columns: set[str]) -> str | None:
    if {"prompt", "completion", "label"} <= columns:
        return "unpaired"
    if {"chosen", "rejected"} <= columns:
        return "paired"
    return None


def normalize(records: list[dict[str, Any]], mapping: dict[str, str] | None = None) -> Normalized:
    """KTO rows from raw records. ``mapping`` renames columns ({'question': 'prompt', ...}) first."""
    if not records:
        raise DataError("the file holds no rows")
    if mapping:
        records = [{mapping.get(k, k): v for k, v in r.items()} for r in records]
    columns = set().union(*(r.keys() for r in records[:1000]))
    shape = detect_shape(columns)
    if shape is None:
        raise DataError(
            f"cannot tell the format from the columns {sorted(columns)}: KTO needs prompt/completion/label, or "
            "prompt/chosen/rejected (or HH chosen/rejected transcripts). Map your columns to these names."
        )
    out = Normalized(rows=[])
    if shape == "unpaired":
        bad = []
        for i, r in enumerate(records, start=1):
            label = parse_label(r.get("label"))
            if label is None:
                bad.append(f"row {i}: label {r.get('label')!r}")
                continue
            out.rows.append({"prompt": r.get("prompt"), "completion": r.get("completion"), "label": label})
        if bad:
            shown = "; ".join(bad[:20]) + (f"; … and {len(bad) - 20} more" if len(bad) > 20 else "")
            raise DataError(
                "labels must be true/false (or yes/no, 1/0, good/bad, desirable/undesirable, 👍/👎); "
                f"these rows have something else: {shown}"
            )
    else:
        out.rows = _unpair(records, out)
    _unify_format(out)
    return out


def _unpair(records: list[dict[str, Any]], out: Normalized) -> list[dict[str, Any]]:
    from datasets import Dataset
    from trl.data_utils import unpair_preference_dataset

    paired, hh = [], 0
    for i, r in enumerate(records, start=1):
        chosen, rejected, prompt = r.get("chosen"), r.get("rejected"), r.get("prompt")
        if prompt is None and isinstance(chosen, str):
            split = _hh_split(chosen, rejected)
            if split is None:
                raise DataError(f"row {i}: chosen/rejected without a prompt, and not HH 'Human:/Assistant:' transcripts")
            prompt, chosen, rejected = split
            hh += 1
        elif prompt is None and is_conversation(chosen) and is_conversation(rejected):
            # conversational pairs that share the history: the prompt is everything before the last reply
            prompt, chosen, rejected = chosen[:-1], chosen[-1:], rejected[-1:]
        if prompt is None:
            raise DataError(f"row {i}: no prompt")
        paired.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    if hh:
        out.conversions.append(f"{hh} Anthropic HH transcripts split into conversation prompt + final reply")
    text_rows = [p for p in paired if not is_conversation(p["prompt"])]
    conv_rows = [p for p in paired if is_conversation(p["prompt"])]
    rows = []
    for group in (text_rows, conv_rows):
        if group:
            group = [_coerce_pair(p) for p in group]
            rows.extend(unpair_preference_dataset(Dataset.from_list(group)).to_list())
    out.conversions.append(f"{len(paired)} chosen/rejected pairs unpaired into {len(rows)} KTO rows")
    return rows


def _coerce_pair(p: dict[str, Any]) -> dict[str, Any]:
    if is_conversation(p["prompt"]):
        for k in ("chosen", "rejected"):
            if isinstance(p[k], str):
                p[k] = [{"role": "assistant", "content": p[k]}]
    return p


def _unify_format(out: Normalized) -> None:
    """One dataset holds one shape: text rows join conversational ones as single-turn conversations."""
    conv = [is_conversation(r["prompt"]) for r in out.rows]
    if any(conv) and not all(conv):
        n = 0
        for r, c in zip(out.rows, conv):
            if not c:
                r["prompt"] = [{"role": "user", "content": str(r["prompt"]).strip()}]
                r["completion"] = [{"role": "assistant", "content": _text(r["completion"]).strip()}]
                n += 1
        out.conversions.append(f"{n} text rows turned into single-turn conversations to match the other rows")
    for r in out.rows:
        if is_conversation(r["prompt"]) and isinstance(r["completion"], str):
            r["completion"] = [{"role": "assistant", "content": r["completion"].strip()}]


def _text(value: Any) -> str:
    if is_conversation(value):
        return "\n".join(str(m["content"]) for m in value)
    return "" if value is None else str(value)


def completion_text(value: Any) -> str:
    return _text(value)
