"""The KTO health panel reads a run's logged metrics and says, in plain words, what looks wrong and what to change.

Every rule is shown firing on a synthetic metric series with its problem, and staying quiet on a series just on
the other side of its threshold, so a rule that breaks (never fires, or fires on healthy runs) fails a test.
"""
import math

import pytest

from studio.training import health
from studio.config.run import RunConfig


def series(n: int, **cols) -> list[dict]:
    """n logged steps; each column is a constant, a list, or a function of the 0-based index (None = not logged)."""
    out = []
    for i in range(n):
        m = {"step": i + 1, "max_steps": n, "epoch": (i + 1) / n}
        for key, v in cols.items():
            val = v(i) if callable(v) else (v[i] if isinstance(v, list) else v)
            if val is not None:
                m[key.replace("__", "/")] = val
        out.append(m)
    return out


def healthy(n=30, **override) -> list[dict]:
    """A run that learns: loss falls from 0.5 with batch noise, good rewards rise, bad ones fall, KL small > 0."""
    cols = dict(
        loss=lambda i: 0.5 - 0.006 * i + 0.01 * math.sin(i * 1.7),
        learning_rate=2e-4,
        grad_norm=lambda i: 0.5 + 0.1 * math.cos(i),
        kl=lambda i: 0.0 if i == 0 else 0.02 + 0.002 * i,
        rewards__chosen=lambda i: 0.03 * i + 0.05 * math.sin(i),
        rewards__rejected=lambda i: -0.05 * i + 0.05 * math.cos(i),
    )
    cols.update(override)
    steps = series(n, **cols)
    for m in steps:
        if "rewards/chosen" in m and "rewards/rejected" in m:
            m["rewards/margins"] = m["rewards/chosen"] - m["rewards/rejected"]
    return steps


def rules(findings) -> list[str]:
    return [f.rule for f in findings]


def only(findings, rule) -> health.Finding:
    match = [f for f in findings if f.rule == rule]
    assert len(match) == 1, rules(findings)
    return match[0]


def test_a_healthy_run_and_a_short_run_raise_no_alarm():
    assert health.check(healthy()) == []
    assert health.check(healthy(3)) == []
    assert health.check([]) == []


def test_nan_or_inf_is_an_error_that_names_the_step_and_says_to_lower_the_learning_rate():
    steps = healthy()
    steps[6]["loss"] = float("nan")
    steps[9]["kl"] = float("inf")
    f = only(health.check(steps, learning_rate=2e-4), "non_finite")
    assert f.severity == health.ERROR
    assert f.step == 7 and "loss" in f.title
    assert "learning_rate" in f.fix and "now 0.0002" in f.fix
    assert "non_finite" not in rules(health.check(healthy()))


def test_a_label_that_never_reaches_training_is_an_error():
    steps = healthy(rewards__rejected=None)  # no undesirable row in any batch
    f = only(health.check(steps), "label_missing")
    assert f.severity == health.ERROR and "No undesirable rows" in f.title
    steps = healthy(rewards__chosen=None)
    assert "No desirable rows" in only(health.check(steps), "label_missing").title


def test_many_one_sided_batches_warn_and_suggest_a_bigger_batch_but_a_few_do_not():
    n = 20
    # 8 of 20 steps (40%) saw only desirable rows
    steps = healthy(n, rewards__rejected=lambda i: None if i % 5 in (1, 3) else -0.05 * i)
    f = only(health.check(steps, batch_size=2, grad_accum=1), "label_missing")
    assert f.severity == health.WARNING and f.title.startswith("40%")
    assert "per_device_train_batch_size" in f.fix and "now 2 x 1" in f.fix
    # 4 of 20 (20%) is below the threshold: normal noise of small batches
    steps = healthy(n, rewards__rejected=lambda i: None if i % 5 == 1 else -0.05 * i)
    assert "label_missing" not in rules(health.check(steps))


def test_kl_stuck_at_zero_with_unmoved_rewards_means_the_adapter_is_not_learning():
    steps = healthy(12, kl=0.0, rewards__chosen=lambda i: 1e-4 * i, rewards__rejected=lambda i: -1e-4 * i)
    f = only(health.check(steps, learning_rate=5e-7), "kl_stuck_zero")
    assert "not learning" in f.meaning
    assert "learning_rate" in f.fix and "now 5e-07" in f.fix


def test_kl_stuck_at_zero_with_a_large_batch_does_not_ask_for_a_larger_one():
    steps = healthy(12, kl=0.0)
    f = only(health.check(steps, batch_size=16, learning_rate=2e-4), "kl_stuck_zero")
    assert "Raise train.per_device_train_batch_size" not in f.fix
    assert "16 rows a pass" in f.fix and "lower train.learning_rate (now 0.0002)" in f.fix


def test_kl_stuck_at_zero_while_rewards_move_points_at_the_batch_size():
    steps = healthy(12, kl=0.0)
    f = only(health.check(steps, batch_size=2), "kl_stuck_zero")
    assert "per_device_train_batch_size (now 2)" in f.fix


def test_kl_zero_only_early_or_for_fewer_steps_than_the_window_is_fine():
    window = health.KL_WINDOW
    # the clamped estimate often reads 0 for a few steps in a row; five zeros at the end are not "stuck"
    steps = healthy(12, kl=lambda i: 0.0 if i >= 7 else 0.01)
    assert "kl_stuck_zero" not in rules(health.check(steps))
    # zero for a long stretch, but one positive value inside the last window
    steps = healthy(window + 5, kl=lambda i: 0.01 if i == 6 else 0.0)
    assert "kl_stuck_zero" not in rules(health.check(steps))
    assert "kl_stuck_zero" not in rules(health.check(healthy(window - 1, kl=0.0)))
    # APO-zero has no KL term: TRL logs 0 on purpose
    assert "kl_stuck_zero" not in rules(health.check(healthy(12, kl=0.0), loss_type="apo_zero_unpaired"))


def test_rewards_that_keep_growing_past_the_limit_are_flagged_as_diverging():
    steps = healthy(12, rewards__rejected=lambda i: -1.5 * (i + 1) ** 1.3)  # -1.5 ... -38 and still falling
    f = only(health.check(steps, beta=0.1), "rewards_diverging")
    assert "kto.beta (now 0.1)" in f.fix
    assert "rewards/rejected" in f.title or "rewards/margins" in f.title


def test_large_but_settled_rewards_or_growing_small_rewards_are_not_divergence():
    settled = healthy(12, rewards__rejected=lambda i: -12.0 - 0.01 * i)
    assert "rewards_diverging" not in rules(health.check(settled))
    small = healthy(12, rewards__rejected=lambda i: -0.05 * (i + 1) ** 1.5)  # grows, but stays under the limit
    assert "rewards_diverging" not in rules(health.check(small))


def test_good_answers_losing_probability_too_is_flagged():
    steps = healthy(12, rewards__chosen=lambda i: -0.3 * i, rewards__rejected=lambda i: -0.6 * i)
    f = only(health.check(steps), "chosen_sinking")
    assert "desirable_weight" in f.fix
    rising = healthy(12, rewards__chosen=lambda i: 0.3 * i, rewards__rejected=lambda i: -0.6 * i)
    assert "chosen_sinking" not in rules(health.check(rising))
    # a slight dip of good answers (above the threshold) is ordinary
    dipping = healthy(12, rewards__chosen=lambda i: -0.05 * i, rewards__rejected=lambda i: -0.6 * i)
    assert "chosen_sinking" not in rules(health.check(dipping))


def test_negative_and_falling_margins_suggest_flipped_labels():
    steps = healthy(12, rewards__chosen=lambda i: -0.1 * i, rewards__rejected=lambda i: 0.05 * i)
    f = only(health.check(steps), "margins_negative")
    assert "label" in f.meaning and "Data tab" in f.fix
    assert "margins_negative" not in rules(health.check(healthy(12)))
    # slightly below zero (batch noise early in a run) is not a reversed signal
    noisy = healthy(12, rewards__chosen=lambda i: -0.01 * i, rewards__rejected=lambda i: 0.0)
    assert "margins_negative" not in rules(health.check(noisy))


def test_a_loss_stuck_at_one_half_means_nothing_is_learned():
    steps = healthy(12, loss=0.5, learning_rate=5e-7)
    f = only(health.check(steps, learning_rate=5e-7), "loss_flat")
    assert f.severity == health.WARNING and "now 5e-07" in f.fix


def test_a_loss_flat_near_zero_means_the_data_is_fit():
    steps = healthy(12, loss=lambda i: 0.001 + 1e-5 * i)
    f = only(health.check(steps), "loss_flat")
    assert f.severity == health.INFO and "fit this data" in f.meaning


def test_a_loss_that_moves_a_little_or_a_schedule_at_zero_is_not_flat():
    just_moving = healthy(12, loss=lambda i: 0.5 + (health.FLAT_RANGE if i % 2 else 0.0))
    assert "loss_flat" not in rules(health.check(just_moving))
    schedule_at_zero = healthy(12, loss=0.5, learning_rate=0.0)
    assert "loss_flat" not in rules(health.check(schedule_at_zero))


def test_findings_come_worst_first_and_config_sharpens_the_advice():
    steps = healthy(12, loss=0.5, kl=0.0, rewards__chosen=0.0, rewards__rejected=0.0)
    steps[3]["grad_norm"] = float("nan")
    cfg = RunConfig().updated({"train.learning_rate": 5e-7})
    findings = health.check_config(steps, cfg)
    assert findings[0].rule == "non_finite"
    assert [f.severity for f in findings] == sorted((f.severity for f in findings), key=health.SEVERITY_ORDER.get)
    assert {"kl_stuck_zero", "loss_flat"} <= set(rules(findings))
    assert all("now 5e-07" in f.fix for f in findings if f.rule in ("loss_flat", "kl_stuck_zero"))


def test_eval_entries_are_ignored_and_a_resumed_step_replaces_the_old_one():
    steps = healthy(5)
    replayed = dict(steps[3], loss=0.123)
    evals = [{"step": 4, "eval_loss": float("nan")}]
    merged = health.train_steps(steps + evals + [replayed])
    assert [m["step"] for m in merged] == [1, 2, 3, 4, 5]
    assert merged[3]["loss"] == pytest.approx(0.123)
    assert health.check(steps + evals) == []


def test_held_out_evaluation_without_learning_is_flagged_with_what_to_change():
    seed_like = {"rewards": {"pair_accuracy": 0.493, "margin": 0.0004}}
    f = health.held_out_learning(seed_like, learning_rate=5e-7)
    assert f is not None and f.severity == health.WARNING
    assert "49%" in f.title and "learning_rate" in f.fix and "2e-4" in f.fix
    assert health.held_out_learning({"rewards": {"pair_accuracy": 0.66, "margin": 2.1}}) is None
    assert health.held_out_learning({"rewards": {"pair_accuracy": 0.60, "margin": -0.2}}) is not None
    assert health.held_out_learning({"rewards": {"pair_accuracy": None, "margin": 0.3}}) is None
    # a margin of a few ten-thousandths is no movement at all, whatever the accuracy of a handful of pairs
    assert health.held_out_learning({"rewards": {"pair_accuracy": 0.67, "margin": 0.0004}}) is not None


def test_no_learning_needs_enough_pairs_and_never_asks_to_raise_a_rate_that_is_already_high():
    """2 held-out pairs at 0% after a 2-step run at lr 5e-3 told the user to raise the learning rate."""
    tiny = {"n_pairs": 2, "rewards": {"pair_accuracy": 0.0, "margin": -0.123}}
    assert health.held_out_learning(tiny, learning_rate=5e-3) is None
    unmoved = {"n_pairs": 2, "rewards": {"pair_accuracy": 0.5, "margin": 0.0003}}
    assert health.held_out_learning(unmoved, learning_rate=5e-7) is not None  # did not move at all: still said
    many = {"n_pairs": 200, "rewards": {"pair_accuracy": 0.49, "margin": -0.05}}
    high = health.held_out_learning(many, learning_rate=5e-3)
    assert high is not None and not health.raises_learning_rate(high.fix) and "train longer" in high.fix
    low = health.held_out_learning(many, learning_rate=5e-6)
    assert health.raises_learning_rate(low.fix) and "(now 5e-06)" in low.fix
