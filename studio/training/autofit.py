"""Auto-fit: the longest max_length and the per-device batch (with accumulation keeping the effective batch) that
fit a card's memory budget on a loading path, from the estimate in ``studio.training.memory``, and the card plan
that compares the paths. The run plan (``studio.training.plan``) decides which path a run takes."""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Iterable

from studio.models.arch import Arch, arch_for
from studio.training.memory import (COMPONENT_LABELS, COMPONENTS, DEFAULT_HEADROOM, DEFAULT_SEQ_CEILING, MAX_BATCH,
                                    MIN_SEQ, SEQ_STEP, TRANSIENT_MARGIN, Estimate, RunWontFit, Settings, estimate,
                                    settings_from_run)


# ---- auto-fit ----------------------------------------------------------------------------------------------------

@dataclass
class Fit:
    ok: bool
    path: str
    budget_gib: float
    seq: int | None = None
    batch: int | None = None
    grad_accum: int | None = None
    effective_batch: int | None = None
    estimate: Estimate | None = None
    reason: str = ""
    micro_batch: int | None = None

    def run_changes(self) -> dict[str, Any]:
        """Dotted run-config fields for the chosen settings."""
        if not self.ok:
            return {}
        return {"kto.max_length": self.seq, "train.per_device_train_batch_size": self.batch,
                "train.gradient_accumulation_steps": self.grad_accum,
                "memory.micro_batch_size": self.micro_batch}

    def as_dict(self) -> dict[str, Any]:
        d = {"ok": self.ok, "path": self.path, "budget_gib": self.budget_gib, "reason": self.reason}
        if self.ok:
            d["chosen"] = {"max_length": self.seq, "per_device_train_batch_size": self.batch,
                           "gradient_accumulation_steps": self.grad_accum, "effective_batch": self.effective_batch,
                           "micro_batch_size": self.micro_batch}
        if self.estimate is not None:
            d["estimate"] = self.estimate.as_dict()
        return d


def usable(budget_gib: float, headroom: float = DEFAULT_HEADROOM) -> float:
    return budget_gib * (1 - headroom)


def safe_total(e: Estimate, margin: float = TRANSIENT_MARGIN) -> float:
    """The estimate with its calibrated, token-dependent parts taken ``margin`` times: what auto-fit plans with."""
    c = e.components
    return c["weights"] + c["lora_optimizer"] + margin * (c["activations"] + c["logits"] + c["overhead"])


def auto_fit(arch: Arch, path: str, budget_gib: float, *, seq: int | None = None,
             seq_ceiling: int = DEFAULT_SEQ_CEILING, effective_batch: int = 16, max_batch: int = MAX_BATCH,
             settings: Settings | None = None, headroom: float = DEFAULT_HEADROOM, savers: bool = True) -> Fit:
    """The largest sequence length (up to ``seq_ceiling``, or exactly ``seq``) that fits with the minimum KTO batch
    of 2, then the largest per-device batch (up to ``effective_batch``) that still fits at that length; gradient
    accumulation makes up the effective batch, with as few steps as that batch allows (the batch is then trimmed to
    the smallest that reaches the effective batch in those steps). Fits: ``safe_total`` <= budget x (1 - headroom).

    With ``savers``, a length that does not fit as it is may still be reached by taking gradients one row at a time
    (``memory.micro_batch_size`` 1; KTO's KL still pairs the whole batch). A micro-batched step's activation memory
    does not grow with the batch, so the batch then goes straight to the effective batch (KTO's KL estimate gets
    more rows, no accumulation needed)."""
    base = settings or Settings()
    limit = usable(budget_gib, headroom)
    options: list[int | None] = [base.micro_batch]  # rows per gradient pass; None = the whole batch
    if savers and 1 not in options:
        options.append(1)

    def est(q: int, b: int, opt: int | None = options[0]) -> Estimate:
        return estimate(arch, path, base, budget_gib=budget_gib, seq=q, batch=b, micro_batch=opt)

    def fits(q: int, b: int, opt: int | None) -> bool:
        return safe_total(est(q, b, opt)) <= limit

    ceiling = min(seq_ceiling, arch.max_positions)
    candidates = [seq] if seq else list(range(ceiling - ceiling % SEQ_STEP or MIN_SEQ, MIN_SEQ - 1, -SEQ_STEP))
    chosen_seq, opt = None, options[0]
    for q in candidates:
        fitting = [o for o in options if fits(q, 2, o)]
        if fitting:
            chosen_seq, opt = q, fitting[0]
            break
    if chosen_seq is None:
        q = candidates[-1]
        e = est(q, 2, options[-1])
        fixed = e.components["weights"] + e.components["lora_optimizer"]
        if fixed + TRANSIENT_MARGIN * e.components["overhead"] > limit:
            reason = (f"{arch.label()} does not fit on the {path} path in {budget_gib:g} GiB: the frozen weights and "
                      f"the adapter alone take {fixed:.2f} GiB of the {limit:.2f} GiB auto-fit plans with "
                      f"({headroom:.0%} kept free). Pick a smaller model, another path or a larger card.")
        else:
            reason = (f"{arch.label()} at {q} tokens x batch 2 needs {e.total_gib:.2f} GiB on the {path} path "
                      f"({safe_total(e):.2f} GiB with auto-fit's margin), more than the {limit:.2f} GiB it plans with "
                      f"in {budget_gib:g} GiB. Use shorter rows, a smaller model or a larger card.")
        return Fit(False, path, budget_gib, estimate=e, reason=reason)
    top = max(2, min(max_batch, effective_batch))
    widest = 2
    for b in range(3, top + 1):
        if not fits(chosen_seq, b, opt):
            break
        widest = b
    # the fewest accumulation steps the widest batch allows, then the smallest batch that still reaches the effective
    # batch in that many steps (batch 15 x 2 would overshoot an effective batch of 16; 8 x 2 hits it)
    accum = max(1, math.ceil(effective_batch / widest))
    chosen_batch = max(2, math.ceil(effective_batch / accum))
    micro = opt if opt and opt < chosen_batch else None
    e = est(chosen_seq, chosen_batch, micro)
    reason = (f"{chosen_seq} tokens x batch {chosen_batch} (x{accum} accumulation = effective batch "
              f"{chosen_batch * accum}): {e.total_gib:.2f} GiB predicted of {budget_gib:g} GiB"
              + (f", with gradients {micro} row{'s' if micro > 1 else ''} at a time" if micro else ""))
    return Fit(True, path, budget_gib, chosen_seq, chosen_batch, accum, chosen_batch * accum, e, reason,
               micro_batch=micro)


def check(arch: Arch, path: str, settings: Settings, budget_gib: float) -> Estimate:
    """The estimate of a run about to start. Raises RunWontFit, with the reason and what to change, when the
    predicted peak exceeds the budget; adds a warning note when it fits only without auto-fit's safety margin."""
    e = estimate(arch, path, settings, budget_gib=budget_gib)
    if e.total_gib > budget_gib:
        fit = auto_fit(arch, path, budget_gib, seq_ceiling=settings.seq, settings=settings,
                       effective_batch=settings.batch)
        advice = (f"To fit: max_length {fit.seq} with per-device batch {fit.batch}"
                  + (f" and memory.micro_batch_size {fit.micro_batch}" if fit.micro_batch else "")
                  + " (raise gradient accumulation to keep the effective batch), or press Auto-fit in the Model & "
                  "preset tab." if fit.ok else fit.reason)
        top = max(COMPONENTS, key=lambda k: e.components[k])
        raise RunWontFit(
            f"This run is predicted not to fit: {e.total_gib:.2f} GiB peak > {budget_gib:g} GiB available for "
            f"{arch.label()} on the {path} path at max_length {settings.seq} x batch {settings.batch} (largest part: "
            f"{COMPONENT_LABELS[top]}, {e.components[top]:.2f} GiB). {advice}", e)
    if safe_total(e) > usable(budget_gib):
        e.notes.append(f"Close to the limit: {e.total_gib:.2f} GiB predicted of {budget_gib:g} GiB, and the estimate "
                       "is good to about 15%. If it runs out of memory, use Auto-fit's settings.")
    return e


def check_run(cfg, path: str, budget_gib: float, bitsandbytes: bool = True) -> Estimate:
    """``check`` for a RunConfig: the model's architecture and the memory-relevant settings come from it."""
    return check(arch_for(cfg.model.name_or_path), path, settings_from_run(cfg, "cuda", bitsandbytes), budget_gib)


def gpu_paths(backend: str | None) -> list[str]:
    return [backend] if backend else ["unsloth", "bnb"]


@dataclass
class CardPlan:
    """Auto-fit of a run config to a card, for every loading path that can run there."""

    arch: Arch
    budget_gib: float | None
    fits: dict[str, Fit]  # GPU paths
    estimates: dict[str, Estimate]  # every path shown (the fitted estimate for GPU paths)
    path: str | None  # the path whose settings ``changes`` holds
    changes: dict[str, Any]
    message: str


def plan_for_card(cfg, budget_gib: float | None, device_kind: str = "cuda", preferred_path: str | None = None,
                  seq_ceiling: int = DEFAULT_SEQ_CEILING, effective_batch: int | None = None,
                  fetch: bool = True, installed: Iterable[str] | None = None,
                  bitsandbytes: bool = True) -> CardPlan:
    """Fit ``cfg`` (a RunConfig) to a card with ``budget_gib`` for PyTorch. On CUDA every 4-bit path the config
    allows is fitted and the settings of ``preferred_path`` (what backend 'auto' picks there), else of the first
    path that fits, are returned as run-config changes. ``installed``: the paths a run can take on this machine;
    the others are fitted and shown but never applied. ``bitsandbytes``: whether the card's machine has it (it
    decides what optim 'auto' is). On CPU / Apple MPS there is no GPU budget: the
    full-precision estimate is returned for information (the limit there is system memory and time)."""
    arch = arch_for(cfg.model.name_or_path, fetch)
    # auto-fit decides the memory savers afresh: the config's current ones may come from another model's fit
    base = replace(settings_from_run(cfg, device_kind, bitsandbytes), micro_batch=None)
    eff = effective_batch or cfg.train.per_device_train_batch_size * cfg.train.gradient_accumulation_steps
    if device_kind != "cuda" or budget_gib is None:
        base.compute_bytes = 4  # float32 on CPU and MPS
        e = estimate(arch, "full", base)
        return CardPlan(arch, None, {}, {"full": e}, "full", {},
                        f"{device_kind.upper()}: full-precision LoRA, about {e.total_gib:.1f} GiB of system memory at "
                        f"max_length {base.seq} x batch {base.batch}. Auto-fit works on GPU memory: pick a GPU preset.")
    backend = cfg.model.backend
    if not cfg.model.load_in_4bit or backend == "full":
        paths = ["full"]
    elif backend in ("unsloth", "bnb"):
        paths = [backend]
    else:
        paths = ["unsloth", "bnb"]
    fits = {p: auto_fit(arch, p, budget_gib, seq_ceiling=seq_ceiling, effective_batch=eff, settings=base)
            for p in paths}
    order = ([preferred_path] if preferred_path in fits else []) + paths
    if installed is not None:
        order = [p for p in order if p in set(installed)]
    chosen = next((p for p in order if fits[p].ok), None)
    estimates = {p: f.estimate for p, f in fits.items() if f.estimate is not None}
    if chosen is None:
        msg = " ".join(f.reason for f in fits.values() if not f.ok)
        return CardPlan(arch, budget_gib, fits, estimates, None, {}, msg)
    f = fits[chosen]
    return CardPlan(arch, budget_gib, fits, estimates, chosen, f.run_changes(), f"{chosen}: {f.reason}")
