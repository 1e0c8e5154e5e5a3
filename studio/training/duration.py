"""How long a run takes on a CPU, and the CPU plan: settings a small machine finishes in minutes.

No Gradio here. The Model tab (CPU preset), the Train tab (the expected duration shown before Start) and the CLI use
the same functions, so both tabs show one plan.

The time model counts the work a KTO step does on a CPU: every row of the step is pushed through the model about six
forward-pass equivalents (policy forward + backward, KL forward, reference completion and KL forwards), and that cost
grows with tokens x parameters. One constant, ``SECONDS_PER_TOKEN_GPARAM``, turns it into seconds (in bf16 autocast
a second one adds each pass's fixed cost, ``SECONDS_PER_PASS_GPARAM_BF16``); they are measured with
``python bench/cpu_duration.py`` on a 2-core machine and scaled by the cores torch uses. When the reference
log-probs are precomputed, a third of that work moves into one pass before training; the held-out scoring after
training is two forwards (base and tuned) per row.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Seconds a step takes per (padded) token per billion parameters, float32 on the project's 2-core machine, measured
# with `python bench/cpu_duration.py` on an idle machine (2026-12-02): 0.138 on the sample (4 rows a step, ~212
# tokens, 3.9 s a step) and 0.140 on HH rows at max_length 384, 2 x 4 rows a step (~1465 tokens, 27.7 s a step).
# (An earlier 0.080, from a faster day's run, made the CPU plan promise 6 min for a run that took 10.)
# Which CPU: float32 math on the project's Xeon (it has AMX; float32 is what `model.dtype: float32` or
# KTO_STUDIO_CPU_BF16=0 give there). A 2-core AMD desktop without bf16 ran the HH first run in 8 min 10 s against
# 4 min 41 s predicted, under load (issue 30): re-fit on such a CPU, idle, with `python bench/cpu_duration.py --float32
# --data hh-harmless-dev.jsonl.gz --max-length 384 --batch 2 --accum 4`.
# Re-measured 2026-12-08 on the Xeon with CPU threads given back (studio.models.cpu_threads): 0.063 on HH rows
# (12.4 s a step) and 0.071 on the sample (4.2 s). Kept at 0.14 for the CPUs that actually take this path: without
# AVX-512 BF16 they mostly lack AVX-512 too, half the Xeon's vector width (no such CPU here to re-fit on).
SECONDS_PER_TOKEN_GPARAM = 0.14
SECONDS_PER_PASS_GPARAM = 0.0  # float32: the per-token constant's margin covers its small per-pass cost (0.2 s)
# bfloat16 autocast (float32 weights) on a CPU that multiplies bf16 natively (studio.models.load.cpu_autocast, what
# model.dtype 'auto' does there) has a fixed cost a pass on top of the tokens: the frozen float32 weights are cast to
# bf16 for every forward (autocast caches only weights that train). Fitted to two runs of 2 x 4 rows a step,
# reference in every step (`python bench/cpu_duration.py --max-length 128 --batch 2 --accum 4` and the same with
# `--data hh-harmless-dev.jsonl.gz --max-length 384`, idle, 2026-12-08): 4.4 s a step for the sample's ~435 tokens,
# 8.8 s for HH's ~1465, so 0.0318 s per token-Gparam and 4.7 s per pass-Gparam (0.64 s a pass for the bundled model).
# Plus 10% for a page open on the same cores. With one constant (0.05, fitted on HH alone) the sample's first run
# planned 44 steps at ~2 s and took 3.2 s each.
SECONDS_PER_TOKEN_GPARAM_BF16 = 0.035
SECONDS_PER_PASS_GPARAM_BF16 = 5.2
CALIBRATION_CORES = 2
CHECKPOINTING_FACTOR = 1.3  # recomputing activations in the backward pass
REFERENCE_SHARE = 2 / 6  # the reference model's two forwards out of a step's ~6 forward-equivalents
EVAL_LOSS_SHARE = 0.5  # the trainer's eval-loss pass over a held-out row (forwards only) against training on it
# scoring a held-out row (base + tuned forwards) against training on it, measured where the user waits: the browser
# flow (bench/first_run_flow.py, 2026-12-02) scored 64 cleaned HH rows of ~102 tokens in 49 s (base) + ~33 s (tuned)
# against 127 s of predicted training on them. (bench/cpu_duration.py with the watch on gave 0.27 for 150 raw rows;
# the flow's figure is the one a user sees, with the page open on the same cores.)
EVAL_SHARE = 0.6
STARTUP_S = 25.0  # loading the model, tokenizing, building the trainer
CONVERT_S = 40.0  # the bundled model's one-time GGUF conversion
SAVE_S = 5.0
EVAL_LIMIT = 200  # rows the engine scores after training

# The CPU plan: a first run that finishes in minutes on a 2-core machine. A step's cost grows with its rows, so a CPU
# step is 8 rows (2 per pass x 4 accumulated; KTO needs at least 2 rows per pass for its KL reference point) and the
# cap keeps at least CPU_MIN_STEPS updates; the held-out watch scores at most CPU_EVAL_ROWS rows (twice: the base
# model before training, the tuned one after; a scoring pass costs about a third of training on the same rows),
# enough for an accuracy over ~24 pairs with its ± standard error (about ±10 points).
# training + held-out scoring the CPU plan aims for: a first run that answers in about three minutes from Start (with
# bf16 autocast that is ~10 steps of 8 rows on HH-length rows; float32 CPUs get fewer steps in the same time)
CPU_TARGET_TRAIN_S = 120.0
CPU_MIN_STEPS = 6
CPU_BATCH = 2
CPU_ROWS_PER_STEP = 8
CPU_EVAL_ROWS = 48
CPU_SEQ_MIN, CPU_SEQ_MAX, CPU_SEQ_STEP = 128, 512, 64
CPU_LENGTH_QUANTILE = 0.9  # max_length covers this share of the rows whole; longer ones are truncated


@dataclass
class Duration:
    """A predicted run time, in seconds, by phase."""

    steps: int
    rows_per_step: int
    tokens_per_step: float
    step_s: float
    startup_s: float
    reference_s: float
    train_s: float
    eval_s: float
    save_s: float
    eval_loss_s: float = 0.0  # the trainer's eval loss on the held-out rows (every save_steps and at the end)
    check_s: float = 0.0  # one check of the held-out watch during training (the tuned side of the held-out rows)
    notes: list[str] = field(default_factory=list)

    @property
    def total_s(self) -> float:
        return self.startup_s + self.reference_s + self.train_s + self.eval_loss_s + self.eval_s + self.save_s

    def describe(self) -> str:
        parts = [f"{self.steps} steps x ~{_fmt(self.step_s)}"]
        if self.reference_s >= 1:
            parts.append(f"reference pass ~{_fmt(self.reference_s)}")
        if self.eval_loss_s >= 1:
            parts.append(f"eval loss ~{_fmt(self.eval_loss_s)}")
        if self.eval_s >= 1:
            parts.append(f"held-out scoring ~{_fmt(self.eval_s)}")
        parts.append(f"loading ~{_fmt(self.startup_s)}")
        return f"about {_fmt(self.total_s)} on this CPU ({', '.join(parts)})"


def _fmt(s: float) -> str:
    s = int(round(s))
    if s < 90:
        return f"{s} s"
    if s < 3600:
        return f"{s / 60:.0f} min" if s >= 600 else f"{s // 60} min {s % 60:02d} s"
    return f"{s / 3600:.1f} h"


# ---- inputs ---------------------------------------------------------------------------------------------------------

_lengths_cache: dict[tuple, list[int] | None] = {}


def data_lengths(cfg) -> list[int] | None:
    """Token lengths (prompt + completion) of the run's training rows with its model's tokenizer, or None when the
    data or tokenizer cannot be read (the plan then keeps its defaults). Cached per file version and model."""
    from studio.data import load_kto, resolve
    from studio.data.inspect import load_tokenizer, token_lengths
    from studio.data.normalize import DataError

    source = cfg.data.train_file
    path = Path(resolve(source))
    stamp = (path.stat().st_mtime_ns, path.stat().st_size) if path.is_file() else None
    key = (str(path), stamp, cfg.model.name_or_path)
    if key not in _lengths_cache:
        try:
            rows = [r for r in load_kto(source, strict=False).rows if r["label"] is not None]
            _lengths_cache[key] = token_lengths(rows, load_tokenizer(cfg.model.name_or_path)).total
        except (DataError, OSError, ValueError) as e:  # unreadable data or tokenizer: no length-based plan
            _lengths_cache[key] = None
            _lengths_cache[key + ("error",)] = str(e)
    return _lengths_cache[key]


def model_params(cfg) -> float | None:
    from studio.training import memory

    try:
        return float(memory.arch_for(cfg.model.name_or_path, fetch=False).total_params())
    except Exception:  # unknown or not downloaded: no estimate
        return None


def cores() -> int:
    try:
        import torch

        return max(1, torch.get_num_threads())
    except Exception:
        return os.cpu_count() or 1


# ---- the estimate ---------------------------------------------------------------------------------------------------

def estimate(cfg, lengths: list[int] | None = None, params: float | None = None,
             n_cores: int | None = None, converted: bool | None = None, device=None,
             world: int = 1) -> Duration | None:
    """The predicted duration of ``cfg`` on the CPU ``device`` (a ``models.DeviceInfo``; its ``bf16`` decides the
    time constant, the host CPU is never asked; None: a CPU without native bf16); None when the model's size is
    unknown. ``lengths``: the training rows' token lengths (``data_lengths``); without them every row counts as
    max_length. ``world``: the processes training it (the run plan's ``world``; the Train tab's process: 1)."""
    from studio.training import speed
    from studio.config.run import BUNDLED_MODEL, resolve_epochs

    params = params if params is not None else model_params(cfg)
    if not params:
        return None
    t = cfg.train
    seq = cfg.kto.max_length
    clipped = [min(n, seq) for n in lengths] if lengths else []
    n_rows = len(clipped) if lengths else None
    mean_tok = sum(clipped) / len(clipped) if clipped else float(seq)
    # a batch pads to its longest row; length-grouped batches pad little, others to about the 90th percentile
    pad_tok = mean_tok if cfg.data.length_grouping or not clipped else sorted(clipped)[int(0.9 * (len(clipped) - 1))]
    rows_per_step = t.per_device_train_batch_size * t.gradient_accumulation_steps
    n_eval = 0
    if cfg.data.eval_file:  # the Data tab's held-out file: its own rows
        held = data_lengths(cfg.updated({"data.train_file": cfg.data.eval_file, "data.eval_file": None}))
        n_eval = len(held) if held else 0
        if cfg.data.eval_max_rows:  # the engine scores at most eval_max_rows of them
            n_eval = min(n_eval, cfg.data.eval_max_rows)
    elif n_rows is not None and cfg.data.eval_fraction > 0:
        n_eval = int(round(n_rows * cfg.data.eval_fraction))
        if cfg.data.eval_max_rows:
            n_eval = min(n_eval, cfg.data.eval_max_rows)
        n_rows -= n_eval
    # epochs 'auto' resolved for the rows trained on by the run plan's rule (config.run.resolve_epochs)
    epochs = resolve_epochs(t.num_train_epochs, n_rows) or 1.0
    if t.max_steps and t.max_steps > 0:
        steps = t.max_steps
    elif n_rows:
        # as transformers counts them: ceil(epochs x steps an epoch)
        steps = max(1, math.ceil(math.ceil(n_rows / rows_per_step) * epochs))
    else:
        return None
    n_cores = n_cores or cores()
    scale = params / 1e9 * CALIBRATION_CORES / min(max(n_cores, 1), 16)
    per_token = seconds_per_token_gparam(cfg, device) * scale
    per_pass = seconds_per_pass_gparam(cfg, device) * scale  # a pass: per_device_train_batch_size rows
    if t.gradient_checkpointing:
        per_token *= CHECKPOINTING_FACTOR
        per_pass *= CHECKPOINTING_FACTOR
    tokens_per_step = rows_per_step * pad_tok
    step_s = tokens_per_step * per_token + t.gradient_accumulation_steps * per_pass
    reference_s = 0.0
    precompute = speed.should_precompute_ref(cfg.kto.precompute_ref_log_probs, n_rows or steps * rows_per_step,
                                             t.max_steps, rows_per_step, epochs)
    if precompute:
        ref_rows = n_rows or steps * rows_per_step
        ref_passes = math.ceil(ref_rows / t.per_device_train_batch_size)
        reference_s = (ref_rows * pad_tok * per_token + ref_passes * per_pass) * REFERENCE_SHARE
        step_s *= 1 - REFERENCE_SHARE
    eval_rows = 0
    if cfg.data.evaluate_after:
        eval_rows = min(EVAL_LIMIT, n_eval)
    eval_s = eval_rows * mean_tok * per_token * EVAL_SHARE
    check_s = min(EVAL_LIMIT, n_eval) * mean_tok * per_token * EVAL_SHARE / 2
    eval_loss_s = 0.0
    if n_eval and world > 1:
        # without the held-out watch (several processes) transformers evaluates every save_steps and once more at
        # the last step (TrainerControl's end-of-training eval)
        passes = steps // t.save_steps + (1 if steps % t.save_steps else 0)
        eval_loss_s = n_eval * pad_tok * per_token * EVAL_LOSS_SHARE * passes
    elif n_eval and cfg.watch.every_steps != 0:
        # the held-out watch (studio/training/watch.py) scores the tuned side every few steps; the base side once
        from studio.training import watch

        every = (watch.auto_every(eval_rows or n_eval, rows_per_step, steps) if cfg.watch.every_steps == "auto"
                 else int(cfg.watch.every_steps))
        # a check falling on the last step is the scoring after training, counted above
        eval_s += ((steps - 1) // max(every, 1)) * check_s
    if converted is None:
        from studio.models import bundled

        converted = cfg.model.name_or_path != BUNDLED_MODEL or bundled.is_converted()
    startup = STARTUP_S + (0 if converted else CONVERT_S)
    notes = [] if lengths else ["Row lengths unknown: counted every row at max_length."]
    return Duration(steps=steps, rows_per_step=rows_per_step, tokens_per_step=tokens_per_step, step_s=step_s,
                    startup_s=startup, reference_s=reference_s, train_s=steps * step_s, eval_s=eval_s,
                    save_s=SAVE_S, notes=notes, eval_loss_s=eval_loss_s, check_s=check_s)


def seconds_per_token_gparam(cfg, device=None) -> float:
    """The time constant for the math a CPU run of ``cfg`` does on ``device`` (``models.cpu_autocast``'s rule on the
    DeviceInfo the plan was given; None: a CPU without native bf16, float32 math)."""
    return SECONDS_PER_TOKEN_GPARAM_BF16 if _autocast(cfg, device) else SECONDS_PER_TOKEN_GPARAM


def seconds_per_pass_gparam(cfg, device=None) -> float:
    """The fixed time a forward-and-backward pass costs on top of its tokens, per billion parameters (bf16 autocast
    casts the frozen weights every pass; float32: none counted), on the CPU ``device`` as ``seconds_per_token_gparam``."""
    return SECONDS_PER_PASS_GPARAM_BF16 if _autocast(cfg, device) else SECONDS_PER_PASS_GPARAM


def _autocast(cfg, device) -> bool:
    from studio.models import load as models

    cpu = device if device is not None and device.kind == "cpu" else models.DeviceInfo(kind="cpu", name="cpu")
    return models.cpu_autocast(cfg, cpu)


# ---- the CPU plan ---------------------------------------------------------------------------------------------------

def cpu_seq(lengths: list[int] | None, current: int) -> int:
    """max_length from the data's own lengths: the 90th percentile rounded up to 64 tokens, within 128-512."""
    if not lengths:
        return max(CPU_SEQ_MIN, min(current, CPU_SEQ_MAX))
    ordered = sorted(lengths)
    q = ordered[min(len(ordered) - 1, int(CPU_LENGTH_QUANTILE * len(ordered)))]
    return int(min(CPU_SEQ_MAX, max(CPU_SEQ_MIN, math.ceil(q / CPU_SEQ_STEP) * CPU_SEQ_STEP)))


def cpu_plan(cfg, lengths: list[int] | None = None, ram_gib: float | None = None,
             effective_batch: int | None = None, target_s: float = CPU_TARGET_TRAIN_S,
             device=None) -> dict[str, Any]:
    """Run-config changes that make ``cfg`` finish in minutes on this CPU: max_length from the data, 8 rows a step
    (2 per pass; fewer when the recipe's effective batch is smaller), no gradient checkpointing where memory allows,
    no GPU-only settings, at most CPU_EVAL_ROWS held-out rows (checked at least about ``watch.FEWEST_CHECKS`` times:
    ``watch.auto_every``), and a step cap that keeps training and held-out
    scoring near ``target_s`` seconds (never more than the run's epochs - 'auto': up to 3 passes over a small
    file - never under CPU_MIN_STEPS steps) on the CPU ``device`` (``estimate``'s)."""
    from studio.training import memory

    seq = cpu_seq(lengths, cfg.kto.max_length)
    eff = effective_batch or cfg.train.per_device_train_batch_size * cfg.train.gradient_accumulation_steps
    batch = CPU_BATCH
    accum = max(1, math.ceil(min(eff, CPU_ROWS_PER_STEP) / batch))
    checkpointing = False
    if ram_gib:
        try:
            arch = memory.arch_for(cfg.model.name_or_path, fetch=False)
            e = memory.estimate(arch, "full", memory.Settings(seq=seq, batch=batch, rank=cfg.lora.r, compute_bytes=4,
                                                              gradient_checkpointing=False, optim="adamw_torch"))
            checkpointing = e.total_gib > 0.5 * ram_gib  # keep half the RAM for the rest of the machine
        except Exception:
            checkpointing = True
    changes: dict[str, Any] = {
        "kto.max_length": seq, "train.per_device_train_batch_size": batch, "train.gradient_accumulation_steps": accum,
        "train.gradient_checkpointing": checkpointing, "memory.micro_batch_size": None,
        "model.gpu_memory_gib": None, "model.load_in_4bit": False, "model.backend": "full",
        "train.optim": "adamw_torch", "train.max_steps": -1, "data.eval_max_rows": CPU_EVAL_ROWS,
    }
    d = estimate(cfg.updated(changes), lengths, device=device)
    if d is None or d.step_s <= 0:
        return changes
    # the held-out scoring comes out of the same budget, counted at the cap (the watch's checks during training
    # grow with the steps); a capped run may lose the up-front reference pass (it pays only when nearly every row is
    # visited), which makes its steps dearer: re-estimate at each cap
    cap = d.steps
    while cap > CPU_MIN_STEPS:
        capped = estimate(cfg.updated({**changes, "train.max_steps": cap}), lengths, device=device)
        scoring = capped.eval_s + capped.eval_loss_s
        if capped.train_s + capped.reference_s + scoring <= target_s:
            break
        # at most the steps the whole budget pays for, then down one at a time as the scoring is re-counted
        cap = max(CPU_MIN_STEPS, min(cap - 1, int(target_s // capped.step_s)))
    if cap < d.steps:
        changes["train.max_steps"] = cap
    return changes


def ram_gib() -> float | None:
    try:
        import psutil

        return psutil.virtual_memory().total / 2**30
    except Exception:
        return None
