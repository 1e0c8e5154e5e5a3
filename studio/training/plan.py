"""Planning a run. Two plans, no Gradio here:

- ``plan_run`` -> ``RunPlan``: what a run config becomes on this machine with this data - the loading path, dtype,
  optimizer, reference precompute and its rows per pass, batch / accumulation / micro-batch (after ``memory.fill_card``),
  gradient checkpointing and the planned peak, each with the reason. Every ``auto`` of the run config is decided
  here (or by the one rule it calls: ``models.choose_backend``, ``models.dtype_name``, ``models.frozen_dtype_name``,
  ``config.run.resolve_optim``,
  ``speed.should_precompute_ref``, ``speed.fill_card_changes``, ``memory.forward_rows``); the engine builds the trainer
  from the plan and writes it to the run folder (``plan.json``), the Model tab and ``python -m studio train`` show it.
- ``plan`` -> ``Plan``: a card, a model and a recipe applied to the config: what the Model tab applies, the Train tab
  shows and the Data tab refreshes.

Picking a card re-plans everything the previous card planned: the loading path and memory budget (a CPU run keeps
no ``gpu_memory_gib``), max_length, the per-device batch and its accumulation, the memory savers (micro-batching)
and, on a CPU, gradient checkpointing, 8 rows a step, at most 48 held-out rows and a step cap that keep the run to
minutes (``studio.training.duration``). On a GPU
the settings come from auto-fit (``studio.training.autofit.plan_for_card``) for the path the run will take on this machine.
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from studio.training import autofit, duration, memory, microbatch, speed, trl_seam
from studio.models import load as models
from studio.config import presets
from studio.config.run import AUTO_EPOCH_ROWS, AUTO_MAX_EPOCHS, ConfigError, RunConfig, resolve_epochs, resolve_optim

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
    card_plan: autofit.CardPlan | None = None  # auto-fit per path (GPU cards) or the full-precision estimate
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
            out.config = cfg = cfg.updated(duration.cpu_plan(cfg, lengths, duration.ram_gib(), eff,
                                                             device=_cpu_of(device)))
        out.duration = duration.estimate(cfg, lengths if lengths is not None else duration.data_lengths(cfg),
                                         device=_cpu_of(device))
    elif kind != "cuda" and apply:  # Apple MPS: no GPU budget, no CPU step cap
        out.config = cfg = cfg.updated({"model.gpu_memory_gib": None, "memory.micro_batch_size": None,
                                        **_not_cpu(cfg)})
    elif apply:
        out.config = cfg = cfg.updated(_not_cpu(cfg))
    try:
        path = installed_path(device) if kind == "cuda" else None
        out.card_plan = autofit.plan_for_card(cfg, budget, kind, path,
                                             seq_ceiling=int(seq_ceiling or memory.DEFAULT_SEQ_CEILING),
                                             effective_batch=eff, fetch=False,
                                             installed=installable_paths(device) if kind == "cuda" else None,
                                             # optim 'auto' as plan_run resolves it: this machine's bitsandbytes,
                                             # or, planning for a card elsewhere, a CUDA machine's (requirements-gpu)
                                             bitsandbytes=device.bitsandbytes if device.kind == "cuda" else True)
    except (memory.EstimateError, OSError, ValueError) as e:
        out.error = str(e)
        return out
    if apply and out.card_plan.changes:
        out.config = out.config.updated(out.card_plan.changes)
    return out


def _cpu_of(device):
    """The CPU a 'cpu' card plans for: this DeviceInfo when it is one, else (planning a CPU run on a GPU machine) a
    CPU without native bf16 - the plan never asks the host CPU."""
    return device if getattr(device, "kind", None) == "cpu" else None


def _not_cpu(cfg: RunConfig) -> dict[str, Any]:
    """What the CPU plan decided that is no GPU's plan: its step cap, and its smaller held-out set (unless the
    user chose another size)."""
    out: dict[str, Any] = {"train.max_steps": -1}
    if cfg.data.eval_max_rows == duration.CPU_EVAL_ROWS:
        out["data.eval_max_rows"] = type(cfg.data).model_fields["eval_max_rows"].default
    return out


def initial_config(cfg: RunConfig, device) -> RunConfig:
    """The config a new studio starts from on this machine: on a CPU the CPU plan (the defaults are a GPU's)."""
    if device.kind != "cpu":
        return cfg
    try:
        return plan(cfg, "cpu", device).config
    except Exception:  # a plan that cannot be made must not stop the app: the defaults stay
        return cfg


# ---- the run plan: every `auto` of a run config decided once ----------------------------------------------------------

@dataclass(frozen=True)
class RunPlan:
    """What a run config becomes on one machine (and, once the data is read, for its rows). Frozen: nothing after
    the plan re-decides. ``changes``: the run-config changes the plan makes (fill_card's split of the batch);
    ``config(cfg)`` applies them."""

    device_kind: str  # cuda | mps | cpu
    device_name: str
    backend: str  # the loading path actually taken: unsloth | bnb | full
    dtype: str  # bfloat16 | float16 | float32
    # embeddings, LM head and norms (unquantized on 4-bit paths): the loader loads them in it, the estimate counts it
    frozen_dtype: str
    optim: str  # 'auto' resolved
    batch: int  # per-device rows per pass
    accumulation: int
    micro_batch: int | None  # rows per gradient pass when it splits the batch, else None
    gradient_checkpointing: bool  # as configured (on the Unsloth path Unsloth's own, TRL's wrapper stays off)
    max_length: int
    precompute_ref: bool | None  # None: 'auto' and the data not read yet (``with_data``)
    precompute_rows: int  # rows per reference pass when precomputing
    autocast: str | None = None  # 'bfloat16': a CPU run computes in bf16 autocast (models.cpu_autocast); GPU: dtype
    joint_pass: bool | None = None  # policy and KL rows in one forward (joint_pass.py); None: decided with the data
    budget_gib: float | None = None  # GPU memory the run may use; None off CUDA or without the memory check
    peak_gib: float | None = None  # the memory estimate's predicted peak (CUDA only)
    estimate: dict | None = field(default=None, compare=False)  # its breakdown (memory.Estimate.as_dict)
    data_rows: int | None = None
    epochs: float | None = None  # passes over the training rows; None: 'auto' and the data not read yet (with_data)
    changes: tuple[tuple[str, Any], ...] = ()
    # Notes for people, by what they say (``notes`` lists them all, in this order): the engine and the UI pick them
    # by these fields, never by position or wording
    path_note: str = ""  # the model path the run takes (the headline of describe_plan says it already)
    setup_notes: tuple[str, ...] = ()  # what the plan decided from the config and the device (optimizer, memory...)
    epochs_note: str | None = None  # epochs 'auto': how many passes, and why (None: epochs as configured)
    precompute_note: str = ""  # whether the reference log-probs are precomputed, and why
    precompute_setting: bool | str = field(default="auto", repr=False)  # kto.precompute_ref_log_probs, for with_data
    max_steps: int = field(default=-1, repr=False)
    epochs_setting: float | str = field(default="auto", repr=False)  # train.num_train_epochs, for with_data
    world: int = field(default=1, repr=False)
    joint_fits: bool = field(default=False, repr=False)  # the memory plan leaves room for the joint pass

    @property
    def notes(self) -> tuple[str, ...]:
        """Every note, for people to read (plan.json, the CLI, the Model tab)."""
        return tuple(n for n in (self.path_note, *self.setup_notes, self.epochs_note, self.precompute_note) if n)

    def config(self, cfg: RunConfig) -> RunConfig:
        """``cfg`` with the plan's changes (the config the run trains with and saves as run.yaml)."""
        return cfg.updated(dict(self.changes)) if self.changes else cfg

    def with_data(self, n_rows: int) -> "RunPlan":
        """The plan once the training rows are known: epochs and precompute 'auto' decided for ``n_rows``. The
        precompute and epochs notes say what was decided (the engine shows them once the data is read)."""
        epochs = resolve_epochs(self.epochs_setting, n_rows)
        on = _precompute(self.precompute_setting, n_rows, self.max_steps,
                         self.batch * self.accumulation * self.world, epochs)
        epochs_note = _epochs_note(self.epochs_setting, epochs, n_rows) if self.epochs_setting == "auto" else None
        return replace(self, precompute_ref=on, data_rows=n_rows, epochs=epochs, epochs_note=epochs_note,
                       precompute_note=_precompute_note(self.precompute_setting, on, n_rows),
                       joint_pass=bool(self.joint_fits and on))

    @property
    def trl_gradient_checkpointing(self) -> bool:
        """TRL's gradient checkpointing: off on the Unsloth path, whose own checkpointing is already on."""
        return self.gradient_checkpointing and self.backend != "unsloth"

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["changes"] = dict(self.changes)
        d["notes"] = list(self.notes)
        for k in ("precompute_setting", "max_steps", "epochs_setting", "world", "joint_fits"):
            d.pop(k)
        return d

    def save(self, run_dir: str | Path) -> Path:
        """Write the plan into the run folder (``plan.json``, through the run folder's one writer of that file)."""
        from studio.runs import folder

        Path(run_dir).mkdir(parents=True, exist_ok=True)
        return folder.write_plan(run_dir, self.as_dict())

    def kto_config(self, cfg: RunConfig, **overrides: Any):
        """TRL's KTOConfig built from the plan: the resolved optimizer, dtype, split of the batch, checkpointing,
        reference rows and epochs. TRL's own precompute stays off: the engine runs it once the reference copy is gone
        (``speed.precompute_reference``), when ``precompute_ref`` says so."""
        kw: dict[str, Any] = dict(
            optim=self.optim, per_device_train_batch_size=self.batch, gradient_accumulation_steps=self.accumulation,
            gradient_checkpointing=self.trl_gradient_checkpointing, precompute_ref_log_probs=False,
            precompute_ref_batch_size=self.precompute_rows)
        if self.epochs is not None:  # None only before with_data (the engine builds its trainer after it)
            kw["num_train_epochs"] = self.epochs
        kw.update(overrides)
        cuda = self.device_kind == "cuda"
        bf16 = (cuda and self.dtype == "bfloat16") or self.autocast == "bfloat16"
        return trl_seam.kto_config(self.config(cfg), device=self.device_kind, bf16=bf16,
                                   fp16=cuda and self.dtype == "float16", **kw)


def _precompute(setting, n_rows: int, max_steps: int, rows_per_step: int, epochs: float | None) -> bool:
    return speed.should_precompute_ref(setting, n_rows, max_steps, rows_per_step, epochs)


def _epochs_note(setting, epochs: float | None, n_rows: int | None) -> str:
    if epochs is None:
        return (f"Epochs: 'auto', decided when the data is read (one pass on files of {AUTO_EPOCH_ROWS:,}+ training "
                f"rows, up to {AUTO_MAX_EPOCHS} on small files).")
    return (f"Epochs: {epochs:g} ('auto': {n_rows:,} training rows; small files get up to {AUTO_MAX_EPOCHS} passes)."
            if setting == "auto" else f"Epochs: {epochs:g} (as configured).")


def _precompute_note(setting, on: bool | None, n_rows: int | None) -> str:
    if on is None:
        return "Reference log-probs: 'auto', decided when the data is read (once, before training, when the run " \
               "visits nearly every row)."
    if isinstance(setting, bool):
        return f"Reference log-probs: {'computed once before training' if on else 'in every step'} (as configured)."
    return (f"Reference log-probs: {'computed once before training' if on else 'in every step'} ('auto': the run "
            f"{'visits' if on else 'does not visit'} nearly all {n_rows} rows).")


def world_size() -> int:
    """How many processes train this run (``accelerate launch`` sets WORLD_SIZE): the studio's one reader of it. The
    run plan carries it (``RunPlan.world``); the engine, the loader and the CLI take it from there."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def plan_run(cfg: RunConfig, device: models.DeviceInfo | None = None, data_rows: int | list | None = None, *,
             fetch: bool = True) -> RunPlan:
    """The run plan of ``cfg`` on ``device`` (default: this machine's, ``models.detect_device``) for ``data_rows``
    training rows (a count or the rows' lengths; None: precompute 'auto' stays open, see ``RunPlan.with_data``).

    Raises ``models.ModelLoadError`` for a path the machine cannot take and ``memory.RunWontFit`` (a ConfigError)
    for a CUDA run predicted not to fit its budget. ``fetch``: may the memory estimate download a config.json."""
    device = device or models.detect_device()
    world = world_size()
    backend = models.choose_backend(cfg, device, world)
    notes = [f"Path: {models.BACKEND_LABELS[backend]}" + (" (model.backend 'auto')" if cfg.model.backend == "auto"
                                                          else "")]
    if backend != "unsloth" and cfg.model.backend == "auto" and device.kind == "cuda" and not device.unsloth \
            and models.choose_backend(cfg, replace(device, unsloth=True)) == "unsloth":
        notes.append("With Unsloth installed (`pip install unsloth`) the run would take the Unsloth path.")
    optim = resolve_optim(cfg.train.optim, device.kind, device.bitsandbytes)
    if cfg.train.optim == "auto":
        notes.append(f"Optimizer: {optim} ('auto': 8-bit AdamW needs CUDA and bitsandbytes)")
    dtype = models.dtype_name(cfg, device)
    frozen = models.frozen_dtype_name(backend, dtype)
    autocast = "bfloat16" if models.cpu_autocast(cfg, device) else None
    if autocast:
        notes.append("Compute: bfloat16 autocast on this CPU (native bf16 matmuls; weights stay float32). Set "
                     "model.dtype to float32 for float32 math.")
    changes: dict[str, Any] = {}
    budget = peak = breakdown = None
    ref_rows = None
    joint_fits = False
    if device.kind == "cuda" and cfg.model.memory_check:
        budget = cfg.model.gpu_memory_gib or device.free_gib

        def settings(c: RunConfig) -> memory.Settings:
            return replace(memory.settings_from_run(c, device.kind, device.bitsandbytes),
                           frozen_bytes=memory.dtype_bytes(frozen))

        try:
            arch = memory.arch_for(cfg.model.name_or_path, fetch)
            est = autofit.check(arch, backend, settings(cfg), budget)  # raises RunWontFit with the reason
        except memory.RunWontFit:
            raise  # a ValueError too, but the refusal the run needs, not a missing estimate
        except (memory.EstimateError, OSError, ValueError) as e:
            notes.append(f"No memory estimate: {e}")
        else:
            def need(ch: dict[str, Any]) -> float:
                return memory.estimate(arch, backend, settings(cfg.updated(ch)), budget).total_gib

            fill = speed.fill_card_changes(cfg, need, budget)
            if fill:  # a small model on a big card: fewer, larger passes, the same rows per step
                changes = dict(fill[0])
                cfg = cfg.updated(changes)
                notes.append(fill[1])
            launch = speed.launch_bound_changes(cfg, need, budget, arch.total_params())
            if launch:  # and, while it stays small with twice the rows a pass: one forward a step, fused AdamW
                more, said = launch
                joint_fits = True
                changes.update(more)
                cfg = cfg.updated(more)
                optim = resolve_optim(cfg.train.optim, device.kind, device.bitsandbytes)
                notes.append(said)
            if changes:
                est = autofit.check(arch, backend, settings(cfg), budget)
            peak, breakdown = round(est.total_gib, 2), est.as_dict()
            notes.append(f"Predicted peak GPU memory {est.total_gib:.2f} GiB of {budget:g} GiB ({backend} path)")
            notes.extend(est.notes)
            if cfg.kto.precompute_ref_batch_size == "auto":
                ref_rows = memory.forward_rows(arch, backend, settings(cfg))
                if joint_fits:  # each reference pass then holds the KL rows too: twice the rows
                    ref_rows = max(1, ref_rows // 2)
    t = cfg.train
    setting = cfg.kto.precompute_ref_batch_size
    rows = setting if isinstance(setting, int) and setting > 0 else (ref_rows or t.per_device_train_batch_size)
    micro = cfg.memory.micro_batch_size
    out = RunPlan(
        device_kind=device.kind, device_name=device.name, backend=backend, dtype=dtype, frozen_dtype=frozen,
        autocast=autocast, optim=optim,
        batch=t.per_device_train_batch_size, accumulation=t.gradient_accumulation_steps,
        micro_batch=micro if microbatch.is_active(micro, t.per_device_train_batch_size) else None, gradient_checkpointing=t.gradient_checkpointing,
        max_length=cfg.kto.max_length, precompute_ref=None, precompute_rows=int(rows),
        budget_gib=budget, peak_gib=peak, estimate=breakdown, changes=tuple(changes.items()), path_note=notes[0],
        setup_notes=tuple(notes[1:]),
        precompute_setting=cfg.kto.precompute_ref_log_probs, max_steps=t.max_steps,
        epochs=resolve_epochs(t.num_train_epochs, None), epochs_setting=t.num_train_epochs,
        world=world, joint_fits=joint_fits)
    if isinstance(data_rows, list):
        data_rows = len(data_rows)
    if data_rows is not None:
        return out.with_data(data_rows)
    if out.epochs is None:
        out = replace(out, epochs_note=_epochs_note("auto", None, None))
    if isinstance(out.precompute_setting, bool):
        return replace(out, precompute_ref=out.precompute_setting, joint_pass=joint_fits and out.precompute_setting,
                       precompute_note=_precompute_note(out.precompute_setting, out.precompute_setting, None))
    return replace(out, precompute_note=_precompute_note("auto", None, None))


def describe_plan(p: RunPlan) -> str:
    """The plan in a few lines of Markdown (the Model tab shows it, the CLI prints it)."""
    pre = {True: f"once before training ({p.precompute_rows} rows per pass)", False: "in every step",
           None: "decided when the data is read"}[p.precompute_ref]
    if p.joint_pass:
        pre += "; policy and KL rows in one forward pass"
    split = f"**{p.batch}** rows per pass x **{p.accumulation}** accumulation"
    if p.micro_batch:
        split += f", gradients **{p.micro_batch}** row{'s' if p.micro_batch > 1 else ''} at a time"
    peak = f"; planned peak **{p.peak_gib:.2f} GiB** of {p.budget_gib:g} GiB" if p.peak_gib is not None else ""
    frozen = f" (embeddings, LM head and norms {p.frozen_dtype})" if p.backend in ("bnb", "unsloth") else ""
    lines = [f"**Run plan on {p.device_name} ({p.device_kind}):** {models.BACKEND_LABELS[p.backend]}, {p.dtype}"
             f"{' weights with bfloat16 autocast' if p.autocast else ''}{frozen}, "
             f"optimizer {p.optim}{peak}.",
             f"{split}, max_length **{p.max_length}**, gradient checkpointing "
             f"**{'on' if p.gradient_checkpointing else 'off'}**; reference log-probs {pre}."]
    return "  \n".join(lines) + "".join(f"\n- {n}" for n in p.notes if n != p.path_note)


def plan_text(p: RunPlan) -> str:
    """``describe_plan`` as plain text, for a terminal."""
    return describe_plan(p).replace("**", "").replace("  \n", "\n")


def run_plan_markdown(cfg: RunConfig, card: str, device) -> str:
    """The plan a run of ``cfg`` will use, for the Model tab, when ``card`` is this machine (its GPU, or the CPU /
    MPS card on such a machine); "" for a card elsewhere, whose plan is the card plan above it."""
    if card != DETECTED and card != device.kind:
        return ""
    try:
        return describe_plan(plan_run(cfg, device, fetch=False))
    except (ConfigError, models.ModelLoadError) as e:  # RunWontFit is a ConfigError
        return f"**Run plan:** {e}"
