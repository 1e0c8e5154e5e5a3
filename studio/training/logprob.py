"""A pure-PyTorch stand-in for TRL's Triton log-prob kernel, for CPU and Apple MPS.

TRL 1.15 computes the KTO log-probs through ``trl.kernels.ChunkedLogProbFunction``, a Triton kernel. Triton exists
only on Linux with a GPU, so on CPU/MPS ``trl.trainer.utils._ChunkedLogProbFunction`` is ``None`` and training
crashes. ``install_fallback`` puts ``TorchChunkedLogProb`` there (through ``studio.training.trl_seam``, the one
module that touches TRL's private names); it has the same call signature and the same five outputs (log_probs, entropy,
log_sum_sq_probs, mean_logits, is_top1). Tokens are processed in chunks so the ``[N, vocab]`` logits never exist
at once, and the backward recomputes each chunk instead of storing it.

Logit transform, as in TRL: z = softcap * tanh(logit_scale * (h @ W.T + b) / softcap) / temperature.
"""
from __future__ import annotations

import torch

from studio.training import trl_seam

OPTIONAL_OUTPUTS = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
TOKEN_CHUNK = 512


def _chunk_logits(hidden, weight, bias, logit_scale, softcap, inv_t):
    """Transformed logits z (fp32) for one chunk of tokens, and tanh(y/softcap) for the backward (or None)."""
    y = hidden.float() @ weight.float().t()
    if bias is not None:
        y = y + bias.float()
    y = y * logit_scale
    t = None
    if softcap is not None:
        t = torch.tanh(y / softcap)
        y = softcap * t
    return y * inv_t, t


class TorchChunkedLogProb(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping=None,
                logit_scale=1.0, outputs=OPTIONAL_OUTPUTS):
        # chunk_size is the vocabulary tile of the Triton kernel; here whole rows are taken per token chunk.
        ctx.set_materialize_grads(False)
        n = hidden.shape[0]
        inv_t = 1.0 / temperature
        dev = hidden.device
        logprobs = torch.empty(n, device=dev, dtype=torch.float32)
        log_z = torch.empty(n, device=dev, dtype=torch.float32)
        entropy = torch.empty(n, device=dev, dtype=torch.float32) if "entropy" in outputs else None
        lssp = torch.empty(n, device=dev, dtype=torch.float32) if "log_sum_sq_probs" in outputs else None
        mean_logits = torch.empty(n, device=dev, dtype=torch.float32) if "mean_logits" in outputs else None
        is_top1 = torch.empty(n, device=dev, dtype=torch.bool) if "is_top1" in outputs else None
        with torch.no_grad():
            for s in range(0, n, TOKEN_CHUNK):
                e = min(s + TOKEN_CHUNK, n)
                z, _ = _chunk_logits(hidden[s:e], weight, bias, logit_scale, final_logit_softcapping, inv_t)
                lz = torch.logsumexp(z, dim=-1)
                log_z[s:e] = lz
                tgt = z.gather(1, targets[s:e].unsqueeze(1)).squeeze(1)
                logprobs[s:e] = tgt - lz
                if entropy is not None:
                    p = torch.softmax(z, dim=-1)
                    entropy[s:e] = lz - (p * z).sum(-1)
                if lssp is not None:
                    lssp[s:e] = torch.logsumexp(2 * z, dim=-1) - 2 * lz
                if mean_logits is not None:
                    mean_logits[s:e] = z.mean(-1)
                if is_top1 is not None:
                    is_top1[s:e] = z.argmax(-1) == targets[s:e]
        ctx.save_for_backward(hidden, weight, bias, targets, log_z, entropy if entropy is not None else log_z)
        ctx.has_entropy = entropy is not None
        ctx.params = (logit_scale, final_logit_softcapping, inv_t)
        ctx.mark_non_differentiable(*(x for x in (lssp, mean_logits, is_top1) if x is not None))
        return logprobs, entropy, lssp, mean_logits, is_top1

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy, *_):
        hidden, weight, bias, targets, log_z, entropy = ctx.saved_tensors
        logit_scale, softcap, inv_t = ctx.params
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.zeros(hidden.shape, device=hidden.device, dtype=torch.float32) if need_h else None
        grad_w = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32) if need_w else None
        grad_b = torch.zeros(bias.shape, device=bias.device, dtype=torch.float32) if need_b else None
        if grad_entropy is not None and not ctx.has_entropy:
            grad_entropy = None
        n = hidden.shape[0]
        for s in range(0, n, TOKEN_CHUNK):
            e = min(s + TOKEN_CHUNK, n)
            z, t = _chunk_logits(hidden[s:e], weight, bias, logit_scale, softcap, inv_t)
            log_p = z - log_z[s:e].unsqueeze(1)
            p = log_p.exp()
            g = torch.zeros_like(z)
            if grad_logprobs is not None:
                gl = grad_logprobs[s:e].float().unsqueeze(1)
                g -= gl * p
                g.scatter_add_(1, targets[s:e].unsqueeze(1), gl)
            if grad_entropy is not None:
                # dH/dz_j = -p_j (log p_j + H)
                g -= grad_entropy[s:e].float().unsqueeze(1) * p * (log_p + entropy[s:e].unsqueeze(1))
            g = g * inv_t
            if t is not None:
                g = g * (1 - t * t)
            g = g * logit_scale
            if grad_h is not None:
                grad_h[s:e] = g @ weight.float()
            if grad_w is not None:
                grad_w += g.t() @ hidden[s:e].float()
            if grad_b is not None:
                grad_b += g.sum(0)
        return (
            None if grad_h is None else grad_h.to(hidden.dtype),
            None if grad_w is None else grad_w.to(weight.dtype),
            None if grad_b is None else grad_b.to(bias.dtype),
            None, None, None, None, None, None,
        )


def install_fallback(force: bool = False) -> bool:
    """Put the PyTorch implementation where TRL looks for its kernel, if the Triton one is missing.

    Returns True when the fallback is in use. ``force`` installs it even when Triton is present (for tests)."""
    if force or trl_seam.logprob_kernel() is None:
        trl_seam.set_logprob_kernel(TorchChunkedLogProb)
        return True
    return trl_seam.logprob_kernel() is TorchChunkedLogProb


def needs_fallback(device_type: str) -> bool:
    """Triton runs on CUDA only; everywhere else TRL's kernel cannot run."""
    if device_type != "cuda":
        return True
    return trl_seam.logprob_kernel() is None
