"""Peak GPU memory of a KTO run, predicted from the model's config.json, and auto-fit to a card.

No weights are loaded and nothing here imports torch: the estimate reads architecture numbers (hidden size, layers,
vocabulary, ...) from a config dict - a model preset's built-in copy, a local folder's config.json, the HF cache,
or a GGUF header - and adds up what the training step keeps on the GPU:

- ``weights``: the frozen base. On the 4-bit paths every decoder linear is NF4 with double quantization
  (4 bits + 0.127 bit of scales per weight); embeddings, the LM head and norms are not quantized and stay in the
  dtype the run plan's rule gives them (``models.frozen_dtype_name``: 16-bit on every path; ``Settings.frozen_bytes``
  counts another, e.g. the float32 upcast of PEFT's ``prepare_model_for_kbit_training`` that the bitsandbytes
  path's older measurements ran with). Under memory pressure Unsloth moves an untied input embedding to CPU RAM;
  the estimate applies Unsloth's own rule for that.
- ``lora_optimizer``: the trainable adapter (bf16 on quantized bases, TRL casts it), its gradient and optimizer
  state; with ``reference_copy`` also the frozen fp32 "ref" copy of the adapter that TRL's KTOTrainer keeps for the
  reference pass (the seed's recipes keep it; the engine drops a fresh adapter's copy, studio/training/speed.py).
- ``activations``: per token, per hidden unit: the checkpointed input of every layer when it stays on the GPU
  (in the residual stream's dtype, which is the embedding's: 2 bytes x layers, 4 with a float32 embedding; Unsloth
  offloads these to CPU RAM) plus one layer's working set
  during the backward recompute: ``WORKING_SET_BYTES`` per hidden unit and ``WORKING_SET_INTERMEDIATE_BYTES`` per MLP
  intermediate unit (24.7 and 7.8, calibrated; a wide MLP such as Qwen2.5's needs more than the hidden size says).
  With ``memory.micro_batch_size`` only one micro-batch's tokens count. KTO's KL and
  reference passes run without gradients, so they add a transient working set, not stored activations.
- ``logits``: TRL 1.15 scores tokens with a chunked fused LM-head kernel, so the [batch, seq, vocab] logits never
  exist: one [<=4096 tokens, <=32768 vocab] tile at a time, the completion hidden states it saves (in the residual
  stream's dtype) and their float32 gradient (and, with a float32 head, a bf16 copy of one vocabulary tile of it).
  The tile sizes are TRL's (``trl_seam.logprob_tiles``).
- ``overhead``: CUDA workspaces, Unsloth's staging buffers, allocator slack: a calibrated constant per path.

Four numbers are calibrated (the two working-set terms and the two paths' ``overhead_gib``, by ``python
bench/memory_bench.py fit``: minimax relative error over the fixture); everything else is counted
from the architecture. Sizing the precompute pass (``forward_rows``) adds three more, fitted to measured passes
(``FORWARD_*`` and the bitsandbytes path's ``forward_hidden_bytes``; tests/fixtures/forward_points.json).
``tests/test_memory.py`` holds the estimate to 15% of every measured point in ``tests/fixtures/memory_points.json``
(a point whose measurement contradicts the others is kept there, marked ``disputed`` with the reason and the command
that re-measures it).

Figures are PyTorch's peak *allocated* memory (``torch.cuda.max_memory_allocated``); the card also needs room for the
CUDA context and the desktop, which the GPU presets' budgets (``gpu_gib``: 7.5 for an 8 GB card) leave out.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from studio.config.run import ConfigError, resolve_optim
# the estimate's inputs (memory.Arch etc. for its users)
from studio.models.arch import NF4_BYTES_PER_PARAM, Arch, EstimateError, arch_for, dtype_bytes
from studio.models.load import frozen_dtype_name
from studio.training import trl_seam

GIB = 2**30
COMPLETION_SHARE = 0.5  # completion tokens / all tokens in a row, for the log-prob kernel (anchors: 0.5)
DEFAULT_SEQ_CEILING = 4096
MIN_SEQ = 128
SEQ_STEP = 128
MAX_BATCH = 16
# Auto-fit's safety margins. The weights are counted exactly; the calibrated per-token terms (activations, logits,
# overhead) carry the estimate's error, which grows with the tokens in a step, so auto-fit takes them 1.5 times, and
# keeps 5% of the budget for the caching allocator's fragmentation on top of the peak it reports.
TRANSIENT_MARGIN = 1.5
DEFAULT_HEADROOM = 0.05
COMPONENTS = ("weights", "lora_optimizer", "activations", "logits", "overhead")
COMPONENT_LABELS = {
    "weights": "weights (frozen base)",
    "lora_optimizer": "LoRA + grads + optimizer",
    "activations": "activations",
    "logits": "logits (LM-head tiles)",
    "overhead": "CUDA/allocator overhead",
}


class RunWontFit(ConfigError):
    """A run predicted not to fit its memory budget; ``estimate`` holds the breakdown."""

    def __init__(self, message: str, estimate: "Estimate"):
        super().__init__(message)
        self.estimate = estimate


# ---- loading paths -----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PathModel:
    """How one loading path spends memory. ``overhead_gib`` is calibrated on measured peaks; the rest follows from
    what the path does."""

    name: str
    quantized: bool
    # bytes per token per hidden unit per layer for the checkpointed layer inputs kept on the GPU: 0 when offloaded
    # to CPU RAM (Unsloth), None = the residual stream's dtype (the frozen embedding's, ``Settings.frozen_bytes``)
    checkpoint_bytes: int | None
    overhead_gib: float
    offloads_embedding: bool = False  # Unsloth's offload_embedding="auto"
    calibrated: bool = True
    # the no-gradient reference pass, bytes per token per hidden unit at a 16-bit residual stream (twice that at a
    # float32 one: every hidden-size tensor of a layer is in the stream's dtype); None: FORWARD_BYTES (Unsloth's)
    forward_hidden_bytes: float | None = None


# One layer's working set during the backward recompute (plus the no-grad KL/reference passes), bytes per token per
# hidden unit; the same on every path. Calibrated with the overheads below by `python bench/memory_bench.py fit`
# (minimax relative error over tests/fixtures/memory_points.json): 47.6, rounded. Unsloth's own figure is 42-48.
WORKING_SET_BYTES = 24.7  # per token and hidden unit
# per token and MLP intermediate unit: gate, up, their product and two gradients in 16 bit live during a layer's
# backward, so models with a wide MLP (Qwen2.5: 5.4x hidden, Llama/Mistral: 2.7-3.5x) need more than hidden alone says
WORKING_SET_INTERMEDIATE_BYTES = 7.8
# KTO's reference pass without gradients (TRL's compute_ref_log_probs: the completion and the KL forward) holds one
# layer's tensors at a time: bytes per token per hidden / intermediate unit, fitted to the engine's precompute pass on
# Qwen2.5-3B (103 kB a token) and Mistral-7B (172 kB) with Unsloth (`bash bench/perf_gpu.sh same`, 4 rows per pass:
# tests/fixtures/forward_points.json). A bare forward of the same model needs less (87 and 127 kB,
# `python3 bench/forward_mem.py`); its floor of about one byte per LM-head weight (Qwen2.5-3B: 0.30 GiB up to 2048
# tokens) is kept.
FORWARD_BYTES = 26.0
FORWARD_INTERMEDIATE_BYTES = 4.5
MAX_FORWARD_ROWS = 128
PATHS = {
    "unsloth": PathModel("unsloth", True, checkpoint_bytes=0, overhead_gib=0.448, offloads_embedding=True),
    # Calibrated on runs whose embedding PEFT had upcast to float32 (tests/fixtures/memory_points.json marks them
    # frozen_bytes 4). The reference pass of Qwen2.5-3B at 5 rows x 4096 tokens with that float32 stream needed 165 kB
    # a token (setup peak 6.33 GiB vs 3.08 without it; docs/results/autofit_gpu.jsonl): one point, 56 B/hidden, so 28
    # at a 16-bit stream (not measured yet: `python bench/memory_bench.py bnbfit` re-measures the 16-bit path).
    "bnb": PathModel("bnb", True, checkpoint_bytes=None, overhead_gib=0.183, forward_hidden_bytes=28.0),
    # No measurements yet: same physics, the base in the compute dtype, layer inputs in the compute dtype.
    "full": PathModel("full", False, checkpoint_bytes=None, overhead_gib=0.0, calibrated=False),
}


# ---- the estimate ------------------------------------------------------------------------------------------------

@dataclass
class Settings:
    """The run settings that move memory (the defaults are the anchors' recipe)."""

    seq: int = 1024
    batch: int = 2
    rank: int = 16
    targets: str | tuple[str, ...] = "all-linear"
    gradient_checkpointing: bool = True
    optim: str = "adamw_8bit"  # adamw_8bit | paged_adamw_8bit | adamw_torch
    compute_bytes: int = 2  # bf16/fp16 on CUDA; 4 for float32 (CPU, MPS)
    micro_batch: int | None = None  # rows per policy pass (studio/training/microbatch.py); None = the whole batch
    reference_copy: bool = False  # TRL's frozen fp32 copy of the adapter (studio.speed.drop_reference_copy)
    # bytes per unquantized frozen weight (embeddings, LM head, norms); they set the residual stream's dtype too.
    # None: the run plan's rule for the path (models.frozen_dtype_name); the run plan passes its decision here
    frozen_bytes: int | None = None

    @property
    def active_rows(self) -> int:
        """Rows whose activations exist at once: the micro-batch when one is set, else the whole batch."""
        return min(self.batch, self.micro_batch) if self.micro_batch else self.batch


@dataclass
class Estimate:
    path: str
    arch: str
    settings: dict[str, Any]
    components: dict[str, float]  # GiB, in COMPONENTS order
    total_gib: float
    budget_gib: float | None = None
    notes: list[str] = field(default_factory=list)
    calibrated: bool = True

    @property
    def fits(self) -> bool | None:
        return None if self.budget_gib is None else self.total_gib <= self.budget_gib

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["components"] = {k: round(v, 3) for k, v in self.components.items()}
        d["total_gib"] = round(self.total_gib, 3)
        d["fits"] = self.fits
        return d


def frozen_bytes(path: str, s: Settings) -> int:
    """Bytes per unquantized frozen weight on ``path``: the settings' own figure, else the run plan's rule."""
    if s.frozen_bytes:
        return s.frozen_bytes
    return dtype_bytes(frozen_dtype_name(path, "float32" if s.compute_bytes == 4 else "bfloat16"))


def _lora_training_state_bytes(pm: PathModel, optim: str) -> tuple[int, float]:
    """Per LoRA parameter: the adapter's own bytes, and its gradient + optimizer state (which exist only once
    training starts). TRL casts the adapter to bf16 on quantized bases only."""
    lora_bytes = 2 if pm.quantized else 4
    return lora_bytes, lora_bytes + _optimizer_bytes(optim, lora_bytes)


def _optimizer_bytes(optim: str, param_bytes: int) -> float:
    if "8bit" in optim:
        return 2.0  # two 8-bit moments
    return 2.0 * param_bytes  # AdamW moments in the parameter's dtype


def unsloth_offloads_embedding(arch: Arch, seq: int, budget_gib: float, resident_bytes: float, lora_params: int) -> bool:
    """Unsloth's ``offload_embedding="auto"``: an untied input embedding moves to CPU RAM when the card lacks the
    reserve Unsloth wants for a training step (its estimate: 48 bytes x seq x hidden of activations, fp32 logits for
    up to 2048 rows, fp32 LoRA + AdamW, 1/16 for fragmentation, 256 MiB). Checked after loading and after adding
    LoRA, with the memory left under the cap."""
    if arch.tied:
        return False

    def reserve(extra: float) -> float:
        base = seq * arch.hidden * 48 + min(seq, 2048) * arch.vocab * 4 + extra
        return base * (1 + 1 / 16) + 256 * 2**20

    budget = budget_gib * GIB
    at_load = reserve(0) > budget - resident_bytes
    at_peft = reserve(lora_params * 16) > budget - resident_bytes - lora_params * 4
    return at_load or at_peft


def estimate(arch: Arch, path: str, settings: Settings | None = None, budget_gib: float | None = None,
             **changes: Any) -> Estimate:
    """Predicted peak allocated GPU memory of a KTO training step with this model, path and settings."""
    s = settings or Settings()
    if changes:
        s = Settings(**{**asdict(s), **changes})
    if path not in PATHS:
        raise EstimateError(f"unknown path '{path}': use one of {', '.join(PATHS)}")
    pm = PATHS[path]
    if s.batch < 2:
        raise EstimateError("KTO needs a per-device batch of at least 2")
    notes: list[str] = []
    h = arch.hidden
    n_tok = s.seq * s.active_rows  # a micro-batched step holds one micro-batch's activations at a time
    if s.micro_batch and s.micro_batch < s.batch:
        notes.append(f"Gradients are taken {s.active_rows} row(s) at a time (memory.micro_batch_size); KTO's KL "
                     f"still pairs all {s.batch} rows.")
    frozen = frozen_bytes(path, s)  # also the residual stream's bytes: the embedding's output starts it

    # weights
    lora_n = arch.lora_params(s.rank, s.targets)
    if pm.quantized:
        weights = arch.linear_params() * NF4_BYTES_PER_PARAM
    else:
        weights = arch.linear_params() * s.compute_bytes
    on_gpu_embedding = True
    if pm.offloads_embedding and budget_gib is not None:
        resident = weights + arch.unquantized_params() * frozen
        if unsloth_offloads_embedding(arch, s.seq, budget_gib, resident, lora_n):
            on_gpu_embedding = False
            notes.append(f"Unsloth keeps the input embedding ({arch.embedding_params() * frozen / GIB:.2f} GiB) "
                         "in CPU RAM at this budget (its offload_embedding='auto').")
    weights += arch.unquantized_params(on_gpu_embedding) * frozen

    # LoRA: trainable copy + gradient + optimizer (+ TRL's frozen fp32 "ref" copy where it is kept)
    lora_bytes, training_state = _lora_training_state_bytes(pm, s.optim)
    lora = lora_n * (lora_bytes + training_state + (4 if s.reference_copy else 0))

    # activations: the checkpointed layer inputs (unless offloaded) and one layer's working set
    ckpt_bytes = frozen if pm.checkpoint_bytes is None else pm.checkpoint_bytes
    acts = n_tok * (h * (arch.layers * ckpt_bytes + WORKING_SET_BYTES) + arch.intermediate * WORKING_SET_INTERMEDIATE_BYTES)
    if not s.gradient_checkpointing:
        # every layer keeps its intermediate tensors: norm outputs, q/k/v, attention output, MLP (gate, up, act, product)
        per_layer = s.compute_bytes * (6 * h + 2 * arch.kv_heads * arch.head_dim + 4 * arch.intermediate)
        acts += n_tok * arch.layers * per_layer
        notes.append("Without gradient checkpointing every layer keeps its activations (uncalibrated term).")

    # logits: the fused LM-head kernel's tile, the saved completion hidden states and their fp32 gradient
    # (one tile at a time: each pass frees its tile before the next pass starts)
    n_comp = math.ceil(n_tok * COMPLETION_SHARE)
    token_tile, vocab_tile = trl_seam.logprob_tiles()
    logits = min(n_comp, token_tile) * min(arch.vocab, vocab_tile) * s.compute_bytes
    logits += n_comp * h * (frozen + 4)
    if frozen != s.compute_bytes:  # an fp32 head is cast tile by tile to the compute dtype
        logits += min(arch.vocab, vocab_tile) * h * s.compute_bytes

    comps = {"weights": weights / GIB, "lora_optimizer": lora / GIB, "activations": acts / GIB, "logits": logits / GIB,
             "overhead": pm.overhead_gib}
    total = sum(comps.values())
    if not pm.calibrated:
        notes.append(f"The '{path}' path has no measured points yet: treat this figure as a rough guide.")
    settings_d = asdict(s)
    settings_d["targets"] = s.targets if isinstance(s.targets, str) else list(s.targets)
    settings_d["frozen_bytes"] = frozen  # as decided (fit's JSON shows the rule's answer, not None)
    return Estimate(path=path, arch=arch.label(), settings=settings_d, components=comps, total_gib=total,
                    budget_gib=budget_gib, notes=notes, calibrated=pm.calibrated)


# ---- the precompute pass ------------------------------------------------------------------------------------------

def forward_bytes(arch: Arch, rows: int, seq: int, compute_bytes: int = 2, path: str = "unsloth",
                  stream_bytes: int | None = None) -> float:
    """Transient memory of one forward pass without gradients over ``rows`` x ``seq`` tokens (KTO's reference and
    KL passes): one layer's tensors at a time (the LM head's work has a floor); nothing is kept for a backward.
    ``stream_bytes``: the residual stream's bytes (``frozen_bytes``; default the compute dtype's)."""
    n_tok = rows * seq
    scale = compute_bytes / 2
    stream = (stream_bytes or compute_bytes) / 2
    hidden_bytes = PATHS[path].forward_hidden_bytes or FORWARD_BYTES
    per_token = stream * hidden_bytes * arch.hidden + scale * FORWARD_INTERMEDIATE_BYTES * arch.intermediate
    return max(n_tok * per_token, scale * arch.vocab * arch.hidden)


def forward_rows(arch: Arch, path: str, settings: Settings, max_rows: int = MAX_FORWARD_ROWS) -> int:
    """Rows per pass for precomputing the reference log-probs: the most (up to ``max_rows``) whose no-gradient
    passes need no more memory than the training step's own activations and LM-head tiles (plus the adapter's
    gradient and optimizer state, which do not exist yet), so the precompute pass does not raise the run's peak; at
    least the rows one training pass takes (the micro-batch when there is one, else the per-device batch)."""
    e = estimate(arch, path, settings)
    # before training the adapter has no gradient and no optimizer state yet: that room is free too
    _, training_state = _lora_training_state_bytes(PATHS[path], settings.optim)
    not_yet = arch.lora_params(settings.rank, settings.targets) * training_state
    room = (e.components["activations"] + e.components["logits"]) * GIB + not_yet
    rows = settings.active_rows
    stream = frozen_bytes(path, settings)
    while rows < max_rows and forward_bytes(arch, rows + 1, settings.seq, settings.compute_bytes, path,
                                            stream) <= room:
        rows += 1
    return rows


# ---- from a run config / model name --------------------------------------------------------------------------------

def settings_from_run(cfg, device_kind: str = "cuda", bitsandbytes: bool = True) -> Settings:
    """The memory-relevant settings of a RunConfig on a device (``optim='auto'`` resolved by the run plan's rule,
    ``config.run.resolve_optim``: 8-bit AdamW on CUDA with bitsandbytes installed)."""
    optim = resolve_optim(cfg.train.optim, device_kind, bitsandbytes)
    targets = cfg.lora.target_modules if isinstance(cfg.lora.target_modules, str) else tuple(cfg.lora.target_modules)
    return Settings(seq=cfg.kto.max_length, batch=cfg.train.per_device_train_batch_size, rank=cfg.lora.r,
                    targets=targets, gradient_checkpointing=cfg.train.gradient_checkpointing, optim=optim,
                    compute_bytes=4 if cfg.model.dtype == "float32" else 2,
                    micro_batch=cfg.memory.micro_batch_size)
