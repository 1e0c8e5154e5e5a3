"""Train tab: start / stop / resume the engine's job and watch its curves."""
from __future__ import annotations

import gradio as gr
import pandas as pd

from studio.config import ConfigError
from studio.engine import JobRunning, latest_checkpoint
from studio.ui.widgets import collect, field_component

FIELDS = [
    ("train", "learning_rate"), ("train", "num_train_epochs"), ("train", "max_steps"),
    ("train", "per_device_train_batch_size"), ("train", "gradient_accumulation_steps"),
    ("kto", "beta"), ("kto", "max_length"), ("kto", "desirable_weight"), ("kto", "undesirable_weight"),
    ("lora", "r"), ("lora", "lora_alpha"), ("train", "save_steps"),
]
PLOTS = {
    "loss": ["loss"],
    "rewards": ["rewards/chosen", "rewards/rejected"],
    "margins & KL": ["rewards/margins", "kl"],
    "learning rate": ["learning_rate"],
    "tokens/s": ["tokens_per_s"],
}


def _fmt_s(s) -> str:
    if s is None:
        return "–"
    s = int(s)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def _long(metrics: list[dict], keys: list[str]) -> pd.DataFrame:
    rows = [{"step": m["step"], "value": float(m[k]), "series": k}
            for m in metrics for k in keys if m.get(k) is not None]
    return pd.DataFrame(rows, columns=["step", "value", "series"])


def snapshot(studio):
    """Status line, progress line and one frame per plot for the current (or last) job."""
    job = studio.engine.job
    if job is None:
        return ["No run yet. Pick settings and press **Start training**.", ""] + [_long([], k) for k in PLOTS.values()]
    statuses = [e for e in job.events if e["type"] in ("status", "error", "done")]
    last = statuses[-1]["message"] if statuses else ""
    state = {"starting": "⏳ starting", "running": "🏃 training", "stopping": "⏸ stopping",
             "finished": "✅ finished", "stopped": "⏹ stopped", "failed": "❌ failed"}[job.state]
    status = f"**{state}** — run `{job.config.name}`" + (f" ({job.backend})" if job.backend else "") + f"  \n{last}"
    metrics = [m for m in job.metrics() if "loss" in m]
    progress = ""
    if metrics:
        m = metrics[-1]
        progress = (f"step **{m['step']} / {m['max_steps']}** · epoch {m['epoch']:.2f} · elapsed {_fmt_s(m['elapsed_s'])}"
                    f" · ETA {_fmt_s(m.get('eta_s'))} · loss {m['loss']:.4f}")
        if m.get("gpu_mem_gib"):
            progress += f" · GPU peak {m['gpu_mem_gib']:.2f} GiB"
    return [status, progress] + [_long(metrics, keys) for keys in PLOTS.values()]


def build(studio):
    with gr.Row():
        name = gr.Textbox(label="Run name", value=studio.config.name, elem_id="run-name",
                          info="Names the run folder; resume continues the run of this name.")
    with gr.Accordion("Training settings", open=True):
        with gr.Row():
            comps = [field_component(studio.config, s, n, label=f"{n.replace('_', ' ')}", min_width=200)
                     for s, n in FIELDS]
    with gr.Row():
        start = gr.Button("Start training", variant="primary", elem_id="train-start")
        stop = gr.Button("Stop (saves the adapter)", variant="stop", elem_id="train-stop")
        resume = gr.Button("Resume latest checkpoint", elem_id="train-resume")
    message = gr.Markdown(elem_id="train-message")
    status = gr.Markdown(elem_id="train-status")
    progress = gr.Markdown(elem_id="train-progress")
    plots = []
    with gr.Row():
        for title in list(PLOTS)[:3]:
            plots.append(gr.LinePlot(x="step", y="value", color="series", title=title, height=240,
                                     elem_id=f"plot-{title.split()[0].replace('&', '')}"))
    with gr.Row():
        for title in list(PLOTS)[3:]:
            plots.append(gr.LinePlot(x="step", y="value", color="series", title=title, height=240,
                                     elem_id=f"plot-{title.split()[0].replace('/', '')}"))
    timer = gr.Timer(1.0)

    def _config(run_name, values):
        return studio.update({"name": run_name.strip() or "run", **collect(FIELDS, values)})

    def on_start(run_name, *values):
        try:
            cfg = _config(run_name, values)
            studio.engine.start(cfg)
            return f"Started run `{cfg.name}` → `{cfg.run_dir()}`"
        except (ConfigError, JobRunning, ValueError) as e:
            return f"**Not started:** {e}"

    def on_resume(run_name, *values):
        try:
            cfg = _config(run_name, values)
            ckpt = latest_checkpoint(cfg.run_dir())
            if ckpt is None:
                return f"**Nothing to resume:** run `{cfg.name}` has no saved checkpoint yet."
            studio.engine.start(cfg, resume_from=ckpt)
            return f"Resuming `{cfg.name}` from `{ckpt}`"
        except (ConfigError, JobRunning, ValueError) as e:
            return f"**Not resumed:** {e}"

    def on_stop():
        return "Stopping after this step; a checkpoint and the adapter are saved." if studio.engine.stop() \
            else "No training is running."

    start.click(on_start, [name, *comps], message, concurrency_limit=1)
    resume.click(on_resume, [name, *comps], message, concurrency_limit=1)
    stop.click(on_stop, None, message)
    timer.tick(lambda: snapshot(studio), None, [status, progress, *plots], show_progress="hidden")
