"""KTO health checks: plain-words findings about a run's logged metrics.

Pure functions over the engine's ``metrics`` events (dicts with step, loss, kl, rewards/chosen, rewards/rejected,
rewards/margins, learning_rate, grad_norm ...). Each rule looks for one pattern that hobbyists meet with KTO and
says what it usually means and what to change. Rules only speak once there are enough steps to judge, so a
short healthy run produces no findings.

What the numbers are (TRL's KTOTrainer): a *reward* is beta x (log-prob of the completion under the tuned model
minus under the frozen reference), averaged over the desirable ("chosen") or undesirable ("rejected") rows of the
logged steps; *margins* = chosen - rejected; *kl* is KTO's reference point, an estimate of how far the tuned model
has moved on mismatched prompt/completion pairs inside each batch, clamped at 0. At step 1 the tuned model equals
the reference, so every reward and the KL are 0 and the loss is 0.5 (x the label weights).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Iterable

ERROR, WARNING, INFO = "error", "warning", "info"
SEVERITY_ORDER = {ERROR: 0, WARNING: 1, INFO: 2}

WATCHED = ("loss", "grad_norm", "kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen",
           "logps/rejected")

# How many logged steps each rule needs before it judges, and its thresholds. Module constants so the UI can
# say "too early to judge" and tests can build series that sit just on either side of a threshold.
KL_WINDOW = 10          # KL must be 0 for this many consecutive logged steps (step 1 is always 0)
KL_ZERO = 1e-6
FLAT_WINDOW = 10        # loss range over this many steps ...
FLAT_RANGE = 1e-3       # ... below this = flat (an unmoved model gives exactly 0.5 on every batch)
SATURATED_LOSS = 0.02   # a flat loss below this means the model separates every training row
DIVERGE_WINDOW = 9      # rewards growing over this many steps ...
DIVERGE_LIMIT = 10.0    # ... to a magnitude beyond this (reward units: beta x log-ratio)
DIVERGE_GROWTH = 1.5    # ... and the last third this many times the first third
LABEL_MIN_STEPS = 4
LABEL_MISSING_SHARE = 0.3
TREND_WINDOW = 10       # chosen rewards sinking / margins negative, judged over this many steps
CHOSEN_SINK = -1.0
MARGIN_NEGATIVE = -0.2
COLLAPSE_DRIFT = 1.0    # held-out drift, nats/token below the base (studio.evaluate.DEGENERATE_DRIFT)
STEADY_KL_ROWS = 8  # rows a pass from which KTO's in-batch KL estimate is steady (raising the batch is no advice)
RUNAWAY_REWARD = DIVERGE_LIMIT  # |reward| beyond this while the KL is stuck at 0 = collapse


@dataclass(frozen=True)
class Finding:
    rule: str
    severity: str  # error | warning | info
    title: str
    meaning: str   # what it usually means
    fix: str       # what to change
    step: int | None = None  # the step where it was first seen, when that is meaningful

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def train_steps(metrics: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The training (not eval) log entries, one per step, in step order; a resumed run's re-logged steps win."""
    by_step: dict[int, dict[str, Any]] = {}
    for m in metrics:
        if "loss" in m and "step" in m:
            by_step[int(m["step"])] = m
    return [by_step[s] for s in sorted(by_step)]


def check(metrics: Iterable[dict[str, Any]], *, beta: float | None = None, learning_rate: float | None = None,
          batch_size: int | None = None, grad_accum: int | None = None, loss_type: str = "kto") -> list[Finding]:
    """All findings for a run's metrics, worst first. The keyword arguments (from the run config) only sharpen
    the advice; every rule works without them."""
    steps = train_steps(metrics)
    ctx = dict(beta=beta, learning_rate=learning_rate, batch_size=batch_size, grad_accum=grad_accum)
    findings: list[Finding] = []
    for rule in (non_finite, collapsed, label_missing, kl_stuck_at_zero, rewards_diverging, chosen_sinking,
                 margins_negative, loss_flat):
        if rule in (kl_stuck_at_zero, collapsed) and loss_type != "kto":
            if rule is collapsed:
                f = collapsed(steps, kl_rule=False, **ctx)
                if f is not None:
                    findings.append(f)
            continue  # APO-zero has no KL term; TRL logs 0 on purpose
        f = rule(steps, **ctx)
        if f is not None:
            findings.append(f)
    if any(f.rule == "collapse" for f in findings):
        # a run that moved too far must never be told to move faster
        findings = [f for f in findings if not raises_learning_rate(f.fix)]
    return sorted(findings, key=lambda f: SEVERITY_ORDER[f.severity])


def raises_learning_rate(text: str) -> bool:
    return "raise train.learning_rate" in text.lower()


def check_config(metrics: Iterable[dict[str, Any]], cfg) -> list[Finding]:
    """``check`` with the advice tuned to a ``RunConfig``."""
    return check(metrics, beta=cfg.kto.beta, learning_rate=cfg.train.learning_rate,
                 batch_size=cfg.train.per_device_train_batch_size, grad_accum=cfg.train.gradient_accumulation_steps,
                 loss_type=cfg.kto.loss_type)


# ---- helpers -----------------------------------------------------------------------------------------------------
def _values(steps: list[dict], key: str) -> list[float]:
    return [float(m[key]) for m in steps if m.get(key) is not None]


def _finite(steps: list[dict], key: str) -> list[float]:
    return [v for v in _values(steps, key) if math.isfinite(v)]


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def _slope(xs: list[float]) -> float:
    """Least-squares slope per logged step."""
    n = len(xs)
    mx, my = (n - 1) / 2, _mean(xs)
    den = sum((i - mx) ** 2 for i in range(n))
    return sum((i - mx) * (y - my) for i, y in enumerate(xs)) / den if den else 0.0


def _lr(learning_rate: float | None) -> str:
    return f" (now {learning_rate:g})" if learning_rate else ""


def _beta(beta: float | None) -> str:
    return f" (now {beta:g})" if beta else ""


# ---- the divergence guard (studio.training.events stops a run at the first non-finite value) ----------------------
def non_finite_tensors(named: Iterable[tuple[str, Any]], limit: int = 3) -> list[str]:
    """The names (at most ``limit``) of tensors holding NaN or infinity; None entries are skipped."""
    import torch

    bad = []
    for name, t in named:
        if t is not None and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad.append(name)
            if len(bad) >= limit:
                break
    return bad


def non_finite_logs(logs: dict) -> list[str]:
    """The logged numbers (loss, grad_norm) that are NaN or infinite."""
    return [k for k in ("loss", "grad_norm") if isinstance(logs.get(k), (int, float)) and not math.isfinite(logs[k])]


def diverged_fix(learning_rate: float | None) -> str:
    return (f"Lower train.learning_rate about 10x{_lr(learning_rate)}; keep train.max_grad_norm at 1.0; on an older "
            "card (no bfloat16) try model.dtype float32; check the Data tab for empty rows")


# ---- the rules ---------------------------------------------------------------------------------------------------
def non_finite(steps, learning_rate=None, **_) -> Finding | None:
    for m in steps:
        bad = [k for k in WATCHED if isinstance(m.get(k), (int, float)) and not math.isfinite(m[k])]
        if bad:
            return Finding(
                "non_finite", ERROR, f"NaN / inf at step {m['step']} ({', '.join(bad)})",
                "The numbers overflowed. Every update after this step is garbage, and an adapter saved now may be "
                "broken. Usual causes: a learning rate that is too high, float16 overflow on cards without "
                "bfloat16, or rows with an empty completion.",
                f"Stop the run. Lower train.learning_rate about 10x{_lr(learning_rate)}; keep train.max_grad_norm at "
                "1.0; on an older card (no bfloat16) try model.dtype float32; check the Data tab for empty rows. "
                "Then resume from a checkpoint saved before this step, or start again.",
                step=int(m["step"]))
    return None


def _collapse_fix(learning_rate=None, batch_size=None, grad_accum=None) -> str:
    eff = f" (now {batch_size} x {grad_accum})" if batch_size and grad_accum else ""
    lower = f" to about {learning_rate / 3:.2g}" if learning_rate else " about 3x"
    return (f"Lower train.learning_rate{_lr(learning_rate)}{lower}, and raise the effective batch{eff}, e.g. "
            "train.gradient_accumulation_steps x2: a bigger batch steadies KTO's in-batch KL estimate. Keep warm-up "
            "at about 10% of the run. Do not raise the learning rate: the run moved too far, not too little.")


def collapsed(steps, learning_rate=None, batch_size=None, grad_accum=None, max_drift=COLLAPSE_DRIFT,
              kl_rule=True, **_) -> Finding | None:
    """The model collapsed: the held-out likelihood drift (logged by the held-out watch as ``heldout/drift``) fell
    more than ``max_drift`` nats per token below the base, or KTO's KL stayed 0 for KL_WINDOW logged steps while
    the rewards ran beyond RUNAWAY_REWARD (the model lowers the probability of all text; seen on real HH data with
    the bundled model at lr 1e-3: KL 0 for 140 steps, rewards/chosen -24 to -130, entropy 2.5 -> 0.16)."""
    fix = _collapse_fix(learning_rate, batch_size, grad_accum)
    for m in steps:
        d = m.get("heldout/drift")
        if isinstance(d, (int, float)) and (not math.isfinite(d) or d < -max_drift):
            return Finding(
                "collapse", ERROR, f"The model collapsed by step {m['step']}: good held-out answers are "
                                   f"{abs(d):.1f} nats per token less likely than under the base model",
                "The tuned model now finds the desirable held-out completions far less likely than the base "
                f"model did (more than {max_drift:g} nat per token is collapse): it no longer writes text like "
                "them, even if it still ranks good above bad. The updates were too large for this data.",
                fix, step=int(m["step"]))
    if not kl_rule:
        return None
    for i in range(KL_WINDOW - 1, len(steps)):
        window = steps[i - KL_WINDOW + 1: i + 1]
        kl = [m.get("kl") for m in window]
        if any(not isinstance(v, (int, float)) or v > KL_ZERO for v in kl):
            continue
        rewards = _finite(window, "rewards/chosen") + _finite(window, "rewards/rejected")
        if rewards and max(abs(r) for r in rewards) > RUNAWAY_REWARD:
            step = int(window[0]["step"])
            return Finding(
                "collapse", ERROR, f"The model collapsed by step {step}: KL stuck at 0 while the rewards ran away "
                                   f"(|reward| up to {max(abs(r) for r in rewards):.0f})",
                "KTO's reference point (the KL estimate) has been 0 for "
                f"{KL_WINDOW} logged steps while the rewards moved far from 0: the model lowers the probability "
                "of all text, the KL estimate is clamped at 0, and KTO has lost its anchor to the base model. "
                "Such a model soon stops writing sensible text.",
                fix, step=step)
    return None


def label_missing(steps, batch_size=None, grad_accum=None, **_) -> Finding | None:
    if len(steps) < LABEL_MIN_STEPS:
        return None
    no_chosen = [m for m in steps if m.get("rewards/chosen") is None]
    no_rejected = [m for m in steps if m.get("rewards/rejected") is None]
    eff = f" (now {batch_size} x {grad_accum})" if batch_size and grad_accum else ""
    for missing, kind, other in ((no_chosen, "desirable", "undesirable"), (no_rejected, "undesirable", "desirable")):
        if len(missing) == len(steps):
            return Finding(
                "label_missing", ERROR, f"No {kind} rows reached training",
                f"Every logged step held only {other} rows. KTO then only pushes {other} answers "
                f"{'down' if other == 'undesirable' else 'up'}, with nothing to learn the other side from.",
                f"Add {kind} rows (label {'true' if kind == 'desirable' else 'false'}) to the data, or check the "
                "label column mapping in the Data tab.",
                step=int(steps[0]["step"]))
    one_sided = [m for m in steps if m.get("rewards/chosen") is None or m.get("rewards/rejected") is None]
    share = len(one_sided) / len(steps)
    if share >= LABEL_MISSING_SHARE:
        return Finding(
            "label_missing", WARNING, f"{share:.0%} of logged steps saw only one label",
            "In those steps every row in the batch was desirable or every row undesirable, so the update pushed "
            "in one direction only: curves jump and the rewards/margins plots have gaps. Small batches make this "
            "common.",
            f"Raise train.per_device_train_batch_size or train.gradient_accumulation_steps{eff}; keep "
            "data.shuffle on; balance the two labels (Data tab) if one side is rare.",
            step=int(one_sided[0]["step"]))
    return None


def kl_stuck_at_zero(steps, learning_rate=None, batch_size=None, **_) -> Finding | None:
    kl = [(m["step"], m.get("kl")) for m in steps]
    if len(kl) < KL_WINDOW or any(v is None for _, v in kl[-KL_WINDOW:]):
        return None
    if any(v > KL_ZERO for _, v in kl[-KL_WINDOW:]):
        return None
    rewards = _finite(steps[-KL_WINDOW:], "rewards/chosen") + _finite(steps[-KL_WINDOW:], "rewards/rejected")
    unmoved = not rewards or max(abs(r) for r in rewards) < 0.01
    if unmoved:
        meaning = ("KTO's reference point (the KL estimate) has been 0 for the last "
                   f"{KL_WINDOW} logged steps and the rewards are about 0 too: the tuned model has not moved away "
                   "from the base model. The adapter is not learning.")
        fix = (f"Raise train.learning_rate{_lr(learning_rate)}: LoRA needs about 1e-4 to 5e-4 (full fine-tuning "
               "values like 5e-7 teach an adapter nothing). Check that warm-up is not most of the run.")
    else:
        meaning = ("KTO's reference point (the KL estimate) has been 0 for the last "
                   f"{KL_WINDOW} logged steps although the rewards move. The estimate is clamped at 0: it came out "
                   "negative, which happens when it is computed from very few rows or when the model lowers the "
                   "probability of all text. KTO then loses its anchor to the base model.")
        lower = f"If the rewards of both labels keep falling, lower train.learning_rate{_lr(learning_rate)}."
        if batch_size is not None and batch_size >= STEADY_KL_ROWS:
            # the estimate comes from enough rows: raising the batch is not the change to make
            fix = (f"The batch ({batch_size} rows a pass) is large enough for a steady estimate. {lower} The held-out "
                   "watch (its likelihood-drift curve) tells a model that lowers all text from a healthy one, and its "
                   "collapse guard stops a run that goes too far.")
        else:
            fix = ("Raise train.per_device_train_batch_size" + (f" (now {batch_size})" if batch_size else "") +
                   ": the KL is estimated inside each batch, and 2 rows give a noisy estimate (4-8 is steadier). "
                   + lower)
    return Finding("kl_stuck_zero", WARNING, f"KL stuck at 0 for {KL_WINDOW}+ steps", meaning, fix,
                   step=int(kl[-KL_WINDOW][0]))


def rewards_diverging(steps, beta=None, learning_rate=None, **_) -> Finding | None:
    window = steps[-DIVERGE_WINDOW:]
    if len(window) < DIVERGE_WINDOW:
        return None
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        vals = [abs(m[key]) for m in window if m.get(key) is not None and math.isfinite(m[key])]
        if len(vals) < DIVERGE_WINDOW * 2 // 3:
            continue
        t = max(1, len(vals) // 3)
        first, last = _mean(vals[:t]), _mean(vals[-t:])
        if last > DIVERGE_LIMIT and last > DIVERGE_GROWTH * max(first, 1e-9):
            return Finding(
                "rewards_diverging", WARNING, f"Rewards running away ({key} ≈ {last:.1f} and growing)",
                "The tuned model keeps moving further from the base model instead of settling. KTO rewards "
                "normally level off; rewards that keep growing mean over-optimisation, and the model often starts "
                "to write repetitive or odd text.",
                f"Raise kto.beta{_beta(beta)} (e.g. x2) to keep the model closer, lower "
                f"train.learning_rate{_lr(learning_rate)}, or train fewer steps. Try an earlier checkpoint in Chat.",
                step=int(window[0]["step"]))
    return None


def chosen_sinking(steps, learning_rate=None, beta=None, **_) -> Finding | None:
    window = steps[-TREND_WINDOW:]
    chosen = _finite(window, "rewards/chosen")
    rejected = _finite(window, "rewards/rejected")
    if len(window) < TREND_WINDOW or len(chosen) < TREND_WINDOW // 2 or len(rejected) < TREND_WINDOW // 2:
        return None
    if _mean(chosen[-3:]) < CHOSEN_SINK and _slope(chosen) < 0 and _slope(rejected) < 0:
        return Finding(
            "chosen_sinking", WARNING, "Good answers are becoming less likely too",
            "Both the desirable and the undesirable rewards keep falling: the model wins only by pushing bad "
            "answers down faster than good ones. It is unlearning the good answers as well, which often shows "
            "as shorter or blander replies.",
            f"Lower train.learning_rate{_lr(learning_rate)}, raise kto.beta{_beta(beta)}, or raise "
            "kto.desirable_weight so good rows count more (see the weight suggestion in the Data tab).",
            step=int(window[0]["step"]))
    return None


def margins_negative(steps, **_) -> Finding | None:
    window = steps[-TREND_WINDOW:]
    margins = _finite(window, "rewards/margins")
    if len(window) < TREND_WINDOW or len(margins) < TREND_WINDOW // 2:
        return None
    if _mean(margins) < MARGIN_NEGATIVE and _slope(margins) <= 0:
        return Finding(
            "margins_negative", WARNING, "The model is learning to prefer the undesirable answers",
            "The margin (desirable reward minus undesirable reward) is negative and not recovering. The "
            "training signal points the wrong way: most often the labels are flipped (true must mean good).",
            "Open the data in the Data tab and check that label true marks the answers you want; with paired "
            "data check which column is 'chosen'.",
            step=int(window[0]["step"]))
    return None


def loss_flat(steps, learning_rate=None, **_) -> Finding | None:
    window = steps[-FLAT_WINDOW:]
    if len(window) < FLAT_WINDOW:
        return None
    loss = _finite(window, "loss")
    if len(loss) < FLAT_WINDOW:
        return None
    lrs = _finite(window, "learning_rate")
    if lrs and max(lrs) == 0:
        return None  # the schedule is at zero (end of a cosine, start of warm-up): nothing can move
    if max(loss) - min(loss) >= FLAT_RANGE:
        return None
    level = _mean(loss)
    rewards = _finite(window, "rewards/chosen") + _finite(window, "rewards/rejected")
    if rewards and max(abs(r) for r in rewards) > 1.0 and level >= SATURATED_LOSS:
        return Finding(
            "loss_flat", WARNING, f"Loss stuck at {level:.4f} for {FLAT_WINDOW} steps, rewards far from 0",
            "The model has moved far from the base (large rewards) and the loss no longer changes: the updates "
            "have stalled in a bad place, which usually follows a collapse (too large a learning rate).",
            _collapse_fix(learning_rate),
            step=int(window[0]["step"]))
    if level < SATURATED_LOSS:
        return Finding(
            "loss_flat", INFO, f"Loss flat near 0 ({level:.4f})",
            "The model already separates every training row: it has fit this data. More steps mostly "
            "over-fit it.",
            "Stop here (the adapter is saved), or add more varied data. For a fresh run: fewer epochs or a "
            "higher kto.beta.",
            step=int(window[0]["step"]))
    return Finding(
        "loss_flat", WARNING, f"Loss flat at {level:.4f} for {FLAT_WINDOW} steps",
        "The loss is not moving at all, not even from batch to batch: the adapter is not changing the model. "
        "(An untouched model scores exactly 0.5 per row.)",
        f"Raise train.learning_rate{_lr(learning_rate)}: LoRA usually needs 1e-4 to 5e-4. Check the learning-rate "
        "plot: if it is tiny, shorten warm-up.",
        step=int(window[0]["step"]))


# ---- after training: did the adapter learn? ----------------------------------------------------------------------
NO_LEARNING_ACCURACY = 0.52  # held-out implicit-reward accuracy at or under this is chance level
# β-scaled margin under which the adapter has not moved (the seed's 5e-7 gives ~0.0004; learned runs give 1-2.5)
NO_LEARNING_MARGIN = 0.01
MIN_PAIRS_TO_TELL = 20  # fewer held-out pairs: an accuracy or a margin's sign is noise (± 11 points at 20 pairs)
RAISE_BELOW = 2e-4  # advice to raise the learning rate only under the Standard recipe's lowest rate (3B-8B)


def held_out_learning(result: dict[str, Any], learning_rate: float | None = None,
                      collapsed_run: bool = False) -> Finding | None:
    """A finding when a finished run's held-out evaluation (studio.tuned.evaluate) shows no learning: implicit-reward
    accuracy at chance, or a margin too small to be movement (docs/RECIPES.md)."""
    from studio.tuned.evaluate import DEGENERATED, NO_CHANGE, verdict

    word = (result.get("verdict") or verdict(result)).get("word")
    if word == DEGENERATED:
        v = result.get("verdict") or verdict(result)
        return Finding(
            "held_out_degenerated", ERROR, "The adapter degenerated: " + v["reason"],
            "The updates were too large for this data: the tuned model lowered the probability of all text, good "
            "answers included. A good-looking accuracy or margin does not make it a learned model.",
            _collapse_fix(learning_rate))
    if collapsed_run:
        return None  # the collapse finding says what happened and what to change
    rewards = result.get("rewards") or {}
    acc, margin = rewards.get("pair_accuracy"), rewards.get("margin")
    if word == NO_CHANGE and acc is not None and acc > NO_LEARNING_ACCURACY and margin is not None \
            and margin >= NO_LEARNING_MARGIN:
        return None  # above chance but within noise: the verdict line says so; no advice to change settings
    n = result.get("n_pairs")
    few = isinstance(n, int) and n < MIN_PAIRS_TO_TELL  # a handful of pairs: only "did not move at all" is evidence
    bad_acc = acc is not None and acc <= NO_LEARNING_ACCURACY and not few
    bad_margin = margin is not None and (abs(margin) < NO_LEARNING_MARGIN if few else margin < NO_LEARNING_MARGIN)
    if not (bad_acc or bad_margin):
        return None
    if learning_rate is None or learning_rate < RAISE_BELOW:
        fix = (f"Raise train.learning_rate{_lr(learning_rate)} to 2e-4 (the default, measured over five seeds in "
               "docs/RECIPES.md); train a full epoch or more; check a few labels in the Data tab.")
    else:  # already at or above what LoRA needs: a higher rate is not the answer
        fix = (f"The learning rate{_lr(learning_rate)} is already as high as LoRA needs: train longer (a full epoch "
               "or more, more rows), check a few labels in the Data tab, and score more held-out pairs "
               "(data.eval_fraction, or an eval file) before changing settings.")
    seen = []
    if acc is not None:
        seen.append(f"implicit-reward accuracy {acc:.0%} on held-out pairs (chance is 50%)")
    if margin is not None:
        seen.append(f"mean reward margin {margin:+.4f}")
    return Finding(
        "held_out_no_learning", WARNING, "The adapter shows no learning on held-out data: " + ", ".join(seen),
        "The tuned model ranks held-out good and bad answers no better than the base model. Most often the "
        "learning rate is far too low for LoRA (5e-7 is a full fine-tuning value and teaches an adapter nothing), "
        "the run was too short, or the labels are noisy or flipped.",
        fix)
