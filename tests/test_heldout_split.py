"""The run's held-out split moves whole prompt groups (pairs stay together): ~5% by default, at most 200 rows."""
from __future__ import annotations

import json

from studio.config.run import RunConfig
from studio.data import prepare_training
from studio.data.clean import prompt_key, split_by_prompt
from tests.conftest import kto_pairs as _pairs


def test_held_out_rows_are_whole_pairs_capped_at_the_maximum():
    rows = _pairs(1500)
    train, held = split_by_prompt(rows, 0.05, seed=3, max_rows=200)
    assert len(held) == 150 and len(train) == 2850
    assert not {prompt_key(rows[i]["prompt"]) for i in held} & {prompt_key(rows[i]["prompt"]) for i in train}
    _, held = split_by_prompt(_pairs(5000), 0.05, seed=3, max_rows=200)
    assert len(held) == 200
    # the same seed gives the same split; another seed another one
    assert split_by_prompt(rows, 0.05, 3, 200) == split_by_prompt(rows, 0.05, 3, 200)
    assert split_by_prompt(rows, 0.05, 4, 200)[1] != held


def test_a_tiny_file_still_holds_out_one_whole_pair():
    rows = _pairs(24)
    train, held = split_by_prompt(rows, 0.05, seed=42)
    assert len(held) == 2 and rows[held[0]]["prompt"] == rows[held[1]]["prompt"]
    assert {rows[i]["label"] for i in held} == {True, False}


def test_a_run_holds_out_5_percent_of_whole_pairs_by_default(tmp_path):
    f = tmp_path / "pairs.jsonl"
    f.write_text("".join(json.dumps({"prompt": f"q{i}", "chosen": f"yes {i}", "rejected": f"no {i}"}) + "\n"
                         for i in range(200)), encoding="utf-8")
    cfg = RunConfig().updated({"data.train_file": str(f)})
    assert cfg.data.eval_fraction == 0.05 and cfg.data.eval_max_rows == 200
    td = prepare_training(cfg)
    held = td.eval.to_list()
    assert len(held) == 20 and len(td.train) == 380
    by_prompt: dict = {}
    for r in held:
        by_prompt.setdefault(prompt_key(r["prompt"]), set()).add(r["label"])
    assert all(labels == {True, False} for labels in by_prompt.values())  # 10 intact pairs
    train_prompts = {prompt_key(r["prompt"]) for r in td.train.to_list()}
    assert not train_prompts & set(by_prompt)
    off = prepare_training(cfg.updated({"data.eval_fraction": 0.0}))
    assert off.eval is None and len(off.train) == 400
