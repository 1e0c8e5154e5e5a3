"""Ratings from the Chat tab, kept as KTO rows in one JSONL file the Data tab can load for the next run.

A 👍 on a reply becomes ``{"prompt": <the conversation it answered>, "completion": <the reply>, "label": true}``,
a 👎 the same with ``false``. Extra keys (``id``, ``side``, ``adapter``, ``time``) say where a row came from; the
data loader keeps only prompt / completion / label. Rating the same reply again replaces its row (the ``id`` names
the reply), and taking a rating back removes it, so the file never holds two contradicting labels for one reply.
The file lives in the studio home (never a user's file): ``<studio home>/data/feedback.jsonl``.
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

from studio import paths

FEEDBACK_FILE = "feedback.jsonl"
_lock = threading.Lock()


def feedback_path() -> Path:
    return paths.data_dir() / FEEDBACK_FILE


def reply_id(prompt: Any, completion: Any, side: str) -> str:
    """A stable name for one reply: the same conversation, reply and side always give the same id."""
    blob = json.dumps([prompt, completion, side], sort_keys=True, ensure_ascii=False)
    return hashlib.sha1(blob.encode("utf-8")).hexdigest()[:16]


def load_rows(path: str | Path | None = None) -> list[dict[str, Any]]:
    path = Path(path) if path else feedback_path()
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a half-written last line after a crash: skip it, keep the rest
            continue
    return rows


def record(prompt: Any, completion: Any, liked: bool, *, side: str, adapter: str | None = None,
           base_model: str | None = None, path: str | Path | None = None) -> dict[str, Any]:
    """Add (or re-label) the KTO row for one rated reply and return it.

    ``prompt`` is a list of chat messages (or plain text for models without a chat template); ``completion`` the
    reply text. ``side`` is 'base' or 'tuned'."""
    if not isinstance(liked, bool):
        raise TypeError("liked must be True (👍) or False (👎)")
    if isinstance(prompt, list):
        completion_value: Any = [{"role": "assistant", "content": str(completion)}]
    else:
        completion_value = str(completion)
    row = {
        "prompt": prompt,
        "completion": completion_value,
        "label": liked,
        "id": reply_id(prompt, completion_value, side),
        "side": side,
        "adapter": adapter,
        "base_model": base_model,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    path = Path(path) if path else feedback_path()
    with _lock:
        rows = load_rows(path)
        if any(r.get("id") == row["id"] for r in rows):
            _rewrite(path, [row if r.get("id") == row["id"] else r for r in rows])
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a+b") as f:
                f.seek(0, os.SEEK_END)
                if f.tell() > 0:
                    f.seek(-1, os.SEEK_END)
                    if f.read(1) != b"\n":  # a line cut off by a crash: start on a fresh line
                        f.write(b"\n")
                f.write((json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8"))
    return row


def remove(row_id: str, path: str | Path | None = None) -> bool:
    """Take a rating back. True when a row was removed."""
    path = Path(path) if path else feedback_path()
    with _lock:
        rows = load_rows(path)
        kept = [r for r in rows if r.get("id") != row_id]
        if len(kept) == len(rows):
            return False
        _rewrite(path, kept)
        return True


def counts(path: str | Path | None = None) -> dict[str, int]:
    rows = load_rows(path)
    good = sum(1 for r in rows if r.get("label") is True)
    return {"rows": len(rows), "desirable": good, "undesirable": len(rows) - good}


def _rewrite(path: Path, rows: list[dict[str, Any]]) -> None:
    # write a new file and swap it in, so a crash mid-write never leaves a truncated file
    from studio import atomic

    atomic.write(path, lambda f: f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
