"""A run as its folder tells it: the event log (``folder.read_events``) replayed into what a viewer shows.

Every front end renders a run from its folder, whichever process trains it: the Train tab of the app that started
it, of a second app on the same studio home or of a reloaded page, the CLI (``python -m studio stop``), the history.
``RunView`` reads the log incrementally (``refresh``) and answers what the Train tab asks of a job: ``state``,
``events`` (this attempt's, since its ``started`` event), ``metrics()`` (every attempt's training steps, a resumed
attempt replacing the steps after its checkpoint), ``config``, ``backend``, ``resume_from``, ``started_at``,
``ended_at``, ``error``, ``adapter_path``.

Liveness is the run folder's kernel lock (``studio.runs.lock``): a log without a ``done`` event whose lock nobody
holds is a run whose trainer is gone (the app was killed): ``interrupted``, resumable from its last checkpoint.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from studio.runs import folder, lock as runlock

FINAL = ("finished", "stopped", "failed", "interrupted")
INTERRUPTED_MESSAGE = ("The trainer of this run is gone (the studio was closed or killed mid-run). Resume it from its "
                       "latest checkpoint.")


class RunView:
    """A run folder's run, as its event log says (tolerant of folders without one: their metrics.jsonl)."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self._offset = 0
        self.all_events: list[dict[str, Any]] = []
        self._config = None
        self.live = False
        self.refresh()

    # ---- reading ---------------------------------------------------------------------------------------------------
    def refresh(self) -> "RunView":
        # liveness first: a trainer that ends between the two reads has written its 'done' before letting go
        self.live = runlock.held(self.run_dir)
        new, offset = folder.read_events(self.run_dir, self._offset)
        if offset < self._offset:  # the log was reset by a fresh start and read again from its beginning
            self.all_events = []
        self._offset = offset
        self.all_events.extend(new)
        return self

    @property
    def has_log(self) -> bool:
        return bool(self.all_events)

    @property
    def events(self) -> list[dict[str, Any]]:
        """This attempt's events (from its last ``started`` event on)."""
        starts = [i for i, e in enumerate(self.all_events) if e.get("type") == "started"]
        return self.all_events[starts[-1]:] if starts else list(self.all_events)

    def _last(self, type_: str) -> dict[str, Any] | None:
        return next((e for e in reversed(self.events) if e.get("type") == type_), None)

    @property
    def id(self) -> str | None:
        started = self._last("started")
        return started.get("job_id") if started else None

    @property
    def state(self) -> str:
        done = self._last("done")
        if done is not None:
            return done.get("state") or "finished"
        if not self.live:
            return "interrupted" if self.all_events else "unknown"
        states = [e["state"] for e in self.events if e.get("state")]
        return states[-1] if states else "starting"

    @property
    def done(self) -> bool:
        return self.state in FINAL or self.state == "unknown"

    @property
    def started_at(self) -> float:
        started = self._last("started")
        if started:
            return started.get("time", 0.0)
        return self.events[0].get("time", 0.0) if self.events else 0.0

    @property
    def ended_at(self) -> float | None:
        done = self._last("done")
        if done:
            return done.get("time")
        if self.state == "interrupted":
            return self.events[-1].get("time") if self.events else None
        return None

    @property
    def resume_from(self) -> str | None:
        started = self._last("started")
        return started.get("resume_from") if started else None

    @property
    def backend(self) -> str | None:
        return next((e["backend"] for e in reversed(self.events) if e.get("backend")), None)

    @property
    def error(self) -> str | None:
        err = self._last("error")
        if err:
            return err.get("message")
        return INTERRUPTED_MESSAGE if self.state == "interrupted" else None

    @property
    def adapter_path(self) -> str | None:
        done = self._last("done")
        return done.get("adapter") if done else None

    @property
    def message(self) -> str:
        """The latest line for people: the last status, error or done message."""
        if self.state == "interrupted":
            return INTERRUPTED_MESSAGE
        said = [e for e in self.events if e.get("type") in ("status", "error", "done") and e.get("message")]
        return said[-1]["message"] if said else ""

    @property
    def config(self):
        if self._config is None:
            try:
                self._config = folder.read_config(self.run_dir)
            except Exception:  # noqa: BLE001 - a view without its config still shows its events
                return None
        return self._config

    def metrics(self) -> list[dict[str, Any]]:
        """Every logged entry of the run in step order: earlier attempts' steps up to where a later one resumed,
        then that attempt's; a folder without an event log: its metrics.jsonl."""
        if not self.all_events:
            return folder.read_metrics(self.run_dir)
        out: list[dict[str, Any]] = []
        for e in self.all_events:
            if e.get("type") == "started" and e.get("resume_from"):
                step = folder.step_of(e["resume_from"])
                if step is not None:
                    out = [m for m in out if (m.get("step") or 0) <= step]
            elif e.get("type") == "metrics":
                out.append({k: v for k, v in e.items() if k not in ("type", "state")})
        return out


def view(run_dir: str | Path) -> RunView:
    return RunView(run_dir)


def is_live(run_dir: str | Path) -> bool:
    """Whether a trainer (in any process on this machine) is writing the run now."""
    return runlock.held(run_dir)


def request_stop(run_dir: str | Path, by: str = "") -> bool:
    """Ask the live trainer of ``run_dir`` to stop (a checkpoint and the adapter are saved); False when none runs."""
    if not runlock.held(run_dir):
        return False
    folder.request_stop(run_dir, by=by)
    return True
