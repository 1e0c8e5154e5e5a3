"""One plan for a card, a model and a recipe: what the Model tab applies, the Train tab shows and the Data tab
refreshes. No Gradio here.

Picking a card re-plans everything the previous card planned: the loading path and memory budget (a CPU run keeps
no ``gpu_memory_gib``), max_length, the per-device batch and its accumulation, the memory savers (micro-batching)
and, on a CPU, gradient checkpointing and a step cap that keeps the run to minutes (``studio.training.duration``). On a GPU
the settings come from auto-fit (``studio.training.memory.plan_for_card``) for the path the run will take on this machine.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from studio.training import duration, memory
from studio.models import load as models
from studio.config import presets
from studio.config.run import ConfigError, RunConfig

DETECTED = "detected"  # the Model tab's "this machine's GPU" card


# ---- recipe presets ----------------------------------------------------------------------------------------------

def recipe_changes(cfg: RunConfig, preset: presets.Preset) -> dict[str, Any]:
    """The recipe's fields, plus the gradient accumulation that makes batch x accumulation reach its effective batch
    at the config's current per-device batch."""
    changes = dict(preset.set)
    # Learning rates that work depend on the model's size (docs/RECIPES.md): a recipe may override fields for
    # models under a parameter count, e.g. `small_model: {below_params: 1.0e9, set: {train.learning_rate: 1.0e-3}}`.
    small = preset.get("small_model")
    if small and _params(cfg.model.name_or_path) is not None and _params(cfg.model.name_or_path) < float(small["below_params"]):
        changes.update(small.get("set", {}))
    target = preset.get("effective_batch")
    if target:
        batch = changes.get("train.per_device_train_batch_size", cfg.train.per_device_train_batch_size)
        changes["train.gradient_accumulation_steps"] = max(1, math.ceil(int(target) / batch))
    return changes


def _params(name_or_path: str) -> float | None:
    """Parameter count of a model from its architecture (no weights loaded), None when it can't be read."""
    try:
        return float(memory.arch_for(name_or_path).total_params())
    except Exception:  # an unknown or unreachable model: the recipe's general values apply
        return None


def apply_recipe(cfg: RunConfig, preset: presets.Preset) -> RunConfig:
    try:
        return cfg.updated(recipe_changes(cfg, preset))
    except ConfigError as e:
        raise presets.PresetError(f"recipe preset '{preset.key}': {e}") from None


@dataclass
class Plan:
    config: RunConfig
    card: str
    device_kind: str  # the card's kind: cuda | cpu | mps
    card_plan: memory.CardPlan | None = None  # auto-fit per path (GPU cards) or the full-precision estimate
    duration: duration.Duration | None = None  # CPU only
    error: str | None = None  # no estimate could be made (unknown model): the config keeps its values
    notes: list[str] = field(default_factory=list)


def budget_for(card: str, device) -> tuple[float | None, str]:
    """(GiB PyTorch may use, device kind) for a GPU preset, or for this machine's card."""
    if card == DETECTED:
        # the free memory now, less a little for the CUDA context the training process will create
        return round(max(0.5, (device.free_gib or device.total_gib or 0) - 0.4), 2), "cuda"
    p = presets.get("gpu", card)
    return p.get("gpu_gib"), p.get("device", "cuda")


def installed_path(device) -> str:
    """The 4-bit path backend 'auto' takes for a CUDA card with what is installed here: Unsloth only when it is
    installed (on this machine's GPU, exactly ``models.choose_backend``'s answer)."""
    if device.kind == "cuda":
        probe = RunConfig().updated({"model.name_or_path": "other/model", "model.backend": "auto"})
        try:
            chosen = models.choose_backend(probe, device)
            if chosen in ("unsloth", "bnb"):
                return chosen
        except models.ModelLoadError:
            pass
    return "unsloth" if device.unsloth else "bnb"


def installable_paths(device) -> list[str]:
    """The 4-bit paths a run can take with what is installed: Unsloth only where it is installed; bitsandbytes
    always (a CUDA machine gets it from requirements-gpu.txt; on this one the plan is for a card elsewhere)."""
    return (["unsloth"] if device.unsloth else []) + ["bnb", "full"]


def card_changes(card: str, device) -> dict[str, Any]:
    if card == DETECTED:
        budget, _ = budget_for(card, device)
        return {"model.backend": "auto", "model.load_in_4bit": True, "model.gpu_memory_gib": budget}
    return dict(presets.get("gpu", card).set)


def plan(cfg: RunConfig, card: str, device, *, model_key: str | None = None, recipe_key: str | None = None,
         seq_ceiling: int = memory.DEFAULT_SEQ_CEILING, lengths: list[int] | None = None,
         apply: bool = True, apply_recipe: bool = False) -> Plan:
    """``cfg`` planned for ``card`` (a GPU preset key or DETECTED) on this machine; with ``apply`` False only the
    estimate of ``cfg`` as it is (the view after a page reload). ``recipe_key``: the recipe whose effective batch
    the plan keeps (``apply_recipe``: also set its learning rate, beta, schedule). ``lengths``: the training rows'
    token lengths, for a CPU max_length taken from the data (default: measured with ``duration.data_lengths``)."""
    budget, kind = budget_for(card, device)
    eff = presets.get("recipes", recipe_key).get("effective_batch") if recipe_key else None
    if apply:
        cfg = cfg.updated(card_changes(card, device))
        if model_key and model_key != presets.OTHER_MODEL:
            source = presets.model_source(presets.get("models", model_key), kind, cfg.model.load_in_4bit)
            cfg = cfg.updated({"model.name_or_path": source})
        if recipe_key and apply_recipe:
            cfg = cfg.updated(recipe_changes(cfg, presets.get("recipes", recipe_key)))
    out = Plan(cfg, card, kind)
    if kind == "cpu":
        if apply:
            if lengths is None:
                lengths = duration.data_lengths(cfg)
            out.config = cfg = cfg.updated(duration.cpu_plan(cfg, lengths, duration.ram_gib(), eff))
        out.duration = duration.estimate(cfg, lengths if lengths is not None else duration.data_lengths(cfg))
    elif kind != "cuda" and apply:  # Apple MPS: no GPU budget, no CPU step cap
        out.config = cfg = cfg.updated({"model.gpu_memory_gib": None, "memory.micro_batch_size": None,
                                        "train.max_steps": -1})
    elif apply:
        out.config = cfg = cfg.updated({"train.max_steps": -1})  # a CPU step cap is not a GPU plan
    try:
        path = installed_path(device) if kind == "cuda" else None
        out.card_plan = memory.plan_for_card(cfg, budget, kind, path,
                                             seq_ceiling=int(seq_ceiling or memory.DEFAULT_SEQ_CEILING),
                                             effective_batch=eff, fetch=False,
                                             installed=installable_paths(device) if kind == "cuda" else None)
    except (memory.EstimateError, OSError, ValueError) as e:
        out.error = str(e)
        return out
    if apply and out.card_plan.changes:
        out.config = out.config.updated(out.card_plan.changes)
    return out


def initial_config(cfg: RunConfig, device) -> RunConfig:
    """The config a new studio starts from on this machine: on a CPU the CPU plan (the defaults are a GPU's)."""
    if device.kind != "cpu":
        return cfg
    try:
        return plan(cfg, "cpu", device).config
    except Exception:  # a plan that cannot be made must not stop the app: the defaults stay
        return cfg
