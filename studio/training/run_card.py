"""The run card: what a run of a config will train, before Start (the Train tab shows it).

Model and loading path, data file and rows (train / held out, split as ``studio.data.prepare_training`` splits them),
weights, max_length, batch, steps and epochs, and the expected duration. Everything comes from the config Start
passes to the engine with the run plan's changes applied (``RunPlan.config``: the config the run trains with and
saves as run.yaml) and from the run plan itself, so the card and run.yaml cannot disagree. No Gradio here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from studio.config.run import RunConfig, resolve_epochs

_rows_cache: dict[tuple, tuple[int, int] | str] = {}


@dataclass(frozen=True)
class RunCard:
    model: str
    path: str  # the loading path in words: Unsloth / bitsandbytes / full precision, and the device
    train_file: str
    eval_file: str | None
    train_rows: int | None  # None: the data cannot be read (``data_error`` says why)
    held_out_rows: int | None
    desirable_weight: float
    undesirable_weight: float
    max_length: int
    batch: int
    accumulation: int
    max_steps: int  # as configured (-1: the epochs decide)
    steps: int | None  # the optimizer steps the run will take
    epochs: float | None
    epochs_setting: Any
    duration: str | None
    data_error: str | None = None
    plan_error: str | None = None

    def markdown(self) -> str:
        rows = ("cannot be read: " + self.data_error) if self.data_error else (
            f"**{self.train_rows}** training rows, **{self.held_out_rows}** held out"
            + (f" (from `{self.eval_file}`)" if self.eval_file else ""))
        steps = "unknown until the data can be read" if self.steps is None else f"**{self.steps}**"
        if self.max_steps > 0:
            steps += " (max_steps)"
        if self.epochs is None:
            epochs = f"{self.epochs_setting}"
        else:
            epochs = f"{self.epochs:g}" + (" ('auto')" if self.epochs_setting == "auto" else "")
        if self.max_steps > 0 and self.steps is not None and self.train_rows:
            epochs = f"{self.steps * self.batch * self.accumulation / self.train_rows:.2f} (capped by max_steps)"
        lines = [
            "### What Start will train",
            "| | |", "|---|---|",
            f"| Model | `{self.model}` |",
            f"| Path | {self.path} |",
            f"| Data | `{self.train_file}`: {rows} |",
            f"| Weights | desirable_weight **{self.desirable_weight}**, undesirable_weight "
            f"**{self.undesirable_weight}** |",
            f"| max_length | **{self.max_length}** |",
            f"| Batch | **{self.batch}** rows per pass x **{self.accumulation}** accumulation = "
            f"{self.batch * self.accumulation} rows a step |",
            f"| Steps | {steps} |",
            f"| Epochs | {epochs} |",
            f"| Expected duration | {self.duration or 'measured once the first steps have run'} |",
        ]
        if self.plan_error:
            lines.append(f"\n**The run cannot start as set:** {self.plan_error}")
        return "\n".join(lines)


def data_rows(cfg: RunConfig) -> tuple[int, int]:
    """(training rows, held-out rows) of ``cfg``'s data, split as the engine splits it; DataError when unreadable.
    Cached per file version, split settings and seed."""
    from studio.data import load_kto, resolve
    from studio.data.clean import split_by_prompt

    def stamp(source: str | None):
        if not source:
            return None
        p = Path(resolve(source))
        return (str(p), p.stat().st_mtime_ns, p.stat().st_size) if p.is_file() else (str(p),)

    d = cfg.data
    key = (stamp(d.train_file), stamp(d.eval_file), d.eval_fraction, d.eval_max_rows, cfg.train.seed)
    if key not in _rows_cache:
        rows = load_kto(d.train_file).rows
        if d.eval_file:
            held = len(load_kto(d.eval_file).rows)
            train = len(rows)
        elif d.eval_fraction > 0:
            train_idx, eval_idx = split_by_prompt(rows, d.eval_fraction, cfg.train.seed, d.eval_max_rows)
            train, held = len(train_idx), len(eval_idx)
        else:
            train, held = len(rows), 0
        _rows_cache[key] = (train, held)
    return _rows_cache[key]


def run_card(cfg: RunConfig, device=None) -> tuple[RunCard, RunConfig]:
    """The card of a run of ``cfg`` on ``device`` (default: this machine), and the config the run will save as
    run.yaml (``cfg`` with the run plan's changes)."""
    from studio.data.normalize import DataError
    from studio.errors import StudioError
    from studio.models import load as models
    from studio.training import duration
    from studio.training import plan as planner

    device = device or models.detect_device()
    data_error = plan_error = None
    try:
        n_train, n_held = data_rows(cfg)
    except (DataError, OSError) as e:
        n_train = n_held = None
        data_error = str(e)
    try:
        p = planner.plan_run(cfg, device, n_train, fetch=False)
        saved = p.config(cfg)
        path = models.BACKEND_LABELS[p.backend] + f", {p.dtype}" + (" with bfloat16 autocast" if p.autocast else "") \
            + (" on the CPU" if p.device_kind == "cpu" else f" on {p.device_name}")
        epochs = p.epochs
    except (StudioError, ValueError) as e:  # a path this machine cannot take, a run that won't fit
        saved, path, plan_error = cfg, "—", str(e)
        epochs = resolve_epochs(cfg.train.num_train_epochs, n_train)
    t = saved.train
    per_step = t.per_device_train_batch_size * t.gradient_accumulation_steps
    if t.max_steps > 0:
        steps = t.max_steps
    elif n_train:
        steps = max(1, math.ceil(math.ceil(n_train / per_step) * (epochs or 1.0)))
    else:
        steps = None
    when = None
    if device.kind == "cpu":
        d = duration.estimate(saved, duration.data_lengths(saved), device=device)
        when = d.describe() if d else None
    card = RunCard(model=saved.model.name_or_path, path=path, train_file=saved.data.train_file,
                   eval_file=saved.data.eval_file, train_rows=n_train, held_out_rows=n_held,
                   desirable_weight=saved.kto.desirable_weight, undesirable_weight=saved.kto.undesirable_weight,
                   max_length=saved.kto.max_length, batch=t.per_device_train_batch_size,
                   accumulation=t.gradient_accumulation_steps, max_steps=t.max_steps, steps=steps, epochs=epochs,
                   epochs_setting=t.num_train_epochs, duration=when, data_error=data_error, plan_error=plan_error)
    return card, saved
