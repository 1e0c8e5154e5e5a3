"""memory.micro_batch_size: KTO's KL batch decoupled from the gradient micro-batch.

One training step of the micro-batched trainer must give the same loss, the same LoRA gradients and the same logged
batch-level metrics as TRL's plain KTOTrainer on the same weights and batch, while the model never sees more than
micro_batch_size rows in one forward pass."""
from __future__ import annotations

import math

import pytest
import torch

from studio.training import microbatch
from studio.training.trl_seam import kto_config
from tests.conftest import tiny_run_config

BATCH = 4
# prompts and completions of different lengths (micro-batches get trimmed), labels mixed within each batch of 4
ROWS = [
    ("What is the capital of France?", " Paris is the capital of France.", True),
    ("Name a colour.", " Potato, obviously, and also a very long list of unrelated words here.", False),
    ("Say hello to me in a friendly way please.", " no", False),
    ("2 + 2 =", " 4", True),
    ("Tell me a fact.", " Water boils at 100 degrees Celsius at sea level.", True),
    ("What do bees make?", " Honey.", True),
    ("Is the earth flat?", " Yes, completely flat.", False),
    ("Translate 'cat' to French.", " chat", True),
]
METRIC_KEYS = ("kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected",
               "logits/chosen", "logits/rejected", "entropy", "num_tokens")


def _lora_model(model_dir, seen: list[int]):
    """The tiny model with a fresh LoRA adapter (same weights every call); ``seen`` gets the (rows, width) of
    every forward pass of the transformer."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    torch.manual_seed(0)
    model = get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, lora_dropout=0.0,
                                            target_modules=["q_proj", "v_proj", "up_proj", "down_proj"]))
    model.base_model.model.model.register_forward_pre_hook(
        lambda _m, args, kwargs: seen.append(tuple(kwargs.get("input_ids", args[0] if args else None).shape)),
        with_kwargs=True)
    return model


def _move_policy(model):
    """Random LoRA B matrices for the policy (the trainer's frozen "ref" adapter keeps the zero ones), so policy
    and reference differ: non-zero rewards and KL, and gradients for both A and B."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B.default" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def _trainer(cls, model_dir, tmp_path, precompute: bool, seen: list[int] | None = None, prepare=None):
    """A trainer on the tiny model with a fresh adapter whose policy is then moved; ``prepare(trainer)`` runs between
    the trainer's construction and the move (e.g. changing how the reference is kept)."""
    from datasets import Dataset
    from transformers import AutoTokenizer

    from studio.training import logprob

    logprob.install_fallback(force=True)  # TRL's log-prob kernel is Triton (GPU) only
    tok = AutoTokenizer.from_pretrained(model_dir)
    cfg = tiny_run_config(tmp_path, **{"train.per_device_train_batch_size": BATCH, "kto.max_length": 64,
                                       "train.gradient_accumulation_steps": 2})
    args = kto_config(cfg, device="cpu", precompute_ref_log_probs=precompute)
    ds = Dataset.from_list([{"prompt": p, "completion": c, "label": l} for p, c, l in ROWS])
    model = _lora_model(model_dir, seen if seen is not None else [])
    trainer = cls(model=model, args=args, train_dataset=ds, processing_class=tok)
    assert "ref" in model.peft_config  # the reference is TRL's frozen copy of the initial adapter
    if prepare is not None:
        prepare(trainer)
    _move_policy(model)
    # set by Trainer's training loop (the last accumulation window may be shorter); we call training_step directly
    trainer.current_gradient_accumulation_steps = 2
    return trainer


def _step(trainer, batch):
    """One training step from zero gradients; returns loss, LoRA gradients and the batch's logged metrics."""
    model = trainer.model
    model.zero_grad(set_to_none=True)
    trainer._metrics["train"].clear()
    trainer._total_train_tokens = 0
    inputs = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    loss = trainer.training_step(model, inputs)
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    metrics = {k: list(v) for k, v in trainer._metrics["train"].items()}
    model.zero_grad(set_to_none=True)
    return loss, grads, metrics


def assert_same_step(want, got, grad_rtol: float = 1e-5) -> None:
    """Two ``_step`` results agree: the loss, the gradient of every LoRA weight (A and B, all non-zero) and every
    logged metric (the KL term really exercised: the policy is not the reference)."""
    (want_loss, want_grads, want_metrics), (got_loss, got_grads, got_metrics) = want, got
    assert math.isfinite(want_loss.item()) and want_loss.item() != 0
    assert got_loss.item() == pytest.approx(want_loss.item(), rel=1e-5)
    assert want_grads.keys() == got_grads.keys() and len(want_grads) > 0
    for name, grad in want_grads.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(got_grads[name], grad, rtol=grad_rtol, atol=1e-6, msg=lambda m: f"{name}: {m}")
    assert want_metrics["kl"][0] > 0
    for key in METRIC_KEYS:
        assert got_metrics[key] == pytest.approx(want_metrics[key], rel=1e-5, abs=1e-6), key
    assert set(got_metrics) == set(want_metrics)


@pytest.mark.parametrize("precompute", [False, True], ids=["ref-in-step", "ref-precomputed"])
@pytest.mark.parametrize("micro", [1, 2, 3])
def test_micro_batched_step_equals_the_whole_batch_step(tmp_path, tiny_model_dir, precompute, micro):
    from trl import KTOTrainer

    plain_seen, micro_seen = [], []
    plain = _trainer(KTOTrainer, tiny_model_dir, tmp_path / "plain", precompute, plain_seen)
    cls = microbatch.trainer_class(micro, BATCH)
    assert cls is not KTOTrainer and issubclass(cls, KTOTrainer)
    micro_trainer = _trainer(cls, tiny_model_dir, tmp_path / "micro", precompute, micro_seen)
    original_kl = micro_trainer._compute_kl_logps

    batch = next(iter(plain.get_train_dataloader()))
    assert batch["label"].tolist() == [True, False, False, True]
    assert ("ref_logps" in batch) == precompute
    if precompute:  # both trainers precomputed the same reference values
        again = next(iter(micro_trainer.get_train_dataloader()))
        torch.testing.assert_close(again["ref_logps"], batch["ref_logps"], rtol=0, atol=0)

    plain_seen.clear()
    want_loss, want_grads, want_metrics = _step(plain, batch)
    assert max(rows for rows, _ in plain_seen) == BATCH
    micro_seen.clear()
    got_loss, got_grads, got_metrics = _step(micro_trainer, batch)
    assert max(rows for rows, _ in micro_seen) == micro, "a forward pass saw more rows than the micro-batch"
    if micro == 1:  # a short row's micro-batch drops the padding its longer batch-mates needed
        assert min(width for _, width in micro_seen) < batch["input_ids"].shape[1]

    # one batch-level value per metric; loss, gradients and metrics equal the plain trainer's
    for key in METRIC_KEYS:
        assert len(got_metrics[key]) == 1, (key, got_metrics[key])
    assert_same_step((want_loss, want_grads, want_metrics), (got_loss, got_grads, got_metrics))
    # (d) the temporary state is gone
    assert micro_trainer.precompute_ref_logps is precompute
    assert "_compute_kl_logps" not in vars(micro_trainer)
    assert micro_trainer._compute_kl_logps == original_kl


def test_state_is_restored_when_a_micro_batch_fails(tmp_path, tiny_model_dir):
    trainer = _trainer(microbatch.trainer_class(1, BATCH), tiny_model_dir, tmp_path, precompute=False)
    model = trainer.model
    batch = next(iter(trainer.get_train_dataloader()))
    calls = []

    def failing(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return type(trainer)._compute_loss(trainer, *a, **kw)

    trainer._compute_loss = failing
    with pytest.raises(RuntimeError, match="boom"):
        trainer.training_step(model, batch)
    assert trainer.precompute_ref_logps is False
    assert "_compute_kl_logps" not in vars(trainer)
    assert all(len(v) == 0 for k, v in trainer._metrics["train"].items() if k != "num_tokens")
    model.zero_grad(set_to_none=True)


def test_trainer_class_is_plain_when_the_micro_batch_covers_the_batch():
    from trl import KTOTrainer

    assert microbatch.trainer_class(None, 4) is KTOTrainer
    assert microbatch.trainer_class(4, 4) is KTOTrainer
    assert microbatch.trainer_class(8, 4) is KTOTrainer
    assert microbatch.trainer_class(2, 4).micro_batch_size == 2
    assert microbatch.is_active(1, 2) and not microbatch.is_active(2, 2) and not microbatch.is_active(None, 2)


def _engine_run(tmp_path, monkeypatch, **changes):
    from studio.training.engine import Engine

    built = []
    real = microbatch.trainer_class

    def spy(*a, **kw):
        cls = real(*a, **kw)
        built.append(cls)
        return cls

    monkeypatch.setattr(microbatch, "trainer_class", spy)
    cfg = tiny_run_config(tmp_path, **changes)
    engine = Engine()
    job = engine.start(cfg)
    engine.wait(600)
    assert job.state == "finished", job.error
    assert (cfg.run_dir() / "adapter" / "adapter_model.safetensors").is_file()
    messages = [e.get("message", "") for e in job.events if e["type"] == "status"]
    return job, built, messages


def test_engine_trains_with_micro_batches(tmp_path, monkeypatch, tiny_model_dir):
    from trl import KTOTrainer

    job, built, messages = _engine_run(tmp_path, monkeypatch, **{"model.name_or_path": str(tiny_model_dir),
                                                                "memory.micro_batch_size": 1,
                                                                "train.max_steps": 2, "kto.max_length": 64})
    assert len(built) == 1 and built[0] is not KTOTrainer and built[0].micro_batch_size == 1
    assert any("micro-batches of 1 row" in m for m in messages), messages
    steps = [m for m in job.metrics() if "loss" in m]
    assert [m["step"] for m in steps] == [1, 2]
    for m in steps:
        for k in ("loss", "kl", "rewards/chosen", "rewards/rejected"):
            if k in m:
                assert math.isfinite(m[k]), (k, m)


def test_engine_uses_the_plain_trainer_when_the_micro_batch_is_not_smaller(tmp_path, monkeypatch, tiny_model_dir):
    from trl import KTOTrainer

    _, built, messages = _engine_run(tmp_path, monkeypatch, **{"model.name_or_path": str(tiny_model_dir),
                                                              "memory.micro_batch_size": 2, "train.max_steps": 1,
                                                              "kto.max_length": 64})
    assert built == [KTOTrainer]
    assert not any("micro-batch" in m for m in messages), messages
