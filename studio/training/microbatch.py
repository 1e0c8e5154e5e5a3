"""KTO with the KL batch decoupled from the gradient micro-batch (``memory.micro_batch_size``).

TRL's KTOTrainer takes the KL reference point z_ref as the mean, over the whole per-device batch, of
(policy - reference) log-probs of mismatched prompt/completion pairs, so that batch needs at least 2 rows and its
forward/backward pays the activation memory of all of them at once. ``trainer_class(micro_batch_size, batch_size)``
returns a KTOTrainer subclass whose training step:

1. computes, without gradients and ``micro_batch_size`` rows at a time, the policy KL log-probs of the whole batch
   and (unless they were precomputed) the reference completion and KL log-probs, with TRL's own
   ``_compute_kl_logps`` and ``compute_ref_log_probs``;
2. runs TRL's own ``_compute_loss`` on each micro-batch with gradients, fed the reference values of step 1 and the
   full-batch KL vectors, so its KL term is exactly the full-batch one; each loss is scaled by its share of rows
   (TRL's loss is a mean over the batch's rows) and by gradient accumulation as ``Trainer.training_step`` does, and
   back-propagated on its own (DDP reduces once, on the last micro-batch);
3. replaces the per-micro-batch metrics TRL logged with one batch-level value per key.

The update equals the whole-batch update up to float rounding; only micro_batch_size rows' activations are alive
at once. TRL's members are reached through ``studio.training.trl_seam``, which imports TRL lazily (Unsloth must be
imported before transformers/TRL on its path).
"""
from __future__ import annotations

import contextlib
from typing import Any

from studio.training import trl_seam

# Keys the text collator puts in a KTO batch; a micro-batch's trailing padding is trimmed only when there are no
# others (an unknown per-token tensor could not be trimmed consistently).
_SEQUENCE_KEYS = {"": ("input_ids", "attention_mask", "completion_mask"),
                  "KL_": ("KL_input_ids", "KL_attention_mask", "KL_completion_mask")}
_TEXT_KEYS = {k for keys in _SEQUENCE_KEYS.values() for k in keys} | {"label", "ref_logps", "ref_KL_logps"}

# How each metric TRL logs per call is combined over micro-batches: the weight of one micro-batch's value.
_ROW_WEIGHTED = {"rewards/chosen": "chosen", "logps/chosen": "chosen",
                 "rewards/rejected": "rejected", "logps/rejected": "rejected"}
_TOKEN_WEIGHTED = {"logits/chosen": "chosen_tokens", "logits/rejected": "rejected_tokens",
                   "entropy": "tokens"}


def is_active(micro_batch_size: int | None, batch_size: int) -> bool:
    """Whether ``micro_batch_size`` splits a per-device batch of ``batch_size`` rows."""
    return micro_batch_size is not None and 0 < micro_batch_size < batch_size


def describe(micro_batch_size: int, batch_size: int) -> str:
    """The engine's status line for a micro-batched run."""
    rows = "row" if micro_batch_size == 1 else "rows"
    return (f"Memory: gradients in micro-batches of {micro_batch_size} {rows}, KTO's KL reference point still over "
            f"the whole batch of {batch_size} rows: the same update, with the activation memory of "
            f"{micro_batch_size} {rows} at a time (slower: more, smaller passes)")


def trainer_class(micro_batch_size: int | None = None, batch_size: int | None = None):
    """TRL's KTOTrainer, or a subclass taking gradients ``micro_batch_size`` rows at a time.

    With ``batch_size`` given and ``micro_batch_size`` not below it (or None), the plain KTOTrainer is returned."""
    KTOTrainer = trl_seam.kto_trainer_class()

    if micro_batch_size is None or (batch_size is not None and not is_active(micro_batch_size, batch_size)):
        return KTOTrainer
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be at least 1, not {micro_batch_size}")

    class MicroBatchKTOTrainer(KTOTrainer):
        micro_batch_size: int = 0

        def training_step(self, model, inputs, num_items_in_batch=None):
            if len(inputs["label"]) <= self.micro_batch_size:  # nothing to split (e.g. a short last batch)
                return super().training_step(model, inputs, num_items_in_batch)
            with self.maybe_activation_offload_context:
                return _micro_batched_step(self, model, inputs, num_items_in_batch)

    MicroBatchKTOTrainer.micro_batch_size = int(micro_batch_size)
    MicroBatchKTOTrainer.__qualname__ = MicroBatchKTOTrainer.__name__
    return MicroBatchKTOTrainer


# ---- the step ------------------------------------------------------------------------------------------------------
def _micro_batched_step(trainer, model, inputs: dict[str, Any], num_items_in_batch=None):
    """Mirrors ``transformers.Trainer.training_step`` (5.17) with the forward/backward split into micro-batches."""
    import torch
    from accelerate.utils import DistributedType

    if trainer.accelerator.distributed_type == DistributedType.DEEPSPEED:
        # DeepSpeed's engine steps inside backward(): one backward per training step only
        raise ValueError("memory.micro_batch_size does not work with DeepSpeed; leave it empty")

    cp_context, inputs = trl_seam.prepare_context_parallel_inputs(trainer, model, inputs)
    with cp_context():
        model.train()
        if hasattr(trainer.optimizer, "train") and callable(trainer.optimizer.train):
            trainer.optimizer.train()
        inputs = trl_seam.prepare_inputs(trainer, inputs)

        n = len(inputs["label"])
        size = trainer.micro_batch_size
        bounds = [(s, min(s + size, n)) for s in range(0, n, size)]
        pad_multiple = getattr(trainer.args, "pad_to_multiple_of", None)
        chunks = [_rows(inputs, s, e, n, pad_multiple) for s, e in bounds]

        # 1. no-grad passes, one micro-batch at a time: policy KL, and the reference unless precomputed
        precomputed = trl_seam.uses_precomputed_reference(trainer)
        ref_model = trl_seam.reference_model(trainer)
        calculate_kl = trl_seam.computes_kl(trainer)
        kl_parts, ref_parts, ref_kl_parts = [], [], []
        for chunk in chunks:
            with trainer.compute_loss_context_manager():
                if calculate_kl:
                    with torch.no_grad():
                        kl_parts.append(trl_seam.policy_kl_logps(trainer, model, chunk))
                if not precomputed:
                    ref_logps, ref_kl = trl_seam.reference_logps(trainer, ref_model, chunk)
                    ref_parts.append(ref_logps)
                    if ref_kl is not None:
                        ref_kl_parts.append(ref_kl)
        full_kl = torch.cat(kl_parts) if kl_parts else None
        if precomputed:
            full_ref_kl = inputs.get("ref_KL_logps")
        else:
            full_ref_kl = torch.cat(ref_kl_parts) if ref_kl_parts else None
            for chunk, ref_logps in zip(chunks, ref_parts):
                chunk["ref_logps"] = ref_logps
        if calculate_kl:
            for chunk in chunks:
                chunk["ref_KL_logps"] = full_ref_kl

        # 2. one forward/backward per micro-batch through TRL's own loss, fed the values of step 1
        kwargs = {}
        from transformers.training_args import OptimizerNames

        if trainer.args.optim in [OptimizerNames.LOMO, OptimizerNames.ADALOMO]:
            kwargs["learning_rate"] = trl_seam.learning_rate(trainer)
        scale_by_accumulation = ((not trainer.model_accepts_loss_kwargs or num_items_in_batch is None)
                                 and trainer.compute_loss_func is None)
        metrics = trl_seam.train_metrics(trainer)
        before = {k: len(v) for k, v in metrics.items()}
        logged: list[tuple[dict[str, float], dict[str, list[float]]]] = []
        total = None
        ok = False
        try:
            with trl_seam.supplied_reference(trainer, full_kl):
                total = _backward_each(trainer, model, chunks, n, scale_by_accumulation, kwargs, metrics, logged)
            ok = True
        finally:
            # 3. one batch-level value per metric instead of one per micro-batch
            for key, values in metrics.items():
                if key != "num_tokens":
                    del values[before.get(key, 0):]
            if ok:
                _log_batch_metrics(metrics, logged)
        return total


def _backward_each(trainer, model, chunks, n, scale_by_accumulation, kwargs, metrics, logged):
    """Step 2: forward/backward of each micro-batch through TRL's loss; the sum of the scaled losses."""
    total = None
    for i, chunk in enumerate(chunks):
        last = i == len(chunks) - 1
        sync = contextlib.nullcontext() if last else trainer.accelerator.no_sync(model)
        with sync:
            lengths = {k: len(v) for k, v in metrics.items()}
            with trainer.compute_loss_context_manager():
                loss = trl_seam.kto_loss(trainer, model, chunk)
            logged.append((_weights(trainer, chunk),
                           {k: list(v[lengths.get(k, 0):]) for k, v in metrics.items()}))
            _maybe_empty_cache(trainer)
            if trainer.args.n_gpu > 1:
                loss = loss.mean()
            loss = loss * (len(chunk["label"]) / n)
            if scale_by_accumulation:
                loss = loss / trainer.current_gradient_accumulation_steps
            trainer.accelerator.backward(loss, **kwargs)
            loss = loss.detach()
            total = loss if total is None else total + loss
    return total


def _rows(batch: dict[str, Any], start: int, end: int, n: int, pad_multiple: int | None) -> dict[str, Any]:
    """Rows start:end of a collated batch, without the padding columns no row of the slice needs."""
    import torch

    out = {k: (v[start:end] if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == n else v)
           for k, v in batch.items()}
    if set(out) - _TEXT_KEYS:
        return out
    for keys in _SEQUENCE_KEYS.values():
        ids, mask, _ = keys
        if mask not in out:
            continue
        width = int(out[mask].sum(-1).max())
        if pad_multiple:
            width = -(-width // pad_multiple) * pad_multiple
        if width >= out[mask].shape[1] or bool(out[mask][:, width:].any()):  # nothing to trim, or left padding
            continue
        for k in keys:
            out[k] = out[k][:, :width]
    return out


def _weights(trainer, chunk: dict[str, Any]) -> dict[str, float]:
    """How much one micro-batch's logged values weigh (summed over processes, as TRL gathers the values)."""
    import torch

    labels = chunk["label"].bool()
    mask = chunk["completion_mask"][:, 1:]
    w = torch.stack([labels.sum(), (~labels).sum(), mask[labels].sum(), mask[~labels].sum(), mask.sum(),
                     torch.tensor(len(labels), device=labels.device)]).to(torch.float64)
    if trainer.accelerator.num_processes > 1:
        w = trainer.accelerator.reduce(w, reduction="sum")
    chosen, rejected, chosen_tokens, rejected_tokens, tokens, rows = w.tolist()
    return dict(chosen=chosen, rejected=rejected, chosen_tokens=chosen_tokens, rejected_tokens=rejected_tokens,
                tokens=tokens, rows=rows)


def _log_batch_metrics(metrics, logged: list[tuple[dict[str, float], dict[str, list[float]]]]) -> None:
    combined: dict[str, float] = {}
    keys = []
    for _, values in logged:
        keys += [k for k in values if k not in keys]
    for key in keys:
        if key in ("num_tokens", "rewards/margins"):
            continue  # num_tokens is TRL's running total (already right); margins are recomputed below
        pairs = [(v, w) for w_all, values in logged for v in values.get(key, [])
                 for w in [w_all[_ROW_WEIGHTED.get(key) or _TOKEN_WEIGHTED.get(key) or "rows"]]]
        if not pairs:
            continue
        if key == "kl":  # every micro-batch computed the same full-batch value
            combined[key] = pairs[-1][0]
            continue
        weight = sum(w for _, w in pairs)
        combined[key] = (sum(v * w for v, w in pairs) / weight) if weight > 0 else sum(v for v, _ in pairs) / len(pairs)
    if "rewards/chosen" in combined and "rewards/rejected" in combined:
        combined["rewards/margins"] = combined["rewards/chosen"] - combined["rewards/rejected"]
    for key, value in combined.items():
        metrics[key].append(value)


def _maybe_empty_cache(trainer) -> None:
    steps = trainer.args.torch_empty_cache_steps
    if steps is not None and trainer.state.global_step % steps == 0:
        from transformers.trainer import clear_device_cache

        clear_device_cache()
