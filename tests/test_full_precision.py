"""An export's check computes in float32 without a float32 copy of the big matrices, and goes to the GPU only when
the run's budget leaves room (studio.models.full_precision)."""
from __future__ import annotations

import pytest
import torch

from studio.models import full_precision


def _tiny(tied: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=tied)
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("tied", [False, True])
def test_float32_compute_is_exact_without_upcasting_embedding_or_head(monkeypatch, tied):
    # the head (512 x 64 elements) counts as big: it is multiplied in float32 tiles of 100 rows
    monkeypatch.setattr(full_precision, "TILE_ELEMENTS", 64 * 100)
    model = _tiny(tied)
    reference = _tiny(tied).float()  # the same weights (same seed), in float32
    model.to(torch.bfloat16)
    reference.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    ids = torch.randint(0, 512, (2, 12))
    seen = {}

    def look(name):
        def hook(mod, args, out):
            seen.setdefault(name, (mod.weight.dtype, out.dtype))  # the first forward's: inside the context
        return hook

    model.model.embed_tokens.register_forward_hook(look("embed"))
    model.lm_head.register_forward_hook(look("head"))
    with torch.inference_mode():
        want = reference(input_ids=ids).logits
        with full_precision.float32_compute(model):
            got = model(input_ids=ids).logits
        plain = model(input_ids=ids).logits  # the context is gone: 16-bit arithmetic again
    assert got.dtype == torch.float32
    assert float((got - want).abs().max()) < 1e-4 * max(1.0, float(want.abs().max()))
    assert float((plain.float() - want).abs().max()) > float((got - want).abs().max())
    assert seen["embed"][0] == torch.bfloat16  # never a float32 copy of the vocabulary's rows
    assert seen["head"] == (torch.bfloat16, torch.float32)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert "forward" not in vars(model.lm_head)  # the tiled forward is removed with the context


def test_check_device_is_the_cpu_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    assert full_precision.gpu_room_bytes(7.5) == 0
    assert full_precision.check_device(10, 7.5) == "cpu"


def test_check_device_counts_the_budget_and_what_is_held(monkeypatch):
    """An H100 with 70 GiB free but a run budget of 7.5 GiB of which 5 are held (the Chat tab's model, a run's
    leftovers): a 2 GiB model's check goes to the CPU; with nothing held it goes to the GPU."""
    gib = 2**30
    held = {"bytes": 5 * gib}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (70 * gib, 80 * gib))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *a: held["bytes"])
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda *a: held["bytes"])
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda *a: 1.0, raising=False)
    assert full_precision.gpu_room_bytes(7.5) == int(2.5 * gib)
    assert full_precision.check_device(2 * gib, 7.5) == "cpu"
    assert full_precision.check_device(2 * gib) == "cuda"  # no budget: the card's free memory
    held["bytes"] = 0
    assert full_precision.check_device(2 * gib, 7.5) == "cuda"
    # a process capped at 10% of the card (a benchmark's allocator cap) counts that cap too
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda *a: 0.1, raising=False)
    assert full_precision.check_device(2 * gib) == "cuda"
    assert full_precision.check_device(5 * gib) == "cpu"
