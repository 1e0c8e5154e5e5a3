"""Policy rows and KL rows in one forward pass (studio/training/joint_pass.py).

One training step of the joint-pass trainer must give the same loss, LoRA gradients and logged metrics as TRL's
plain KTOTrainer on the same weights and batch, and its reference pass the same log-probs, while the transformer runs
once per batch (on the batch rows stacked on the KL rows) instead of twice."""
from __future__ import annotations

import math

import pytest
import torch

from studio.training import joint_pass, microbatch
from tests.test_microbatch import BATCH, _step, _trainer, assert_same_step


def _plain():
    from trl import KTOTrainer

    return KTOTrainer


def test_reference_pass_gives_trl_values_in_one_forward(tmp_path, tiny_model_dir):
    plain_seen, joint_seen = [], []
    plain = _trainer(_plain(), tiny_model_dir, tmp_path / "plain", precompute=True, seen=plain_seen)
    joint = _trainer(joint_pass.trainer_class(_plain()), tiny_model_dir, tmp_path / "joint", precompute=True,
                     seen=joint_seen)
    # the constructors ran the reference pass: TRL's two forwards a batch, the joint one forward of both halves
    assert len(plain_seen) == 2 * len(joint_seen) and len(joint_seen) > 0
    assert max(rows for rows, _ in joint_seen) == 2 * max(rows for rows, _ in plain_seen)
    want = plain.train_dataset
    got = joint.train_dataset
    torch.testing.assert_close(torch.tensor(got["ref_logps"]), torch.tensor(want["ref_logps"]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.tensor(got["ref_KL_logps"]), torch.tensor(want["ref_KL_logps"]), rtol=1e-5,
                               atol=1e-5)
    assert any(abs(v) > 0 for v in want["ref_logps"])


def test_training_step_equals_trl_two_pass_step(tmp_path, tiny_model_dir):
    plain_seen, joint_seen = [], []
    plain = _trainer(_plain(), tiny_model_dir, tmp_path / "plain", precompute=True, seen=plain_seen)
    joint = _trainer(joint_pass.trainer_class(_plain()), tiny_model_dir, tmp_path / "joint", precompute=True,
                     seen=joint_seen)
    batch = next(iter(plain.get_train_dataloader()))
    assert batch["input_ids"].shape[1] != batch["KL_input_ids"].shape[1]  # the halves are padded to one width

    plain_seen.clear()
    want_loss, want_grads, want_metrics = _step(plain, batch)
    assert [rows for rows, _ in plain_seen] == [BATCH, BATCH]  # TRL: the KL rows, then the batch rows
    joint_seen.clear()
    got_loss, got_grads, got_metrics = _step(joint, batch)
    assert [rows for rows, _ in joint_seen] == [2 * BATCH], "one forward over batch and KL rows"

    assert_same_step((want_loss, want_grads, want_metrics), (got_loss, got_grads, got_metrics), grad_rtol=1e-4)
    assert joint.precompute_ref_logps is True and "_compute_kl_logps" not in vars(joint)


def test_without_a_precomputed_reference_the_step_is_trls(tmp_path, tiny_model_dir):
    seen = []
    joint = _trainer(joint_pass.trainer_class(_plain()), tiny_model_dir, tmp_path, precompute=False, seen=seen)
    batch = next(iter(joint.get_train_dataloader()))
    seen.clear()
    loss, _, _ = _step(joint, batch)
    assert math.isfinite(loss.item())
    # TRL's own step, unchanged: policy KL rows, batch rows, then the reference's KL rows and batch rows
    assert [rows for rows, _ in seen] == [BATCH] * 4


def test_a_caller_supplied_kl_wins(tmp_path, tiny_model_dir):
    """Micro-batching hands TRL's loss the whole batch's KL: the joint pass must not replace it with a chunk's."""
    cls = joint_pass.trainer_class(microbatch.trainer_class(2, BATCH))
    plain = _trainer(microbatch.trainer_class(2, BATCH), tiny_model_dir, tmp_path / "plain", precompute=True)
    joint = _trainer(cls, tiny_model_dir, tmp_path / "joint", precompute=True)
    batch = next(iter(plain.get_train_dataloader()))
    want_loss, _, want_metrics = _step(plain, batch)
    got_loss, _, got_metrics = _step(joint, batch)
    assert got_loss.item() == pytest.approx(want_loss.item(), rel=1e-5)
    assert got_metrics["kl"] == pytest.approx(want_metrics["kl"], rel=1e-5)


def test_applies_only_to_plain_text_batches():
    base = {k: None for k in ("input_ids", "attention_mask", "completion_mask", "KL_input_ids",
                              "KL_attention_mask", "KL_completion_mask", "label")}
    assert joint_pass.applies(base)
    assert not joint_pass.applies({**base, "token_type_ids": None})
    assert not joint_pass.applies({k: v for k, v in base.items() if not k.startswith("KL_")})


def test_under_bf16_autocast_the_lora_inputs_are_not_cast_and_the_loss_matches(tmp_path, tiny_model_dir, monkeypatch):
    """Mixed precision (bf16 autocast, as on a GPU): the joint pass turns PEFT's fp32 input casts off within the step;
    the loss stays TRL's to bf16 tolerance."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from tests import test_microbatch
    from studio.training import trl_seam

    real = trl_seam.kto_config

    def bf16_config(cfg, **kw):
        return real(cfg, **{**kw, "bf16": True})

    monkeypatch.setattr(test_microbatch, "kto_config", bf16_config)
    plain = _trainer(_plain(), tiny_model_dir, tmp_path / "plain", precompute=True)
    joint = _trainer(joint_pass.trainer_class(_plain()), tiny_model_dir, tmp_path / "joint", precompute=True)
    assert joint.accelerator.mixed_precision == "bf16"
    flags = []
    layers = [m for m in joint.model.modules() if isinstance(m, BaseTunerLayer)]
    layers[0].register_forward_pre_hook(lambda m, a: flags.append(getattr(m, "cast_input_dtype_enabled", True)))
    batch = next(iter(plain.get_train_dataloader()))
    want, _, _ = _step(plain, batch)
    got, grads, _ = _step(joint, batch)
    assert flags and not any(flags), "PEFT cast the LoRA inputs during the joint step"
    assert all(getattr(m, "cast_input_dtype_enabled", True) for m in layers)  # restored after the step
    assert got.item() == pytest.approx(want.item(), rel=2e-2)
    assert all(torch.isfinite(g).all() for g in grads.values())
