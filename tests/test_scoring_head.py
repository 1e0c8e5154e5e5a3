"""The held-out scorer's LM head: exact log-probs without a float32 copy of the head or [tokens, vocab] logits."""
import torch

from studio.tuned import scoring


def _reference(h, w, b, target, scale, softcap):
    z = (h.float() @ w.float().t() + (0 if b is None else b.float())) * scale
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    return torch.log_softmax(z, -1).gather(1, target[:, None]).squeeze(1)


def test_tiled_head_gives_the_full_log_softmax_values():
    torch.manual_seed(0)
    vocab, hidden, n = scoring.VOCAB_TILE * 3 + 17, 32, 40  # a last tile shorter than the others
    for bias in (False, True):
        head = torch.nn.Linear(hidden, vocab, bias=bias).to(torch.bfloat16)
        h = torch.randn(n, hidden, dtype=torch.bfloat16)
        target = torch.randint(0, vocab, (n,))
        target[0], target[1] = 0, vocab - 1
        for scale, softcap in ((1.0, None), (0.5, 30.0)):
            got = scoring._head_logprobs(head, h, target, True, scale, softcap)
            want = _reference(h, head.weight, head.bias, target, scale, softcap)
            assert torch.allclose(got, want, atol=1e-4), (bias, scale, softcap, (got - want).abs().max())


def test_a_module_head_is_called_on_few_tokens_at_a_time(monkeypatch):
    torch.manual_seed(0)
    vocab, hidden, n = 1000, 16, 300
    monkeypatch.setattr(scoring, "HEAD_BYTES", vocab * 4 * 64)  # room for 64 tokens' logits
    inner = torch.nn.Linear(hidden, vocab)
    widest = []

    class Wrapped(torch.nn.Module):  # e.g. a LoRA-wrapped or quantized head
        weight = inner.weight

        def forward(self, x):
            widest.append(x.shape[0])
            return inner(x)

    h, target = torch.randn(n, hidden), torch.randint(0, vocab, (n,))
    got = scoring._head_logprobs(Wrapped(), h, target, False, 1.0, None)
    assert torch.allclose(got, _reference(h, inner.weight, inner.bias, target, 1.0, None), atol=1e-5)
    assert max(widest) == 64 and sum(widest) == n


def test_the_whole_head_is_never_cast_to_float32(monkeypatch):
    vocab, hidden = scoring.VOCAB_TILE * 2, 8
    head = torch.nn.Linear(hidden, vocab, bias=False).to(torch.bfloat16)
    largest = []
    real_float = torch.Tensor.float

    def tracking_float(t):
        largest.append(t.numel())
        return real_float(t)

    monkeypatch.setattr(torch.Tensor, "float", tracking_float)
    scoring._head_logprobs(head, torch.randn(4, hidden, dtype=torch.bfloat16), torch.tensor([0, 1, 2, 3]), True, 1.0,
                           None)
    assert max(largest) <= scoring.VOCAB_TILE * hidden
