"""Speed-ups keep the numbers: precomputed reference log-probs and length-grouped batches change cost, not results."""
import random

import pytest

from studio.training import speed
from studio.training.trl_seam import kto_config
from studio.training.engine import Engine
from tests.conftest import tiny_run_config


def test_length_grouping_is_a_permutation_of_whole_blocks_with_less_padding():
    rnd = random.Random(0)
    lengths = [rnd.randint(10, 2000) for _ in range(203)]
    order = speed.length_grouped_order(lengths, batch_size=4, seed=3)
    assert sorted(order) == list(range(203))
    assert order == speed.length_grouped_order(lengths, batch_size=4, seed=3)  # seeded
    assert order != speed.length_grouped_order(lengths, batch_size=4, seed=4)
    grouped = speed.padding_fraction([lengths[i] for i in order], 4)
    plain = speed.padding_fraction(lengths, 4)
    assert grouped < plain / 3, (grouped, plain)


def test_grouped_batches_keep_trl_kl_pairs_inside_each_batch(tmp_path, bundled_model_dir):
    """TRL builds KL completions by rotating inside consecutive blocks; after grouping, every KL completion of a
    batch is still a completion of that same batch (paired with another prompt)."""
    from datasets import Dataset
    from trl import KTOTrainer

    from studio import data as data_mod
    from studio.training import logprob
    from studio.models import load as models

    cfg = tiny_run_config(tmp_path, **{"data.length_grouping": True})
    td = data_mod.prepare_training(cfg)
    grouped = speed.group_by_length(td.train, 4, seed=1)
    assert isinstance(grouped, Dataset) and len(grouped) == len(td.train)
    loaded = models.load_for_training(cfg)
    logprob.install_fallback(force=True)
    args = kto_config(cfg, device="cpu", per_device_train_batch_size=4)
    trainer = KTOTrainer(model=loaded.model, args=args, train_dataset=grouped, processing_class=loaded.tokenizer)
    ds = trainer.train_dataset
    for s in range(0, len(ds) - len(ds) % 4, 4):
        block = ds[s:s + 4]
        completions = sorted(map(tuple, block["completion_ids"]))
        kl = sorted(map(tuple, block["KL_completion_ids"]))
        assert completions == kl
        # and each row's KL completion is another row's (the rotation), not its own
        assert all(a != b for a, b in zip(block["completion_ids"], block["KL_completion_ids"])) or \
            len(set(map(tuple, block["completion_ids"]))) < 4


def _run(tmp_path, name, model_dir, messages: list | None = None, **changes):
    # float32 math: these runs compare numbers that padding must not change (bf16 autocast, which a CPU with native
    # bf16 takes by default, moves a sequence's log-prob by ~0.1 nat with its batch's padding). The tiny random
    # model: what is compared is the reference path's arithmetic on the same weights, not what the model learns.
    cfg = tiny_run_config(tmp_path, **{"output_dir": str(tmp_path / name), "train.max_steps": 2,
                                       "data.length_grouping": False, "model.dtype": "float32",
                                       "model.name_or_path": str(model_dir), **changes})
    engine = Engine(on_event=(lambda _job, ev: messages.append(str(ev.get("message", "")))) if messages is not None
                    else None)
    job = engine.start(cfg)
    engine.wait(600)
    assert job.state == "finished", job.error
    return [m for m in job.metrics() if "loss" in m]


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory, tiny_model_dir):
    """The 2-step run that computes the reference log-probs in every step (trained once for this module)."""
    return _run(tmp_path_factory.mktemp("plain"), "plain", tiny_model_dir, **{"kto.precompute_ref_log_probs": False})


@pytest.fixture(scope="module")
def precomputed_run(tmp_path_factory, tiny_model_dir):
    """The same run with the reference log-probs computed once before training, rows per pass left 'auto'; with its
    status messages."""
    messages: list[str] = []
    metrics = _run(tmp_path_factory.mktemp("pre"), "pre", tiny_model_dir, messages,
                   **{"kto.precompute_ref_log_probs": True})
    return metrics, messages


def test_precomputed_reference_log_probs_give_the_same_losses_and_rewards(plain_run, precomputed_run):
    plain, (pre, _) = plain_run, precomputed_run
    assert len(plain) == len(pre) == 2
    for a, b in zip(plain, pre):
        for key in ("loss", "rewards/chosen", "rewards/rejected", "kl", "logps/chosen", "logps/rejected"):
            if key in a or key in b:
                assert b[key] == pytest.approx(a[key], rel=1e-3, abs=1e-4), (a["step"], key, a[key], b[key])
    # step 2 runs after an optimizer update: the policy moved, so rewards are no longer all zero
    assert any(abs(pre[1].get(k, 0.0)) > 0 for k in ("rewards/chosen", "rewards/rejected"))


def test_more_rows_per_precompute_pass_give_the_same_losses(tmp_path, tiny_model_dir, plain_run, precomputed_run):
    """Bigger precompute passes (kto.precompute_ref_batch_size; 'auto' sizes them on a GPU) pad rows to a longer
    batch: the reference log-probs, and so the run, must not change."""
    messages: list[str] = []
    wide = _run(tmp_path, "wide", tiny_model_dir, messages, **{"kto.precompute_ref_log_probs": True,
                                                               "kto.precompute_ref_batch_size": 7})
    assert any("(7 rows per pass)" in m for m in messages), messages
    assert len(wide) == len(plain_run) == 2
    for a, b in zip(plain_run, wide):
        for key in ("loss", "rewards/chosen", "rewards/rejected", "kl"):
            if key in a or key in b:
                assert b[key] == pytest.approx(a[key], rel=1e-3, abs=1e-4), (a["step"], key, a[key], b[key])
    _, auto = precomputed_run  # rows per pass left 'auto'
    batch = tiny_run_config(tmp_path).train.per_device_train_batch_size
    assert any(f"({batch} rows per pass)" in m for m in auto), auto  # off a GPU 'auto' is TRL's default


def test_auto_precompute_only_when_the_run_visits_the_data():
    assert speed.should_precompute_ref("auto", n_rows=1000, max_steps=-1, rows_per_step=16, epochs=1)
    assert not speed.should_precompute_ref("auto", n_rows=1000, max_steps=3, rows_per_step=16, epochs=1)
    assert speed.should_precompute_ref(True, n_rows=1000, max_steps=3, rows_per_step=16, epochs=1)
    assert not speed.should_precompute_ref(False, n_rows=10, max_steps=-1, rows_per_step=16, epochs=2)


def test_fill_card_trains_the_effective_batch_in_one_pass_when_the_card_has_room():
    from studio.config.run import RunConfig
    from studio.training.speed import fill_card_changes

    cfg = RunConfig()  # 4 x 4, gradient checkpointing on
    seen = []

    def estimate(changes):
        seen.append(changes)
        return 0.7

    changes, said = fill_card_changes(cfg, estimate, budget_gib=80.0)
    assert changes == {"train.gradient_checkpointing": False, "memory.micro_batch_size": None,
                       "train.per_device_train_batch_size": 16, "train.gradient_accumulation_steps": 1}
    assert seen == [changes]  # the plan asked the estimate about exactly what it applies
    assert "16 rows per pass x 1" in said and "same 16 rows per step" in said and "no gradient checkpointing" in said
    after = cfg.updated(changes)
    assert after.train.per_device_train_batch_size * after.train.gradient_accumulation_steps == 16


def test_fill_card_takes_the_fastest_split_that_fits_and_keeps_the_effective_batch():
    from studio.config.run import RunConfig
    from studio.training.speed import fill_card_changes

    cfg = RunConfig()

    def estimate(ch):  # a card where 16 rows without checkpointing do not fit, 8 rows do
        per_row = 0.5 if ch["train.gradient_checkpointing"] else 1.0
        return per_row * ch["train.per_device_train_batch_size"]

    changes, _ = fill_card_changes(cfg, estimate, budget_gib=20.0)  # room: 10 GiB
    assert (changes["train.per_device_train_batch_size"], changes["train.gradient_accumulation_steps"],
            changes["train.gradient_checkpointing"]) == (8, 2, False)


def test_fill_card_keeps_the_configured_split_when_memory_is_tight_or_it_is_turned_off():
    from studio.config.run import RunConfig
    from studio.training.speed import fill_card_changes

    cfg = RunConfig()
    assert fill_card_changes(cfg, lambda ch: 5.0, budget_gib=7.5) is None  # nothing fits in half of an 8 GB card
    assert fill_card_changes(cfg, lambda ch: 0.5, budget_gib=None) is None  # no GPU budget: CPU / MPS

    def no_estimate(ch):
        raise ValueError("unknown architecture")

    assert fill_card_changes(cfg, no_estimate, budget_gib=80.0) is None
    off = cfg.updated({"memory.fill_card": False})
    assert fill_card_changes(off, lambda ch: 0.5, budget_gib=80.0) is None
    done = cfg.updated({"train.per_device_train_batch_size": 16, "train.gradient_accumulation_steps": 1,
                        "train.gradient_checkpointing": False})
    assert fill_card_changes(done, lambda ch: 0.5, budget_gib=80.0) is None  # nothing left to change
    no_ckpt = cfg.updated({"train.gradient_checkpointing": False})  # never switches recomputation on
    changes, _ = fill_card_changes(no_ckpt, lambda ch: 1.0 if not ch["train.gradient_checkpointing"] else 0.1, 80.0)
    assert changes["train.gradient_checkpointing"] is False
