"""KTO's policy rows and KL rows in one forward pass (small models on big cards).

TRL's KTOTrainer runs the model twice per batch: once on the KL rows (the batch's prompts with mismatched
completions, no gradient) and once on the batch's own rows (with gradient); its reference pass does the same two
forwards. A 135M model on a data-centre card is bound by kernel launches and Python, not by arithmetic
(docs/GPU_RESULTS.md): each forward of ~30 layers with LoRA wrappers costs the same launches whether it holds 16 rows
or 32. ``trainer_class(base)`` returns a subclass of ``base`` (TRL's KTOTrainer or the micro-batching one) that
stacks both sets of rows, padded to one width, into a single forward:

- in training, the KL rows' log-probs are detached (TRL computes them without gradient) and handed to TRL's own loss
  as the policy's KL term (``trl_seam.supplied_reference``); the batch rows' outputs are handed to it in place of its
  forward. The backward pass then runs over twice the rows (the KL rows' gradient is zero): more arithmetic, fewer
  launches, which is the trade a launch-bound run wants and a compute-bound one does not (the run plan decides:
  ``plan.RunPlan.joint_pass``);
- in the reference pass (precomputed once, or per step), one forward gives both the completion and the KL log-probs
  under TRL's own context (no grad, adapter off, autocast).

Rows are right-padded by TRL's collator (``flush_left``), so padding both halves to the wider width adds positions
after every real token: causal attention never lets a real token see them, the labels there are -100, and each half
is cut back to its own width before TRL reads it. The loss, gradients and metrics equal TRL's two-pass step to float
rounding (tests/test_joint_pass.py). Batches with other per-token inputs (Gemma's token_type_ids, vision inputs) and
MoE auxiliary losses take TRL's path unchanged.
"""
from __future__ import annotations

from typing import Any

from studio.training import trl_seam

_TEXT_KEYS = {"input_ids", "attention_mask", "completion_mask", "KL_input_ids", "KL_attention_mask",
              "KL_completion_mask", "label", "ref_logps", "ref_KL_logps"}


def applies(batch: dict[str, Any]) -> bool:
    """Whether a collated batch can take the joint pass: text rows with KL rows and nothing else per token."""
    return "KL_input_ids" in batch and set(batch) <= _TEXT_KEYS


def joint_forward(model, batch: dict[str, Any]):
    """One forward of ``model`` (TRL's fused LM head) over the batch rows stacked on its KL rows; returns
    ``(outputs, n_rows, width, kl_width)``. Runs with gradients unless the caller turned them off."""
    import torch

    ids, mask, comp = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
    kl_ids, kl_mask, kl_comp = batch["KL_input_ids"], batch["KL_attention_mask"], batch["KL_completion_mask"]
    width, kl_width = ids.shape[1], kl_ids.shape[1]
    full = max(width, kl_width)

    def wide(t, fill):
        return t if t.shape[1] == full else torch.nn.functional.pad(t, (0, full - t.shape[1]), value=fill)

    input_ids = torch.cat([wide(ids, 0), wide(kl_ids, 0)])
    attention = torch.cat([wide(mask, 0), wide(kl_mask, 0)])
    completion = torch.cat([wide(comp, 0), wide(kl_comp, 0)])
    labels = input_ids.masked_fill(completion == 0, -100)
    out = model(input_ids=input_ids, attention_mask=attention, labels=labels, use_cache=False, fused_lm_head=True)
    return out, ids.shape[0], width, kl_width


def rows_of(outputs, start: int, end: int, width: int):
    """The fused-head outputs of rows start:end, cut to a half's own ``width`` (per-token fields are width - 1 wide:
    the log-prob of each next token)."""
    import torch

    total = outputs.log_probs.shape[0]
    fields = {}
    for key, value in outputs.items():
        if isinstance(value, torch.Tensor) and value.dim() >= 2 and value.shape[0] == total:
            value = value[start:end, : width - 1]
        fields[key] = value
    return type(outputs)(**fields)


class _Replay:
    """Stands in for the model in TRL's loss, which calls it once (on the batch rows): returns their outputs."""

    def __init__(self, outputs):
        self.outputs = outputs

    def __call__(self, *args, **kwargs):
        return self.outputs


class _JointReference:
    """Stands in for the reference model in ``compute_ref_log_probs``: its first call runs the joint forward (inside
    TRL's no-grad / adapter / autocast context), each call returns the half whose input_ids it is called with."""

    def __init__(self, model, batch: dict[str, Any]):
        self.model, self.batch, self.parts = model, batch, None

    def __call__(self, *args, input_ids=None, **kwargs):
        if self.parts is None:
            out, n, width, kl_width = joint_forward(self.model, self.batch)
            self.parts = (rows_of(out, 0, n, width), rows_of(out, n, 2 * n, kl_width))
        return self.parts[1] if input_ids is self.batch["KL_input_ids"] else self.parts[0]


def _no_input_casts(trainer):
    """Under mixed precision (bf16/fp16 autocast), PEFT's LoRA layers would cast every input to the adapter's fp32
    and autocast would cast it straight back for the matmul: two copies per LoRA layer per pass, a sixth of a small
    model's step on a GPU (torch profiler). Off within the step, autocast alone decides (the same bf16 matmuls)."""
    import contextlib

    if getattr(trainer.accelerator, "mixed_precision", "no") in ("bf16", "fp16"):
        from peft.helpers import disable_input_dtype_casting

        return disable_input_dtype_casting(trainer.accelerator.unwrap_model(trainer.model))
    return contextlib.nullcontext()


def trainer_class(base):
    """``base`` (a KTOTrainer class) with policy and KL rows in one forward pass, in training and in the reference
    pass; batches the joint pass does not apply to go through ``base`` unchanged."""

    class JointPassKTOTrainer(base):
        def compute_ref_log_probs(self, model, inputs):
            if not (trl_seam.computes_kl(self) and applies(inputs)):
                return trl_seam.class_reference_logps(base, self, model, inputs)
            with _no_input_casts(self):
                return trl_seam.class_reference_logps(base, self, _JointReference(model, inputs), inputs)

        def _compute_loss(self, model, inputs, return_outputs):
            if not (self.model.training and not return_outputs and trl_seam.computes_kl(self)
                    and trl_seam.uses_precomputed_reference(self) and applies(inputs)
                    and not getattr(self, "aux_loss_enabled", False)
                    and not trl_seam.kl_supplied(self)):  # a KL supplied by the caller (micro-batching) wins
                return trl_seam.class_kto_loss(base, self, model, inputs, return_outputs)
            import torch

            device = self.accelerator.device
            batch = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
            with _no_input_casts(self):
                out, n, width, kl_width = joint_forward(model, batch)
            policy_kl = rows_of(out, n, 2 * n, kl_width).log_probs.detach().sum(-1)
            with trl_seam.supplied_reference(self, policy_kl):
                return trl_seam.class_kto_loss(base, self, _Replay(rows_of(out, 0, n, width)), batch, return_outputs)

    JointPassKTOTrainer.__qualname__ = JointPassKTOTrainer.__name__ = f"JointPass{base.__name__}"
    return JointPassKTOTrainer
