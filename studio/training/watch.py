"""The held-out watch: score held-out rows during training, keep the best step, stop and roll back on collapse.

While a run trains, its held-out rows (an eval file, or the data.eval_fraction split of whole prompts) are scored
every ``watch.every_steps`` optimizer steps with the tuned model; the base model's log-probs are computed once, at
the start (the adapter switched off). Each check gives the implicit-reward accuracy over paired prompts (with one
standard error), the reward margin and the **likelihood drift**: the desirable completions' mean log-prob per
token, tuned minus base. A learning model ranks good above bad while its drift stays near 0; a collapsing one can
still rank pairs (it lowers every completion, the bad ones a little more) while its drift falls by nats per token.

The numbers are merged into the training metrics of the step they were taken at (``heldout/accuracy``,
``heldout/accuracy_se``, ``heldout/margin``, ``heldout/drift``, ``heldout/n_pairs``), so they are in
metrics.jsonl, the run history, the Train tab's plots and the CLI's output.

Best step: among the checks whose drift is inside ``watch.best_max_drift`` (0.5 nat per token: a safe bound, tighter
than the collapse bound; a drift within one standard error of it counts as inside; when no check is inside, among
those inside ``watch.max_drift``), the **latest one that the most accurate check so far does not clearly beat**: clearly
means winning the same held-out pairs by more than ``LEAD_SE`` standard errors (a paired sign test). A
smaller lead is noise (a 5% split of a small file holds a few dozen pairs: ± 6 points; of an imbalanced one, with
10% desirable rows, eight pairs: ± 17), and of two steps that score alike the later one has learned from more data;
a clearly better earlier step still wins. Both allowances matter most on thin splits: on one with eight pairs, the
earlier rule (one standard error of accuracy, the bound read as exact) kept step 36 of 162 of the default run on
such a file (the trace of docs/RECIPES.md), which scored 58.3% on 254 pairs it never saw, where the last step scored
63.1%. No check taken after a collapse is seen is ever kept.
Its adapter weights are kept in memory (a LoRA adapter is small) and, with ``watch.keep_best``, written as the run's
adapter at the end. Collapse guard (``watch.stop_on_collapse``): a drift beyond ``watch.max_drift``, or KTO's KL
stuck at 0 while the rewards run away (studio.health.collapsed), stops the run and rolls back to the best step, or
to the untrained adapter when no check before the collapse was sound.

A resume reuses what the run's cache (``studio.runs.cache``, set as ``Watch.cache`` by the engine) holds: the base
model's log-probs, and the check of the step it resumes from when the run took one there. A step that was not checked
(a run stopped by hand) is not scored at the start of the resume: it is the step to roll back to only when no later
check is sound, and it is scored then.

Runs on one process only (a multi-GPU run keeps the score after training and no guard).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

from studio.tuned import evaluate, scoring
from studio.training import health

BUDGET = 0.06  # 'auto' spaces the checks so that they cost about this fraction of the training time
FORWARD_SHARE = 0.25  # a scoring forward pass per row, as a share of a training step's work per row (fwd+bwd+...)
LEAD_SE = 2.0  # an earlier check beats a later one only by a lead of more standard errors than this
METRIC_KEYS = ("heldout/accuracy", "heldout/accuracy_se", "heldout/margin", "heldout/drift", "heldout/n_pairs")


# a short run (a first CPU run) is still checked up to this many times, the last at its end, as long as the checks
# before the end cost at most SHORT_RUN_SHARE of its training: points on its charts, candidates for its best step
FEWEST_CHECKS, SHORT_RUN_SHARE = 4, 0.2


def auto_every(n_rows: int, rows_per_step: int, steps: int | None = None) -> int:
    """Steps between checks so that scoring ``n_rows`` rows costs about BUDGET of the training time; in a run of
    ``steps`` steps that this spacing would check only at the end (a 6-step CPU run got one point), up to
    FEWEST_CHECKS checks where they cost at most SHORT_RUN_SHARE of its training. The duration estimate counts the
    same checks."""
    one_check = n_rows * FORWARD_SHARE / max(rows_per_step, 1)  # in optimizer steps
    every = max(1, math.ceil(one_check / BUDGET))
    if steps and steps > 0:
        extra = min(FEWEST_CHECKS - 1, int(steps * SHORT_RUN_SHARE / max(one_check, 1e-9)))
        if extra >= 1:
            every = min(every, max(1, math.ceil(steps / (extra + 1))))
    return every


@dataclass
class Point:
    """One check: the step and its evaluation (None: the untrained adapter, identical to the base model)."""

    step: int
    result: dict[str, Any] | None

    @property
    def accuracy(self) -> float | None:
        return (self.result or {}).get("rewards", {}).get("pair_accuracy") if self.result else None

    @property
    def drift(self) -> float | None:
        return self.result.get("drift") if self.result else 0.0

    @property
    def drift_se(self) -> float:
        """One standard error of the drift (0 for the untrained adapter, or with fewer than two desirable rows)."""
        return (evaluate.drift_se(self.result) or 0.0) if self.result else 0.0

    @property
    def margin(self) -> float | None:
        return self.result["rewards"].get("margin") if self.result else 0.0

    def metrics(self) -> dict[str, Any]:
        r = self.result or {}
        rw = r.get("rewards", {})
        return {"heldout/accuracy": rw.get("pair_accuracy"), "heldout/accuracy_se": rw.get("pair_accuracy_se"),
                "heldout/margin": rw.get("margin"), "heldout/drift": r.get("drift"),
                "heldout/n_pairs": r.get("n_pairs")}

    def short(self) -> str:
        if self.result is None:
            return "the untrained adapter (the base model unchanged)"
        rw = self.result["rewards"]
        acc = evaluate.format_accuracy(rw.get("pair_accuracy"), rw.get("pair_accuracy_se"), self.result["n_pairs"])
        drift = self.drift
        return (f"{acc} held-out reward accuracy, drift "
                f"{'–' if drift is None else format(drift, '+.2f')} nats/token")


class Watch:
    def __init__(self, cfg, rows: list[dict], emit: Callable[..., None], *,
                 stopping: Callable[[], bool] = lambda: False, max_tokens: int = 2048):
        self.cfg = cfg
        self.rows = evaluate.limit_rows(rows, cfg.data.eval_max_rows)
        self.emit = emit  # emit(type, **data): the engine's events
        self.stopping = stopping
        self.max_tokens = max_tokens
        self.every = 0
        self.points: list[Point] = []
        self.best: Point | None = None  # the step kept (see the module doc)
        self.top: Point | None = None  # the most accurate sound check so far
        self.best_state: dict | None = None
        self.start: Point | None = None  # None after a resume from a step that was not checked
        self.start_step = 0
        self.start_state: dict | None = None
        self.collapse: health.Finding | None = None
        self.pending: dict[str, Any] = {}
        self.logged: list[dict[str, Any]] = []
        self.items = self.kept = self.base = None
        self.skipped = 0
        self.tokenizer = None
        self.cache = None  # studio.runs.cache.WatchCache: the base scores and checks of this run, kept for a resume

    # ---- scoring -------------------------------------------------------------------------------------------------
    def _logps(self, model, what: str) -> list[float]:
        total, done = len(self.items), [0]
        message = f"Scoring {len(self.items)} held-out rows with the {what}"
        self.emit("phase", phase="scoring", message=message + "…", done=0, total=total)

        def step(n: int) -> None:  # the count travels as done / total (front ends show it once)
            done[0] += n
            self.emit("phase", phase="scoring", message=message + "…", done=done[0], total=total)

        was_training = model.training
        model.eval()
        try:
            return scoring.completion_logps(model, self.items, pad_token_id=scoring.pad_id(self.tokenizer),
                                             max_tokens=self.max_tokens, on_batch=step)
        finally:
            if was_training:
                model.train()

    def begin(self, model, tokenizer, step: int, max_steps: int, rows_per_step: int) -> None:
        """Tokenize the rows, score them once with the base model (or take the scores the run's cache holds),
        remember the starting adapter."""
        self.tokenizer = tokenizer
        self.items, self.kept, self.skipped = scoring.tokenize_rows(tokenizer, self.rows, self.cfg.kto.max_length)
        self.base = self.cache.base(len(self.items)) if self.cache is not None else None
        if self.base is None:
            with model.disable_adapter():
                self.base = self._logps(model, "base model (once)")
            if self.cache is not None:
                self.cache.save_base(self.base)
        else:
            self.emit("status", message=f"Held-out watch: the base model's scores of {len(self.items)} rows taken "
                                        "from the run's cache")
        every = self.cfg.watch.every_steps
        self.every = auto_every(len(self.items), rows_per_step, max_steps) if every == "auto" else int(every)
        self.start_state = _snapshot(model)
        self.start_step = step
        self.start = Point(step, None) if step == 0 else self._resumed_at(step)
        self.pending = {}  # a resumed run's starting point belongs to no new step
        self.emit("status", message=(
            f"Held-out watch: {len(self.items)} rows ({self._n_pairs()} pairs), checked every {self.every} steps"
            + (f" and at the end of the warm-up (step {self.warmup_end(max_steps)})"
               if self.warmup_end(max_steps) else "")
            if self.every else f"Held-out watch: {len(self.items)} rows, scored after training"),
                  watch_every=self.every, watch_rows=len(self.items))

    def _n_pairs(self) -> int:
        keys: dict[str, set] = {}
        for i in self.kept:
            keys.setdefault(evaluate._prompt_key(self.rows[i]["prompt"]), set()).add(bool(self.rows[i]["label"]))
        return sum(1 for v in keys.values() if len(v) == 2)

    def _result(self, tuned: list[float]) -> dict[str, Any]:
        result = evaluate.score_result(self.rows, self.items, self.kept, self.skipped, self.base, tuned,
                                       beta=self.cfg.kto.beta, max_length=self.cfg.kto.max_length)
        result["verdict"] = evaluate.verdict(result, self.cfg.watch.max_drift)
        return result

    def _score(self, model, step: int) -> dict[str, Any]:
        """Score the model as it is now (step ``step``'s adapter) and keep its scores in the run's cache."""
        tuned = self._logps(model, f"tuned model at step {step}")
        if self.cache is not None:
            self.cache.save_check(step, tuned)
        return self._result(tuned)

    def _resumed_at(self, step: int) -> Point | None:
        """The starting point of a run resumed at ``step``: its check from before the stop (the run's cache), which
        counts for the best step as it did then; None when that step was not checked (scored only if the run has to
        roll back to it, in ``finish``)."""
        if self.cache is None:
            return None
        self.cache.forget_after(step)  # checks after it belong to the attempt this resume replaces
        tuned = self.cache.check(step, len(self.items))
        if tuned is None:
            return None
        point = Point(step, self._result(tuned))
        self.points.append(point)
        if self.consider(point):
            self.best_state = self.start_state
        self.emit("status", message=f"Held-out check at step {step} (taken before the stop, from the run's cache): "
                                    f"{point.short()}", step=step)
        return point

    def check(self, model, step: int, guard: bool = True) -> Point:
        point = Point(step, self._score(model, step))
        self.points.append(point)
        self.pending = {k: v for k, v in point.metrics().items() if v is not None}
        # once a collapse is seen (KL stuck at 0 while the rewards run away: the check right after says how far it
        # drifted), no later check is a step to keep, however its few held-out rows read
        if self.collapse is None and self.consider(point):
            self.best_state = _snapshot(model)
        self.emit("status", message=f"Held-out check at step {step}: {point.short()}", step=step,
                  **{k.replace("/", "_"): v for k, v in point.metrics().items()})
        if guard and not self._sound(point) and self.collapse is None:
            self.collapse = health.collapsed([{"step": step, **point.metrics()}],
                                             **self._ctx(), max_drift=self.cfg.watch.max_drift)
        return point

    def _sound(self, point: Point) -> bool:
        d = point.drift
        return d is not None and math.isfinite(d) and d >= -self.cfg.watch.max_drift

    def _safe(self, p: Point) -> bool:
        """Inside the safe bound, within one standard error of the drift (a few desirable rows measure it loosely)."""
        bound = min(self.cfg.watch.best_max_drift, self.cfg.watch.max_drift)
        return p.drift is not None and p.drift + p.drift_se >= -bound

    def _key(self, p: Point) -> tuple[bool, float, float]:
        """Inside the safe bound first, then accuracy, then margin."""
        acc = p.accuracy
        return (self._safe(p), acc if acc is not None else 0.5, p.margin or 0.0)

    def _prefer(self, p: Point) -> bool:
        """Should the sound check ``p`` (later than every check so far) become the kept step?"""
        if self.best is None or self._safe(p) != self._safe(self.best):
            return self.best is None or self._safe(p)
        top = self.top  # the same side of the safe bound as p and the kept step (a safe check outranks any other)
        if self._key(p) > self._key(top):
            return True
        if p.accuracy is None or top.accuracy is None:  # no paired prompts: the margin decides
            return (p.margin or 0.0) >= (top.margin or 0.0)
        return not self._clearly_better(top, p)

    def _clearly_better(self, a: Point, b: Point) -> bool:
        """Does check ``a`` win the held-out pairs by more than LEAD_SE standard errors over check ``b``? Both
        scored the same pairs, so the test is paired, a sign test: were neither better, each pair's difference of
        implicit-reward wins would be as likely negative as positive, so their sum would spread by the square root
        of their sum of squares. Pairs that both checks rank alike add nothing; three pairs lost and none gained
        is not a clear lead (1.7 standard errors), five are (2.2)."""
        if a.result is None or b.result is None:
            return False
        wa, wb = evaluate.pair_wins(a.result, self.rows), evaluate.pair_wins(b.result, self.rows)
        d = [wa[k] - wb[k] for k in wa if k in wb]
        spread = math.sqrt(sum(x * x for x in d))
        return spread > 0 and sum(d) > LEAD_SE * spread

    def consider(self, p: Point) -> bool:
        """Take the check ``p`` into the choice of the kept step (and the most accurate one); True when it becomes
        the kept step (the caller snapshots the adapter then)."""
        if not self._sound(p):
            return False
        kept = self._prefer(p)
        if kept:
            self.best = p
        if self.top is None or self._key(p) > self._key(self.top):
            self.top = p
        return kept

    def warmup_end(self, max_steps: int) -> int | None:
        """The step where the warm-up reaches the full learning rate: one more check there, so that a run that
        collapses soon after (where the rate peaks) has a sound step to roll back to before the first regular one.
        Only in runs long enough for three regular checks, where the extra one costs a third of the watch's budget
        at most (a 6-step CPU run would pay a whole check for it)."""
        w = self.cfg.train.warmup_steps
        end = int(round(w * max_steps)) if w < 1 else int(w)
        return end if 0 < end < self.every and 3 * self.every <= max_steps else None

    def _ctx(self) -> dict[str, Any]:
        t = self.cfg.train
        return dict(learning_rate=t.learning_rate, batch_size=t.per_device_train_batch_size,
                    grad_accum=t.gradient_accumulation_steps)

    # ---- during training -----------------------------------------------------------------------------------------
    def take_pending(self) -> dict[str, Any]:
        out, self.pending = self.pending, {}
        return out

    def after_step(self, model, step: int, max_steps: int) -> bool:
        """At the end of an optimizer step: check when due. True when the run should stop (collapse)."""
        if self.items is None or self.stopping():
            return False
        if self.every and (step % self.every == 0 or step == max_steps or step == self.warmup_end(max_steps)):
            self.check(model, step)
        return self.collapse is not None and self.cfg.watch.stop_on_collapse

    def after_log(self, model, logs: dict[str, Any], step: int) -> bool:
        """A logged training step: KL stuck at 0 while the rewards run away is collapse too."""
        if self.items is None or "loss" not in logs or self.cfg.kto.loss_type != "kto":
            return False
        self.logged.append({**logs, "step": step})
        if self.collapse is None:
            finding = health.collapsed(self.logged[-health.KL_WINDOW:], **self._ctx(),
                                       max_drift=self.cfg.watch.max_drift)
            if finding is not None:
                self.collapse = finding
                if not self.points or self.points[-1].step != step:
                    self.check(model, step, guard=False)  # say how far it drifted
        return self.collapse is not None and self.cfg.watch.stop_on_collapse

    # ---- after training ------------------------------------------------------------------------------------------
    def finish(self, model, step: int, user_stopped: bool) -> dict[str, Any] | None:
        """Score the last step (unless stopped by the user), pick the adapter to keep and load its weights into
        ``model``. Returns what happened: message, the kept point's evaluation, steps, whether it rolled back."""
        if self.items is None:
            return None
        if user_stopped and self.collapse is None:
            return None  # stopped by hand: the adapter is the step it stopped at, unscored
        if not user_stopped and (not self.points or self.points[-1].step != step):
            self.check(model, step, guard=self.collapse is None)
        last = self.points[-1] if self.points else None
        kept, rolled = last, False
        guard = self.collapse is not None and self.cfg.watch.stop_on_collapse
        if last is not None and (guard or (self.cfg.watch.keep_best and not user_stopped)):
            target, state = (self.best, self.best_state) if self.best is not None else (self.start, self.start_state)
            if target is None and self.best is None and state is not None:  # a resume's start, not checked yet
                target = self.start = Point(self.start_step, None)
            if target is not None and state is not None and target.step != last.step:
                _restore(model, state)
                kept, rolled = target, True
                if kept.result is None and kept.step > 0:  # the resumed-from step: its scores, now
                    kept.result = self._score(model, kept.step)
        if kept is None:
            return None
        parts = []
        if guard:
            parts.append(f"⛔ Collapse guard: {self.collapse.title}. Training stopped early at step {step}.")
            if rolled:
                parts.append(f"Rolled back to {'step ' + str(kept.step) if kept.result else 'the start'}: "
                             f"{kept.short()}" + ("." if kept.result else
                                                  " — no held-out check before the collapse was sound."))
            parts.append(f"What to change: {self.collapse.fix}")
        elif self.collapse is not None:  # seen, but the guard is off
            parts.append(f"⚠️ {self.collapse.title}. The guard is off (watch.stop_on_collapse), so the run "
                         f"went on. What to change: {self.collapse.fix}")
        if not guard and last is not None:
            if rolled:
                parts.append(f"Step {kept.step} was best: {kept.short()}; the last step ({last.step}) was "
                             f"{last.short()}. The run's adapter is step {kept.step}'s (watch.keep_best; turn it "
                             "off to keep the last step's).")
            elif len(self.points) > 1 and self.cfg.watch.keep_best and not user_stopped:
                parts.append(f"The last step ({last.step}) was the best held-out check: {last.short()}.")
        result = kept.result
        if result is None:  # the untrained adapter: the base model against itself
            result = evaluate.score_result(self.rows, self.items, self.kept, self.skipped, self.base, self.base,
                                           beta=self.cfg.kto.beta, max_length=self.cfg.kto.max_length)
            result["verdict"] = evaluate.verdict(result, self.cfg.watch.max_drift)
        return {"message": " ".join(parts), "result": result, "kept_step": kept.step,
                "last_step": last.step if last else step, "best_step": self.best.step if self.best else None,
                "rolled_back": rolled, "collapsed": self.collapse is not None,
                "collapse": self.collapse.as_dict() if self.collapse else None,
                "points": [{"step": p.step, **p.metrics()} for p in self.points]}

    # ---- the transformers callback -------------------------------------------------------------------------------
    def callback(self, rows_per_step: int):
        from transformers import TrainerCallback

        watch = self

        class WatchCallback(TrainerCallback):
            def on_train_begin(self, args, state, control, model=None, processing_class=None, **kw):
                if watch.items is None and model is not None and not watch.stopping():
                    watch.begin(model, processing_class, state.global_step, state.max_steps, rows_per_step)

            def on_step_end(self, args, state, control, model=None, **kw):
                if watch.after_step(model, state.global_step, state.max_steps):
                    control.should_training_stop = True
                if watch.pending:
                    control.should_log = True  # the numbers go out with this step's metrics
                return control

            def on_log(self, args, state, control, logs=None, model=None, **kw):
                if watch.after_log(model, dict(logs or {}), state.global_step):
                    control.should_training_stop = True
                return control

        return WatchCallback()


def _snapshot(model) -> dict:
    """The trainable (adapter) weights, copied to the CPU."""
    return {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}


def _restore(model, state: dict) -> None:
    import torch

    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in state:
                p.copy_(state[n].to(device=p.device, dtype=p.dtype))
