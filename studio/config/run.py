"""The run config: the one typed description of a KTO run.

The UI, the presets under ``presets/`` and the headless CLI all read and write this object; it is the only place
where a run's settings live. Field names inside the ``lora``, ``kto`` and ``train`` sections are the names TRL's
``KTOConfig`` and PEFT's ``LoraConfig`` use, so the mapping to them is derived from the fields, never retyped.
Every field documents what it does and when to change it; the UI takes its labels and help texts from here.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from studio import paths
from studio.config import strict
from studio.errors import UsageError

BUNDLED_MODEL = "bundled:smollm2-135m"
# train.num_train_epochs 'auto' (``resolve_epochs``): about AUTO_EPOCH_ROWS rows' worth of passes, 1 to AUTO_MAX_EPOCHS
AUTO_EPOCH_ROWS = 3000
AUTO_MAX_EPOCHS = 3
SAMPLE_DATA = "sample"


class ConfigError(UsageError, ValueError):
    """A run config that cannot be used. The message names the field and says what to change."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    _no_yes_no = field_validator("*", mode="before")(classmethod(strict.no_yes_no_for_a_number))


class ModelSettings(_Section):
    name_or_path: str = Field(
        BUNDLED_MODEL,
        description="Which model to tune: a Hugging Face hub id (downloaded into the HF cache), a local folder, "
        f"a .gguf file, or '{BUNDLED_MODEL}' for the small model that ships with the studio.",
    )
    backend: Literal["auto", "unsloth", "bnb", "full"] = Field(
        "auto",
        description="How the model is loaded. 'auto' picks Unsloth 4-bit on CUDA when Unsloth is installed, else "
        "bitsandbytes NF4 4-bit on CUDA, else full precision on CPU / Apple MPS. Force one only to compare.",
    )
    load_in_4bit: bool = Field(
        True, description="On CUDA, keep the frozen base weights in 4-bit (QLoRA). Needed for 7B models on 8 GB."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="Compute dtype. 'auto' is bfloat16 where the device supports it, float16 on older CUDA cards, "
        "float32 on CPU.",
    )
    trust_remote_code: bool = Field(False, description="Allow model code from the hub. Only for models you trust.")
    gpu_memory_gib: float | None = Field(
        None, gt=0,
        description="GPU memory this run may use, GiB (a GPU preset sets it: 7.5 for an 8 GB card). Empty: the free "
        "memory of this machine's GPU. A run predicted to need more is refused.",
    )
    memory_check: bool = Field(
        True, description="Refuse to start a run the memory estimate predicts will not fit (good to about 15%). "
        "Turn off to try anyway."
    )


class LoraSettings(_Section):
    """Fields named as in ``peft.LoraConfig``."""

    r: int = Field(16, ge=1, le=1024, description="LoRA rank: capacity of the adapter. 8-32 is typical.")
    lora_alpha: int = Field(32, ge=1, description="LoRA scaling numerator; the update is scaled by alpha / r.")
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA input. Unsloth is fastest at 0.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear",
        description="Layers that get an adapter. 'all-linear' = every projection of attention and MLP (not lm_head).",
    )
    bias: Literal["none", "all", "lora_only"] = Field("none", description="Which biases are trained.")


class KTOSettings(_Section):
    """Fields named as in ``trl.KTOConfig``."""

    beta: float = Field(
        0.1, gt=0.0, description="KTO beta: how far the tuned model may move from the base (higher = stay closer)."
    )
    desirable_weight: float = Field(
        1.0, gt=0.0, description="Loss weight of desirable (good) rows. Balance so that "
        "(desirable_weight * n_good) / (undesirable_weight * n_bad) lies in [1, 4/3] (KTO paper)."
    )
    undesirable_weight: float = Field(1.0, gt=0.0, description="Loss weight of undesirable (bad) rows.")
    loss_type: Literal["kto", "apo_zero_unpaired"] = Field("kto", description="The KTO loss, or APO-zero unpaired.")
    max_length: int = Field(
        768, ge=16, description="Longest prompt+completion in tokens; longer rows are truncated. Drives memory."
    )
    precompute_ref_log_probs: bool | Literal["auto"] = Field(
        "auto",
        description="Compute the frozen reference model's log-probs once before training instead of two extra "
        "forward passes per row per step. 'auto': on when the run visits (nearly) every row.",
    )
    precompute_ref_batch_size: int | Literal["auto"] = Field(
        "auto",
        description="Rows per forward pass when the reference log-probs are precomputed. These passes keep no "
        "activations for a backward pass, so more rows fit than in a training step, and bigger passes run faster. "
        "'auto': on a GPU, as many rows (up to 128) as the memory estimate says fit beside the step's own peak; "
        "elsewhere the per-device batch.",
    )

    @field_validator("precompute_ref_batch_size")
    @classmethod
    def _positive_rows(cls, v):
        if isinstance(v, int) and v < 1:
            raise ValueError(f"is {v}; use a number of rows (1 or more) or 'auto'")
        return v


class TrainSettings(_Section):
    """Fields named as in ``transformers.TrainingArguments`` (through ``KTOConfig``)."""

    learning_rate: float = Field(
        2e-4,
        gt=0.0,
        lt=1.0,
        description="Peak learning rate. LoRA needs far more than full fine-tuning: 5e-7 (the full fine-tuning "
        "advice) teaches a LoRA adapter nothing. 2e-4 (the default) learned on every seed of five on real data "
        "without a collapse (docs/RECIPES.md); 5e-4 and 1e-3 learned as much on their good seeds but collapsed on "
        "others. For 3B-8B QLoRA models 2e-4 is also QLoRA's usual value.",
    )
    num_train_epochs: float | Literal["auto"] = Field(
        "auto",
        description=f"Passes over the training data. 'auto': {AUTO_EPOCH_ROWS:,} training rows / the rows this run "
        f"trains on (after the held-out split), rounded, between 1 and {AUTO_MAX_EPOCHS}: one epoch on files of "
        f"{AUTO_EPOCH_ROWS:,}+ rows, up to {AUTO_MAX_EPOCHS} on small files, so a small (or imbalanced, thinned) file "
        "still gets enough optimizer steps. A number (1, 2.5) is used as is.",
    )
    max_steps: int = Field(-1, description="Stop after this many optimizer steps (-1: run all epochs).")
    per_device_train_batch_size: int = Field(
        8,
        description="Rows per forward pass on one device. KTO needs at least 2: its KL term pairs each prompt with "
        "another row's completion inside the batch.",
    )
    gradient_accumulation_steps: int = Field(
        2, ge=1, description="Forward passes per optimizer step. Effective batch = per-device batch x this x devices."
    )
    warmup_steps: float = Field(
        0.1, ge=0.0, description="Warm-up: a fraction of the run when below 1 (0.1 = first 10%), else a step count."
    )
    lr_scheduler_type: Literal["linear", "cosine", "constant", "constant_with_warmup"] = Field(
        "cosine", description="How the learning rate decays after warm-up."
    )
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, gt=0.0, description="Gradient clipping.")
    optim: Literal["auto", "adamw_torch", "adamw_torch_fused", "adamw_8bit", "paged_adamw_8bit"] = Field(
        "auto", description="Optimizer. 'auto' = 8-bit AdamW on CUDA (saves memory), plain AdamW elsewhere; a model "
        "small for its GPU (memory.fill_card) gets fused AdamW, a few kernels a step instead of a few per weight."
    )
    gradient_checkpointing: bool = Field(
        True, description="Recompute activations in the backward pass: much less memory, about 20-30% slower."
    )
    logging_steps: int = Field(1, ge=1, description="Log metrics every N optimizer steps.")
    save_steps: int = Field(50, ge=1, description="Save a resumable checkpoint every N optimizer steps.")
    save_total_limit: int = Field(3, ge=1, description="Keep at most this many checkpoints per run.")
    seed: int = Field(42, description="Seed for shuffling, LoRA init and dropout.")


    @field_validator("num_train_epochs", mode="before")
    @classmethod
    def _positive_epochs(cls, v):
        if isinstance(v, str) and v.strip().lower() == "auto":
            return "auto"
        if isinstance(v, bool):
            raise ValueError(f"is {v}; use a number of passes (above 0, e.g. 1 or 2.5) or 'auto'")
        try:
            n = float(v)
        except (TypeError, ValueError):
            raise ValueError(f"is {v!r}; use a number of passes (above 0, e.g. 1 or 2.5) or 'auto'") from None
        if not math.isfinite(n) or n <= 0:
            raise ValueError(f"is {v}; use a number of passes (above 0, e.g. 1 or 2.5) or 'auto'")
        return n

    @field_validator("per_device_train_batch_size")
    @classmethod
    def _kto_needs_pairs(cls, v: int) -> int:
        if v < 2:
            raise ValueError(
                f"is {v}, but KTO needs at least 2: its KL estimate pairs each prompt with another row's completion "
                "inside the batch. Use 2 and raise gradient_accumulation_steps to keep the effective batch."
            )
        return v


class DataSettings(_Section):
    train_file: str = Field(
        SAMPLE_DATA,
        description=f"Training data: a JSONL/JSON/CSV/Parquet file or a saved datasets folder; '{SAMPLE_DATA}' = "
        "the small example set that ships with the studio.",
    )
    eval_file: str | None = Field(None, description="Optional held-out data in the same formats.")
    eval_fraction: float = Field(
        0.05, ge=0.0, lt=0.9,
        description="Without an eval file, hold out this fraction of the training rows (at most data.eval_max_rows) "
        "to watch during training and score after it. Whole prompts are held out, so a preference pair stays "
        "together. 0 turns it off.",
    )
    eval_max_rows: int | None = Field(
        200, ge=2,
        description="At most this many held-out rows are split off the training file and scored during and after "
        "training (more rows: a steadier score, slower checks). Empty: no cap.",
    )
    shuffle: bool = Field(True, description="Shuffle rows before training (TRL's KTO trainer never does).")
    evaluate_after: bool = Field(
        True,
        description="When the run has held-out data, score base vs tuned on it (up to 200 rows) after training and "
        "warn when the adapter shows no learning. The result is stored with the run (eval.json).",
    )
    length_grouping: bool = Field(
        True,
        description="Batch rows of similar length together (less padding, faster), in random batch order. "
        "Whole batches are moved, so KTO's in-batch KL pairing stays valid.",
    )


class MemorySettings(_Section):
    """Ways to trade a little speed for GPU memory. Studio settings (TRL has no such fields); the engine applies them.

    (Unsloth's tiled MLP was tried as a second saver and fails inside TRL's KTO step: docs/GPU_RESULTS.md.)"""

    micro_batch_size: int | None = Field(
        None, ge=1,
        description="Rows per forward/backward pass of the policy. KTO's KL reference point still pairs the whole "
        "per-device batch (TRL needs at least 2 rows), but gradients are taken one micro-batch at a time and summed: "
        "the same update, with the activation memory of micro_batch_size rows. Empty: the whole batch at once "
        "(fastest). 1 lets an 8 GB card train rows twice as long.",
    )
    fill_card: bool = Field(
        True,
        description="When the model is small for the GPU, train the effective batch in fewer, larger passes and "
        "without gradient checkpointing, as far as the memory estimate leaves half the card free: the same rows per "
        "optimizer step, several times faster (the bundled model on a big card: one pass a step). KTO's KL reference "
        "point is then averaged over the larger pass. Off: keep the batch split and checkpointing as configured.",
    )


class WatchSettings(_Section):
    """The held-out watch (studio/training/watch.py): while training, the held-out rows (data.eval_file, or the
    data.eval_fraction split) are scored every few steps against the base model, whose log-probs are computed once.
    Studio settings (TRL has no such fields)."""

    every_steps: int | Literal["auto"] = Field(
        "auto",
        description="Score the held-out rows every N optimizer steps (implicit-reward accuracy, margin, likelihood "
        "drift; plotted live). 'auto': as often as keeps the checks under about 6% of the training time. 0: only "
        "once, after training (no best step, and the collapse guard sees only the training curves).",
    )
    keep_best: bool = Field(
        True,
        description="Save the best held-out step's adapter as the run's adapter, not the last step's: among the "
        "checks whose drift is inside watch.best_max_drift, the latest that the most accurate one does not clearly "
        "beat on the same held-out pairs (by more than two standard errors: less is noise, and the later step learned "
        "from more data). "
        "Off: the last step's adapter is saved (a collapse still rolls back while watch.stop_on_collapse is on).",
    )
    max_drift: float = Field(
        1.0, gt=0.0,
        description="Likelihood drift that counts as collapse, in nats per token: when the desirable held-out "
        "completions become more than this much less likely per token under the tuned model than under the base, "
        "the model no longer writes text like them. Such a step is never the best one.",
    )
    best_max_drift: float = Field(
        0.5, gt=0.0,
        description="The safe bound for the best step, in nats per token: a held-out check whose drift stays within "
        "this of the base always beats one that drifted further (among those, the highest accuracy wins). Tighter "
        "than watch.max_drift, which stops the run: a model can rank pairs better while it starts to lose fluency.",
    )
    stop_on_collapse: bool = Field(
        True,
        description="Collapse guard: stop early when the held-out drift passes watch.max_drift, or KTO's KL stays 0 "
        "while the rewards run away, and roll back to the best held-out step (else to the untrained adapter).",
    )

    @field_validator("every_steps")
    @classmethod
    def _not_negative(cls, v):
        if isinstance(v, int) and v < 0:
            raise ValueError(f"is {v}; use a number of steps (0 = only after training) or 'auto'")
        return v


class RunConfig(_Section):
    name: str = Field("run", min_length=1, max_length=80, description="Run name; the run folder is named after it.")
    output_dir: str | None = Field(
        None, description="Where checkpoints, the adapter and logs go. Empty: <studio home>/runs/<name>."
    )
    model: ModelSettings = Field(default_factory=ModelSettings)
    lora: LoraSettings = Field(default_factory=LoraSettings)
    kto: KTOSettings = Field(default_factory=KTOSettings)
    train: TrainSettings = Field(default_factory=TrainSettings)
    data: DataSettings = Field(default_factory=DataSettings)
    memory: MemorySettings = Field(default_factory=MemorySettings)
    watch: WatchSettings = Field(default_factory=WatchSettings)

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        bad = set(v) - set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")
        if bad or v.startswith("."):
            raise ValueError("use letters, digits, '-', '_' and '.' only (it names a folder)")
        return v

    # ---- paths -------------------------------------------------------------------------------------------------
    def run_dir(self) -> Path:
        return Path(self.output_dir) if self.output_dir else paths.runs_dir() / self.name

    # ---- YAML --------------------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunConfig":
        try:
            return cls.model_validate(data or {})
        except ValidationError as e:
            raise ConfigError(_explain(e)) from None

    @classmethod
    def load(cls, path: str | Path) -> "RunConfig":
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"run config {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            raise ConfigError(f"{path} is not valid YAML: {e}") from None
        if data is not None and not isinstance(data, dict):
            raise ConfigError(f"{path} must hold a mapping of sections (model, lora, kto, train, data, memory)")
        return cls.from_dict(data or {})

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_yaml(), encoding="utf-8")
        return path

    def updated(self, changes: dict[str, Any]) -> "RunConfig":
        """A copy with dotted-path changes applied ({'train.learning_rate': 1e-4}), validated as a whole."""
        data = self.model_dump()
        for dotted, value in changes.items():
            node = data
            *parents, leaf = dotted.split(".")
            for p in parents:
                if p not in node or not isinstance(node[p], dict):
                    raise ConfigError(f"unknown field '{dotted}'")
                node = node[p]
            if leaf not in node:
                raise ConfigError(f"unknown field '{dotted}'")
            node[leaf] = value
        return RunConfig.from_dict(data)

    # ---- mapping to TRL / PEFT ---------------------------------------------------------------------------------
    def to_lora_config(self, target_modules: list[str] | str | None = None):
        from peft import LoraConfig

        kw = self.lora.model_dump()
        if target_modules is not None:
            kw["target_modules"] = target_modules
        return LoraConfig(task_type="CAUSAL_LM", **kw)

    def kto_config_fields(self, *, device: str = "cpu", bf16: bool = False, fp16: bool = False, bnb: bool = False,
                          **overrides: Any) -> dict[str, Any]:
        """The fields of TRL's KTOConfig for this run on the given device (``studio.training.trl_seam.kto_config``
        builds it: only the TRL seam imports TRL). ``overrides`` are KTOConfig fields set by the engine."""
        train = self.train.model_dump()
        train["optim"] = resolve_optim(train["optim"], device, bnb)  # the engine passes the run plan's optim
        kw: dict[str, Any] = dict(
            **train,
            **self.kto.model_dump(),
            output_dir=str(self.run_dir()),
            bf16=bf16,
            fp16=fp16,
            use_cpu=device == "cpu",
            report_to=[],
            save_strategy="steps",
            dataset_num_proc=None,
            dataloader_num_workers=0,  # worker processes break on Windows and cost more than they give here
            gradient_checkpointing_kwargs={"use_reentrant": False} if self.train.gradient_checkpointing else None,
            remove_unused_columns=False,
            disable_tqdm=True,  # front ends draw their own progress from the engine's events
            ddp_find_unused_parameters=False,  # every LoRA weight is used each step; the search costs a graph walk
        )
        kw.update(overrides)
        if kw["precompute_ref_log_probs"] == "auto":  # the engine resolves 'auto' from the data (studio/training/speed.py)
            kw["precompute_ref_log_probs"] = False
        if kw["precompute_ref_batch_size"] == "auto":  # the engine sizes it from the memory estimate
            kw["precompute_ref_batch_size"] = None
        if kw["num_train_epochs"] == "auto":
            # the run plan passes the epochs it resolved for the data (RunPlan.kto_config); without a row count
            # (a caller outside the plan) one pass, the rule's answer for a file of AUTO_EPOCH_ROWS rows or more
            kw["num_train_epochs"] = 1.0
        return kw


def resolve_optim(optim: str, device_kind: str, bitsandbytes: bool) -> str:
    """The optimizer ``train.optim`` means on a device: 'auto' is 8-bit AdamW with CUDA and bitsandbytes installed,
    else AdamW in torch. The one rule for 'auto', used by the run plan (studio.training.plan.plan_run), the memory
    estimate and the KTOConfig mapping."""
    if optim != "auto":
        return optim
    return "adamw_8bit" if (device_kind == "cuda" and bitsandbytes) else "adamw_torch"


def resolve_epochs(setting: float | str, n_rows: int | None) -> float | None:
    """The passes ``train.num_train_epochs`` means for a run on ``n_rows`` training rows (after the held-out split):
    a number is used as is; 'auto' is AUTO_EPOCH_ROWS / n_rows rounded (halves up), between 1 and AUTO_MAX_EPOCHS
    (2,370 rows: 1; 1,300: 2; 200: 3). None for 'auto' before the rows are known. The one rule for 'auto', used by
    the run plan (studio.training.plan.RunPlan.with_data) and the duration estimate (studio.training.duration)."""
    if setting != "auto":
        return float(setting)
    if n_rows is None:
        return None
    return float(min(AUTO_MAX_EPOCHS, max(1, math.floor(AUTO_EPOCH_ROWS / max(n_rows, 1) + 0.5))))


def _explain(e: ValidationError) -> str:
    lines = []
    for err in e.errors():
        loc = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown field (check the spelling; see presets/runs/quickstart.yaml for the known fields)"
        lines.append(f"{loc}: {msg}" if loc else msg)
    return "invalid run config: " + "; ".join(lines)


def parse_sets(items: list[str]) -> dict[str, Any]:
    """``["train.max_steps=10", ...]`` (the CLI's ``--set``) as run-config changes, each value read as YAML."""
    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set needs FIELD=VALUE, got '{item}'")
        k, v = item.split("=", 1)
        try:
            out[k.strip()] = yaml.safe_load(v)
        except yaml.YAMLError as e:
            problem = " ".join(str(getattr(e, "problem", None) or e).split())
            raise ConfigError(f"--set {item}: '{v}' is not a value ({problem}); write numbers and words as they "
                              "are, lists as [1, 2], and quote text with brackets or colons: "
                              f"--set '{k.strip()}=\"{v}\"'") from None
    return out
