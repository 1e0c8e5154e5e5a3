"""The training engine: TRL's KTOTrainer in a background thread, observable through events.

Any front end (the Gradio Train tab, the CLI's progress bar, tests) starts a job with ``Engine.start`` and polls
``Engine.events(since)``. Events are plain dicts with a ``type``:

- ``status``: a message for the log ("Device: ...", "Training…", a data note, ...);
- ``phase``: what the job is doing now, with progress: ``phase`` (a short name: "data", "convert", "model",
  "reference", "training", "evaluating", "scoring", "saving"), ``message``, ``done`` and ``total`` (ints, or None
  when the phase cannot count its work). A phase lasts until the next phase event; front ends show the latest one
  with a bar, its own ETA (from the phase's first event and ``done / total``) and a clock that keeps moving;
- ``started``: the job was accepted (emitted by ``start``, before the thread runs), with resume_from;
- ``metrics``: one logged step: step, max_steps, epoch, loss, rewards/chosen, rewards/rejected, rewards/margins, kl,
  learning_rate, tokens_per_s, elapsed_s, eta_s, and memory: gpu_mem_gib (peak allocated), gpu_reserved_gib
  (held from the card), gpu_total_gib (the card), ram_gib / ram_total_gib (this process / the machine);
- ``checkpoint``: a resumable checkpoint was saved: step, path;
- ``error``: what went wrong and a plain-words fix; the job ends, the process stays up;
- ``done``: the job ended (finished or stopped), with the adapter path.

Every event (with the job's ``state`` then) is also appended to the run folder's ``events.jsonl``
(``folder.append_event``): the run folder is the interface, and every viewer - this app's Train tab, a second app on
the same studio home, the CLI - renders from it (``studio.runs.live``). The trainer holds the run folder's kernel
lock for the whole job (``studio.runs.lock``), so a viewer tells a live run from one whose process is gone.

A stop request is a file in the run folder (``folder.request_stop``: ``Engine.stop``, a second app's Stop,
``python -m studio stop RUN``), checked at the end of each optimizer step: the trainer then saves a resumable
checkpoint and the engine saves the adapter, so stopping never loses the work done. Only one job runs at a time.
"""
from __future__ import annotations

import logging
import os
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from studio.config.run import RunConfig
from studio.errors import UsageError
from studio.runs import folder
from studio.training.events import explain_error, make_callback

log = logging.getLogger(__name__)


class JobRunning(UsageError, RuntimeError):
    pass


@dataclass
class Job:
    id: str
    config: RunConfig
    resume_from: str | None = None
    state: str = "starting"  # starting | running | stopping | finished | stopped | failed
    events: list[dict[str, Any]] = field(default_factory=list)
    stop_requested: bool = False
    adapter_path: str | None = None
    error: str | None = None
    backend: str | None = None
    started_at: float = field(default_factory=time.time)
    ended_at: float | None = None
    thread: threading.Thread | None = None
    eval_rows: list[dict[str, Any]] | None = None  # held-out rows, scored after training
    watch: Any = None  # studio.watch.Watch: the held-out rows scored during training
    plan: Any = None  # studio.training.plan.RunPlan: every `auto` of the config decided for this machine and data
    # the first non-finite gradient, weight or logged number: {"step", "what", "names"} (studio.training.events)
    diverged: dict[str, Any] | None = None
    lock: Any = None  # studio.runs.lock.Claim: the run folder, held while the job runs
    # the trained model, weakly (studio.models.leftovers: emptied if anything still holds it after the run), and the
    # GPU memory allocated before the run, which the end of the run returns to
    model_ref: Any = None
    model_storages: Any = None  # studio.models.leftovers.storage_refs: which big weights outlive the run, on CUDA
    gpu_before: int = 0
    optimizer_mark: Any = None  # studio.models.leftovers.optimizer_overrides, taken before the run

    def should_stop(self) -> bool:
        """Stop asked for, here (``Engine.stop``) or by any viewer through the run folder's stop request."""
        if not self.stop_requested and folder.stop_requested(self.run_dir):
            self.stop_requested = True
        return self.stop_requested

    @property
    def run_dir(self) -> Path:
        return self.config.run_dir()

    @property
    def done(self) -> bool:
        return self.state in ("finished", "stopped", "failed")

    def metrics(self) -> list[dict[str, Any]]:
        return [e for e in self.events if e["type"] == "metrics"]


class Engine:
    """Runs one KTO job at a time in a background thread."""

    def __init__(self, on_event: Callable[[Job, dict], None] | None = None):
        self._lock = threading.Lock()
        self.job: Job | None = None
        self.on_event = on_event  # e.g. the run history; called from the training thread
        self.extra_callbacks: list = []  # more transformers TrainerCallbacks for every run (benchmarks, tests)

    # ---- control -------------------------------------------------------------------------------------------------
    def start(self, cfg: RunConfig, resume_from: str | None = None) -> Job:
        """Start training ``cfg``; ``resume_from`` is a checkpoint folder or 'latest'. Raises JobRunning if busy."""
        with self._lock:
            if self.job is not None and not self.job.done:
                raise JobRunning(f"a training job is already running ({self.job.config.name}): stop it or wait")
            if self.job is not None and self.job.thread is not None:
                self.job.thread.join(30)  # a finished job's thread is releasing its run folder
            resume_note = None
            if resume_from is not None:  # this run's newest whole checkpoint, or a named one that is whole
                resume_from, resume_note = folder.resume_point(cfg.run_dir(), resume_from)
            claim = None
            if _is_main_process():
                from studio.runs import lock as runlock

                claim = runlock.claim(cfg.run_dir())  # RunBusy (a ConfigError) while another process trains into it
                try:
                    if resume_from:
                        folder.forget_metrics_after(cfg.run_dir(), folder.step_of(resume_from))
                    else:  # a new run owns the folder: checkpoints an older run left here are not resumed
                        folder.start_fresh(cfg.run_dir())
                    folder.clear_stop(cfg.run_dir())  # a request a finished run left is not this job's
                    folder.write_config(cfg.run_dir(), cfg)
                except BaseException as e:
                    runlock.release(claim)
                    if isinstance(e, OSError):
                        from studio.config.run import ConfigError

                        raise ConfigError(f"cannot write the run folder {cfg.run_dir()}: {e.strerror or e}. Free "
                                          "some space or choose another output_dir") from e
                    raise
            job = Job(id=uuid.uuid4().hex[:12], config=cfg, resume_from=resume_from, lock=claim)
            self.job = job
            self.emit(job, "started", resume_from=resume_from, run_dir=str(cfg.run_dir()), job_id=job.id,
                      name=cfg.name, pid=os.getpid())
            if resume_note:
                self.emit(job, "status", message=resume_note)
            job.thread = threading.Thread(target=self._run, args=(job,), name=f"kto-{job.id}", daemon=True)
            job.thread.start()
            return job

    def stop(self) -> bool:
        """Ask the current job to stop: the run folder's stop request, which the trainer checks every step."""
        job = self.job
        if job is None or job.done:
            return False
        if _is_main_process():
            folder.request_stop(job.run_dir, by=f"this studio (process {os.getpid()})")
        self.stopping(job)
        return True

    def stopping(self, job: Job) -> None:
        """The job saw a stop request: say so once."""
        first = not getattr(job, "_stop_said", False)
        job.stop_requested = True
        job._stop_said = True
        if job.state == "running":
            job.state = "stopping"
        if first:
            self.emit(job, "status", message="Stopping after the current step; the adapter will be saved…")

    def wait(self, timeout: float | None = None) -> Job | None:
        job = self.job
        if job and job.thread:
            job.thread.join(timeout)
        return job

    def events(self, since: int = 0) -> list[dict[str, Any]]:
        job = self.job
        return job.events[since:] if job else []

    @property
    def busy(self) -> bool:
        return self.job is not None and not self.job.done

    # ---- the job -------------------------------------------------------------------------------------------------
    def emit(self, job: Job, type_: str, **data) -> None:
        """One event of ``job``: kept in memory, appended to the run folder's events.jsonl (with the job's state),
        passed to ``on_event``."""
        event = {"type": type_, "time": time.time(), **data}
        job.events.append(event)
        if _is_main_process():
            try:
                folder.append_event(job.run_dir, {**event, "state": data.get("state", job.state)})
                if type_ == "metrics":
                    folder.append_metrics(job.run_dir, event)
            except OSError:
                pass
        if self.on_event:
            try:
                self.on_event(job, event)
            except Exception:  # a broken observer must not kill training
                log.exception("event observer failed")

    def phase(self, job: Job, phase: str, message: str, done: int | None = None, total: int | None = None) -> None:
        self.emit(job, "phase", phase=phase, message=message, done=done, total=total)

    def _run(self, job: Job) -> None:
        """The job's thread: any failure ends the run as 'failed' (error.log, a plain-words reason, the events) and
        the process keeps serving. The model, optimizer and caches are released (the trainer lives only in
        ``_train``'s frame, gone by then) before the run says it is done, so whoever reacts to 'done' (the Chat tab
        loading a model, the next run) finds the memory given back; then the run folder is let go."""
        from studio.models import leftovers

        job.gpu_before = leftovers.cuda_allocated()
        job.optimizer_mark = leftovers.optimizer_overrides()
        final: dict[str, Any] | None = None
        try:
            final = self._train(job)
        except BaseException as exc:  # noqa: BLE001 - every failure becomes an event; the process stays up
            job.state = "failed"
            try:
                job.error = explain_error(exc, job.config)
            except Exception:  # noqa: BLE001 - explaining must not fail the failure report
                job.error = f"{type(exc).__name__}: {exc}. The full traceback is in the run folder's error.log."
            try:
                folder.write_error(job.run_dir, traceback.format_exc())
            except OSError:
                pass
            # the traceback goes to error.log (and the debug log), the plain message to the user once
            log.debug("training failed: %s", traceback.format_exc())
            self.emit(job, "error", message=job.error)
            final = dict(state="failed", adapter=None, message=job.error)
            del exc  # its traceback holds the trainer's frame
        try:
            self._release(job, final["state"])
        finally:
            job.state = final["state"]
            job.ended_at = time.time()
            self.emit(job, "done", **final)
            if _is_main_process():
                from studio.runs import lock as runlock

                try:
                    folder.clear_stop(job.run_dir)
                finally:
                    runlock.release(job.lock or job.run_dir)

    def _release(self, job: Job, state: str) -> None:
        """The finished run's memory back to the card: the watch's scorer, Python's garbage, CUDA's cache; a model
        something still holds is emptied in place (``studio.models.leftovers``), which the run folder records."""
        from studio.models import leftovers
        from studio.models.load import free_memory

        job.watch = None  # it holds the tuned model's scorer and the best step's adapter weights
        try:
            leftovers.forget_optimizer_overrides(job.optimizer_mark)
        except Exception:  # noqa: BLE001 - a bitsandbytes with another registry layout: reported by release below
            log.exception("letting go of bitsandbytes' optimizer registry failed")
        job.optimizer_mark = None
        free_memory()  # gc, then torch.cuda.empty_cache(): the GPU memory goes back to the card
        try:
            found = leftovers.release(job.model_ref, job.gpu_before, free_memory, job.model_storages)
        except Exception:  # noqa: BLE001 - the run has ended; its report must not fail it
            log.exception("releasing the finished run's memory failed")
            found = None
        job.model_ref = job.model_storages = None
        if found and _is_main_process():
            try:
                folder.append_event(job.run_dir, {"type": "memory", "time": time.time(), "state": state,
                                                  **found})
            except OSError:
                pass

    def _train(self, job: Job) -> dict[str, Any]:
        """Build the trainer and train; returns the run's 'done' event (``_run`` writes it)."""
        cfg = job.config
        job.run_dir.mkdir(parents=True, exist_ok=True)
        self.emit(job, "status", message=f"Run folder: {job.run_dir}")
        trainer = self._build(job)
        if trainer is None:  # stopped while loading
            return dict(state="stopped", adapter=None, message="Stopped before training began.")
        job.state = "stopping" if job.should_stop() else "running"
        self.emit(job, "status", message="Resuming training…" if job.resume_from else "Training…")
        trainer.train(resume_from_checkpoint=job.resume_from)
        model = getattr(trainer, "model", None)
        if job.diverged is None and model is not None:  # the last guard: never a non-finite adapter as the result
            from studio.training import health

            bad = health.non_finite_tensors((n, p) for n, p in model.named_parameters() if p.requires_grad)
            if bad:
                job.diverged = {"step": trainer.state.global_step, "what": "adapter weights", "names": bad}
        if job.diverged is not None:  # stopped at a NaN/inf: the last good checkpoint, and the run failed
            from studio.training.diverged import roll_back

            return roll_back(self, job, trainer)
        # the held-out watch scores the last step and loads the adapter to keep (best step, or rolled back)
        watched = job.watch.finish(trainer.model, trainer.state.global_step, job.stop_requested) \
            if job.watch is not None else None
        adapter = folder.adapter_dir(job.run_dir)
        self.phase(job, "saving", "Saving the adapter…")
        trainer.save_model(str(adapter))
        job.adapter_path = str(adapter)
        verdict = ""
        if watched is not None:
            verdict = self._report_watch(job, watched)
        elif not job.stop_requested and cfg.data.evaluate_after and job.eval_rows and _is_main_process():
            verdict = self._evaluate(job, trainer)
        if _is_main_process():
            self._report_health(job, collapsed=bool(watched and watched["collapsed"]))
        step = trainer.state.global_step
        return dict(state="stopped" if job.stop_requested else "finished", adapter=str(adapter), step=step,
                    message=f"{'Stopped' if job.stop_requested else 'Finished'} at step {step}. "
                            f"Adapter saved to {adapter}" + verdict)

    def _report_watch(self, job: Job, watched: dict[str, Any]) -> str:
        """Store the kept adapter's held-out evaluation (eval.json) and say in words what the watch saw."""
        from studio.tuned import evaluate
        from studio.training import health

        cfg = job.config
        result = dict(watched["result"])
        which = "final adapter" + (f", rolled back to step {watched['kept_step']}" if watched["rolled_back"] else "")
        result.update(run=job.run_dir.name, run_dir=str(job.run_dir), adapter=job.adapter_path,
                      adapter_label=f"{job.run_dir.name} · {which}", base_model=cfg.model.name_or_path,
                      data="held-out rows of the run" if not cfg.data.eval_file else cfg.data.eval_file,
                      limit=cfg.data.eval_max_rows, created=time.strftime("%Y-%m-%dT%H:%M:%S"),
                      watch={k: v for k, v in watched.items() if k not in ("result", "message")})
        if cfg.data.evaluate_after:
            evaluate.write_eval(job.run_dir, result)
        line = evaluate.verdict_line(result)
        finding = health.held_out_learning(result, cfg.train.learning_rate, collapsed_run=watched["collapsed"])
        self.emit(job, "evaluation", summary=f"Held-out: {line}", rewards=result["rewards"],
                   drift=result.get("drift"), verdict=result.get("verdict"), watch=result["watch"],
                   finding=finding.as_dict() if finding else None)
        if watched["message"]:
            self.emit(job, "status", message=watched["message"])
        text = (" " + watched["message"] if watched["message"] else "") + f" Held-out ({which}): {line}."
        if finding and not watched["collapsed"]:
            text += f" ⚠️ {finding.title}. {finding.fix}"
        return text

    def _report_health(self, job: Job, collapsed: bool = False) -> None:
        """The run's health findings (studio.training.health), for every run: the CLI prints them, the history keeps them."""
        from studio.training import health

        findings = health.check_config(job.metrics(), job.config)
        icons = {health.ERROR: "🛑", health.WARNING: "⚠️", health.INFO: "ℹ️"}
        self.emit(job, "health", findings=[f.as_dict() for f in findings])
        for f in findings:
            where = f" (from step {f.step})" if f.step is not None else ""
            self.emit(job, "status", message=f"{icons[f.severity]} Health: {f.title}{where}. {f.meaning} "
                                              f"What to change: {f.fix}")
        if not findings:
            self.emit(job, "status", message="Health: no problems spotted in the training curves.")

    def _evaluate(self, job: Job, trainer) -> str:
        """Held-out base-vs-tuned scores with the model still in memory; a warning when nothing was learned."""
        from studio.tuned import evaluate
        from studio.training import health

        cfg = job.config
        rows = evaluate.limit_rows(job.eval_rows, cfg.data.eval_max_rows)
        self.emit(job, "status", message=f"Scoring {len(rows)} held-out rows, base vs tuned…")
        self.phase(job, "scoring", f"Scoring {len(rows)} held-out rows, base vs tuned…", 0, len(rows))
        try:
            model = trainer.model
            model.eval()
            result = evaluate.evaluate_rows(model, trainer.processing_class, rows, beta=cfg.kto.beta,
                                            max_length=cfg.kto.max_length)
        except Exception as e:  # the adapter is saved; a failed score must not fail the run
            self.emit(job, "status", message=f"Held-out evaluation skipped: {e}")
            return ""
        result.update(run=job.run_dir.name, run_dir=str(job.run_dir), adapter=job.adapter_path,
                      adapter_label=f"{job.run_dir.name} · final adapter", base_model=cfg.model.name_or_path,
                      data="held-out split of the run", limit=200, created=time.strftime("%Y-%m-%dT%H:%M:%S"))
        evaluate.write_eval(job.run_dir, result)
        r = result["rewards"]
        summary = (f" Held-out: implicit-reward accuracy "
                   f"{'–' if r.get('pair_accuracy') is None else format(r['pair_accuracy'], '.0%')}, "
                   f"margin {'–' if r.get('margin') is None else format(r['margin'], '+.3f')}.")
        finding = health.held_out_learning(result, cfg.train.learning_rate)
        self.emit(job, "evaluation", summary=summary.strip(), rewards=r,
                   finding=finding.as_dict() if finding else None)
        if finding:
            self.emit(job, "status", message=f"⚠️ {finding.title}. {finding.fix}")
            return summary + f" ⚠️ {finding.title}. {finding.fix}"
        return summary

    def _build(self, job: Job):
        from studio import data as data_mod
        from studio.runs import cache as run_cache, checkpoints
        from studio.training import logprob, microbatch, speed, plan as planner, trl_seam
        from studio.models import load as models

        cfg = job.config
        _quiet_libraries()
        device = models.detect_device()
        # every `auto` decided once, here; RunWontFit (a ConfigError) when a CUDA run is predicted not to fit
        plan = planner.plan_run(cfg, device)
        cfg = job.config = plan.config(cfg)  # fill_card's split of the batch, if any
        backend = job.backend = plan.backend
        speed.fast_attention_kernels()
        self.emit(job, "status", message=f"Device: {device.name} ({device.kind}); path: {models.BACKEND_LABELS[backend]}",
                   backend=backend, device=device.as_dict(), plan=plan.as_dict())
        for note in plan.setup_notes:  # epochs and the reference are decided once the data is read
            self.emit(job, "status", message=note)
        self.emit(job, "status", message="Preparing data…")
        self.phase(job, "data", f"Reading and preparing {Path(data_mod.resolve(cfg.data.train_file)).name}…")
        td = data_mod.prepare_training(cfg)
        self.emit(job, "status", message=f"{len(td.train)} training rows ({td.n_desirable} desirable, "
                                          f"{td.n_undesirable} undesirable)" + (f"; {len(td.eval)} eval rows" if td.eval is not None else ""),
                   n_train=len(td.train), n_desirable=td.n_desirable, n_undesirable=td.n_undesirable)
        for note in td.notes:
            self.emit(job, "status", message=note)
        job.eval_rows = td.eval.to_list() if td.eval is not None else None
        if job.eval_rows is not None and _is_main_process():  # what a later evaluation reads (evaluate.held_out_rows)
            folder.write_heldout(job.run_dir, job.eval_rows)
        if cfg.data.length_grouping:
            td.train = speed.group_by_length(td.train, cfg.train.per_device_train_batch_size, cfg.train.seed)
        world = plan.world  # the plan's process count (plan.world_size: the one reader of WORLD_SIZE)
        plan = job.plan = plan.with_data(len(td.train))
        precompute = plan.precompute_ref
        if _is_main_process():
            plan.save(job.run_dir)
        if plan.epochs_note:  # epochs 'auto', decided for these rows
            self.emit(job, "status", message=plan.epochs_note)
        self.emit(job, "status", message=plan.precompute_note, plan=plan.as_dict())
        self.emit(job, "status", message="Speed-ups: " + (", ".join(
            (["length-grouped batches"] if cfg.data.length_grouping else [])
            + (["reference log-probs computed once before training"] if precompute else [])
            + (["policy and KL rows in one forward pass"] if plan.joint_pass else [])) or "none"))
        micro = plan.micro_batch
        if micro:
            self.emit(job, "status", message=microbatch.describe(micro, plan.batch), micro_batch_size=micro)
        if job.should_stop():
            return None
        from studio.models import bundled
        from studio.config.run import BUNDLED_MODEL

        if cfg.model.name_or_path == BUNDLED_MODEL and not bundled.is_converted():
            self.phase(job, "convert", "Converting the bundled SmolLM2-135M into a trainable checkpoint (once, "
                                        "about a minute on a CPU)…")
        else:
            self.phase(job, "model", f"Loading {cfg.model.name_or_path}…")

        def model_progress(m: str) -> None:
            self.emit(job, "status", message=m)
            self.phase(job, "convert" if m.startswith("Converting") else "model", m)

        loaded = models.load_for_training(cfg, device, progress=model_progress, frozen_dtype=plan.frozen_dtype,
                                          world=plan.world)
        import weakref

        try:
            job.model_ref = weakref.ref(loaded.model)
        except TypeError:  # not a model (a test's stand-in)
            job.model_ref = None
        from studio.models import leftovers

        job.model_storages = leftovers.storage_refs(loaded.model) if device.kind == "cuda" and job.model_ref else None
        if job.should_stop():
            return None
        if logprob.needs_fallback(device.kind):
            logprob.install_fallback(force=True)
        # TRL's KTOTrainer, or its subclass taking gradients micro_batch_size rows at a time (imported only now:
        # Unsloth must come before TRL)
        trainer_cls = microbatch.trainer_class(micro, plan.batch)
        if plan.joint_pass and not micro:
            from studio.training import joint_pass

            trainer_cls = joint_pass.trainer_class(trainer_cls)

        # one process: the held-out watch scores the eval rows (TRL's own eval loop would score them a second time)
        watching = td.eval is not None and world == 1 and _is_main_process()
        trl_eval = td.eval is not None and not watching
        kto_args = plan.kto_config(cfg, do_eval=trl_eval, eval_strategy="steps" if trl_eval else "no",
                                   eval_steps=cfg.train.save_steps if trl_eval else None)
        ref_pass_rows = plan.precompute_rows
        # the base model as loaded: its files and the settings that change its numbers (speed.reference_fingerprint)
        model_key = speed.reference_fingerprint(
            loaded.source.path, backend=backend, dtype=str(loaded.dtype), frozen_dtype=plan.frozen_dtype,
            device=device.kind, load_in_4bit=cfg.model.load_in_4bit, trust_remote_code=cfg.model.trust_remote_code)
        # what a resume reuses (studio.runs.cache): the prepared rows and reference log-probs an earlier start or
        # resume of this run stored, when they were made from the same rows, model and settings (one process:
        # rank 0 alone writes the run folder)
        store = folder.run_cache(job.run_dir) if model_key and world == 1 and _is_main_process() else None
        rows_key = ref_key = cached = None
        reused_ref = False
        train_rows = td.train
        if store is not None:
            rows_key = run_cache.key(rows=run_cache.rows_digest(td.train), model=model_key,
                                     max_length=kto_args.max_length, batch=kto_args.per_device_train_batch_size,
                                     truncation=getattr(kto_args, "truncation_mode", None), loss=kto_args.loss_type,
                                     versions=run_cache.library_versions())
            ref_key = run_cache.key(rows=rows_key, rows_per_pass=ref_pass_rows)
            cached = store.load_rows(rows_key)
        if cached is not None:
            train_rows, stored_ref = cached
            reused_ref = bool(precompute) and stored_ref == ref_key
            if not reused_ref:
                train_rows = run_cache.without_reference(train_rows)
            trainer_cls = trl_seam.taking_prepared(trainer_cls, [train_rows])
            self.emit(job, "status", message=f"Training rows: {len(train_rows)} tokenized rows taken from the run's "
                                              "cache" + (", with the reference model's log-probs" if reused_ref else ""))
            self.phase(job, "data", f"Reading {len(train_rows)} tokenized rows from the run's cache…")
        else:
            self.emit(job, "status", message="Tokenizing…")
            n_tok = len(td.train) + (len(td.eval) if trl_eval else 0)
            self.phase(job, "data", f"Tokenizing {n_tok} rows…")
        # the held-out rows go to TRL only for its own eval loop; the watch tokenizes and scores them itself
        trainer = trainer_cls(model=loaded.model, args=kto_args, train_dataset=train_rows,
                              eval_dataset=td.eval if trl_eval else None, processing_class=loaded.tokenizer,
                              callbacks=[make_callback(self, job), *self.extra_callbacks])
        _no_log_printing(trainer)
        if watching:
            from studio.training.watch import Watch

            job.watch = Watch(cfg, job.eval_rows, lambda type_, **d: self.emit(job, type_, **d),
                              stopping=lambda: job.stop_requested,
                              # a launch-bound small model scores in few, large passes
                              max_tokens=16384 if plan.joint_pass else 4096 if device.kind == "cuda" else 2048)
            if store is not None:  # the base model's scores, and the checks a resume starts from
                job.watch.cache = store.watch(
                    run_cache.key(rows=run_cache.rows_digest(job.watch.rows), model=model_key,
                                  max_length=cfg.kto.max_length, max_tokens=job.watch.max_tokens,
                                  versions=run_cache.library_versions()), run=folder.run_id(job.run_dir))
            trainer.add_callback(job.watch.callback(
                cfg.train.per_device_train_batch_size * cfg.train.gradient_accumulation_steps))
        # checkpoint-N appears only once complete, saying which run saved it
        checkpoints.atomic_saves(trainer, trl_seam, mark=lambda p: folder.mark_checkpoint(job.run_dir, p))
        dropped = speed.drop_reference_copy(trainer.model)
        if reused_ref and not dropped:  # the reference is a trained starting adapter, not the base the cache scored
            trainer.train_dataset = run_cache.without_reference(trainer.train_dataset)
            reused_ref = False
        if precompute and not job.stop_requested and reused_ref:
            trl_seam.set_precomputed(trainer, ref_pass_rows, model_key)
        elif precompute and not job.stop_requested:
            self.emit(job, "status", message=f"Computing the reference model's log-probs for {len(td.train)} rows "
                                              f"once ({ref_pass_rows} rows per pass)…")
            # frozen_dtype: reference log-probs cached while bitsandbytes upcast the embeddings (float32 residual
            # stream) are not this base's (model_key holds it)
            speed.precompute_reference(trainer, ref_pass_rows, model_key if dropped else None,
                                       progress=lambda d, t: self.phase(
                job, "reference", f"Reference model's log-probs, {ref_pass_rows} rows per pass", d, t))
            if store is not None:
                store.save_rows(rows_key, trainer.train_dataset, ref_key if dropped else None)
        elif store is not None and cached is None:
            store.save_rows(rows_key, trainer.train_dataset, None)
        return trainer


def _is_main_process() -> bool:
    """Under `accelerate launch` every rank runs an engine; only rank 0 writes the run folder's files."""
    return int(os.environ.get("RANK", "0")) == 0


def _quiet_libraries() -> None:
    try:
        import datasets

        datasets.disable_progress_bars()
    except Exception:
        pass


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _no_log_printing(trainer) -> None:
    """transformers adds a PrinterCallback (disable_tqdm) or a ProgressCallback that print TRL's raw log dicts
    ({'loss': '0.52', 'grad_norm': …}) to stdout; the front ends show the engine's events instead (CLI bars, UI)."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    for cb in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(cb)

