"""A user evaluates a trained run on held-out data: base vs tuned log-probs, pair accuracy and implicit rewards.

The numbers are checked against a direct one-row-at-a-time computation and against TRL's own KTOTrainer metrics.
"""
from __future__ import annotations

import json

import pytest
import torch

from studio import safepaths
from studio.tuned import evaluate, scoring
from studio.data import load_kto
from studio.data.normalize import is_conversation

BETA, MAX_LEN = 0.1, 128


@pytest.fixture(scope="module")
def sample_raw():
    from studio.data import SAMPLE_PATH

    return [json.loads(line) for line in SAMPLE_PATH.read_text(encoding="utf-8").splitlines()]


def _paired(raw, conversational: bool, n_prompts: int) -> list[dict]:
    """Rows of the first ``n_prompts`` sample prompts (each has one desirable and one undesirable completion)."""
    chosen = [r for r in raw if is_conversation(r["prompt"]) == conversational]
    keys = []
    for r in chosen:
        k = json.dumps(r["prompt"])
        if k not in keys:
            keys.append(k)
    keys = keys[:n_prompts]
    return [r for r in chosen if json.dumps(r["prompt"]) in keys]


def _direct_logp(model, tok, row) -> float:
    """Completion log-prob the plain way: one row, the full logits, float64 log-softmax."""
    prompt, completion = row["prompt"], row["completion"]
    if is_conversation(prompt):
        p = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        f = tok.apply_chat_template(prompt + completion, tokenize=True, return_dict=True)["input_ids"]
    else:
        p = tok(prompt)["input_ids"]
        f = tok(prompt + completion + tok.eos_token)["input_ids"]
    n = 0
    while n < min(len(p), len(f)) and p[n] == f[n]:
        n += 1
    f = list(f)[:MAX_LEN]
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([f])).logits[0].double()
    logp = torch.log_softmax(logits, dim=-1)
    return float(sum(logp[t - 1, f[t]] for t in range(n, len(f))))


def test_eval_numbers_match_a_direct_computation(chat, run_dir, sample_raw, bundled_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    long_prompt = "Tell me about this: " + "very " * 200  # longer than max_length: skipped, as TRL drops it
    rows = (_paired(sample_raw, True, 3) + _paired(sample_raw, False, 2)
            + [{"prompt": "Is water wet?", "completion": " Yes.", "label": True},  # a prompt without a pair
               {"prompt": long_prompt, "completion": " Hm.", "label": False}])
    result = evaluate.evaluate_rows(chat.model, chat.tokenizer, rows, beta=BETA, max_length=MAX_LEN)

    base = AutoModelForCausalLM.from_pretrained(bundled_model_dir, dtype=torch.float32).eval()
    base_lp = [_direct_logp(base, chat.tokenizer, r) for r in rows[:-1]]
    tuned_model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(bundled_model_dir, dtype=torch.float32), str(run_dir / "adapter")).eval()
    tuned_lp = [_direct_logp(tuned_model, chat.tokenizer, r) for r in rows[:-1]]

    assert result["n_rows"] == len(rows) - 1 and result["n_skipped"] == 1
    assert result["n_pairs"] == 5
    got = {s["index"]: s for s in result["rows"]}
    for i in range(len(rows) - 1):
        assert got[i]["base_logp"] == pytest.approx(base_lp[i], abs=2e-3)
        assert got[i]["tuned_logp"] == pytest.approx(tuned_lp[i], abs=2e-3)
        assert got[i]["reward"] == pytest.approx(BETA * (tuned_lp[i] - base_lp[i]), abs=5e-4)

    labels = [r["label"] for r in rows[:-1]]
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    for side, lps in (("base", base_lp), ("tuned", tuned_lp)):
        good = mean([lp for lp, y in zip(lps, labels) if y])
        bad = mean([lp for lp, y in zip(lps, labels) if not y])
        assert result[side]["logp_desirable"] == pytest.approx(good, abs=2e-3)
        assert result[side]["logp_undesirable"] == pytest.approx(bad, abs=2e-3)
        assert result[side]["logp_gap"] == pytest.approx(good - bad, abs=4e-3)

    # pairs: rows 0..9 are five prompts with one desirable and one undesirable completion each
    pairs = {}
    for i, r in enumerate(rows[:10]):
        pairs.setdefault(json.dumps(r["prompt"]), {})[r["label"]] = i
    wins_base = mean([float(base_lp[p[True]] > base_lp[p[False]]) for p in pairs.values()])
    wins_tuned = mean([float(tuned_lp[p[True]] > tuned_lp[p[False]]) for p in pairs.values()])
    rewards = [BETA * (t - b) for t, b in zip(tuned_lp, base_lp)]
    margins = [rewards[p[True]] - rewards[p[False]] for p in pairs.values()]
    assert result["base"]["pair_accuracy"] == pytest.approx(wins_base)
    assert result["tuned"]["pair_accuracy"] == pytest.approx(wins_tuned)
    assert result["rewards"]["pair_margin"] == pytest.approx(mean(margins), abs=5e-4)
    assert result["rewards"]["pair_accuracy"] == pytest.approx(mean([float(m > 0) for m in margins]))


@pytest.mark.parametrize("conversational", [False, True], ids=["plain-text", "conversational"])
def test_implicit_rewards_are_the_ones_trls_kto_trainer_reports(chat, run_dir, sample_raw, bundled_model_dir,
                                                               tmp_path, conversational):
    from datasets import Dataset
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from trl import KTOConfig, KTOTrainer

    from studio.training import logprob

    logprob.install_fallback(force=True)  # TRL's log-prob kernel is Triton-only; the studio's CPU stand-in
    rows = _paired(sample_raw, conversational, 3)
    ours = evaluate.evaluate_rows(chat.model, chat.tokenizer, rows, beta=BETA, max_length=MAX_LEN)

    policy = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(bundled_model_dir, dtype=torch.float32),
                                       str(run_dir / "adapter"))
    reference = AutoModelForCausalLM.from_pretrained(bundled_model_dir, dtype=torch.float32)
    args = KTOConfig(output_dir=str(tmp_path / "trl"), beta=BETA, max_length=MAX_LEN, bf16=False, use_cpu=True,
                     per_device_train_batch_size=2, per_device_eval_batch_size=len(rows), report_to=[],
                     precompute_ref_log_probs=False, disable_tqdm=True, remove_unused_columns=False)
    trainer = KTOTrainer(model=policy, ref_model=reference, args=args, train_dataset=Dataset.from_list(rows),
                         eval_dataset=Dataset.from_list(rows), processing_class=chat.tokenizer)
    trl = trainer.evaluate()  # one batch holds every row, so TRL's metrics are plain means over the rows

    assert ours["tuned"]["logp_desirable"] == pytest.approx(trl["eval_logps/chosen"], abs=2e-3)
    assert ours["tuned"]["logp_undesirable"] == pytest.approx(trl["eval_logps/rejected"], abs=2e-3)
    assert ours["rewards"]["desirable"] == pytest.approx(trl["eval_rewards/chosen"], abs=2e-4)
    assert ours["rewards"]["undesirable"] == pytest.approx(trl["eval_rewards/rejected"], abs=2e-4)
    assert ours["rewards"]["margin"] == pytest.approx(trl["eval_rewards/margins"], abs=4e-4)
    assert abs(ours["rewards"]["desirable"]) > 1e-4, "the trained adapter should give non-zero rewards"


def test_unpaired_held_out_data_gives_the_log_prob_gap_and_says_why_pairs_are_empty(chat):
    rows = [{"prompt": "Name a fruit.", "completion": " An apple.", "label": True},
            {"prompt": "Name a colour.", "completion": " Blue.", "label": True},
            {"prompt": "Name an animal.", "completion": " A chair.", "label": False}]
    result = evaluate.evaluate_rows(chat.model, chat.tokenizer, rows, beta=BETA, max_length=MAX_LEN)
    assert result["n_pairs"] == 0
    assert result["tuned"]["pair_accuracy"] is None and result["rewards"]["pair_accuracy"] is None
    assert result["tuned"]["logp_gap"] == pytest.approx(
        result["tuned"]["logp_desirable"] - result["tuned"]["logp_undesirable"])
    assert "no prompt has both" in result["note"]


def test_limit_takes_whole_prompts_so_pairs_stay_together():
    rows = [{"prompt": p, "completion": c, "label": y}
            for p in ("a", "b", "c") for c, y in (("good", True), ("bad", False))]
    assert [r["prompt"] for r in evaluate.limit_rows(rows, 4)] == ["a", "a", "b", "b"]
    assert [r["prompt"] for r in evaluate.limit_rows(rows, 3)] == ["a", "a"]
    assert evaluate.limit_rows(rows, None) == rows


def test_headless_eval_prints_json_and_stores_it_with_the_run(run_dir, tmp_path, capsys):
    import shutil

    from studio.cli import main

    run_dir = shutil.copytree(run_dir, tmp_path / "tiny")  # the shared run stays untouched
    assert main(["eval", str(run_dir), "--limit", "4"]) == 0
    printed = json.loads(capsys.readouterr().out)
    stored = json.loads((run_dir / "eval.json").read_text(encoding="utf-8"))
    assert "held-out 25% split" in printed["data"]  # the run's own held-out rows, as split for training
    from studio.runs import folder

    assert printed["n_rows"] <= len(folder.read_heldout(run_dir))  # the split the engine stored with the run
    assert printed["n_rows"] <= 4 and printed["n_rows"] == len(stored["rows"])
    assert {k: v for k, v in stored.items() if k != "rows"} == printed
    assert set(printed["base"]) == set(printed["tuned"]) >= {"logp_desirable", "logp_undesirable", "logp_gap",
                                                             "pair_accuracy"}
    table = evaluate.summary_table(stored)
    assert table[0][0] == "mean log-prob, desirable" and table[0][1] == round(stored["base"]["logp_desirable"], 3)


def test_a_run_without_held_out_data_gets_a_clear_message(run_dir, tmp_path, capsys):
    import shutil

    from studio.cli import main

    copy = tmp_path / "no_eval"
    shutil.copytree(run_dir, copy)
    text = (copy / "run.yaml").read_text(encoding="utf-8").replace("eval_fraction: 0.25", "eval_fraction: 0.0")
    (copy / "run.yaml").write_text(text, encoding="utf-8")
    assert main(["eval", str(copy)]) == 2
    assert "has no held-out data" in capsys.readouterr().err


def test_held_out_file_loads_with_the_data_tabs_loader(tmp_path):
    f = tmp_path / "held.jsonl"
    f.write_text(json.dumps({"prompt": "Hi", "chosen": "Hello!", "rejected": "Go away."}) + "\n", encoding="utf-8")
    rows, source = evaluate.held_out_rows(tmp_path, safepaths.typed(str(f)))
    assert source == str(f) and rows == load_kto(str(f)).rows and len(rows) == 2


def test_conversation_rows_need_a_chat_template(bundled_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(bundled_model_dir)
    tok.chat_template = None
    with pytest.raises(evaluate.EvalError, match="no chat template"):
        scoring.tokenize_row(tok, [{"role": "user", "content": "Hi"}], [{"role": "assistant", "content": "Yo"}], 64)
    plain = scoring.tokenize_row(tok, "Hi", " Yo", 64)
    assert plain.completion_ids[-1] == tok.eos_token_id  # plain-text completions end with EOS, as in TRL


def _run_folder(tmp_path, **changes):
    """A run folder with its run.yaml only (no training): its data file does not exist."""
    from studio.config.run import RunConfig
    from studio.runs import folder

    cfg = RunConfig().updated({"name": "held", "output_dir": str(tmp_path / "held"), "data.train_file": str(
        tmp_path / "gone.jsonl"), "data.eval_fraction": 0.25, **changes})
    folder.write_config(cfg.run_dir(), cfg)
    return cfg.run_dir()


def test_evaluation_reads_the_held_out_split_the_run_stored(tmp_path, monkeypatch):
    from studio import data as data_mod
    from studio.runs import folder

    run = _run_folder(tmp_path)
    stored = [{"prompt": "q", "completion": "a", "label": True}, {"prompt": "q", "completion": "b", "label": False}]
    folder.write_heldout(run, stored)

    def no_split(cfg):
        raise AssertionError("the run's training data was read and split again")

    monkeypatch.setattr(data_mod, "prepare_training", no_split)
    rows, source = evaluate.held_out_rows(run)
    assert rows == stored and "held-out 25% split" in source


def test_evaluate_run_reads_run_yaml_once_and_returns_what_it_stored(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from studio.runs import folder
    from studio.tuned import chat

    run = _run_folder(tmp_path)
    folder.write_heldout(run, [{"prompt": "q", "completion": "a", "label": True}])
    reads = []
    real_read = folder.read_config
    monkeypatch.setattr(folder, "read_config", lambda d: reads.append(d) or real_read(d))
    monkeypatch.setattr(chat, "resolve_adapter", lambda p: SimpleNamespace(path=run / "adapter", label="held · a"))

    class FakeChat:
        lock = __import__("threading").Lock()
        device = SimpleNamespace(kind="cpu")
        model = tokenizer = None

        def use(self, choice, progress=None):
            pass

    scores = {"n_rows": 1, "n_pairs": 0, "rows": [{"index": 0}], "base": {"logp_desirable": -2.0},
              "tuned": {"logp_desirable": -1.5}, "rewards": {}}
    monkeypatch.setattr(evaluate, "evaluate_rows", lambda *a, **k: dict(scores))
    monkeypatch.setattr(evaluate, "read_eval", lambda d: pytest.fail("evaluate_run read its own eval.json back"))
    result = evaluate.evaluate_run(run, chat_model=FakeChat())
    assert len(reads) == 1
    assert json.loads((run / evaluate.EVAL_FILE).read_text(encoding="utf-8")) == json.loads(json.dumps(result))
    assert "drift" in result and result["verdict"]["word"] and result["adapter_label"] == "held · a"
