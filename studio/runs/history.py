"""Run history: every training run's config, status, timestamps, curves, checkpoints and adapter, in SQLite.

The file is ``<studio home>/history.sqlite``. ``History.record`` is the engine's ``on_event`` hook, so it is called
from the training thread while the UI reads from request threads: one connection guarded by a lock.

A *run* is one run folder. Starting a job creates a run; resuming continues the run whose folder holds the
checkpoint (status, curves and adapter are updated in place), and each start or resume is also kept as an
*attempt*. Resuming from an earlier checkpoint forks the curve: the logged steps after that checkpoint are dropped
and re-logged by the resumed job. Runs whose trainer is gone (its run folder's kernel lock is free: the app was
closed or killed mid-run) are shown as 'interrupted', whichever app on this studio home looks.
"""
from __future__ import annotations

import json
import os
import shutil
import sqlite3
import threading
import time
from pathlib import Path
from contextlib import contextmanager
from typing import Any

import yaml

from studio import paths
from studio.config.run import RunConfig
from studio.errors import StudioError
from studio.runs import folder, lock as runlock

ACTIVE = ("starting", "running", "stopping")
FINAL_KEYS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "kl", "learning_rate", "grad_norm",
              "epoch", "tokens_per_s", "elapsed_s", "gpu_mem_gib")

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    run_dir TEXT NOT NULL,
    config TEXT NOT NULL,
    status TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    ended_at REAL,
    step INTEGER,
    max_steps INTEGER,
    final_metrics TEXT,
    checkpoints TEXT NOT NULL DEFAULT '[]',
    adapter_path TEXT,
    error TEXT,
    backend TEXT,
    pid INTEGER,
    files_deleted_at REAL
);
CREATE TABLE IF NOT EXISTS attempts (
    job_id TEXT PRIMARY KEY,
    run_id TEXT NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    resume_from TEXT,
    config TEXT NOT NULL,
    started_at REAL NOT NULL,
    ended_at REAL,
    status TEXT NOT NULL,
    error TEXT
);
CREATE TABLE IF NOT EXISTS metrics (
    run_id TEXT NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    job_id TEXT NOT NULL,
    step INTEGER NOT NULL,
    data TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS metrics_run_step ON metrics(run_id, step);
CREATE INDEX IF NOT EXISTS runs_dir ON runs(run_dir);
CREATE TABLE IF NOT EXISTS votes (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    created_at REAL NOT NULL,
    model_a TEXT NOT NULL,
    label_a TEXT NOT NULL,
    model_b TEXT NOT NULL,
    label_b TEXT NOT NULL,
    choice TEXT NOT NULL,
    prompt TEXT NOT NULL,
    reply_a TEXT NOT NULL,
    reply_b TEXT NOT NULL,
    settings TEXT NOT NULL DEFAULT '{}',
    base_model TEXT
);
"""


class HistoryError(StudioError, RuntimeError):
    pass


def default_path() -> Path:
    return paths.home() / "history.sqlite"


class History:
    """The run history. Safe to share between threads; every public method is one short transaction."""

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path else default_path()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None, timeout=30)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA foreign_keys = ON")
        self._db.executescript(SCHEMA)
        self._job_runs: dict[str, str] = {}
        self.version = 0  # bumped on every write, so a UI can tell cheaply whether to redraw
        self.mark_interrupted()

    # ---- plumbing ----------------------------------------------------------------------------------------------
    def _write(self, sql: str, args: tuple = ()) -> None:
        with self._lock:
            self._db.execute(sql, args)
            self.version += 1

    @contextmanager
    def _transaction(self):
        """One commit for the several writes an event makes (one disk sync per event, all or nothing)."""
        with self._lock:
            self._db.execute("BEGIN")
            try:
                yield
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _rows(self, sql: str, args: tuple = ()) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(r) for r in self._db.execute(sql, args).fetchall()]

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ---- recording (the engine's on_event hook) ----------------------------------------------------------------
    def record(self, job, event: dict[str, Any]) -> None:
        """Store one engine event of ``job``. Called from the training thread."""
        with self._lock:
            known = job.id in self._job_runs
            try:
                with self._transaction():
                    self._record(job, event)
            except BaseException:
                if not known:  # the run row was rolled back with the rest
                    self._job_runs.pop(job.id, None)
                raise

    def _record(self, job, event: dict[str, Any]) -> None:
        run_id = self._job_runs.get(job.id) or self._begin(job)
        now = event.get("time", time.time())
        kind = event["type"]
        if kind == "metrics":
            self._metrics(run_id, job, event, now)
        elif kind == "checkpoint":
            self._checkpoint(run_id, event, now)
        elif kind == "error":
            self._write("UPDATE runs SET error=?, updated_at=? WHERE id=?", (event.get("message"), now, run_id))
            self._write("UPDATE attempts SET error=? WHERE job_id=?", (event.get("message"), job.id))
        elif kind == "done":
            self._done(run_id, job, event, now)
        elif kind == "status":
            self._write("UPDATE runs SET status=?, backend=COALESCE(?, backend), updated_at=? WHERE id=?",
                        (job.state, job.backend, now, run_id))
            self._write("UPDATE attempts SET status=? WHERE job_id=?", (job.state, job.id))

    def _begin(self, job) -> str:
        """The run this job belongs to: the run that owns its checkpoint when resuming, else a new one."""
        cfg: RunConfig = job.config
        run_dir = str(Path(cfg.run_dir()).resolve())
        now = job.started_at
        config = cfg.to_yaml()
        run_id = None
        if job.resume_from:
            owner = self._rows("SELECT id FROM runs WHERE run_dir=? AND files_deleted_at IS NULL "
                               "ORDER BY created_at DESC LIMIT 1", (run_dir,))
            run_id = owner[0]["id"] if owner else None
        if run_id is None:
            run_id = job.id
            self._write("INSERT INTO runs (id, name, run_dir, config, status, created_at, updated_at, pid) "
                        "VALUES (?, ?, ?, ?, 'starting', ?, ?, ?)",
                        (run_id, cfg.name, run_dir, config, now, now, os.getpid()))
        else:
            # the curve continues from the checkpoint: steps logged after it are replaced by the resumed job
            step = folder.step_of(job.resume_from)
            if step is not None:
                self._write("DELETE FROM metrics WHERE run_id=? AND step>?", (run_id, step))
            self._write("UPDATE runs SET name=?, config=?, status='starting', updated_at=?, ended_at=NULL, "
                        "error=NULL, pid=?, step=COALESCE(?, step) WHERE id=?",
                        (cfg.name, config, now, os.getpid(), step, run_id))
        self._write("INSERT OR REPLACE INTO attempts (job_id, run_id, resume_from, config, started_at, status) "
                    "VALUES (?, ?, ?, ?, ?, 'starting')", (job.id, run_id, job.resume_from, config, now))
        self._job_runs[job.id] = run_id
        return run_id

    def _metrics(self, run_id: str, job, event: dict, now: float) -> None:
        data = {k: v for k, v in event.items() if k != "type"}
        step = int(event.get("step", 0))
        self._write("INSERT INTO metrics (run_id, job_id, step, data) VALUES (?, ?, ?, ?)",
                    (run_id, job.id, step, json.dumps(data, allow_nan=True)))
        if "loss" in event:  # a training step (eval entries carry eval_loss only)
            # keep each metric's last logged value: a step whose batches held one label logs no margin
            row = self._rows("SELECT final_metrics FROM runs WHERE id=?", (run_id,))
            final = json.loads(row[0]["final_metrics"]) if row and row[0]["final_metrics"] else {}
            final.update({k: event[k] for k in FINAL_KEYS if event.get(k) is not None})
            self._write("UPDATE runs SET step=?, max_steps=?, final_metrics=?, updated_at=? WHERE id=?",
                        (step, event.get("max_steps"), json.dumps(final, allow_nan=True), now, run_id))

    def _checkpoint(self, run_id: str, event: dict, now: float) -> None:
        row = self._rows("SELECT checkpoints FROM runs WHERE id=?", (run_id,))
        ckpts = json.loads(row[0]["checkpoints"]) if row else []
        ckpts = [c for c in ckpts if c["path"] != event["path"]] + [{"step": event["step"], "path": event["path"]}]
        self._write("UPDATE runs SET checkpoints=?, updated_at=? WHERE id=?", (json.dumps(ckpts), now, run_id))

    def _done(self, run_id: str, job, event: dict, now: float) -> None:
        state = event.get("state", job.state)
        self._write("UPDATE runs SET status=?, ended_at=?, updated_at=?, adapter_path=COALESCE(?, adapter_path), "
                    "step=COALESCE(?, step), error=CASE WHEN ?='failed' THEN ? ELSE error END WHERE id=?",
                    (state, now, now, event.get("adapter"), event.get("step"), state, job.error, run_id))
        self._write("UPDATE attempts SET status=?, ended_at=? WHERE job_id=?", (state, now, job.id))

    def mark_interrupted(self) -> int:
        """Runs left 'running' whose trainer is gone (the studio was closed or killed mid-run): nobody holds their
        run folder's lock (``studio.runs.lock``; the kernel frees it with the process)."""
        active = ",".join("?" * len(ACTIVE))
        stale = [r for r in self._rows(f"SELECT id, run_dir FROM runs WHERE status IN ({active})", ACTIVE)
                 if not runlock.held(r["run_dir"])]
        for r in stale:
            self._write("UPDATE runs SET status='interrupted', error=COALESCE(error, ?) WHERE id=?",
                        ("The studio stopped while this run was training. Resume it from its latest checkpoint.",
                         r["id"]))
            self._write(f"UPDATE attempts SET status='interrupted' WHERE run_id=? AND status IN ({active})",
                        (r["id"], *ACTIVE))
        return len(stale)

    # ---- reading -----------------------------------------------------------------------------------------------
    def runs(self) -> list[dict[str, Any]]:
        """All runs, newest first (a run whose trainer is gone shows as interrupted)."""
        self.mark_interrupted()
        return [self._decode(r) for r in self._rows("SELECT * FROM runs ORDER BY created_at DESC")]

    def get(self, run_id: str) -> dict[str, Any] | None:
        rows = self._rows("SELECT * FROM runs WHERE id=?", (run_id,))
        return self._decode(rows[0]) if rows else None

    def run_for_job(self, job_id: str) -> str | None:
        rows = self._rows("SELECT run_id FROM attempts WHERE job_id=?", (job_id,))
        return rows[0]["run_id"] if rows else None

    def attempts(self, run_id: str) -> list[dict[str, Any]]:
        return self._rows("SELECT job_id, resume_from, started_at, ended_at, status, error FROM attempts "
                          "WHERE run_id=? ORDER BY started_at", (run_id,))

    def metrics(self, run_id: str) -> list[dict[str, Any]]:
        """The run's logged entries in step order (training steps and eval entries)."""
        rows = self._rows("SELECT data FROM metrics WHERE run_id=? ORDER BY step, rowid", (run_id,))
        return [json.loads(r["data"]) for r in rows]

    def config(self, run_id: str) -> RunConfig | None:
        run = self.get(run_id)
        return RunConfig.from_dict(yaml.safe_load(run["config"])) if run else None

    @staticmethod
    def _decode(row: dict[str, Any]) -> dict[str, Any]:
        row = dict(row)
        row["final_metrics"] = json.loads(row["final_metrics"]) if row.get("final_metrics") else {}
        row["checkpoints"] = json.loads(row["checkpoints"] or "[]")
        return row

    def checkpoints(self, run_id: str) -> list[tuple[int, str]]:
        """The run's checkpoints that are still on disk (old ones are rotated away by save_total_limit)."""
        run = self.get(run_id)
        return folder.run_checkpoints(run["run_dir"]) if run else []

    # ---- deleting ----------------------------------------------------------------------------------------------
    def delete_files(self, run_id: str) -> list[str]:
        """Delete what the studio wrote for this run (checkpoints, adapter, logs); keep the record, marked.

        Only the studio's own files are removed, so a custom output folder keeps anything else the user put
        there. Refused while the run is training."""
        run = self.get(run_id)
        if run is None:
            raise HistoryError(f"no run with id {run_id}")
        if runlock.held(run["run_dir"]):
            raise HistoryError(f"run '{run['name']}' is training: stop it before deleting its files")
        run_dir = Path(run["run_dir"])
        removed: list[str] = []
        if run_dir.is_dir():
            for p in sorted(run_dir.iterdir()):
                if p.name in folder.STUDIO_FILES or (p.is_dir() and folder.step_of(p) is not None):
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
                    removed.append(str(p))
            try:
                run_dir.rmdir()  # only when nothing of the user's is left in it
                removed.append(str(run_dir))
            except OSError:
                pass
        # every run recorded in this folder has lost its files
        self._write("UPDATE runs SET files_deleted_at=?, updated_at=? WHERE run_dir=?",
                    (time.time(), time.time(), run["run_dir"]))
        return removed

    def forget(self, run_id: str) -> None:
        """Remove the run's record (its files stay unless deleted first)."""
        self._write("DELETE FROM runs WHERE id=?", (run_id,))

    # ---- blind A/B votes (studio.votes decides what they mean) -----------------------------------------------------
    VOTE_FIELDS = ("model_a", "label_a", "model_b", "label_b", "choice", "prompt", "reply_a", "reply_b", "settings",
                   "base_model")

    def add_vote(self, vote: dict[str, Any]) -> int:
        """Store one A/B vote (what was shown as A and B, the prompt, both replies, the settings, the choice)."""
        values = [vote.get(k) for k in self.VOTE_FIELDS]
        for i, k in enumerate(self.VOTE_FIELDS):
            if k in ("prompt", "settings"):
                values[i] = json.dumps(values[i] if values[i] is not None else {}, ensure_ascii=False)
        with self._lock:
            cur = self._db.execute(f"INSERT INTO votes (created_at, {', '.join(self.VOTE_FIELDS)}) "
                                   f"VALUES (?, {', '.join('?' * len(self.VOTE_FIELDS))})",
                                   (vote.get("created_at", time.time()), *values))
            self.version += 1
            return int(cur.lastrowid)

    def votes(self) -> list[dict[str, Any]]:
        """Every A/B vote, oldest first, with prompt and settings decoded."""
        out = []
        for r in self._rows("SELECT * FROM votes ORDER BY created_at, id"):
            for k, empty in (("prompt", ""), ("settings", {})):
                try:
                    r[k] = json.loads(r[k]) if r[k] else empty
                except (TypeError, json.JSONDecodeError):
                    pass  # kept as stored
            out.append(r)
        return out
