"""A resume reuses what the run already computed (the run folder's cache/): the tokenized rows, the reference model's
log-probs, the held-out watch's base scores and the check of the step it resumes from; never a cache made from other
rows or settings."""
import shutil

import pytest

from studio.runs import cache as run_cache
from studio.runs import folder
from studio.training import trl_seam
from studio.training.engine import Engine
from tests.conftest import tiny_run_config


# ---- the cache on its own ------------------------------------------------------------------------------------------

def test_stored_rows_come_back_only_under_their_key(tmp_path):
    from datasets import Dataset

    store = folder.run_cache(tmp_path)
    assert store.load_rows("k1") is None  # a run folder of an older studio: no cache, a miss
    rows = Dataset.from_list([{"prompt_ids": [1, 2], "completion_ids": [3], "ref_logps": -1.5, "ref_KL_logps": -2.0}])
    assert store.save_rows("k1", rows, "ref1")
    back, ref = store.load_rows("k1")
    assert ref == "ref1" and back.to_list() == rows.to_list()
    assert store.load_rows("k2") is None  # other rows or settings: ignored, never trusted
    store.save_rows("k1", rows, None)  # rows without a trusted reference: its columns are not handed out
    back, ref = store.load_rows("k1")
    assert ref is None and "ref_logps" not in back.column_names
    (tmp_path / "cache" / "train" / "meta.json").write_text("not json")
    assert store.load_rows("k1") is None


def test_the_watch_cache_keeps_checks_of_this_run_and_forgets_replayed_steps(tmp_path):
    store = folder.run_cache(tmp_path)
    w = store.watch("key", run="run-a")
    assert w.base(3) is None and w.check(2, 3) is None
    w.save_base([-1.0, -2.0, -3.0])
    w.save_check(2, [-0.5, -1.5, -2.5])
    w.save_check(4, [-0.4, -1.4, -2.4])
    assert store.watch("key", run="run-a").base(3) == [-1.0, -2.0, -3.0]
    assert w.base(4) is None  # other held-out rows
    w.forget_after(2)  # a resume from step 2 replays step 4
    assert w.check(2, 3) == [-0.5, -1.5, -2.5] and w.check(4, 3) is None
    assert store.watch("key", run="run-b").check(2, 3) is None  # a fresh run in the folder: not its checks
    assert store.watch("other key", run="run-a").base(3) is None


def test_the_rows_digest_follows_content_and_order():
    a, b = {"prompt": "p", "completion": "c", "label": True}, {"prompt": "q", "completion": "d", "label": False}
    assert run_cache.rows_digest([a, b]) == run_cache.rows_digest([dict(a), dict(b)])
    assert run_cache.rows_digest([a, b]) != run_cache.rows_digest([b, a])
    assert run_cache.rows_digest([a, b]) != run_cache.rows_digest([a, {**b, "completion": "e"}])


# ---- a real resume (a tiny random Llama with the bundled tokenizer: what is under test is the cache) ----------------------------------------------------------------------------

@pytest.fixture
def prepared_calls(monkeypatch):
    """How many datasets TRL's KTOTrainer tokenized (its ``_prepare_dataset``)."""
    cls = trl_seam.kto_trainer_class()
    calls = []
    original = cls._prepare_dataset

    def counted(self, dataset, *args, **kwargs):
        calls.append(len(dataset))
        return original(self, dataset, *args, **kwargs)

    monkeypatch.setattr(cls, "_prepare_dataset", counted)
    return calls


def _config(tmp_path, rows: int = 16, model=None, **changes):
    """3 steps on the first ``rows`` rows of the sample (a quarter held out), checkpoints and checks every 2 steps,
    of ``model`` (a folder; default the bundled model)."""
    from studio.data import load_kto
    from studio.data.clean import write_jsonl

    data = tmp_path / "data.jsonl"
    if not data.is_file():
        write_jsonl(load_kto("sample").rows[:rows], data)
    return tiny_run_config(tmp_path, **{"train.max_steps": 3, "train.save_steps": 2, "watch.every_steps": 2,
                                        "data.train_file": str(data), "data.eval_fraction": 0.25,
                                        "kto.precompute_ref_log_probs": True, "kto.max_length": 64,
                                        **({"model.name_or_path": str(model)} if model else {}), **changes})


def _train(engine, cfg, **kw):
    job = engine.start(cfg, **kw)
    engine.wait(900)
    assert job.state == "finished", job.error
    return job


def _phases(job, phase):
    return [e["message"] for e in job.events if e["type"] == "phase" and e["phase"] == phase]


def _losses(job):
    return {m["step"]: m["loss"] for m in job.metrics() if "loss" in m}


def test_a_resume_reuses_the_cache_and_trains_as_one_without_it(tmp_path, tiny_model_dir, prepared_calls):
    engine = Engine()
    cfg = _config(tmp_path, model=tiny_model_dir)
    first = _train(engine, cfg)
    assert len(prepared_calls) == 1  # the training rows (the watch tokenizes the held-out ones itself)
    assert _phases(first, "reference") and any("base model" in m for m in _phases(first, "scoring"))
    assert (cfg.run_dir() / "checkpoint-2").is_dir()
    without = tmp_path / "without-cache"  # the same run, its cache gone (a folder of an older studio)
    shutil.copytree(cfg.run_dir(), without)
    shutil.rmtree(without / "cache")

    prepared_calls.clear()
    cached = _train(engine, cfg, resume_from=str(cfg.run_dir() / "checkpoint-2"))
    assert prepared_calls == []  # not tokenized again
    assert not _phases(cached, "reference")  # the reference log-probs not computed again
    scored = _phases(cached, "scoring")
    assert not any("base model" in m or "step 2" in m for m in scored), scored  # nor the base, nor step 2's check
    assert any("tuned model at step 3" in m for m in scored)
    assert any("at step 2 (taken before the stop, from the run's cache)" in e.get("message", "")
               for e in cached.events)

    prepared_calls.clear()
    rebuilt = _train(engine, cfg.updated({"output_dir": str(without)}), resume_from=str(without / "checkpoint-2"))
    assert len(prepared_calls) == 1 and _phases(rebuilt, "reference")
    assert any("base model" in m for m in _phases(rebuilt, "scoring"))
    assert sorted(_losses(cached)) == sorted(_losses(rebuilt)) == [3]
    for step, loss in _losses(cached).items():
        assert loss == pytest.approx(_losses(rebuilt)[step], rel=1e-4, abs=1e-5), step
    drift = [[m.get("heldout/drift") for m in j.metrics() if m.get("step") == 3 and "heldout/drift" in m]
             for j in (cached, rebuilt)]
    assert drift[0] and drift[0][0] == pytest.approx(drift[1][0], rel=1e-4, abs=1e-5)


def test_a_cache_of_other_rows_or_another_max_length_is_rebuilt(tmp_path, tiny_model_dir, prepared_calls):
    from studio.data import load_kto
    from studio.data.clean import write_jsonl

    engine = Engine()
    cfg = _config(tmp_path, rows=10, model=tiny_model_dir, **{"train.max_steps": 2})
    data = cfg.data.train_file
    _train(engine, cfg)

    prepared_calls.clear()
    longer = _train(engine, cfg.updated({"train.max_steps": 3, "kto.max_length": 80}), resume_from="latest")
    assert len(prepared_calls) == 1 and _phases(longer, "reference")
    assert any("base model" in m for m in _phases(longer, "scoring"))  # the held-out rows are cut elsewhere

    rows = load_kto(data).rows
    rows = [{**r, "completion": [{**m, "content": m["content"] + " Edited."} for m in r["completion"]]}
            for r in rows]  # the file changed under the run
    write_jsonl(rows, data, overwrite=True)
    prepared_calls.clear()
    edited = _train(engine, cfg.updated({"train.max_steps": 4, "kto.max_length": 80}), resume_from="latest")
    assert len(prepared_calls) == 1 and _phases(edited, "reference")


# ---- the held-out watch of a resumed run (a stand-in model, no training) -------------------------------------------

class _Adapter:
    """A model whose one adapter weight ``w`` moves each desirable held-out completion by -w nats a token (the
    desirable one always ranked first); the base model is w = 0."""

    def __init__(self, w: float):
        import torch

        self.training = True
        self.w = torch.nn.Parameter(torch.tensor([w]))

    def named_parameters(self):
        return [("w", self.w)]

    def eval(self):
        self.training = False

    def train(self):
        self.training = True

    def disable_adapter(self):
        import contextlib

        import torch

        @contextlib.contextmanager
        def off():
            saved = self.w.detach().clone()
            with torch.no_grad():
                self.w.zero_()
            yield
            with torch.no_grad():
                self.w.copy_(saved)

        return off()


@pytest.fixture
def scored(monkeypatch):
    """Each held-out scoring pass of the watch, by the model's weight then."""
    from types import SimpleNamespace

    from studio.tuned import scoring

    passes = []
    monkeypatch.setattr(scoring, "tokenize_rows", lambda tok, rows, max_length: (
        [SimpleNamespace(completion_ids=[0] * 10) for _ in rows], list(range(len(rows))), 0))
    monkeypatch.setattr(scoring, "pad_id", lambda tok: 0)

    def logps(model, items, pad_token_id=0, max_tokens=0, on_batch=None):
        w = float(model.w.detach())
        passes.append(w)
        return [-10 * w - (0.0 if i % 2 == 0 else 1.0) for i in range(len(items))]

    monkeypatch.setattr(scoring, "completion_logps", logps)
    return passes


@pytest.mark.parametrize("checked_before", [False, True])
def test_a_resumed_watch_scores_its_starting_step_at_most_once(tmp_path, scored, checked_before):
    from studio.training.watch import Watch

    from tests.conftest import kto_pairs

    cfg = tiny_run_config(tmp_path, **{"watch.every_steps": 1})
    rows = kto_pairs(4)
    store = folder.run_cache(tmp_path).watch("key", run="r")
    if checked_before:  # the run checked step 2 before it was stopped there, and stored its base scores
        store.save_base([-0.0 - (0.0 if i % 2 == 0 else 1.0) for i in range(len(rows))])
        store.save_check(2, [-2.0 - (0.0 if i % 2 == 0 else 1.0) for i in range(len(rows))])
    w = Watch(cfg, rows, lambda *a, **k: None, stopping=lambda: False)
    w.cache = store
    model = _Adapter(0.2)  # step 2's adapter, as the checkpoint loaded it
    w.begin(model, None, step=2, max_steps=4, rows_per_step=2)
    assert scored == ([] if checked_before else [0.0])  # the base model only when the cache held no scores
    model.w.data.fill_(5.0)  # step 3 collapses: -5 nats a token
    assert w.after_step(model, 3, 4)  # the guard stops the run
    finish = w.finish(model, 3, user_stopped=False)
    assert finish["rolled_back"] and finish["kept_step"] == 2 and float(model.w.detach()) == pytest.approx(0.2)
    assert finish["result"]["drift"] == pytest.approx(-0.2)
    # step 2 scored once in all: before the stop (the cache), or now that the run rolls back to it
    assert scored == ([5.0] if checked_before else [0.0, 5.0, pytest.approx(0.2)])
