"""A run folder's cache (``cache/``): what a resume of the run would otherwise compute again before its first step.

- ``cache/train/``  the training rows as TRL's KTOTrainer prepared them (tokenized, KL completions, filtered) and,
                    when the run precomputes them, the reference model's log-probs as columns (a datasets folder,
                    ``save_to_disk``), with ``meta.json``: the key of the rows and the key of the log-probs;
- ``cache/watch.json`` the held-out watch's base-model log-probs (one per held-out row) and the tuned model's at each
                    check, by step, so a resume neither scores the base model again nor the step it resumes from.

Every entry is stored with a key, a hash of everything that decides its numbers (the rows, the model's files and
loading settings, max_length, the batch the KL completions rotate in, the library versions: ``key``); an entry whose
key does not match what the run would compute now is ignored and rebuilt, never trusted. A run folder without a cache
(written by an older studio) is a cache miss. Writing the cache never fails a run: a full disk only costs the next
resume its time. ``studio.runs.folder`` names the folder (``folder.run_cache``); nothing else writes into it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any

from studio import atomic

log = logging.getLogger(__name__)

CACHE_DIR = "cache"
TRAIN = "train"
WATCH_FILE = "watch.json"
META_FILE = "meta.json"
REFERENCE_COLUMNS = ("ref_logps", "ref_KL_logps")


def key(**parts: Any) -> str:
    """A hash of ``parts`` (JSON-able values; others by ``str``)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def rows_digest(rows) -> str:
    """A hash of rows (a list of dicts, or a datasets.Dataset) in their order: the order decides KTO's KL pairs."""
    h = hashlib.sha256()
    for row in rows:
        h.update(json.dumps(row, sort_keys=True, default=str, ensure_ascii=False).encode())
        h.update(b"\n")
    return h.hexdigest()


def library_versions() -> dict[str, str]:
    """Versions of the libraries that tokenize and score: a new one may do either differently."""
    from importlib import metadata

    out = {}
    for name in ("trl", "transformers", "tokenizers", "datasets", "torch", "peft"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


class RunCache:
    """The cache of one run folder."""

    def __init__(self, run_dir: str | Path):
        self.dir = Path(run_dir) / CACHE_DIR

    # ---- the prepared training rows ------------------------------------------------------------------------------
    def load_rows(self, rows_key: str) -> tuple[Any, str | None] | None:
        """The prepared training rows stored under ``rows_key`` and the key of the reference log-probs they carry
        (None: they carry none); None when nothing matching is stored or it cannot be read."""
        where = self.dir / TRAIN
        meta = _read_json(where / META_FILE)
        if not isinstance(meta, dict) or meta.get("rows") != rows_key:
            return None
        try:
            from datasets import load_from_disk

            dataset = load_from_disk(str(where / "data"))
        except Exception as e:  # noqa: BLE001 - a damaged cache is rebuilt
            log.info("run cache %s unreadable (%s): rebuilding it", where, e)
            return None
        ref = meta.get("reference")
        if ref is None or not all(c in dataset.column_names for c in REFERENCE_COLUMNS[:1]):
            dataset = without_reference(dataset)
            ref = None
        return dataset, ref

    def save_rows(self, rows_key: str, dataset, reference_key: str | None) -> bool:
        """Store the prepared rows (with the reference log-probs under ``reference_key``, when given). A write that
        fails leaves no entry (the next resume rebuilds it) and is not an error."""
        where = self.dir / TRAIN
        tmp = self.dir / (TRAIN + ".tmp")
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            dataset.flatten_indices().save_to_disk(str(tmp / "data"))
            atomic.write(tmp / META_FILE, json.dumps({"rows": rows_key, "reference": reference_key}))
            shutil.rmtree(where, ignore_errors=True)
            tmp.rename(where)
            return True
        except Exception as e:  # noqa: BLE001 - a cache that cannot be written only costs a later resume its time
            log.info("could not write the run cache %s: %s", where, e)
            shutil.rmtree(tmp, ignore_errors=True)
            return False

    # ---- the held-out watch --------------------------------------------------------------------------------------
    def watch(self, watch_key: str, run: str | None) -> "WatchCache":
        return WatchCache(self.dir / WATCH_FILE, watch_key, run)


def without_reference(dataset):
    """``dataset`` without precomputed reference log-prob columns."""
    drop = [c for c in REFERENCE_COLUMNS if c in dataset.column_names]
    return dataset.remove_columns(drop) if drop else dataset


class WatchCache:
    """The held-out watch's stored numbers: the base model's log-probs (under ``watch_key``: the held-out rows, the
    model, max_length, the scoring batches) and the checks' results of run ``run`` (a fresh start in the folder is
    another run) by step."""

    def __init__(self, path: Path, watch_key: str, run: str | None):
        self.path, self.key, self.run = path, watch_key, run

    def _read(self) -> dict[str, Any]:
        data = _read_json(self.path)
        if not isinstance(data, dict) or data.get("key") != self.key:
            return {"key": self.key, "base": None, "run": self.run, "checks": {}}
        if data.get("run") != self.run or not isinstance(data.get("checks"), dict):
            data.update(run=self.run, checks={})
        return data

    def _write(self, data: dict[str, Any]) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic.write(self.path, json.dumps(data))
        except OSError as e:
            log.info("could not write the run cache %s: %s", self.path, e)

    def base(self, n_rows: int) -> list[float] | None:
        """The base model's log-probs of the ``n_rows`` held-out rows, when stored."""
        return _logps(self._read().get("base"), n_rows)

    def save_base(self, logps: list[float]) -> None:
        data = self._read()
        data["base"] = [float(v) for v in logps]
        self._write(data)

    def check(self, step: int, n_rows: int) -> list[float] | None:
        """The tuned model's log-probs of the ``n_rows`` held-out rows at ``step``, if this run checked that step."""
        return _logps(self._read()["checks"].get(str(step)), n_rows)

    def save_check(self, step: int, logps: list[float]) -> None:
        data = self._read()
        data["checks"][str(step)] = [float(v) for v in logps]
        self._write(data)

    def forget_after(self, step: int) -> None:
        """A resume from ``step`` replays the steps after it: their stored checks are another attempt's."""
        data = self._read()
        kept = {s: r for s, r in data["checks"].items() if s.isdigit() and int(s) <= step}
        if kept != data["checks"]:
            data["checks"] = kept
            self._write(data)


def _logps(values: Any, n_rows: int) -> list[float] | None:
    if isinstance(values, list) and len(values) == n_rows and all(isinstance(v, (int, float)) for v in values):
        return [float(v) for v in values]
    return None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
