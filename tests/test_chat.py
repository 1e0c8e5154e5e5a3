"""After a short training run, a user chats with the base model and the tuned adapter side by side.

One model is in memory; the tuned side is the adapter switched on, the base side the same model with it off.
"""
from __future__ import annotations

import shutil

import pytest
import torch

from studio.tuned.chat import (AdapterChoice, ChatError, GenerationSettings, build_messages, list_adapters,
                         resolve_adapter)

@pytest.fixture(scope="module")
def plain_base(bundled_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(bundled_model_dir, dtype=torch.float32).eval()


QUESTION = build_messages([], "What is the capital of France?")


def test_switching_the_adapter_off_gives_the_base_logits_exactly_and_on_changes_them(chat, plain_base):
    ids = torch.tensor([chat.render(QUESTION)])
    with torch.inference_mode():
        expected = plain_base(input_ids=ids).logits[0].float()
    base_side = chat.logits(QUESTION, tuned=False)
    tuned_side = chat.logits(QUESTION, tuned=True)
    assert torch.equal(base_side, expected), "the base side must be the untouched base model"
    change = (tuned_side - base_side).abs().max().item()
    assert change > 0.05, f"three training steps should move the logits, moved only {change}"
    # and toggling back really restores the base model, bit for bit
    assert torch.equal(chat.logits(QUESTION, tuned=False), expected)


def test_base_side_reply_is_the_base_models_own_reply_with_the_same_seed(chat, plain_base):
    settings = GenerationSettings(max_new_tokens=12, temperature=0.9, top_p=0.95, seed=7)
    reply = chat.reply(QUESTION, tuned=False, settings=settings)
    ids = torch.tensor([chat.render(QUESTION)])
    torch.manual_seed(7)
    with torch.inference_mode():
        out = plain_base.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                                  do_sample=True, temperature=0.9, top_p=0.95, pad_token_id=chat.tokenizer.pad_token_id)
    expected = chat.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert reply == expected
    # the same seed gives the same tuned reply every time, so differences between the sides come from training
    assert chat.reply(QUESTION, True, settings) == chat.reply(QUESTION, True, settings)


def test_replies_stream_as_growing_text(chat):
    settings = GenerationSettings(max_new_tokens=10, temperature=0.0)
    pieces = list(chat.stream(QUESTION, tuned=True, settings=settings))
    assert len(pieces) >= 2
    assert all(b.startswith(a) for a, b in zip(pieces, pieces[1:]))
    assert pieces[-1] == chat.reply(QUESTION, tuned=True, settings=settings)


def test_a_reply_stopped_by_max_new_tokens_is_marked_cut_off_and_one_that_ended_is_not(chat):
    """Issue 16 point 9: front ends mark a reply cut off at max new tokens (the Chat tab adds a ✂️ note)."""
    short = GenerationSettings(max_new_tokens=3, temperature=0.0)
    chat.reply(build_messages([], "Write a long story about a dragon who learns to bake bread."), True, short)
    assert chat.cut_off
    roomy = GenerationSettings(max_new_tokens=64, temperature=0.0)
    text = chat.reply(QUESTION, tuned=False, settings=roomy)  # "The capital of France is Paris." and end of turn
    assert len(chat.tokenizer(text)["input_ids"]) < 64 and not chat.cut_off


def test_each_side_keeps_its_own_history_and_the_system_prompt(chat):
    history = [{"role": "user", "content": [{"type": "text", "text": "Hi!"}]},
               {"role": "assistant", "content": "Hello, how can I help?"}]
    msgs = build_messages(history, "Tell me a fact.", system_prompt="Answer briefly.")
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user"]
    text = chat.tokenizer.decode(chat.render(msgs))
    assert "Answer briefly." in text and "Hello, how can I help?" in text and text.rstrip().endswith("assistant")


def test_switching_between_a_runs_adapter_and_its_checkpoint_keeps_one_model(chat, run_dir):
    final_logits = chat.logits(QUESTION, tuned=True)
    model = chat.model
    checkpoint = AdapterChoice(run_dir, run_dir / "checkpoint-2")
    chat.use(checkpoint)
    assert chat.model is model, "a second adapter must not load a second model"
    ckpt_logits = chat.logits(QUESTION, tuned=True)
    assert not torch.equal(ckpt_logits, final_logits), "step 2 and step 3 adapters should differ"
    chat.use(run_dir)
    assert torch.equal(chat.logits(QUESTION, tuned=True), final_logits)
    assert len(chat.model.peft_config) == 2


def test_adapters_of_runs_in_the_studio_home_are_listed(run_dir, studio_home):
    from studio import paths

    shutil.copytree(run_dir, paths.runs_dir() / "copied", ignore=shutil.ignore_patterns("optimizer.pt"))
    labels = [a.label for a in list_adapters()]
    assert labels == ["copied · final adapter", "copied · checkpoint-3", "copied · checkpoint-2"]


def test_unusable_adapter_paths_say_what_to_do(tmp_path):
    with pytest.raises(ChatError, match="does not exist"):
        resolve_adapter(tmp_path / "nope")
    (tmp_path / "empty_run").mkdir()
    (tmp_path / "empty_run" / "run.yaml").write_text("name: empty_run\n")
    with pytest.raises(ChatError, match="no saved adapter yet"):
        resolve_adapter(tmp_path / "empty_run")
    with pytest.raises(ChatError, match="neither a run folder"):
        resolve_adapter(tmp_path)
