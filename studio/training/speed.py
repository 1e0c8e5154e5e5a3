"""Making a KTO run cheaper without changing what it computes.

- Length-aware batching: rows of similar length share a batch, so the collator pads less. TRL's KTO trainer reads
  the dataset in order and builds the KL pairs by rotating completions inside each consecutive block of
  ``per_device_train_batch_size`` rows, so we reorder whole blocks: every batch is still a block of rows that is
  rotated within itself, which keeps the KL estimate's pairing valid.
- Reference log-probs precomputed once: the frozen reference model's log-probs (and KL log-probs) do not change
  during training, so computing them once in a no-grad pass replaces two extra forward passes per row per epoch.
  It pays when the run visits (nearly) every row; a short run over a few rows of a large set would pay for rows it
  never trains on.
- No second copy of the adapter: given a PEFT model, TRL's KTOTrainer adds a frozen copy of the adapter ("ref") and
  scores the reference with it. A fresh LoRA adapter adds nothing (its B matrices are zero), so that copy is the
  base model, which TRL also scores when there is no "ref" adapter (adapters disabled). Dropping it frees an adapter's
  worth of GPU memory, skips its LoRA products in every reference pass and keeps it out of every saved checkpoint.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import random
from pathlib import Path
from typing import Any

from studio.training import trl_seam
from studio.training.trl_seam import REFERENCE_ADAPTER  # the name TRL's KTOTrainer gives its frozen copy


def row_length(row: dict[str, Any]) -> int:
    """Characters of prompt + completion: a cheap stand-in for tokens that orders rows the same way."""
    def size(v):
        if isinstance(v, list):
            return sum(len(str(m.get("content", ""))) for m in v if isinstance(m, dict))
        return len(v or "")

    return size(row.get("prompt")) + size(row.get("completion"))


def length_grouped_order(lengths: list[int], batch_size: int, seed: int, mega: int = 64) -> list[int]:
    """Row order whose consecutive blocks of ``batch_size`` hold rows of similar length, in random block order.

    Rows are shuffled, cut into windows of ``mega`` batches, sorted by length inside each window (so grouping
    stays local and the epoch stays random), cut into blocks, and the blocks are shuffled. A final partial block
    stays last: the trainer's last batch is the only short one, as without grouping."""
    rnd = random.Random(seed)
    idx = list(range(len(lengths)))
    rnd.shuffle(idx)
    window = batch_size * mega
    ordered: list[int] = []
    for s in range(0, len(idx), window):
        ordered.extend(sorted(idx[s:s + window], key=lambda i: lengths[i], reverse=True))
    full = len(ordered) - len(ordered) % batch_size
    blocks = [ordered[s:s + batch_size] for s in range(0, full, batch_size)]
    rnd.shuffle(blocks)
    tail = ordered[full:]
    return [i for b in blocks for i in b] + tail


def group_by_length(dataset, batch_size: int, seed: int):
    """The dataset reordered by ``length_grouped_order`` (a datasets.Dataset in, one out)."""
    lengths = [row_length(r) for r in dataset]
    return dataset.select(length_grouped_order(lengths, batch_size, seed)).flatten_indices()


def padding_fraction(lengths: list[int], batch_size: int) -> float:
    """Share of padded positions when rows are batched in this order (for reports and tests)."""
    total = padded = 0
    for s in range(0, len(lengths), batch_size):
        block = lengths[s:s + batch_size]
        total += max(block) * len(block)
        padded += max(block) * len(block) - sum(block)
    return padded / total if total else 0.0


def should_precompute_ref(setting, n_rows: int, max_steps: int, rows_per_step: int, epochs: float | str | None) -> bool:
    """Resolve ``kto.precompute_ref_log_probs`` ('auto' | bool) for a run. ``epochs`` None or 'auto' (not resolved
    yet): at least one pass, since epochs 'auto' never goes below one."""
    if isinstance(setting, bool):
        return setting
    if epochs is None or epochs == "auto":
        epochs = 1.0
    rows_visited = rows_per_step * max_steps if max_steps and max_steps > 0 else n_rows * epochs
    return rows_visited >= 0.9 * n_rows


def drop_reference_copy(model) -> bool:
    """Delete TRL's frozen "ref" adapter from ``model`` when it equals the base model (a plain LoRA adapter whose B
    matrices are all zero, as every fresh adapter is); TRL then scores the reference with adapters disabled, the
    same numbers. Keeps it (returns False) for anything else: a trained starting adapter, DoRA, another PEFT type."""
    configs = getattr(model, "peft_config", None) or {}
    ref = configs.get(REFERENCE_ADAPTER)
    if ref is None or str(getattr(ref, "peft_type", "")).split(".")[-1] != "LORA" or getattr(ref, "use_dora", False):
        return False
    tag = f".{REFERENCE_ADAPTER}."
    for name, p in model.named_parameters():
        if tag in name and ("lora_B" in name or "lora_embedding_B" in name) and bool(p.detach().any()):
            return False
    model.delete_adapter(REFERENCE_ADAPTER)
    return True


def reference_fingerprint(source_path: str, **settings: Any) -> str | None:
    """Key of TRL's cache of precomputed reference log-probs (with the data's fingerprint). TRL's own key hashes
    every weight of the model, copied to CPU RAM (seconds to tens of seconds on a 7B model, before each run); with
    the reference being the base model as loaded, the checkpoint's files (names, sizes, modification times) and the
    loading settings that change its numbers identify it as well. None when there are no local files to read."""
    h = hashlib.sha256()
    root = Path(source_path)
    if not root.exists():
        return None
    base = root if root.is_dir() else root.parent
    for f in sorted(root.rglob("*")) if root.is_dir() else [root]:
        if f.is_file():
            st = f.stat()
            h.update(f"{f.relative_to(base)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return h.hexdigest()


def precompute_reference(trainer, rows_per_pass: int, fingerprint: str | None = None, progress=None) -> None:
    """Compute the reference log-probs of the trainer's train (and eval) rows once, as TRL's KTOTrainer does in its
    constructor when built with ``precompute_ref_log_probs`` - here after the constructor, so that the pass runs
    without the reference copy (``drop_reference_copy``). ``fingerprint`` replaces TRL's hash of every weight as the
    cache key (None: TRL's hash, needed when the reference is an adapter rather than the base model).
    ``progress(done, total)`` is called after each pass (batches over train and eval rows together)."""
    import math

    trl_seam.set_precomputed(trainer, rows_per_pass, fingerprint)
    datasets = [trainer.train_dataset] + ([trainer.eval_dataset] if trainer.eval_dataset is not None else [])
    total = sum(math.ceil(len(d) / rows_per_pass) for d in datasets)
    done = 0

    def counted():  # TRL computes the reference once per pass; count the passes for progress
        nonlocal done
        done += 1
        progress(min(done, total), total)

    if progress:
        progress(0, total)
    with trl_seam.counting_reference_passes(trainer, counted) if progress else contextlib.nullcontext():
        trainer.train_dataset = trl_seam.precompute_split(trainer, trainer.train_dataset, "train", rows_per_pass)
        if trainer.eval_dataset is not None:
            trainer.eval_dataset = trl_seam.precompute_split(trainer, trainer.eval_dataset, "eval", rows_per_pass)


# ---- small models on big cards -------------------------------------------------------------------------------------
# A 135M model on a desktop or data-centre card is bound by kernel launches and Python, not by the card: a KTO step of
# batch 4 x 4 runs four policy passes, four KL passes and four backward passes of ~30 layers each, and gradient
# checkpointing adds a fifth forward. Fewer, larger passes without recomputation do the same arithmetic in a fraction of
# the launches (measured on an H200: 5.3 s -> 0.35 s a step, docs/GPU_RESULTS.md). The plan takes the fastest split of
# the effective batch whose memory estimate needs at most FILL_CARD_SHARE of the budget (the estimate of the
# unquantized path is not yet calibrated on measured points, hence the wide margin), so a model that is big for the
# card keeps the settings auto-fit chose for memory.
FILL_CARD_SHARE = 0.5
FILL_CARD_MAX_ROWS = 64  # rows per pass at most (KTO's KL estimate pairs the rows of one pass)


def fill_card_candidates(cfg) -> list[dict[str, Any]]:
    """Splits of the effective batch, fastest first: no recomputation before bigger passes (recomputing costs a
    forward pass in every regime; bigger passes pay only where launches dominate), bigger passes before smaller."""
    t = cfg.train
    rows = t.per_device_train_batch_size * t.gradient_accumulation_steps
    splits = [(b, rows // b) for b in range(min(rows, FILL_CARD_MAX_ROWS), t.per_device_train_batch_size, -1)
              if rows % b == 0 and b >= 2]
    out = []
    for ckpt in (False, True):
        for b, a in splits + [(t.per_device_train_batch_size, t.gradient_accumulation_steps)]:
            out.append({"train.gradient_checkpointing": ckpt, "memory.micro_batch_size": None,
                        "train.per_device_train_batch_size": b, "train.gradient_accumulation_steps": a})
    return out


def fill_card_changes(cfg, estimate_gib, budget_gib: float | None) -> tuple[dict[str, Any], str] | None:
    """Run-config changes that train ``cfg``'s effective batch in fewer, larger passes and without gradient
    checkpointing where the card has room for it, with a sentence for the user. ``estimate_gib(changes)`` returns the
    memory estimate (GiB) of the config with those changes. None when nothing would change or nothing fits
    comfortably. The effective batch (rows per optimizer step) and every other setting stay; the per-device batch,
    which is also the group KTO's KL reference point is averaged over, grows (a steadier estimate)."""
    if not cfg.memory.fill_card or budget_gib is None:
        return None
    t = cfg.train
    now = {"train.gradient_checkpointing": t.gradient_checkpointing,
           "memory.micro_batch_size": cfg.memory.micro_batch_size,
           "train.per_device_train_batch_size": t.per_device_train_batch_size,
           "train.gradient_accumulation_steps": t.gradient_accumulation_steps}
    for changes in fill_card_candidates(cfg):
        if changes == now:
            return None  # the configured split is already the fastest that fits
        if changes["train.gradient_checkpointing"] and not t.gradient_checkpointing:
            continue  # never turn recomputation on: that is auto-fit's call, for memory
        try:
            need = estimate_gib(changes)
        except Exception:  # noqa: BLE001 - no estimate, no change
            return None
        if need is None or need > FILL_CARD_SHARE * budget_gib:
            continue
        b, a = changes["train.per_device_train_batch_size"], changes["train.gradient_accumulation_steps"]
        no_ckpt = t.gradient_checkpointing and not changes["train.gradient_checkpointing"]
        said = (f"Small model for this card ({need:.1f} of {budget_gib:g} GiB): {b} rows per pass x {a} "
                f"(was {t.per_device_train_batch_size} x {t.gradient_accumulation_steps}, the same {b * a} rows per "
                f"step){', no gradient checkpointing' if no_ckpt else ''}. Set memory.fill_card off to keep the "
                "configured split.")
        return changes, said
    return None


LAUNCH_BOUND_PARAMS = 1.0e9  # below this a step is bound by launches on a GPU with room (135M on an H200: 6x)


def launch_bound_changes(cfg, estimate_gib, budget_gib: float | None,
                         params: float | None) -> tuple[dict[str, Any], str] | None:
    """For a model under LAUNCH_BOUND_PARAMS parameters that stays small for the card with twice the rows a pass
    (``estimate_gib(changes)`` as in ``fill_card_changes``): ``(changes, sentence)``, where the run takes KTO's
    policy and KL rows in one forward pass (``joint_pass.py``, when the reference is precomputed) and, with
    ``train.optim`` 'auto', fused AdamW instead of 8-bit AdamW (a few kernels a step instead of several per LoRA
    weight; the optimizer state of a small model's adapter is a few MiB either way). None otherwise: memory, not launches, is then what counts."""
    if not cfg.memory.fill_card or budget_gib is None or params is None or params >= LAUNCH_BOUND_PARAMS:
        return None
    t = cfg.train
    if cfg.memory.micro_batch_size is not None and cfg.memory.micro_batch_size < t.per_device_train_batch_size:
        return None
    try:
        need = estimate_gib({"train.per_device_train_batch_size": 2 * t.per_device_train_batch_size})
    except Exception:  # noqa: BLE001 - no estimate, no change
        return None
    if need is None or need > FILL_CARD_SHARE * budget_gib:
        return None
    changes = {"train.optim": "adamw_torch_fused"} if t.optim == "auto" else {}
    said = (f"Launch-bound (a small model for this card, {need:.1f} of {budget_gib:g} GiB with twice the rows a pass): "
            "the policy and KL rows of a step go through the model in one forward pass"
            + (", and fused AdamW updates the adapter" if changes else "") + ". Set memory.fill_card off to keep "
            "TRL's two passes" + (" and 8-bit AdamW." if changes else "."))
    return changes, said


def fast_attention_kernels() -> None:
    """On CUDA, keep scaled-dot-product attention off cuDNN's backend: it builds an execution plan for every new
    sequence length on the CPU (about 3 ms a call, measured), and KTO batches change length every step. Flash and
    memory-efficient attention take any length without that cost."""
    import torch

    if torch.cuda.is_available():
        torch.backends.cuda.enable_cudnn_sdp(False)
