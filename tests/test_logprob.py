"""The PyTorch stand-in for TRL's Triton log-prob kernel computes the same function as a plain log-softmax."""
import pytest
import torch

from studio.training import logprob
from studio.training.logprob import TorchChunkedLogProb


def naive(hidden, weight, bias, targets, temperature, softcap, scale):
    z = hidden @ weight.t()
    if bias is not None:
        z = z + bias
    z = z * scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    z = z / temperature
    logp = torch.log_softmax(z, dim=-1)
    p = logp.exp()
    return (logp.gather(1, targets[:, None]).squeeze(1), -(p * logp).sum(-1),
            torch.logsumexp(2 * z, -1) - 2 * torch.logsumexp(z, -1), z.mean(-1), z.argmax(-1) == targets)


@pytest.mark.parametrize("softcap,scale,temperature,with_bias", [
    (None, 1.0, 1.0, False), (30.0, 0.5, 0.7, True), (None, 2.0, 1.3, True)])
def test_values_and_gradients_match_naive_reference(softcap, scale, temperature, with_bias, monkeypatch):
    monkeypatch.setattr(logprob, "TOKEN_CHUNK", 7)  # several chunks, the last one partial
    g = torch.Generator().manual_seed(1234)
    n, h, v = 23, 16, 50
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(v, generator=g, dtype=torch.float64, requires_grad=True) if with_bias else None
    targets = torch.randint(0, v, (n,), generator=g)
    w_lp, w_ent = torch.randn(n, generator=g, dtype=torch.float64), torch.randn(n, generator=g, dtype=torch.float64)

    ours = TorchChunkedLogProb.apply(hidden, weight, bias, targets, temperature, 4096, softcap, scale,
                                     ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1"))
    ref = naive(hidden, weight, bias, targets, temperature, softcap, scale)
    for name, a, b in zip(["log_probs", "entropy", "log_sum_sq_probs", "mean_logits"], ours[:4], ref[:4]):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5, msg=name)
    assert torch.equal(ours[4], ref[4])

    inputs = [hidden, weight] + ([bias] if with_bias else [])
    got = torch.autograd.grad((ours[0] * w_lp).sum() + (ours[1] * w_ent).sum(), inputs)
    want = torch.autograd.grad((ref[0] * w_lp).sum() + (ref[1] * w_ent).sum(), inputs)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5)


def test_only_requested_outputs_are_computed():
    hidden = torch.randn(5, 8, requires_grad=True)
    weight = torch.randn(11, 8)
    out = TorchChunkedLogProb.apply(hidden, weight, None, torch.randint(0, 11, (5,)), 1.0, 4096, None, 1.0, ())
    assert out[0].shape == (5,) and all(x is None for x in out[1:])
    out[0].sum().backward()
    assert hidden.grad is not None and torch.isfinite(hidden.grad).all()


def test_fallback_is_installed_where_trl_looks_for_its_kernel():
    from trl.trainer import utils as trl_utils

    before = trl_utils._ChunkedLogProbFunction
    try:
        assert logprob.install_fallback(force=True)
        assert trl_utils._ChunkedLogProbFunction is TorchChunkedLogProb
    finally:
        trl_utils._ChunkedLogProbFunction = before
    assert logprob.needs_fallback("cpu") and logprob.needs_fallback("mps")
