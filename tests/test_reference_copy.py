"""TRL's KTOTrainer keeps a frozen copy of a PEFT model's adapter ("ref") to score the reference. For a fresh LoRA
adapter that copy is the base model, so the engine drops it (studio.speed.drop_reference_copy) and TRL scores the
reference with adapters disabled: one step must give the same loss, gradients and metrics as TRL with its copy, with
the reference log-probs in the step or precomputed (studio.speed.precompute_reference)."""
from __future__ import annotations

import os
import time

import pytest
import torch

from studio.training import speed
from studio.training.trl_seam import kto_config
from tests.test_microbatch import BATCH, METRIC_KEYS, ROWS, _lora_model, _move_policy, _step
from tests.test_microbatch import _trainer as microbatch_trainer
from tests.conftest import tiny_run_config


def _trainer(model_dir, tmp_path, precompute: bool, drop: bool):
    from trl import KTOTrainer

    def drop_copy(trainer):
        assert speed.drop_reference_copy(trainer.model)
        if precompute:
            speed.precompute_reference(trainer, rows_per_pass=3, fingerprint="test")

    return microbatch_trainer(KTOTrainer, model_dir, tmp_path, precompute and not drop,
                              prepare=drop_copy if drop else None)


@pytest.mark.parametrize("precompute", [False, True], ids=["ref-in-step", "ref-precomputed"])
def test_a_step_without_the_reference_copy_equals_trls_step_with_it(tmp_path, tiny_model_dir, precompute):
    with_copy = _trainer(tiny_model_dir, tmp_path / "copy", precompute, drop=False)
    without = _trainer(tiny_model_dir, tmp_path / "dropped", precompute, drop=True)
    assert "ref" in with_copy.model.peft_config and "ref" not in without.model.peft_config
    n_copy = sum(p.numel() for p in with_copy.model.parameters())
    n_without = sum(p.numel() for p in without.model.parameters())
    n_lora = sum(p.numel() for n, p in without.model.named_parameters() if "lora_" in n)
    assert n_copy - n_without == n_lora > 0  # exactly one adapter's worth of weights is gone

    batch = next(iter(with_copy.get_train_dataloader()))
    if precompute:  # the reference log-probs, computed with the copy and without it, are the same numbers
        again = next(iter(without.get_train_dataloader()))
        assert without.args.precompute_ref_log_probs and without.args.precompute_ref_batch_size == 3
        torch.testing.assert_close(again["ref_logps"], batch["ref_logps"], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(again["ref_KL_logps"], batch["ref_KL_logps"], rtol=1e-6, atol=1e-6)
    want_loss, want_grads, want_metrics = _step(with_copy, batch)
    got_loss, got_grads, got_metrics = _step(without, batch)
    assert want_metrics["kl"][0] > 0  # the policy differs from the reference: the comparison means something
    assert got_loss.item() == pytest.approx(want_loss.item(), rel=1e-5)
    assert got_grads.keys() == want_grads.keys() and len(got_grads) > 0
    for name, want in want_grads.items():
        torch.testing.assert_close(got_grads[name], want, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
    for key in METRIC_KEYS:
        assert got_metrics[key][0] == pytest.approx(want_metrics[key][0], rel=1e-5, abs=1e-6), key


def test_a_reference_copy_that_differs_from_the_base_model_is_kept(tmp_path, tiny_model_dir):
    """A starting adapter that already changes the model (non-zero B) is the reference: its copy must stay."""
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import KTOTrainer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = _lora_model(tiny_model_dir, [])
    _move_policy(model)  # before the trainer copies it
    args = kto_config(tiny_run_config(tmp_path, **{"train.per_device_train_batch_size": BATCH}), device="cpu")
    ds = Dataset.from_list([{"prompt": p, "completion": c, "label": l} for p, c, l in ROWS])
    KTOTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
    assert not speed.drop_reference_copy(model)
    assert "ref" in model.peft_config
    assert not speed.drop_reference_copy(torch.nn.Linear(2, 2))  # not a PEFT model: nothing to drop


def test_the_reference_fingerprint_follows_the_checkpoint_files_and_the_loading_settings(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"weights")
    first = speed.reference_fingerprint(str(model), backend="full", dtype="torch.float32")
    assert first == speed.reference_fingerprint(str(model), dtype="torch.float32", backend="full")
    assert first != speed.reference_fingerprint(str(model), backend="bnb", dtype="torch.float32")
    (model / "model.safetensors").write_bytes(b"other weights")
    changed = speed.reference_fingerprint(str(model), backend="full", dtype="torch.float32")
    assert changed != first
    stamp = time.time() + 10
    os.utime(model / "model.safetensors", (stamp, stamp))  # same size, new time: a rewritten file
    assert speed.reference_fingerprint(str(model), backend="full", dtype="torch.float32") != changed
    assert speed.reference_fingerprint(str(tmp_path / "absent")) is None
