"""Scoring completions under a model: held-out rows tokenized the way TRL's ``KTOTrainer`` tokenizes them (chat
template for conversational rows, EOS appended to plain-text completions, the completion starting where the
tokenized prompt and prompt+completion diverge, ``max_length`` truncation), and each completion's summed log-prob
computed in float32, as TRL's fused LM head computes it. ``studio.tuned.evaluate`` and the held-out watch
(``studio.training.watch``) score with these."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from studio.data.trl_data import common_prefix_length, kto_token_ids
from studio.errors import UsageError


class EvalError(UsageError, ValueError):
    """Evaluation input that cannot be used; the message says what to do."""


# ---- tokenization (as TRL's KTOTrainer) ------------------------------------------------------------------------

@dataclass
class Tokenized:
    prompt_ids: list[int]
    completion_ids: list[int]

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.completion_ids)


def _is_conversation(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(m, dict) and "role" in m for m in value)


def tokenize_row(tokenizer, prompt: Any, completion: Any, max_length: int | None) -> Tokenized | None:
    """Prompt and completion token ids the way TRL's KTO trainer builds them; None when the prompt alone fills
    ``max_length`` (TRL drops such rows)."""
    if _is_conversation(prompt):
        if not getattr(tokenizer, "chat_template", None):
            raise EvalError("these held-out rows are conversations, but the model's tokenizer has no chat template "
                            "to render them: use plain-text rows (prompt/completion strings) for this model")
        if not _is_conversation(completion):
            completion = [{"role": "assistant", "content": str(completion)}]
        row = {"prompt": prompt, "completion": completion}
    else:
        row = {"prompt": str(prompt), "completion": str(completion)}
    (prompt_ids,), (full_ids,) = kto_token_ids(tokenizer, [row], _is_conversation(prompt))
    prompt_ids, full_ids = list(prompt_ids), list(full_ids)
    # the completion starts where the two tokenizations diverge (chat templates, merges across the boundary)
    n = common_prefix_length(prompt_ids, full_ids)
    if max_length is not None:
        if n >= max_length:
            return None
        full_ids = full_ids[:max_length]
    return Tokenized(full_ids[:n], full_ids[n:])


# ---- log-probs -------------------------------------------------------------------------------------------------

def _batches(items: list[Tokenized], max_tokens: int) -> Iterable[list[int]]:
    """Indices grouped longest first, each batch padded to at most ``max_tokens`` tokens."""
    order = sorted(range(len(items)), key=lambda i: -items[i].length)
    batch: list[int] = []
    for i in order:
        width = items[batch[0]].length if batch else items[i].length
        if batch and (len(batch) + 1) * width > max_tokens:
            yield batch
            batch = []
        batch.append(i)
    if batch:
        yield batch


HEAD_CHUNK = 2048  # completion tokens per LM-head product (2048 x a 50k vocabulary: 400 MB of fp32 logits)


def _head_logits(head, h, plain_head: bool):
    """The LM head's logits of hidden states ``h``, in float32."""
    import torch

    if plain_head:
        z = h.float() @ head.weight.float().t()
        if head.bias is not None:
            z = z + head.bias.float()
        return z
    return head(h).float()


def completion_logps(model, items: list[Tokenized], *, pad_token_id: int, max_tokens: int = 2048,
                     on_batch: Callable[[int], None] | None = None) -> list[float]:
    """Sum of the completion's token log-probs for each item, in float32 as TRL's fused LM head computes them."""
    import torch

    out = [math.nan] * len(items)
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = inner.get_decoder()
    head = inner.get_output_embeddings()
    cfg = inner.config
    softcap = getattr(cfg, "final_logit_softcapping", None)
    scale = getattr(cfg, "logit_scale", None) or 1.0
    plain_head = type(head) is torch.nn.Linear  # a LoRA-wrapped or quantized head is called as a module
    device = inner.get_input_embeddings().weight.device
    with torch.inference_mode():
        for idx in _batches(items, max_tokens):
            width = max(items[i].length for i in idx)
            ids = torch.full((len(idx), width), pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for r, i in enumerate(idx):
                seq = items[i].prompt_ids + items[i].completion_ids
                ids[r, : len(seq)] = torch.tensor(seq)
                mask[r, : len(seq)] = 1
            hidden = decoder(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state
            # every completion token of the batch at once (one transfer back per batch, not one per row): position
            # t predicts token t+1, so a completion's tokens are predicted from positions p-1 .. p+c-2
            predicts = torch.zeros((len(idx), width), dtype=torch.bool)
            for r, i in enumerate(idx):
                p, c = len(items[i].prompt_ids), len(items[i].completion_ids)
                predicts[r, p - 1 : p + c - 1] = c > 0
            target = torch.roll(ids, -1, dims=1)[predicts].to(hidden.device)
            row_of = torch.arange(len(idx))[:, None].expand(-1, width)[predicts].to(hidden.device)
            h = hidden[predicts.to(hidden.device)]
            sums = torch.zeros(len(idx), dtype=torch.float32, device=hidden.device)
            for s in range(0, h.shape[0], HEAD_CHUNK):
                z = _head_logits(head, h[s : s + HEAD_CHUNK], plain_head) * scale
                if softcap:
                    z = softcap * torch.tanh(z / softcap)
                lp = z.gather(1, target[s : s + HEAD_CHUNK, None]).squeeze(1) - torch.logsumexp(z, dim=-1)
                sums.index_add_(0, row_of[s : s + HEAD_CHUNK], lp)
            for r, value in enumerate(sums.tolist()):
                out[idx[r]] = value
            if on_batch:
                on_batch(len(idx))
    return out


def tokenize_rows(tokenizer, rows: list[dict], max_length: int | None) -> tuple[list[Tokenized], list[int], int]:
    """(tokenized rows, their indices in ``rows``, how many were skipped because the prompt fills max_length)."""
    if not rows:
        raise EvalError("no held-out rows to evaluate")
    items, kept, skipped = [], [], 0
    for i, r in enumerate(rows):
        t = tokenize_row(tokenizer, r["prompt"], r["completion"], max_length)
        if t is None:
            skipped += 1
            continue
        items.append(t)
        kept.append(i)
    if not items:
        raise EvalError(f"every prompt is at least max_length ({max_length}) tokens long: nothing to score")
    return items, kept, skipped


def pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
