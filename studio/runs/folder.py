"""A run folder and everything in it: one reader and one writer per file, and the rules for new runs and resumes.

A run folder (``<studio home>/runs/NAME`` or a custom ``output_dir``) holds:

- ``run.yaml``       the run's config (``write_config`` / ``read_config``; a key a newer studio removed is dropped);
- ``metrics.jsonl``  one logged entry per line (``append_metrics`` / ``read_metrics``; a cut-off line is skipped);
- ``events.jsonl``   everything the trainer tells the world, one typed event a line (``append_event`` /
                     ``read_events``): started, status, phase, metrics, checkpoint, watch checks, evaluation, health,
                     error, done. Each start or resume begins with a ``started`` event; every viewer (the Train tab of
                     any app on this home, the CLI, the history) renders from it (``studio.runs.live``). Older run
                     folders have none: viewers fall back to metrics.jsonl and the history;
- ``stop.request``   a request to stop (``request_stop``), written by any viewer; the trainer checks it every step and
                     turns it into a checkpoint and the adapter, then removes it;
- ``checkpoint-N/``  resumable checkpoints, written whole by ``studio.runs.checkpoints`` (``run_checkpoints``,
                     ``latest_checkpoint``);
- ``adapter/``       the final LoRA adapter (``adapter_dir``, ``adapters``);
- ``eval.json``      the held-out evaluation (its one reader and writer is ``studio.tuned.evaluate``: the file is
                     what an evaluation says, its derived keys are the evaluation's);
- ``heldout.jsonl``  the held-out rows the run trained without (``write_heldout`` / ``read_heldout``);
- ``error.log``      the traceback of a failed run (``write_error`` / ``read_error``);
- ``plan.json``      the run plan, when one is stored (``write_plan`` / ``read_plan``);
- ``cache/``         what a resume reuses instead of computing it again: the tokenized training rows with the
                     reference log-probs, the held-out watch's base scores and checks (``run_cache``; its one reader
                     and writer is ``studio.runs.cache``, which ignores an entry whose key does not match);
- ``.run-id``        which run owns the folder: a fresh start writes a new id and each checkpoint it saves carries
                     it, so resuming never picks a checkpoint an older run left in the same folder;
- ``.run.lock``      the live writer (``studio.runs.lock``).

The rules shared by the CLI and the UI: ``new_run`` (a fresh start never writes into a used folder: the name gets
``-2``, ``-3`` ...; a custom folder is refused), ``resume_run`` (the saved run.yaml decides the model, the data and
the adapter's shape; a resume may change how training goes on) and ``resume_point`` (which checkpoint: the newest
whole one of this run, or a named one, checked).
"""
from __future__ import annotations

import json
import time
import re
import uuid
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from studio import atomic
from studio.config.run import ConfigError, RunConfig
from studio.runs import cache, checkpoints
from studio.runs.lock import LOCK

CONFIG_FILE = "run.yaml"
METRICS_FILE = "metrics.jsonl"
EVAL_FILE = "eval.json"
HELDOUT_FILE = "heldout.jsonl"
ERROR_FILE = "error.log"
PLAN_FILE = "plan.json"
ADAPTER_DIR = "adapter"
README_FILE = "README.md"
RUN_ID_FILE = ".run-id"
# What the studio writes into a run folder (besides checkpoint-N/): deleting a run removes these and nothing else,
# so a user's own files in a custom output folder survive.
EVENTS_FILE = "events.jsonl"
STOP_FILE = "stop.request"
STUDIO_FILES = (ADAPTER_DIR, METRICS_FILE, CONFIG_FILE, EVAL_FILE, HELDOUT_FILE, ERROR_FILE, PLAN_FILE, README_FILE,
                RUN_ID_FILE, LOCK, EVENTS_FILE, STOP_FILE, cache.CACHE_DIR)
# What a resume keeps as saved: the adapter's shape, the base model and the data the run trains on.
RESUME_KEEPS = ("lora.", "model.", "data.")

step_of = checkpoints.step_of
checkpoint_dir = checkpoints.checkpoint_dir


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S")


def _write_atomic(path: Path, text: str) -> Path:
    """A crash never leaves half a file (studio.atomic: temporary file, fsync, rename)."""
    return atomic.write(path, text)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None


# ---- run.yaml ------------------------------------------------------------------------------------------------------

def is_run_folder(run_dir: str | Path) -> bool:
    return (Path(run_dir) / CONFIG_FILE).is_file()


def write_config(run_dir: str | Path, cfg: RunConfig) -> Path:
    return cfg.save(Path(run_dir) / CONFIG_FILE)


def read_config(run_dir: str | Path) -> RunConfig:
    """The run's config. Keys this version does not know (written by an older studio, since removed) are dropped;
    a missing or unreadable file, or a value that is wrong, is a ``ConfigError`` saying so."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise ConfigError(f"{Path(run_dir)} is not a run folder (it has no {CONFIG_FILE})")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of sections (model, lora, kto, train, data, memory)")
    for _ in range(100):  # each pass drops the unknown keys pydantic names
        try:
            return RunConfig.model_validate(data)
        except ValidationError as e:
            unknown = [err["loc"] for err in e.errors() if err["type"] == "extra_forbidden"]
            if not unknown:
                return RunConfig.from_dict(data)  # raises the ConfigError with the explanation
            for loc in unknown:
                node = data
                for key in loc[:-1]:
                    node = node.get(key) if isinstance(node, dict) else None
                if isinstance(node, dict):
                    node.pop(loc[-1], None)
    return RunConfig.from_dict(data)


# ---- metrics.jsonl -------------------------------------------------------------------------------------------------

def _append_line(path: Path, entry: dict[str, Any]) -> None:
    """Add ``entry`` as one JSON line; after a line a crash cut off, on a line of its own (the cut one stays
    skipped). One write call, so a reader in another process sees whole lines (or a cut last one it skips)."""
    with open(path, "a+b") as f:
        cut = False
        if f.seek(0, 2) > 0:
            f.seek(-1, 2)
            cut = f.read(1) != b"\n"
        f.write((("\n" if cut else "") + json.dumps(entry, default=str) + "\n").encode("utf-8"))


def _json_lines(text: str) -> list[dict[str, Any]]:
    out = []
    for line in text.splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(entry, dict):
            out.append(entry)
    return out


def append_metrics(run_dir: str | Path, entry: dict[str, Any]) -> None:
    """Add one entry as a line; after a line a crash cut off, on a line of its own (the cut one stays skipped)."""
    _append_line(Path(run_dir) / METRICS_FILE, entry)


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The logged entries; a line that is not a whole JSON object (a crash mid-write) is skipped."""
    f = Path(run_dir) / METRICS_FILE
    try:
        text = f.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    return _json_lines(text)


# ---- events.jsonl, stop.request --------------------------------------------------------------------------------------

def append_event(run_dir: str | Path, event: dict[str, Any]) -> None:
    """Add one trainer event (a dict with ``type`` and ``time``) to the run's event log."""
    _append_line(Path(run_dir) / EVENTS_FILE, event)


def read_events(run_dir: str | Path, offset: int = 0) -> tuple[list[dict[str, Any]], int]:
    """The events written since byte ``offset`` and the offset to read on from. Only whole lines are read (a line
    being written is left for the next read); a line that is not a JSON object is skipped. A file that shrank (a
    fresh start reset it) is read again from the start: compare the offset you pass with the one you get."""
    f = Path(run_dir) / EVENTS_FILE
    try:
        size = f.stat().st_size
        if size < offset:
            offset = 0
        with open(f, "rb") as fh:
            fh.seek(offset)
            data = fh.read(size - offset)
    except OSError:
        return [], offset
    end = data.rfind(b"\n") + 1  # up to the last whole line
    return _json_lines(data[:end].decode("utf-8", errors="replace")), offset + end


def has_events(run_dir: str | Path) -> bool:
    return (Path(run_dir) / EVENTS_FILE).is_file()


def reset_events(run_dir: str | Path) -> None:
    """A new run takes the folder: the event log starts empty."""
    (Path(run_dir) / EVENTS_FILE).unlink(missing_ok=True)


def request_stop(run_dir: str | Path, by: str = "") -> Path:
    """Ask the run's trainer to stop: it saves a checkpoint and the adapter after the current step."""
    return _write_atomic(Path(run_dir) / STOP_FILE, json.dumps({"requested": _now(), "by": by}))


def stop_requested(run_dir: str | Path) -> bool:
    return (Path(run_dir) / STOP_FILE).is_file()


def clear_stop(run_dir: str | Path) -> None:
    (Path(run_dir) / STOP_FILE).unlink(missing_ok=True)


def _line_step(line: str) -> int | None:
    try:
        return int(json.loads(line).get("step"))
    except (ValueError, TypeError, AttributeError):
        return None


def forget_metrics_after(run_dir: str | Path, step: int | None) -> None:
    """Resuming from an earlier checkpoint replays the steps after it: drop their old lines first, so
    metrics.jsonl stays one line per step."""
    f = Path(run_dir) / METRICS_FILE
    if step is None or not f.is_file():
        return
    kept = [line for line in f.read_text(encoding="utf-8", errors="replace").splitlines()
            if _line_step(line) is None or _line_step(line) <= step]
    f.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


# ---- which run owns the folder, and its checkpoints ----------------------------------------------------------------

def run_id(run_dir: str | Path) -> str | None:
    """The id of the run that owns the folder; None for a folder written before ids existed."""
    try:
        return (Path(run_dir) / RUN_ID_FILE).read_text(encoding="utf-8").strip() or None
    except (OSError, UnicodeDecodeError):
        return None


def start_fresh(run_dir: str | Path) -> str:
    """A new run takes the folder: a new id, so checkpoints an older run left here are never resumed."""
    new = uuid.uuid4().hex[:12]
    _write_atomic(Path(run_dir) / RUN_ID_FILE, new + "\n")
    reset_events(run_dir)
    return new


def mark_checkpoint(run_dir: str | Path, checkpoint: str | Path) -> None:
    """Say in ``checkpoint`` which run saved it (called before it is published under its final name)."""
    owner = run_id(run_dir)
    if owner:
        (Path(checkpoint) / RUN_ID_FILE).write_text(owner + "\n", encoding="utf-8")


def belongs(run_dir: str | Path, checkpoint: str | Path) -> bool:
    """Whether ``checkpoint`` was saved by the run that owns ``run_dir`` (every checkpoint of an older folder
    without an id does)."""
    owner = run_id(run_dir)
    return owner is None or run_id(checkpoint) == owner


def checkpoint_folders(run_dir: str | Path) -> list[Path]:
    """Every ``checkpoint-N`` folder, whoever saved it, newest first."""
    return checkpoints.candidates(run_dir)


def run_checkpoints(run_dir: str | Path) -> list[tuple[int, str]]:
    """(step, path) of this run's checkpoints on disk, oldest first."""
    return sorted((step_of(p), str(p)) for p in checkpoint_folders(run_dir) if belongs(run_dir, p))


def latest_checkpoint(run_dir: str | Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """This run's newest whole checkpoint, and the newer ones skipped with the reason."""
    skipped = []
    for p in checkpoint_folders(run_dir):
        if not belongs(run_dir, p):
            continue
        why = checkpoints.problem(p)
        if why is None:
            return p, skipped
        skipped.append((p, why))
    return None, skipped


# ---- cache/ ------------------------------------------------------------------------------------------------------

def run_cache(run_dir: str | Path) -> cache.RunCache:
    """The run's cache of prepared rows and base-model scores (``studio.runs.cache``): what a resume reuses."""
    return cache.RunCache(run_dir)


# ---- the adapter ---------------------------------------------------------------------------------------------------

def adapter_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / ADAPTER_DIR


def is_adapter_dir(p: str | Path) -> bool:
    p = Path(p)
    return (p / "adapter_config.json").is_file() and any(
        (p / n).is_file() for n in ("adapter_model.safetensors", "adapter_model.bin"))


def adapters(run_dir: str | Path) -> list[Path]:
    """The run's saved adapters: the final adapter first, then its checkpoints, newest first."""
    out = [adapter_dir(run_dir)] if is_adapter_dir(adapter_dir(run_dir)) else []
    return out + [Path(p) for _, p in reversed(run_checkpoints(run_dir)) if is_adapter_dir(p)]


# ---- heldout.jsonl -----------------------------------------------------------------------------------------------

def write_heldout(run_dir: str | Path, rows: list[dict[str, Any]]) -> Path:
    """Store the held-out rows the run trained without (its seeded split), so an evaluation reads them back instead
    of splitting the data again."""
    return _write_atomic(Path(run_dir) / HELDOUT_FILE,
                         "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in rows))


def read_heldout(run_dir: str | Path) -> list[dict[str, Any]] | None:
    """The run's stored held-out rows, or None when it stored none (a run of an older studio) or the file cannot be
    read; a cut-off last line is skipped."""
    try:
        lines = (Path(run_dir) / HELDOUT_FILE).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    rows = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


# ---- error.log, plan.json ------------------------------------------------------------------------------------------

def write_error(run_dir: str | Path, text: str) -> None:
    _write_atomic(Path(run_dir) / ERROR_FILE, text)


def read_error(run_dir: str | Path) -> str | None:
    try:
        return (Path(run_dir) / ERROR_FILE).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None


def write_plan(run_dir: str | Path, plan: dict[str, Any]) -> Path:
    return _write_atomic(Path(run_dir) / PLAN_FILE, json.dumps(plan, indent=2, default=str))


def read_plan(run_dir: str | Path) -> dict[str, Any] | None:
    data = _read_json(Path(run_dir) / PLAN_FILE)
    return data if isinstance(data, dict) else None


# ---- the rules: new run, resume, fresh names -----------------------------------------------------------------------

def is_used(run_dir: str | Path) -> bool:
    d = Path(run_dir)
    return d.is_dir() and any(d.iterdir())


def new_run(cfg: RunConfig) -> tuple[RunConfig, str | None]:
    """``cfg`` for a fresh start that overwrites nothing: if its run folder already holds a run, the next free
    name ``<name>-2``, ``-3`` ... A custom output folder is never renamed; a ``ValueError`` says to pick another.
    Returns the config and a note saying what changed (None when nothing did)."""
    if not is_used(cfg.run_dir()):
        return cfg, None
    if cfg.output_dir:
        raise ValueError(f"the output folder {cfg.output_dir} already holds a run: resume it, delete its files in "
                         "the run history, or choose another output_dir")
    base = re.sub(r"-\d+$", "", cfg.name)
    n = 2
    while True:
        candidate = cfg.updated({"name": f"{base}-{n}"})
        if not is_used(candidate.run_dir()):
            return candidate, (f"A run named `{cfg.name}` already exists (resume it with **Resume**); "
                               f"this new run is named `{candidate.name}`.")
        n += 1


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def differences(saved: RunConfig, cfg: RunConfig) -> dict[str, Any]:
    """The dotted fields where ``cfg`` differs from ``saved``, with ``cfg``'s values."""
    a, b = _flat(saved.model_dump()), _flat(cfg.model_dump())
    return {k: v for k, v in b.items() if a.get(k) != v}


def resume_run(cfg: RunConfig, changes: dict[str, Any] | None = None) -> tuple[RunConfig, list[str]]:
    """The config a resume of ``cfg``'s run trains with: the saved run.yaml, with ``changes`` (dotted fields; all of
    ``cfg``'s differences from the saved run when None) applied, except what a resume cannot change (the adapter's
    shape, the base model, the data: ``RESUME_KEEPS``). Returns the config and the 'field=saved value' kept."""
    run_dir = cfg.run_dir()
    saved = read_config(run_dir) if is_run_folder(run_dir) else cfg
    if changes is None:
        changes = differences(saved, cfg)
    flat = _flat(saved.model_dump())
    kept = [f"{k.split('.', 1)[1]}={flat.get(k)}" for k, v in changes.items()
            if k.startswith(RESUME_KEEPS) and k in flat and flat[k] != v]
    allowed = {k: v for k, v in changes.items() if not k.startswith(RESUME_KEEPS)}
    allowed.pop("output_dir", None)  # the folder is the run's; its name stays as the folder says
    return saved.updated(allowed), kept


def resume_point(run_dir: str | Path, resume_from: str | Path) -> tuple[str, str | None]:
    """The checkpoint a resume starts from and a note: 'latest' is this run's newest whole checkpoint (never one an
    older run left in the folder; newer damaged ones are skipped and named); a named checkpoint must be whole and,
    when it is in this folder, this run's."""
    run_dir = Path(run_dir)
    if str(resume_from) == "latest":
        found, skipped = latest_checkpoint(run_dir)
        why = "; ".join(f"{p.name} skipped: {reason}" for p, reason in skipped)
        if found is None:
            others = [p.name for p in checkpoint_folders(run_dir) if not belongs(run_dir, p)]
            if others:
                why = "; ".join(filter(None, [why, f"{', '.join(others)} belong to an older run in this folder"]))
            raise ConfigError(f"run '{run_dir.name}' has no saved checkpoint to resume from"
                              + (f" ({why})" if why else ""))
        return str(found), f"Resuming from {found.name}" + (f" ({why})" if why else "")
    path = Path(resume_from)
    _check_resumable(path)
    if path.parent.resolve() == run_dir.resolve() and not belongs(run_dir, path):
        raise ConfigError(f"{path.name} was saved by an older run in {run_dir}, not by the run there now: resume "
                          "one of this run's checkpoints, or start a new run")
    return str(path), None


def _check_resumable(path: Path) -> None:
    """A checkpoint named by the user must be whole; if not, say what is wrong and which earlier one would do."""
    why = checkpoints.problem(path)
    if why is None:
        return
    if step_of(path) is None and why == "trainer_state.json is missing (the save did not finish)":
        raise ConfigError(f"{path} is not a saved checkpoint (no trainer_state.json): pick one of the run's "
                          "checkpoint-N folders")
    step = step_of(path)
    earlier = [p for p in checkpoints.candidates(path.parent) if step is not None and step_of(p) < step
               and belongs(path.parent, p) and checkpoints.problem(p) is None]
    hint = (f"resume from {earlier[0]} instead (the newest complete one before it)" if earlier
            else "no earlier complete checkpoint exists: start the run again")
    raise ConfigError(f"checkpoint {path} cannot be resumed: {why}. {hint[0].upper() + hint[1:]}")
