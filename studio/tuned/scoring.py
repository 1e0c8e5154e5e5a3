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


# The LM head is applied in tiles so no [tokens, vocab] float32 logits and no float32 copy of the head exist at once:
# at most TOKEN_CHUNK x VOCAB_TILE logits and a VOCAB_TILE x hidden slice of the head (64 MB for a 4096-wide model),
# whatever the vocabulary (152k for Qwen2.5, 256k for Gemma). A head that is not a plain Linear (LoRA-wrapped,
# quantized) is called as a module on as few tokens as keep its [tokens, vocab] output near HEAD_BYTES.
TOKEN_CHUNK = 1024
VOCAB_TILE = 4096
HEAD_BYTES = 64 * 2**20


def _head_logprobs(head, h, target, plain_head: bool, scale: float, softcap):
    """log p(target) of hidden states ``h`` [n, hidden] under the LM head, in float32, with a streaming logsumexp
    over vocabulary tiles."""
    import torch

    n = h.shape[0]
    if not plain_head:
        vocab = head.weight.shape[0] if hasattr(head, "weight") else 1
        step = max(1, HEAD_BYTES // max(1, vocab * 4))
        out = torch.empty(n, dtype=torch.float32, device=h.device)
        for s in range(0, n, step):
            z = _transform(head(h[s : s + step]).float(), scale, softcap)
            out[s : s + step] = z.gather(1, target[s : s + step, None]).squeeze(1) - torch.logsumexp(z, dim=-1)
        return out
    weight, bias = head.weight, head.bias
    hf = h.float()
    lse = torch.full((n,), float("-inf"), dtype=torch.float32, device=h.device)
    tgt = torch.zeros(n, dtype=torch.float32, device=h.device)
    for v0 in range(0, weight.shape[0], VOCAB_TILE):
        v1 = min(v0 + VOCAB_TILE, weight.shape[0])
        z = hf @ weight[v0:v1].float().t()
        if bias is not None:
            z = z + bias[v0:v1].float()
        z = _transform(z, scale, softcap)
        lse = torch.logaddexp(lse, torch.logsumexp(z, dim=-1))
        inside = (target >= v0) & (target < v1)
        if inside.any():
            rows = inside.nonzero().squeeze(1)
            tgt[rows] = z[rows, target[rows] - v0]
    return tgt - lse


def _transform(z, scale: float, softcap):
    import torch

    z = z * scale
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    return z


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
            for s in range(0, h.shape[0], TOKEN_CHUNK):
                lp = _head_logprobs(head, h[s : s + TOKEN_CHUNK], target[s : s + TOKEN_CHUNK], plain_head, scale,
                                    softcap)
                sums.index_add_(0, row_of[s : s + TOKEN_CHUNK], lp)
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
