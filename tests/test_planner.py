"""One plan for a card, a model and a recipe (studio/training/plan.py, studio/training/duration.py): the CPU card plans a run that
finishes in minutes with its duration known before Start; switching card or model re-plans everything the previous
one planned; auto-fit applies the path that is installed (issue 16, points 3-5)."""
from __future__ import annotations

import json
import math

import pytest

from tests.conftest import unsloth_only_8b
from studio.training import duration, memory, plan as planner
from studio.config.run import RunConfig
from studio.models.load import DeviceInfo

# every test here runs twice, the host CPU's bf16 probe forced on and off: the plan and the duration follow the
# DeviceInfo they are given, never the machine the suite runs on
pytestmark = pytest.mark.usefixtures("host_bf16")

CPU = DeviceInfo(kind="cpu", name="test CPU")
CPU_BF16 = DeviceInfo(kind="cpu", name="test CPU with AVX-512 BF16", bf16=True)
CPU_WITH_UNSLOTH = DeviceInfo(kind="cpu", name="test CPU", unsloth=True)
HH_LIKE = [60 + (i * 37) % 400 for i in range(3000)]  # token lengths of 3,000 rows, 60-459 tokens


def _hh_config(**changes):
    return RunConfig().updated({"data.train_file": "hh.jsonl", **changes})


def test_the_cpu_card_plans_minutes_not_hours_from_the_datas_own_lengths():
    # what a run started from the UI on a CPU used before: batch 4 x 4, max_length 1024, checkpointing, all rows
    default = _hh_config()
    before = duration.estimate(default, HH_LIKE, converted=True)
    assert before.total_s > 3600  # hours on a 2-core CPU
    p = planner.plan(default, "cpu", CPU, lengths=HH_LIKE)
    cfg = p.config
    ordered = sorted(HH_LIKE)
    p90 = ordered[int(0.9 * len(ordered))]
    assert cfg.kto.max_length == math.ceil(p90 / 64) * 64  # from the data, not the 1024 default
    assert cfg.train.gradient_checkpointing is False  # a 135M model leaves plenty of RAM
    # 8 rows a step, at least 2 a pass (KTO's KL reference point pairs rows within a pass)
    assert cfg.train.per_device_train_batch_size >= 2
    assert cfg.train.per_device_train_batch_size * cfg.train.gradient_accumulation_steps == 8
    assert duration.CPU_MIN_STEPS <= cfg.train.max_steps < before.steps  # a step cap, a few updates kept
    assert cfg.data.eval_max_rows == duration.CPU_EVAL_ROWS  # held-out scoring sized for a CPU
    assert cfg.model.load_in_4bit is False and cfg.model.gpu_memory_gib is None
    assert cfg.memory.micro_batch_size is None
    # the expected duration is known before Start, and it is minutes even on a fresh clone (model conversion)
    fresh = duration.estimate(cfg, HH_LIKE, converted=False)
    assert p.duration is not None and p.duration.total_s <= fresh.total_s < 480
    assert "min" in p.duration.describe()


def test_the_step_cap_fills_the_time_budget_with_the_scoring_counted_at_the_cap():
    # a cleaned HH file (1,417 short rows): the watch would check many times over the whole data, only once or twice
    # over the capped run; the cap is counted with the latter, so the run gets the steps its budget pays for
    # (on a CPU with native bf16, whose steps are fast enough for more than the minimum)
    cfg = _hh_config(**{"data.eval_fraction": 0.1})
    lengths = [105] * 1417
    p = planner.plan(cfg, "cpu", CPU_BF16, lengths=lengths)
    steps = p.config.train.max_steps
    assert steps > duration.CPU_MIN_STEPS

    def work(n):
        d = duration.estimate(p.config.updated({"train.max_steps": n}), lengths, converted=True, device=CPU_BF16)
        return d.train_s + d.reference_s + d.eval_s + d.eval_loss_s

    assert work(steps) <= duration.CPU_TARGET_TRAIN_S < work(steps + 1)


def test_a_small_data_set_is_trained_whole_without_a_cap():
    p = planner.plan(_hh_config(), "cpu", CPU, lengths=[40] * 48)
    assert p.config.train.max_steps == -1
    assert p.config.kto.max_length == duration.CPU_SEQ_MIN


def test_a_gpu_card_keeps_a_held_out_size_the_user_chose():
    mine = planner.plan(_hh_config(**{"data.eval_max_rows": 500}), "8gb", CPU, lengths=HH_LIKE).config
    assert mine.data.eval_max_rows == 500


def test_the_cpu_plan_turns_checkpointing_on_when_the_model_would_fill_the_ram():
    changes = duration.cpu_plan(_hh_config(), HH_LIKE, ram_gib=0.5)
    assert changes["train.gradient_checkpointing"] is True


def test_the_duration_model_reproduces_its_measured_cpu_runs():
    """`python bench/cpu_duration.py --data hh-harmless-dev.jsonl.gz --max-length 384 --batch 2 --accum 4` on the
    idle 2-core machine (2026-12-02): 4 steps of 8 HH rows (~183 tokens each), reference in every step: 110.9 s in
    float32, 35.6 s in bf16 autocast (model.dtype 'auto' on that CPU, which multiplies bf16 natively). And the
    sample's short rows (2026-12-08, `--max-length 128 --batch 2 --accum 4`, ~54 tokens a row): 4.4 s a step in bf16
    autocast, where a per-token constant alone (fitted on HH) predicted 2.0 s."""
    auto = RunConfig().updated({"kto.max_length": 384, "train.per_device_train_batch_size": 2,
                                "train.gradient_accumulation_steps": 4, "train.max_steps": 4,
                                "train.gradient_checkpointing": False, "data.evaluate_after": False,
                                "data.eval_fraction": 0.0, "kto.precompute_ref_log_probs": False})
    fast = duration.estimate(auto, [183] * 3000, n_cores=2, converted=True, device=CPU_BF16)
    assert fast.train_s == pytest.approx(35.6, rel=0.15)
    short = duration.estimate(auto.updated({"kto.max_length": 128}), [54] * 178, n_cores=2, converted=True,
                              device=CPU_BF16)
    assert short.step_s == pytest.approx(4.4, rel=0.15)
    # a CPU without bf16: float32 math
    assert duration.estimate(auto, [183] * 3000, n_cores=2, converted=True, device=CPU).train_s == \
        pytest.approx(110.9, rel=0.15)
    cfg = RunConfig().updated({"model.dtype": "float32", "kto.max_length": 384, "train.per_device_train_batch_size": 2,
                               "train.gradient_accumulation_steps": 4, "train.max_steps": 4,
                               "train.gradient_checkpointing": False, "data.evaluate_after": False,
                               "data.eval_fraction": 0.0, "kto.precompute_ref_log_probs": False})
    d = duration.estimate(cfg, [183] * 3000, n_cores=2, converted=True, device=CPU_BF16)  # float32 asked for
    assert d.reference_s == 0 and d.eval_s == 0
    assert d.train_s == pytest.approx(110.9, rel=0.15)
    # and it scales: twice the steps, twice the training time; checkpointing costs more
    d2 = duration.estimate(cfg.updated({"train.max_steps": 8}), [183] * 3000, n_cores=2, converted=True)
    assert d2.train_s == pytest.approx(2 * d.train_s, rel=0.01)
    slow = duration.estimate(cfg.updated({"train.gradient_checkpointing": True}), [183] * 3000, n_cores=2,
                             converted=True)
    assert slow.train_s > d.train_s


def test_the_plan_and_duration_follow_the_device_info_not_the_host_cpu(host_bf16):
    """The host probe is forced both ways (conftest's host_bf16); the plan for a CPU with native bf16 and for one
    without is the same either way, and differs between the two devices as the time constants say."""
    cfg = _hh_config(**{"data.eval_fraction": 0.1})
    fast = planner.plan(cfg, "cpu", CPU_BF16, lengths=[105] * 1417)
    slow = planner.plan(cfg, "cpu", CPU, lengths=[105] * 1417)
    assert fast.config.train.max_steps > slow.config.train.max_steps
    a = duration.estimate(slow.config, HH_LIKE, converted=True, n_cores=2, device=CPU_BF16)
    b = duration.estimate(slow.config, HH_LIKE, converted=True, n_cores=2, device=CPU)
    t = slow.config.train
    scale = duration.model_params(slow.config) / 1e9  # 2 cores: the calibration's own
    for d, token, per_pass in ((a, duration.SECONDS_PER_TOKEN_GPARAM_BF16, duration.SECONDS_PER_PASS_GPARAM_BF16),
                               (b, duration.SECONDS_PER_TOKEN_GPARAM, duration.SECONDS_PER_PASS_GPARAM)):
        step = (d.tokens_per_step * token + t.gradient_accumulation_steps * per_pass) * scale
        if d.reference_s:
            step *= 1 - duration.REFERENCE_SHARE
        assert d.step_s == pytest.approx(step)
    assert b.step_s > a.step_s
    assert duration.seconds_per_token_gparam(cfg, CPU_BF16) == duration.SECONDS_PER_TOKEN_GPARAM_BF16
    assert duration.seconds_per_token_gparam(cfg, CPU) == duration.SECONDS_PER_TOKEN_GPARAM
    # no device given: a CPU without native bf16, whatever the host says
    assert duration.seconds_per_token_gparam(cfg) == duration.SECONDS_PER_TOKEN_GPARAM


def test_switching_to_a_gpu_card_and_a_7b_then_back_to_cpu_replans_everything():
    start = planner.plan(_hh_config(), "cpu", CPU, lengths=HH_LIKE).config
    gpu = planner.plan(start, "8gb", CPU, model_key="mistral-7b-instruct-v0.3", lengths=HH_LIKE).config
    assert gpu.model.gpu_memory_gib == 7.5 and gpu.train.max_steps == -1  # no CPU step cap on a GPU plan
    assert gpu.data.eval_max_rows == RunConfig().data.eval_max_rows  # nor the CPU's smaller held-out set
    assert gpu.kto.max_length > 512 and gpu.train.gradient_checkpointing
    back = planner.plan(gpu, "cpu", CPU, model_key="smollm2-135m", lengths=HH_LIKE).config
    assert back.model.name_or_path == "bundled:smollm2-135m"
    for field in ("kto.max_length", "train.per_device_train_batch_size", "train.gradient_accumulation_steps",
                  "train.max_steps", "train.gradient_checkpointing", "memory.micro_batch_size",
                  "model.gpu_memory_gib", "model.load_in_4bit", "model.backend", "data.eval_max_rows"):
        section, name = field.split(".")
        assert getattr(getattr(back, section), name) == getattr(getattr(start, section), name), field


def test_autofit_applies_the_path_that_is_installed_and_shows_the_other_as_an_option():
    from studio.ui.model_tab import plan_markdown

    cfg = _hh_config()
    p = planner.plan(cfg, "8gb", CPU, model_key="mistral-7b-instruct-v0.3")
    assert p.card_plan.path == "bnb"  # "unsloth: no" on this device
    bnb = p.card_plan.fits["bnb"]
    assert p.config.kto.max_length == bnb.seq and p.config.train.per_device_train_batch_size == bnb.batch
    text = plan_markdown(p.card_plan, True, unsloth_installed=False)
    assert "Applied for the bitsandbytes 4-bit path" in text
    assert text.count("With Unsloth installed you could") == 1
    assert text.count("Gradients are taken") <= 1  # a note shared by both paths is said once
    with_unsloth = planner.plan(cfg, "8gb", CPU_WITH_UNSLOTH, model_key="mistral-7b-instruct-v0.3")
    assert with_unsloth.card_plan.path == "unsloth"
    assert "With Unsloth installed" not in plan_markdown(with_unsloth.card_plan, True, unsloth_installed=True)


def test_a_model_that_fits_only_with_unsloth_is_not_applied_where_unsloth_is_missing(tmp_path):
    from studio.ui.model_tab import plan_markdown

    p = planner.plan(_hh_config(**{"model.name_or_path": unsloth_only_8b(tmp_path)}), "8gb", CPU)
    assert p.card_plan.path is None and not p.card_plan.changes
    text = plan_markdown(p.card_plan, True)
    assert "Does not fit" in text and "With Unsloth installed you could" in text


def test_a_new_studio_on_a_cpu_starts_from_the_cpu_plan(bundled_model_dir):
    cfg = planner.initial_config(RunConfig(), CPU)
    assert cfg.model.load_in_4bit is False  # not offered as ticked on a CPU
    assert cfg.train.gradient_checkpointing is False and cfg.kto.max_length <= duration.CPU_SEQ_MAX
    d = duration.estimate(cfg, duration.data_lengths(cfg))
    assert d is not None and d.total_s < 600
    gpu = DeviceInfo(kind="cuda", name="card", total_gib=8.0, free_gib=7.5)
    assert planner.initial_config(RunConfig(), gpu) == RunConfig()


def test_data_lengths_are_measured_with_the_models_tokenizer(tmp_path, bundled_model_dir):
    f = tmp_path / "rows.jsonl"
    rows = [{"prompt": "Hi " * n, "completion": "ok", "label": bool(n % 2)} for n in range(1, 21)]
    f.write_text("\n".join(json.dumps(r) for r in rows))
    lengths = duration.data_lengths(RunConfig().updated({"data.train_file": str(f)}))
    assert len(lengths) == 20 and lengths == sorted(lengths) and lengths[-1] > lengths[0] + 15
    assert duration.data_lengths(RunConfig().updated({"data.train_file": str(tmp_path / "missing.jsonl")})) is None


def test_the_held_out_file_counts_its_watch_checks_and_its_scoring(tmp_path, bundled_model_dir, monkeypatch):
    """The held-out watch scores the rows every few steps and once after training: time the user waits (the Data
    tab saves the held-out rows as their own file). With several processes (no watch) transformers evaluates the
    eval rows once more at the last step instead."""
    rows = [{"prompt": f"Question {i} " * 20, "completion": "An answer " * 20, "label": bool(i % 2)} for i in range(40)]
    train, held = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    train.write_text("\n".join(json.dumps(r) for r in rows))
    held.write_text("\n".join(json.dumps(r) for r in rows[:10]))
    cfg = RunConfig().updated({"data.train_file": str(train), "data.eval_file": str(held), "train.max_steps": 4})
    d = duration.estimate(cfg, duration.data_lengths(cfg), converted=True)
    assert d.eval_loss_s == 0 and d.eval_s > 0
    after_only = duration.estimate(cfg.updated({"watch.every_steps": 0}), duration.data_lengths(cfg), converted=True)
    assert 0 < after_only.eval_s < d.eval_s  # the checks during training cost time too
    capped = duration.estimate(cfg.updated({"data.eval_max_rows": 4}), duration.data_lengths(cfg), converted=True)
    assert 0 < capped.eval_s < d.eval_s  # the engine scores at most data.eval_max_rows of the file's rows
    assert d.total_s == pytest.approx(d.startup_s + d.reference_s + d.train_s + d.eval_loss_s + d.eval_s + d.save_s)
    assert duration.estimate(cfg, duration.data_lengths(cfg), converted=True, world=2).eval_loss_s > 0
    no_eval = duration.estimate(cfg.updated({"data.eval_file": None, "data.eval_fraction": 0.0}),
                                duration.data_lengths(cfg), converted=True)
    assert no_eval.eval_loss_s == 0 and no_eval.eval_s == 0


@pytest.mark.parametrize("rows,epochs", [(2370, 1), (1300, 2), (200, 3)])
def test_the_duration_counts_the_epochs_the_run_plan_decides(rows, epochs):
    """Epochs 'auto' in the estimate is the run plan's rule for the rows trained on (after the held-out split)."""
    cfg = RunConfig().updated({"train.per_device_train_batch_size": 2, "train.gradient_accumulation_steps": 4,
                               "data.eval_fraction": 0.0, "train.num_train_epochs": "auto"})
    d = duration.estimate(cfg, [100] * rows, params=135e6, converted=True)
    assert d.steps == math.ceil(rows / 8) * epochs
    assert planner.plan_run(cfg, CPU, data_rows=rows).epochs == epochs
    # held-out rows split off first: 1,400 rows less 5% (70) train 1,330 -> 2 passes
    split = duration.estimate(cfg.updated({"data.eval_fraction": 0.05, "data.eval_max_rows": None}),
                              [100] * 1400, params=135e6, converted=True)
    assert split.steps == math.ceil(1330 / 8) * 2
    # a number the user set is used as is (transformers: ceil(epochs x steps an epoch))
    fixed = duration.estimate(cfg.updated({"train.num_train_epochs": 1.5}), [100] * rows, params=135e6,
                              converted=True)
    assert fixed.steps == math.ceil(math.ceil(rows / 8) * 1.5)


def test_a_short_cpu_run_gets_several_held_out_checks_and_the_estimate_counts_them():
    # issue 30: 'auto' spaced the checks by cost alone, so a 6-step CPU run got one point on its charts, at the end;
    # now at least about four, by the same rule in the watch and the estimate, whatever max_steps the user sets
    from studio.training import watch

    assert watch.auto_every(8, 8, 6) == 2 and watch.auto_every(8, 8, 12) == 3  # cheap checks: four a run
    assert watch.auto_every(8, 8) == watch.auto_every(8, 8, -1) > 3  # no cap: spaced by cost as before
    assert watch.auto_every(400, 8, 6) == watch.auto_every(400, 8) > 6  # dear checks: at the end only
    cfg = _hh_config(**{"data.eval_fraction": 0.1})
    p = planner.plan(cfg, "cpu", CPU, lengths=[55] * 180)
    assert p.config.train.max_steps > 0 and p.config.watch.every_steps == "auto"
    base = cfg.updated({"train.max_steps": 12})
    d4 = duration.estimate(base, [55] * 180, params=135e6, converted=True)
    d1 = duration.estimate(base.updated({"watch.every_steps": 12}), [55] * 180, params=135e6, converted=True)
    assert d4.eval_s > d1.eval_s  # three checks before the end are counted, not one
