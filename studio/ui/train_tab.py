"""Train tab: start / stop / resume the engine's job, watch its curves and health, browse the run history.

Everything shown is read by a timer from the run folder's event log (``studio.runs.live``) of the run this studio
watches - its engine's job, or a run another process on the same studio home trains (a second app, the CLI) - and
from the SQLite history, so a refreshed page, a second browser tab or a second app shows the running run, not a
blank form. Stop writes the run folder's stop request, which whichever process trains the run honours.
"""
from __future__ import annotations

import time
from pathlib import Path

import gradio as gr
import pandas as pd

from studio.training import duration, health
from studio.tuned import evaluate
from studio.models import load as models
from studio.config.run import ConfigError, RunConfig
from studio.training.engine import JobRunning
from studio.training.events import current_phase
from studio.runs import folder, live
from studio.runs.history import ACTIVE, HistoryError
from studio.ui.widgets import collect, field_component, shown

FIELDS = [
    ("train", "learning_rate"), ("train", "num_train_epochs"), ("train", "max_steps"),
    ("train", "per_device_train_batch_size"), ("train", "gradient_accumulation_steps"),
    ("kto", "beta"), ("kto", "max_length"), ("kto", "desirable_weight"), ("kto", "undesirable_weight"),
    ("lora", "r"), ("lora", "lora_alpha"), ("train", "save_steps"), ("train", "gradient_checkpointing"),
    ("memory", "micro_batch_size"),
]
# ---- the run card: what Start will train (issue 30) ------------------------------------------------------------------
def run_card_md(studio, run_name, values) -> str:
    """The run card of the config Start would pass to the engine now: the shared config with the form's values,
    rendered by ``studio.training.run_card`` from that config with the run plan's changes (what run.yaml holds)."""
    from studio.training.run_card import run_card

    try:
        cfg = studio.config.updated(form_changes(run_name, values))
    except (ConfigError, ValueError) as e:
        return f"### What Start will train\n**Not startable as set:** {e}"
    return run_card(cfg)[0].markdown()


def build_run_card(studio, tab, name, comps) -> None:
    """The card's block and its events: shown when the tab is, and after any change of the form."""
    card = gr.Markdown(elem_id="train-card")
    show = dict(fn=lambda n, *v: {card: run_card_md(studio, n, v)}, inputs=[name, *comps], outputs=[card],
                show_progress="hidden", concurrency_limit=1, concurrency_id="train-run-card",
                trigger_mode="always_last")
    for c in (name, *comps):
        c.change(**show)
    if tab is not None:
        tab.select(**show)
    app = gr.context.Context.root_block
    if app is not None:
        app.load(**show)


RELOADED_NOTICE = "Settings updated from the other tabs (Model & preset, Data) since this form was last shown."
# title -> (elem_id suffix, logged keys drawn as series)
PLOTS = {
    "loss": ("loss", ["loss"]),
    "rewards": ("rewards", ["rewards/chosen", "rewards/rejected"]),
    "margins (chosen − rejected)": ("margins", ["rewards/margins"]),
    "KL (reference point)": ("kl", ["kl"]),
    "learning rate": ("lr", ["learning_rate"]),
    "tokens/s": ("tokens", ["tokens_per_s"]),
    "held-out reward accuracy": ("heldout-accuracy", ["heldout/accuracy"]),
    "held-out drift (nats/token)": ("heldout-drift", ["heldout/drift"]),
}
CHECK_PLOTS = ("held-out reward accuracy", "held-out drift (nats/token)")
PLOT_Y_LIMITS = {"held-out reward accuracy": [0, 1.05]}  # a fraction: 100% drawn inside the frame, not on its edge
COMPARABLE = ["loss", "rewards/margins", "rewards/chosen", "rewards/rejected", "kl", "learning_rate", "tokens_per_s"]
HISTORY_COLUMNS = ["run", "name", "status", "started", "took", "steps", "loss", "margin", "adapter"]
STATE_LABELS = {"starting": "⏳ starting", "running": "🏃 training", "stopping": "⏸ stopping",
                "finished": "✅ finished", "stopped": "⏹ stopped", "failed": "❌ failed",
                "interrupted": "⚠️ interrupted"}
SEVERITY_ICONS = {health.ERROR: "🛑", health.WARNING: "⚠️", health.INFO: "ℹ️"}
LATEST = "latest"


# ---- formatting ----------------------------------------------------------------------------------------------------
def _fmt_s(s) -> str:
    if s is None:
        return "–"
    s = int(s)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def _fmt_time(t) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(t)) if t else "–"


def _num(v, fmt=".4f") -> str:
    return format(v, fmt) if isinstance(v, (int, float)) else "–"


def _long(metrics: list[dict], keys: list[str], label=None) -> pd.DataFrame:
    pts = [(int(m["step"]), float(m[k]), label or k) for m in metrics for k in keys
           if isinstance(m.get(k), (int, float))]
    # typed columns even when empty: an untyped frame would make the chart's step axis categorical
    return pd.DataFrame({"step": pd.Series([p[0] for p in pts], dtype="int64"),
                         "value": pd.Series([p[1] for p in pts], dtype="float64"),
                         "series": pd.Series([p[2] for p in pts], dtype="str")})


def _bar(fraction: float | None, text: str, elem_class: str, moving: bool = False, phase: str | None = None) -> str:
    """A progress bar; ``moving``: work that cannot be counted, drawn as a stripe sliding along the bar."""
    pct = 0.0 if fraction is None else max(0.0, min(1.0, fraction)) * 100
    inner = (f'<div style="width:{pct:.1f}%;height:100%;background:var(--color-accent,#f97316);'
             'transition:width .5s"></div>')
    if moving:
        inner = ('<div class="studio-indeterminate" style="width:30%;height:100%;background:var(--color-accent,'
                 '#f97316)"></div>')  # slides along the bar: the app's CSS animates it
    attrs = f' data-phase="{phase}"' if phase else ""
    return (f'<div class="{elem_class}" data-fraction="{pct / 100:.4f}"{attrs}>'
            '<div style="height:14px;border-radius:7px;background:var(--neutral-200,#e5e7eb);overflow:hidden">'
            f'{inner}</div>'
            f'<div style="margin-top:4px;font-size:0.95em">{text}</div></div>')


# ---- views of the live job -----------------------------------------------------------------------------------------
def stop_button(busy: bool) -> dict:
    return gr.update(variant="stop" if busy else "secondary", interactive=busy)


def _view(studio, run_dir) -> live.RunView:
    """The run folder's view, kept per studio so each tick reads only the new lines of its event log."""
    views = studio.__dict__.setdefault("_run_views", {})
    key = str(Path(run_dir).resolve())
    if key not in views:
        views[key] = live.RunView(run_dir)
    return views[key].refresh()


def watched(studio):
    """The run this studio shows: its engine's job while it runs, else a run another process on this studio home
    trains now (a second app, the CLI), else its engine's last job or the other process's run it showed last, else
    the newest run if its trainer is gone
    (interrupted: resumable). Rendered from the run folder's event log; a job whose folder has none (a trainer of an
    older studio) from the job itself. None: nothing to show."""
    job = studio.engine.job
    if job is not None and not job.done:
        return _from_folder(studio, job)
    runs = studio.history.runs()
    for r in runs:
        if r["status"] in ACTIVE and live.is_live(r["run_dir"]) and folder.has_events(r["run_dir"]):
            studio.__dict__["_watched_run"] = r["run_dir"]  # kept in view once it ends
            return _view(studio, r["run_dir"])
    if job is not None:
        return _from_folder(studio, job)
    if studio.__dict__.get("_watched_run"):
        return _view(studio, studio.__dict__["_watched_run"])
    if runs and runs[0]["status"] == "interrupted" and folder.has_events(runs[0]["run_dir"]):
        return _view(studio, runs[0]["run_dir"])
    return None


def _from_folder(studio, job):
    return _view(studio, job.run_dir) if folder.has_events(job.run_dir) else job


def job_metrics(studio, shown=None) -> list[dict]:
    """The watched run's training steps, with the steps of earlier attempts of the same run when it was resumed."""
    shown = watched(studio) if shown is None else shown
    if shown is None:
        return []
    if isinstance(shown, live.RunView):
        return health.train_steps(shown.metrics())
    run_id = studio.history.run_for_job(shown.id) if shown.resume_from else None
    logged = studio.history.metrics(run_id) if run_id else []
    return health.train_steps(logged + shown.metrics())


def status_md(job) -> str:
    if job is None:
        return "No run yet. Pick settings and press **Start training**."
    statuses = [e for e in job.events if e["type"] in ("status", "error", "done")]
    last = statuses[-1]["message"] if statuses else ""
    if job.state == "interrupted":
        last = live.INTERRUPTED_MESSAGE
    name = job.config.name if job.config is not None else Path(job.run_dir).name
    return (f"**{STATE_LABELS.get(job.state, job.state)}** — run `{name}`" + (f" ({job.backend})" if job.backend else "")
            + (f", resumed from `{Path(job.resume_from).name}`" if job.resume_from else "") + f"  \n{last}")


def progress_html(job, now: float | None = None) -> str:
    """The current phase (data, conversion, reference pass, training, scoring, saving) with its own bar and ETA, and
    the job's elapsed clock; redrawn every second while a job runs, so the clock keeps moving."""
    if job is None:
        return _bar(None, "No training yet.", "train-progress-bar")
    now = time.time() if now is None else now
    elapsed = (job.ended_at or now) - job.started_at
    ticks = [e for e in job.events if e["type"] in ("progress", "metrics") and "max_steps" in e and "eval_loss" not in e]
    last = ticks[-1] if ticks else None
    steps = (f"step <b>{last.get('step', 0)} / {last.get('max_steps') or 0}</b> · epoch {last.get('epoch', 0):.2f}"
             if last else "")
    loss = next((m["loss"] for m in reversed(ticks) if "loss" in m), None)
    loss_text = f" · loss {loss:.4f}" if loss is not None else ""
    if job.done:
        head = STATE_LABELS.get(job.state, job.state)
        total = (last or {}).get("max_steps") or 0
        fraction = 1.0 if job.state == "finished" else ((last or {}).get("step", 0) / total if total else None)
        text = " · ".join(p for p in (f"<b>{head}</b>", steps or "did not reach training",
                                      f"took {_fmt_s(elapsed)}") if p) + loss_text
        return _bar(fraction, text, "train-progress-bar")
    ph = current_phase(job.events, now)
    if ph is None:
        return _bar(None, f"<b>Starting…</b> · elapsed {_fmt_s(elapsed)}", "train-progress-bar", moving=True)
    done, total = ph.get("done"), ph.get("total")
    counted = done is not None and bool(total)
    if ph["phase"] == "training":
        text = f"<b>{ph['label']}</b> · {steps or f'step <b>{done or 0} / {total or 0}</b>'}{loss_text}"
    else:
        text = f"<b>{ph['label']}</b>: {ph['message']}" + (f" · <b>{done} / {total}</b>" if counted else "")
    eta = ph["eta_s"] if counted else None
    text += (f" · ETA {_fmt_s(eta) if eta is not None else ph.get('eta_note') or '–'}" if counted else "")
    text += f" · this phase {_fmt_s(ph['elapsed_s'])} · elapsed {_fmt_s(elapsed)}"
    return _bar(done / total if counted else None, text, "train-progress-bar", moving=not counted,
                phase=ph["phase"])


def duration_markdown(cfg, card: str | None = "cpu") -> str:
    """The Train tab's line: how long the config in the form takes here (CPU only; a GPU run shows its steps).
    ``card``: the Model tab's card (None: not picked yet, so the tab shows this machine's, CPU only): the advice to
    pick the CPU only card is given only when another card is picked."""
    device = models.detect_device()
    if device.kind != "cpu":
        return ""
    lengths = duration.data_lengths(cfg)
    d = duration.estimate(cfg, lengths, device=device)
    if d is None:
        why = ("the training data's token lengths could not be measured with this model's tokenizer" if lengths is None
               else "the model's size cannot be read before it is downloaded")
        return f"Expected duration on this CPU: unknown ({why})."
    if d.total_s <= 600:
        slow = ""
    elif card in (None, "cpu"):
        slow = " Over 10 minutes: lower max steps or max_length for a shorter run."
    else:
        slow = " Over 10 minutes: pick the **CPU only** card in the Model & preset tab for a plan that fits."
    return f"Expected duration: **{d.describe()}**.{slow}"


def memory_html(job) -> str:
    last = next((m for m in reversed(job.metrics()) if "ram_gib" in m or "gpu_mem_gib" in m), None) if job else None
    if last is None:
        return _bar(None, "Memory: shown once training logs its first step.", "train-memory-bar")
    if last.get("gpu_total_gib"):
        held, total = last.get("gpu_reserved_gib") or 0.0, last["gpu_total_gib"]
        return _bar(held / total, f"GPU memory: <b>{held:.2f} of {total:.2f} GiB</b> held by training "
                                  f"(peak in tensors {last.get('gpu_mem_gib') or 0:.2f} GiB)", "train-memory-bar")
    if last.get("ram_total_gib"):
        ram, total = last.get("ram_gib") or 0.0, last["ram_total_gib"]
        return _bar(ram / total, f"No GPU: training on the CPU. RAM: <b>{ram:.2f} of {total:.1f} GiB</b> "
                                 "used by the studio", "train-memory-bar")
    return _bar(None, "No GPU: training on the CPU.", "train-memory-bar")


def health_md(metrics: list[dict], cfg: RunConfig | None) -> str:
    steps = health.train_steps(metrics)
    if not steps:
        return "**KTO health** — checks start once training logs its first steps."
    findings = health.check_config(steps, cfg) if cfg is not None else health.check(steps)
    head = f"**KTO health** after {len(steps)} logged step{'s' if len(steps) != 1 else ''}"
    if not findings:
        early = len(steps) < max(health.KL_WINDOW, health.FLAT_WINDOW)
        return head + ": ✅ no problems spotted" + (
            f" (the KL and flat-loss checks need {health.KL_WINDOW}+ steps)." if early else ".")
    out = [head + ":"]
    for f in findings:
        where = f" (from step {f.step})" if f.step is not None else ""
        out.append(f"- {SEVERITY_ICONS[f.severity]} **{f.title}**{where}  \n  *Usually means:* {f.meaning}  \n"
                   f"  *What to change:* {f.fix}")
    return "\n".join(out)


def plot_updates(metrics: list[dict]) -> list[pd.DataFrame | None]:
    """One frame per plot; None (an empty chart) where nothing is logged yet: the browser sizes a chart's axes
    from the first frame it gets, so it must never get an empty one."""
    frames = [_long(metrics, keys) for _, keys in PLOTS.values()]
    return [None if f.empty else f for f in frames]


# ---- history views -------------------------------------------------------------------------------------------------
def history_frame(history) -> pd.DataFrame:
    rows = []
    for r in history.runs():
        fm = r["final_metrics"]
        took = (r["ended_at"] or r["updated_at"]) - r["created_at"] if r["created_at"] else None
        adapter = r["adapter_path"] or "–"
        if r["files_deleted_at"]:
            adapter = "files deleted"
        rows.append([r["id"], r["name"], r["status"], _fmt_time(r["created_at"]), _fmt_s(took),
                     f"{r['step'] or 0} / {r['max_steps'] or '?'}", _num(fm.get("loss")),
                     _num(fm.get("rewards/margins")), adapter])
    return pd.DataFrame(rows, columns=HISTORY_COLUMNS)


def run_choices(history) -> list[tuple[str, str]]:
    return [(f"{r['name']} · {_fmt_time(r['created_at'])} · {r['id'][:6]}", r["id"]) for r in history.runs()]


def run_detail_md(history, run_id: str | None) -> str:
    run = history.get(run_id) if run_id else None
    if run is None:
        return "Pick a run above and press **Open**."
    fm = run["final_metrics"]
    lines = [f"### `{run['name']}` — {STATE_LABELS.get(run['status'], run['status'])}",
             f"- started {_fmt_time(run['created_at'])}, ended {_fmt_time(run['ended_at'])}; run folder "
             f"`{run['run_dir']}`" + (" (files deleted)" if run["files_deleted_at"] else ""),
             f"- steps {run['step'] or 0} / {run['max_steps'] or '?'} · loss {_num(fm.get('loss'))} · margin "
             f"{_num(fm.get('rewards/margins'))} · KL {_num(fm.get('kl'))}"]
    if run["adapter_path"]:
        there = Path(run["adapter_path"]).is_dir()
        lines.append(f"- adapter: `{run['adapter_path']}`" + ("" if there else " (no longer on disk)"))
    ckpts = history.checkpoints(run["id"])
    lines.append("- checkpoints on disk: " + (", ".join(f"`checkpoint-{s}`" for s, _ in ckpts) +
                                               " — pick one in **Resume from** to continue from it"
                                               if ckpts else "none"))
    attempts = history.attempts(run["id"])
    if len(attempts) > 1:
        lines.append("- attempts: " + "; ".join(
            f"{a['status']}" + (f" (resumed from `{Path(a['resume_from']).name}`)" if a["resume_from"] else "")
            for a in attempts))
    if run["error"]:
        lines.append(f"- **error:** {run['error']}")
    stored = evaluate.read_eval(run["run_dir"])
    if stored:
        lines.append(f"- held-out evaluation ({stored['adapter_label']}): {evaluate.verdict_line(stored)}")
    cfg = history.config(run["id"])
    lines.append("\n" + health_md(history.metrics(run["id"]), cfg))
    lines.append(f"\n<details><summary>run config</summary>\n\n```yaml\n{cfg.to_yaml() if cfg else ''}```\n"
                 "</details>")
    return "\n".join(lines)


def compare_frame(history, run_a: str | None, run_b: str | None, key: str) -> pd.DataFrame:
    frames = []
    for tag, run_id in (("A", run_a), ("B", run_b)):
        run = history.get(run_id) if run_id else None
        if run is not None:
            steps = health.train_steps(history.metrics(run_id))
            frames.append(_long(steps, [key], label=f"{tag}: {run['name']} ({run_id[:6]})"))
    return pd.concat(frames, ignore_index=True) if frames else _long([], [key])


def checkpoint_choices(run_dir: Path | None) -> list[tuple[str, str]]:
    ckpts = folder.run_checkpoints(run_dir) if run_dir else []
    latest = f"latest (checkpoint-{ckpts[-1][0]})" if ckpts else "latest (none saved yet)"
    return [(latest, LATEST)] + [(f"checkpoint-{s}", p) for s, p in reversed(ckpts)]


# ---- handlers: module-level, so tests call them without a browser -------------------------------------------------
# Each takes the Studio and the values the event sends and returns {key: value} for the parts of the page it changes
# (keys: "name", the FIELDS' "section.name", "message", the plots' PLOT_KEYS, ...); ``build`` maps the keys to the
# tab's components, and a part absent from the dict is left as it is.
FORM_KEYS = ["name"] + [f"{s}.{n}" for s, n in FIELDS]
PLOT_KEYS = {title: f"plot-{suffix}" for title, (suffix, _) in PLOTS.items()}


def form_changes(run_name, values) -> dict:
    """The config changes the form holds: the run name and FIELDS' values, in FIELDS' order."""
    return {"name": (run_name or "").strip() or "run", **collect(FIELDS, values)}


def form_values(cfg: RunConfig) -> dict:
    return {"name": cfg.name, **{f"{s}.{n}": shown(s, n, getattr(getattr(cfg, s), n)) for s, n in FIELDS}}


def run_dir_for(studio, run_name) -> Path | None:
    try:
        return studio.config.updated({"name": (run_name or "").strip() or "run"}).run_dir()
    except ConfigError:
        return None


def busy_message(studio, verb: str) -> str:
    job = studio.engine.job
    return f"**Not {verb}:** a training job is running (`{job.config.name}`): stop it or wait for it to end."


def start_run(studio, run_name, values, processes: int = 1) -> dict:
    """Start the form's run: in this process (the engine's thread), or with ``processes`` > 1 on all GPUs through
    ``accelerate launch`` (studio/training/launcher.py), watched through its run folder like any other process's."""
    if studio.engine.busy:
        return {"message": busy_message(studio, "started")}
    try:
        changes = form_changes(run_name, values)
        cfg, note = folder.new_run(studio.config.updated(changes))
        cfg = studio.update({**changes, "name": cfg.name}, source="train-form")
        if int(processes or 1) > 1:
            from studio.training import launcher

            launched = launcher.launch(cfg, int(processes))
            studio.__dict__["_watched_run"] = str(launched.run_dir)
            return {"message": f"{note + '  ' + chr(10) if note else ''}Started run `{cfg.name}` on {processes} GPUs "
                               f"(data-parallel) → `{cfg.run_dir()}`; console log `{launched.log}`",
                    "name": cfg.name}
        studio.engine.start(cfg)
        return {"message": f"{note + '  ' + chr(10) if note else ''}Started run `{cfg.name}` → `{cfg.run_dir()}`",
                "name": cfg.name}
    except JobRunning:
        return {"message": busy_message(studio, "started")}
    except (ConfigError, ValueError) as e:
        return {"message": f"**Not started:** {e}"}


def resume_run(studio, run_name, checkpoint, values) -> dict:
    if studio.engine.busy:
        return {"message": busy_message(studio, "resumed")}
    try:
        changes = form_changes(run_name, values)
        # the saved run decides model, data and the adapter's shape; the form may change how training goes on
        cfg, kept = folder.resume_run(studio.config.updated(changes), changes)
        if not folder.run_checkpoints(cfg.run_dir()):
            return {"message": f"**Nothing to resume:** run `{cfg.name}` has no saved checkpoint yet."}
        job = studio.engine.start(cfg, resume_from=checkpoint or LATEST)
        studio.replace(cfg, source="train-form")
        note = (f"  \nLoRA settings stay as saved ({', '.join(kept)}): an adapter's shape cannot change "
                "mid-run." if kept else "")
        return {"message": f"Resuming `{cfg.name}` from `{Path(job.resume_from).name}`" + note}
    except JobRunning:
        return {"message": busy_message(studio, "resumed")}
    except (ConfigError, ValueError) as e:
        return {"message": f"**Not resumed:** {e}"}


def stop_run(studio) -> dict:
    """Stop this studio's job, or the live run it shows that another process trains: the run folder's stop
    request, turned into a checkpoint and the adapter by the trainer."""
    if studio.engine.stop():
        return {"message": "Stopping after this step; a checkpoint and the adapter are saved."}
    shown = watched(studio)
    if shown is not None and not shown.done and live.request_stop(shown.run_dir, by="the studio's Stop button"):
        return {"message": f"Stopping `{Path(shown.run_dir).name}` (trained by another process) after this step; "
                           "a checkpoint and the adapter are saved."}
    return {"message": "No training is running."}


def open_run(studio, run_id) -> dict:
    """A run of the history into the form (its settings become the studio's config)."""
    cfg = studio.history.config(run_id) if run_id else None
    if cfg is None:
        return {"message": "Pick a run first."}
    studio.replace(cfg, source="train-form")
    return {"message": f"Opened `{cfg.name}`: its settings are in the form. **Resume** continues it; **Start** makes "
                       "a new run with these settings.",
            **form_values(cfg),
            "checkpoint": gr.update(choices=checkpoint_choices(cfg.run_dir()), value=LATEST),
            "detail": run_detail_md(studio.history, run_id), "compare_a": run_id}


def delete_run(studio, run_id, yes) -> dict:
    if not run_id:
        return {"message": "Pick a run first.", "confirm": False}
    if not yes:
        return {"message": "Tick **yes, delete this run's files** first: deleting cannot be undone.", "confirm": False}
    run = studio.history.get(run_id)
    job = studio.engine.job
    if run and job is not None and studio.engine.busy and Path(job.run_dir).resolve() == Path(run["run_dir"]):
        return {"message": "**Not deleted:** this run is training; stop it first.", "confirm": False}
    try:
        removed = studio.history.delete_files(run_id)
    except HistoryError as e:
        return {"message": f"**Not deleted:** {e}", "confirm": False}
    return {"message": f"Deleted {len(removed)} files/folders of `{run['name']}`; its record stays in the history.",
            "detail": run_detail_md(studio.history, run_id), "confirm": False}


def compare_runs(studio, a, b, key) -> dict:
    frame = compare_frame(studio.history, a, b, key or "loss")
    return {"compare": None if frame.empty else frame}


def page_form(studio) -> dict:
    """A new or refreshed page shows the running job's settings, else the studio's current config."""
    job = studio.engine.job
    return form_values(job.config if job is not None and not job.done else studio.config)


def tick(studio, state, run_name, checkpoint, now: float | None = None) -> dict:
    """The timer: what changed since this browser tab last drew (``state``, returned updated as "seen")."""
    state = dict(state or {})
    job = watched(studio)
    hist = studio.history
    key = [job.id if job else None, len(job.events) if job else 0, job.state if job else None, hist.version]
    out: dict = {}
    if key != state.get("key"):
        metrics = job_metrics(studio, job)
        # plots are redrawn only when the curves changed (a redraw resets the chart's zoom and tooltips)
        curve_key = [job.id if job else None, [(m["step"], m.get("loss")) for m in metrics]]
        if curve_key != state.get("curves"):
            out.update(zip(PLOT_KEYS.values(), plot_updates(metrics)))
        state["curves"] = curve_key
        out.update(status=status_md(job), progress=progress_html(job, now), memory=memory_html(job),
                   health=health_md(metrics, job.config if job else None), history=history_frame(hist))
        state["key"] = key
    elif job is not None and not job.done:
        # nothing new happened, but the clocks and the phase's ETA move: redraw the progress line alone
        out["progress"] = progress_html(job, now)
    choices = run_choices(hist)
    if choices != state.get("runs"):
        state["runs"] = choices
        out.update({k: gr.update(choices=choices) for k in ("run", "compare_a", "compare_b")})
    busy = studio.engine.busy or (job is not None and not job.done)
    if busy != state.get("busy"):  # red and clickable only while a job runs
        state["busy"] = busy
        out["stop"] = stop_button(busy)
    ckpts = checkpoint_choices(run_dir_for(studio, run_name))
    if ckpts != state.get("ckpts"):
        state["ckpts"] = ckpts
        keep = checkpoint in [v for _, v in ckpts]
        out["checkpoint"] = gr.update(choices=ckpts, value=checkpoint if keep else LATEST)
    out["seen"] = state
    return out


def edit_field(studio, section: str, field_name: str, value) -> dict:
    """A value typed in the form goes into the shared config at once, this field only (an invalid one waits for
    Start, which reports it), so switching tabs and back keeps it; the expected duration follows."""
    try:
        studio.update(collect([(section, field_name)], [value]), source="train-form")
    except (ConfigError, ValueError):
        return {}
    return {"expected": duration_markdown(studio.config, getattr(studio, "card", None))}


def load_form(studio) -> dict:
    return {**page_form(studio), "seen_changes": studio.outside_changes}


def show_form(studio, seen) -> dict:
    """Shown again: reload the settings only if another tab changed the config since they were last loaded, and say
    so. The run name is left as it is: no other tab sets it, and a reload could overwrite a name being typed."""
    if seen == studio.outside_changes:
        return {}
    form = page_form(studio)
    del form["name"]
    return {**form, "seen_changes": studio.outside_changes, "message": RELOADED_NOTICE}


def expected_duration(studio) -> dict:
    """The expected duration: its own event, so that measuring the data's lengths (seconds, the first time) never
    delays the form's reload (a late reload would overwrite what the user types meanwhile)."""
    return {"expected": duration_markdown(studio.config, getattr(studio, "card", None))}


# ---- the tab -------------------------------------------------------------------------------------------------------
def build(studio, app: gr.Blocks | None = None, tab: gr.Tab | None = None):
    """The Train tab. ``tab`` (its gr.Tab) refreshes the form from the shared config whenever the tab is shown, so
    settings applied elsewhere (the Model tab's auto-fit, a preset, the Data tab) are what Start uses."""
    with gr.Row():
        name = gr.Textbox(label="Run name", value=studio.config.name, elem_id="run-name",
                          info="Names the run folder. Start makes a new run (a used name gets -2, -3 …); "
                               "Resume continues the run of this name.")
    with gr.Accordion("Training settings", open=True):
        with gr.Row():
            comps = [field_component(studio.config, s, n, label=f"{n.replace('_', ' ')}", min_width=200)
                     for s, n in FIELDS]
    build_run_card(studio, tab, name, comps)
    here = models.detect_device()
    gpu_count = here.count if here.kind == "cuda" else 1
    gpus = None
    if gpu_count > 1:  # several GPUs: this process on one, or all of them through accelerate launch
        from studio.training import launcher

        gpus = gr.Dropdown(label="GPUs", choices=launcher.gpu_choices(gpu_count), value=gpu_count,
                           elem_id="train-gpus", info="All GPUs: data-parallel processes (accelerate launch), "
                                                      "watched and stopped through the run folder.")
    with gr.Row():
        start = gr.Button("Start training", variant="primary", elem_id="train-start")
        stop = gr.Button("Stop (saves the adapter)", variant="secondary", interactive=False, elem_id="train-stop")
        resume = gr.Button("Resume", elem_id="train-resume")
        ckpt = gr.Dropdown(label="Resume from", choices=checkpoint_choices(None), value=LATEST,
                           elem_id="train-checkpoint", info="Any saved checkpoint of the run named above.")
    expected = gr.Markdown(elem_id="train-expected")
    message = gr.Markdown(elem_id="train-message")
    status = gr.Markdown(elem_id="train-status")
    with gr.Row():
        progress = gr.HTML(elem_id="train-progress")
        memory = gr.HTML(elem_id="train-memory")
    plots = []
    titles = list(PLOTS)
    for row in (titles[:3], titles[3:]):
        with gr.Row():
            for title in row:
                # the held-out checks are a few points far apart (one, in a short CPU run): drawn as dots, since a
                # line of one point draws nothing
                kind, steps = (gr.ScatterPlot, {"x_axis_format": "d"}) if title in CHECK_PLOTS else (gr.LinePlot, {})
                plots.append(kind(x="step", y="value", color="series", title=title, height=230, **steps,
                                  y_title=PLOTS[title][1][0] if len(PLOTS[title][1]) == 1 else "reward",
                                  y_axis_format=".3~g", color_title="", elem_id=f"plot-{PLOTS[title][0]}",
                                  y_lim=PLOT_Y_LIMITS.get(title)))
    health_box = gr.Markdown(elem_id="train-health")

    with gr.Accordion("Run history", open=True):
        table = gr.Dataframe(headers=HISTORY_COLUMNS, interactive=False, elem_id="history-table", wrap=True)
        with gr.Row():
            run_dd = gr.Dropdown(label="Run", choices=[], elem_id="history-run", scale=3)
            open_btn = gr.Button("Open (load its settings)", elem_id="history-open", scale=1)
            confirm = gr.Checkbox(label="yes, delete this run's files", value=False,
                                  elem_id="history-delete-confirm", scale=1)
            delete_btn = gr.Button("Delete run files", variant="stop", elem_id="history-delete", scale=1)
        detail = gr.Markdown(elem_id="history-detail")
        gr.Markdown("**Compare two runs**")
        with gr.Row():
            cmp_a = gr.Dropdown(label="Run A", choices=[], elem_id="history-compare-a")
            cmp_b = gr.Dropdown(label="Run B", choices=[], elem_id="history-compare-b")
            cmp_key = gr.Dropdown(label="Curve", choices=COMPARABLE, value="loss", elem_id="history-compare-metric")
        cmp_plot = gr.LinePlot(x="step", y="value", color="series", title="compare", height=260,
                               y_axis_format=".3~g", color_title="", elem_id="plot-compare")
    seen = gr.State(None)  # what this browser tab last drew, so the timer only sends changes
    seen_changes = gr.State(-1)  # per browser tab: the studio's outside-change count the form last showed
    timer = gr.Timer(1.0)

    ui = {"name": name, **dict(zip(FORM_KEYS[1:], comps)), "checkpoint": ckpt, "stop": stop, "expected": expected,
          "message": message, "status": status, "progress": progress, "memory": memory,
          **dict(zip(PLOT_KEYS.values(), plots)), "health": health_box, "history": table, "run": run_dd,
          "confirm": confirm, "detail": detail, "compare_a": cmp_a, "compare_b": cmp_b, "compare": cmp_plot,
          "seen": seen, "seen_changes": seen_changes}

    def on(fn, *keys) -> dict:
        """The event's ``fn`` (``fn``'s {key: value} as the {component: value} Gradio takes; nothing: all left as they
        are) and ``outputs`` (the components it may change)."""
        def handler(*args):
            out = fn(*args)
            return {ui[k]: v for k, v in out.items()} if out else gr.skip()
        return {"fn": handler, "outputs": [ui[k] for k in keys]}

    form = [name, *comps]
    if gpus is None:
        start.click(**on(lambda n, *v: start_run(studio, n, v), "message", "name"), inputs=form, concurrency_limit=1)
    else:
        start.click(**on(lambda g, n, *v: start_run(studio, n, v, g), "message", "name"), inputs=[gpus, *form],
                    concurrency_limit=1)
    resume.click(**on(lambda n, c, *v: resume_run(studio, n, c, v), "message"), inputs=[name, ckpt, *comps],
                 concurrency_limit=1)
    stop.click(**on(lambda: stop_run(studio), "message"))
    open_btn.click(**on(lambda r: open_run(studio, r), "message", *FORM_KEYS, "checkpoint", "detail", "compare_a"),
                   inputs=run_dd)
    delete_btn.click(**on(lambda r, y: delete_run(studio, r, y), "message", "detail", "confirm"),
                     inputs=[run_dd, confirm])
    for c in (cmp_a, cmp_b, cmp_key):
        c.change(**on(lambda a, b, k: compare_runs(studio, a, b, k), "compare"), inputs=[cmp_a, cmp_b, cmp_key])
    timer.tick(**on(lambda s, n, c: tick(studio, s, n, c), "status", "progress", "memory", *PLOT_KEYS.values(),
                   "health", "history", "run", "compare_a", "compare_b", "stop", "checkpoint", "seen"),
               inputs=[seen, name, ckpt], show_progress="hidden")
    for (section, field_name), c in zip(FIELDS, comps):
        c.input(**on(lambda v, s=section, f=field_name: edit_field(studio, s, f, v), "expected"), inputs=c,
                show_progress="hidden")
    if tab is not None:
        tab.select(**on(lambda s: show_form(studio, s), *FORM_KEYS, "seen_changes", "message"), inputs=seen_changes,
                   show_progress="hidden")
        tab.select(**on(lambda: expected_duration(studio), "expected"), show_progress="hidden")
    app = app or gr.context.Context.root_block
    if app is not None:
        app.load(**on(lambda: load_form(studio), *FORM_KEYS, "seen_changes"))
        app.load(**on(lambda: expected_duration(studio), "expected"), show_progress="hidden")
