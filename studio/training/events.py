"""What a run tells its front ends: the phases with their labels and ETA, the trainer callback that turns TRL's
steps into engine events (and reads the stop flag), memory use, and errors in plain words with what to change.
No Gradio, no TRL at import time (Unsloth must be imported before transformers)."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from studio.config.run import ConfigError, RunConfig
from studio.runs import folder


def explain_error(exc: BaseException, cfg: RunConfig | None = None) -> str:
    """A plain-words message with what to change, for errors users meet."""
    import torch

    from studio.data.normalize import DataError
    from studio.models.load import ModelLoadError

    if isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower():
        hint = []
        if cfg is not None:
            hint.append(f"lower kto.max_length (now {cfg.kto.max_length})")
            if cfg.train.per_device_train_batch_size > 2:
                hint.append(f"lower train.per_device_train_batch_size (now {cfg.train.per_device_train_batch_size}, "
                            "minimum 2) and raise gradient_accumulation_steps")
            if (cfg.memory.micro_batch_size or cfg.train.per_device_train_batch_size) > 1:
                hint.append("set memory.micro_batch_size to 1 (gradients one row at a time, the same update)")
            if not cfg.train.gradient_checkpointing:
                hint.append("turn on train.gradient_checkpointing")
            if not cfg.model.load_in_4bit:
                hint.append("turn on model.load_in_4bit")
        hint.append("pick a smaller model or the preset for your card (Model & preset tab: auto-fit)")
        return "The GPU ran out of memory. To fit: " + "; ".join(hint) + "."
    if isinstance(exc, (ConfigError, DataError, ModelLoadError)):
        return str(exc)
    from studio.runs import checkpoints

    if isinstance(exc, checkpoints.DiskFull):
        return str(exc)
    text = str(exc)
    # torch.save and safetensors report a full disk in their own words ("unexpected pos"), not as OSError 28
    if checkpoints.is_disk_full(exc):
        filename = getattr(exc, "filename", None)
        where = cfg.run_dir() if cfg is not None else (Path(filename).parent if filename else None)
        return (str(checkpoints.disk_full(where, None)) if where is not None else
                "The disk filled up while saving: free some space, then resume the run from its latest checkpoint.")
    if _is_compiler_error(exc):
        model = cfg.model.name_or_path if cfg is not None else "this model"
        first = (text.strip().splitlines() or [""])[0][:160]
        return (f"PyTorch's compiler (torch Inductor) failed to build the fused kernels Unsloth uses for {model} "
                f"({type(exc).__name__}{': ' + first if first else ''}): a known incompatibility of some Unsloth model "
                "paths with some torch versions, not a problem with your data or settings. Train on the PEFT + "
                "bitsandbytes path instead (model.backend: bnb; the Model & preset tab's auto-fit says whether it "
                "fits your card), start the studio with Unsloth's compiler off (UNSLOTH_COMPILE_DISABLE=1 python "
                "app.py), or pick another model. The full traceback is in the run folder's error.log.")
    return f"{type(exc).__name__}: {exc}. The full traceback is in the run folder's error.log."


def _is_compiler_error(exc: BaseException) -> bool:
    """torch.compile / Inductor failures (InductorError, BackendCompilerFailed), also when wrapped by another error."""
    seen = 0
    while exc is not None and seen < 5:
        kind = type(exc)
        if kind.__name__ in ("InductorError", "BackendCompilerFailed") or kind.__module__.startswith(
                ("torch._inductor", "torch._dynamo")):
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


PHASE_LABELS = {"data": "Preparing data", "convert": "Converting the model", "model": "Loading the model",
                "reference": "Reference pass", "training": "Training", "evaluating": "Eval loss",
                "scoring": "Held-out scoring", "saving": "Saving"}


def current_phase(events: list[dict[str, Any]], now: float | None = None) -> dict[str, Any] | None:
    """The latest ``phase`` event with what front ends show: ``label``, ``elapsed_s`` in this phase (from its first
    event, or from where its count started again at a lower number: a new pass) and ``eta_s`` (None without counts): the phase's own rate so far (first to latest counted event), counted
    down from the latest event, so it keeps moving between events. None before the first phase event."""
    phases = [e for e in events if e.get("type") == "phase"]
    if not phases:
        return None
    last = dict(phases[-1])
    now = time.time() if now is None else now
    same = [e for e in phases if e["phase"] == last["phase"]]
    # a phase that runs again (the held-out rows scored by the base model, later by the tuned one) counts from 0
    # again: its clock and rate start at that pass, not at the first pass's start
    for i in range(len(same) - 1, 0, -1):
        if same[i].get("done") is not None and (same[i - 1].get("done") or 0) > same[i]["done"]:
            same = same[i:]
            break
    counted = [e for e in same if e.get("done") is not None]
    eta, note = None, None
    if counted and last.get("total") and last.get("done") is not None:
        # the rate of the units measured so far; once a few are, without the first one, which carries the warm-up
        # (a first training step on a CPU can take several times the next ones)
        measured = counted[1:] if len(counted) >= 3 else counted
        first, latest = measured[0], measured[-1]
        left = last["total"] - latest["done"]
        if left <= 0:
            note = "finishing…"  # all counted: the phase ends (and the next one starts) any moment
        elif latest["done"] > first["done"] and latest["time"] > first["time"]:
            per_unit = (latest["time"] - first["time"]) / (latest["done"] - first["done"])
            eta = per_unit * left - (now - latest["time"])
            if eta <= 0:  # the current unit takes longer than the ones before: not 0:00, re-measuring
                eta, note = None, "measuring…"
        else:
            note = "measuring…"  # no unit measured yet (the first step is running)
    last.update(label=PHASE_LABELS.get(last["phase"], last["phase"].capitalize()),
                elapsed_s=max(0.0, now - same[0]["time"]), eta_s=eta, eta_note=note)
    return last


def make_callback(engine, job):
    """Bridges transformers' callback API to engine events and the stop flag (built lazily: Unsloth must be
    imported before transformers, so this module does not import transformers at import time)."""
    from transformers import TrainerCallback

    from studio.training import health

    class EngineCallback(TrainerCallback):
        def __init__(self):
            self.t0 = self.last_t = time.time()
            self.last_tokens, self.start_step = None, 0

        def on_train_begin(self, args, state, control, **kw):
            self.t0 = self.last_t = time.time()
            self.start_step = state.global_step
            engine.emit(job, "progress", step=state.global_step, max_steps=state.max_steps,
                         epoch=state.epoch or 0.0, elapsed_s=0.0, eta_s=None)
            engine.phase(job, "training", "Training", state.global_step, state.max_steps)

        def on_save(self, args, state, control, **kw):
            path = folder.checkpoint_dir(args.output_dir, state.global_step)
            if path.is_dir():
                engine.emit(job, "checkpoint", step=state.global_step, path=str(path))

        def _diverged(self, control, step: int, what: str, names: list[str]) -> None:
            if job.diverged is None:
                job.diverged = {"step": step, "what": what, "names": names}
            control.should_training_stop = True
            control.should_save = False  # a checkpoint of this step would not be finite (or not this step's)

        def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
            """The first non-finite gradient stops the run before the optimizer applies it (its grads are dropped,
            so AdamW skips the step and the weights stay as they were)."""
            if model is None or job.diverged is not None:
                return control
            params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
            bad = health.non_finite_tensors((n, p.grad) for n, p in params)
            if bad:
                for _, p in params:
                    p.grad = None
                self._diverged(control, state.global_step + 1, "gradient", bad)
            return control

        def on_step_end(self, args, state, control, model=None, **kw):
            engine.phase(job, "training", "Training", state.global_step, state.max_steps)
            if model is not None and job.diverged is None:
                bad = health.non_finite_tensors((n, p) for n, p in model.named_parameters() if p.requires_grad)
                if bad:
                    self._diverged(control, state.global_step, "adapter weights", bad)
            if job.diverged is not None:
                self._diverged(control, state.global_step, "", [])
            elif _agreed(job.should_stop()):  # the run folder's stop request (any viewer), on every rank at once
                engine.stopping(job)
                control.should_save = True
                control.should_training_stop = True
            return control

        def on_prediction_step(self, args, state, control, eval_dataloader=None, **kw):
            """The periodic evaluation on the eval rows (every save_steps): its own phase, then back to training."""
            self.eval_batches = getattr(self, "eval_batches", 0) + 1
            try:
                total = len(eval_dataloader) if eval_dataloader is not None else None
            except TypeError:
                total = None
            engine.phase(job, "evaluating", "Eval loss on the held-out rows", self.eval_batches, total)

        def on_evaluate(self, args, state, control, **kw):
            self.eval_batches = 0
            engine.phase(job, "training", "Training", state.global_step, state.max_steps)

        def on_log(self, args, state, control, logs=None, **kw):
            logs = dict(logs or {})
            bad = health.non_finite_logs(logs)
            if bad:
                self._diverged(control, state.global_step, " and ".join(bad), [])
            if "loss" not in logs and "eval_loss" not in logs:
                return
            now = time.time()
            event: dict[str, Any] = {k: v for k, v in logs.items() if isinstance(v, (int, float))}
            tokens = logs.get("num_tokens")
            if tokens is not None and self.last_tokens is not None and now > self.last_t:
                event["tokens_per_s"] = (tokens - self.last_tokens) / (now - self.last_t)
            elif tokens is not None and now > self.t0:
                event["tokens_per_s"] = tokens / (now - self.t0) if self.start_step == 0 else None
            if tokens is not None:
                self.last_tokens, self.last_t = tokens, now
            elapsed = now - self.t0
            done_steps = state.global_step - self.start_step
            eta = (state.max_steps - state.global_step) * elapsed / done_steps if done_steps > 0 else None
            event.update(step=state.global_step, max_steps=state.max_steps, epoch=state.epoch or 0.0,
                         elapsed_s=elapsed, eta_s=eta, **memory_use())
            if job.watch is not None and "loss" in logs:
                event.update(job.watch.take_pending())  # the held-out check of this step (studio/training/watch.py)
            engine.emit(job, "metrics", **event)

    return EngineCallback()


def _agreed(flag: bool) -> bool:
    """Under several processes (`accelerate launch`), a stop seen by one rank is every rank's (they must leave the
    training loop at the same step); one process: the flag itself."""
    try:
        import torch
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            t = torch.tensor([1.0 if flag else 0.0])
            if dist.get_backend() == "nccl":
                t = t.cuda()
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            return bool(t.item() > 0)
    except Exception:  # noqa: BLE001 - no process group: this process decides
        pass
    return flag


def memory_use() -> dict[str, float | None]:
    """Memory now, in GiB: on CUDA the peak allocated by tensors (gpu_mem_gib), what the process holds from the
    card (gpu_reserved_gib: what other programs cannot use) and the card's size; on every device the process's
    RAM and the machine's."""
    import torch

    out: dict[str, float | None] = {"gpu_mem_gib": None, "gpu_reserved_gib": None, "gpu_total_gib": None,
                                    "ram_gib": None, "ram_total_gib": None}
    if torch.cuda.is_available():
        gib = 2**30
        out.update(gpu_mem_gib=round(torch.cuda.max_memory_allocated() / gib, 3),
                   gpu_reserved_gib=round(torch.cuda.memory_reserved() / gib, 3),
                   gpu_total_gib=round(torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
                                       / gib, 3))
    try:
        import psutil

        out.update(ram_gib=round(psutil.Process().memory_info().rss / 2**30, 3),
                   ram_total_gib=round(psutil.virtual_memory().total / 2**30, 3))
    except Exception:  # psutil is optional here; the plots simply lack RAM
        pass
    return out
