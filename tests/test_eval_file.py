"""eval.json has one writer and one reader: files from older versions, truncated or garbage files never stop the
studio from starting, and every reader gets the keys it shows."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from studio.tuned import evaluate

# what the engine's own end-of-run writer stored before eval.json had one writer: no adapter_label, data, created,
# run_dir (the Chat tab read them and the app failed to start with KeyError: 'adapter_label')
OLD_ENGINE_FILE = {
    "beta": 0.1, "max_length": 128, "n_rows": 12, "n_desirable": 6, "n_undesirable": 6, "n_pairs": 6,
    "n_skipped": 0,
    "base": {"logp_desirable": -60.0, "logp_undesirable": -70.0, "logp_gap": 10.0, "logp_per_token_desirable": -2.5,
             "logp_per_token_undesirable": -2.9, "pair_accuracy": 0.5},
    "tuned": {"logp_desirable": -61.0, "logp_undesirable": -75.0, "logp_gap": 14.0,
              "logp_per_token_desirable": -2.55, "logp_per_token_undesirable": -3.1, "pair_accuracy": 0.67},
    "rewards": {"desirable": -0.1, "undesirable": -0.5, "margin": 0.4, "pair_margin": 0.4, "pair_accuracy": 0.67},
    "rows": [], "run": "old", "adapter": "/somewhere/old/adapter", "base_model": "bundled:smollm2-135m", "limit": 200,
}
BAD_FILES = {
    "old-engine": json.dumps(OLD_ENGINE_FILE),
    "truncated": json.dumps(OLD_ENGINE_FILE, indent=2)[:150],
    "garbage": "\x00\x01 not json at all",
    "empty": "",
    "a-list": "[1, 2, 3]",
    "wrong-types": json.dumps({"base": "x", "tuned": [1], "rewards": {"pair_accuracy": "high", "margin": None},
                               "n_pairs": "many", "verdict": "learned", "beta": "?"}),
}


@pytest.mark.parametrize("kind", sorted(BAD_FILES))
def test_reader_never_raises_and_gives_every_key_the_views_use(tmp_path, kind):
    (tmp_path / evaluate.EVAL_FILE).write_bytes(BAD_FILES[kind].encode("utf-8", "surrogateescape"))
    result = evaluate.read_eval(tmp_path)
    if kind in ("truncated", "garbage", "empty", "a-list"):
        assert result is None
        return
    for key in ("adapter_label", "data", "created", "run_dir", "n_rows", "n_pairs", "beta", "verdict", "drift"):
        assert key in result, key
    assert result["verdict"]["word"] in (evaluate.LEARNED, evaluate.NO_CHANGE, evaluate.DEGENERATED)
    evaluate.summary_table(result)
    evaluate.chart_rows(result)
    evaluate.verdict_line(result)
    if kind == "old-engine":
        assert result["adapter_label"] == "old · final adapter"
        assert result["drift"] == pytest.approx(-0.05)


def test_writer_fills_what_readers_show_and_writes_atomically(tmp_path):
    path = evaluate.write_eval(tmp_path, dict(OLD_ENGINE_FILE))
    stored = json.loads(path.read_text(encoding="utf-8"))
    assert stored["adapter_label"] and stored["created"] and stored["run_dir"] == str(tmp_path)
    assert stored["verdict"]["word"] == evaluate.NO_CHANGE  # 67% of 6 pairs is within noise of 50%
    assert not list(tmp_path.glob("*.part"))
    assert evaluate.read_eval(tmp_path) == stored


def _fake_run(home: Path, name: str, eval_text: str) -> Path:
    from studio.config.run import RunConfig

    run = home / "runs" / name
    RunConfig(name=name).save(run / "run.yaml")
    (run / "adapter").mkdir(parents=True)
    (run / "adapter" / "adapter_config.json").write_text("{}")
    (run / "adapter" / "adapter_model.safetensors").write_bytes(b"")
    (run / evaluate.EVAL_FILE).write_bytes(eval_text.encode("utf-8", "surrogateescape"))
    return run


@pytest.mark.parametrize("kind", ["old-engine", "truncated", "garbage", "wrong-types"])
def test_the_app_starts_with_any_stored_eval_file(studio_home, kind):
    """The newest run's stored evaluation is shown while the page is built: whatever is in it, the app builds."""
    from studio.ui import chat_tab
    from studio.ui.app import build_app

    run = _fake_run(studio_home, f"run-{kind}", BAD_FILES[kind])
    app = build_app()
    assert app is not None
    head, table, _ = chat_tab.eval_views(chat_tab._stored_eval(str(run / "adapter")))
    if kind == "old-engine":
        assert "old · final adapter" in head and "67% ± 19.7 (6 pairs)" in head and not table.empty
    elif kind == "wrong-types":
        assert f"run-{kind} · final adapter" in head and not table.empty
    else:
        assert head.startswith("No evaluation stored")


def test_the_chat_tab_shows_a_collapsed_adapter_as_degenerated_with_its_drift(tmp_path):
    """The issue's seed-42 run: 58% held-out reward accuracy and margin +19 while the good answers' log-prob per
    token fell from -2.56 to -16.72. Shown as degenerated, never as learned."""
    from studio.ui import chat_tab

    collapsed = json.loads(json.dumps(OLD_ENGINE_FILE))
    collapsed.update(n_pairs=256, n_rows=512)
    collapsed["base"]["logp_per_token_desirable"] = -2.56
    collapsed["tuned"]["logp_per_token_desirable"] = -16.72
    collapsed["rewards"].update(pair_accuracy=0.58, margin=19.36)
    evaluate.write_eval(tmp_path, collapsed)
    head, table, _ = chat_tab.eval_views(evaluate.read_eval(tmp_path))
    assert "**degenerated**" in head and "learned" not in head
    assert "likelihood drift -14.16 nats/token" in head and "58% ± 3.1 (256 pairs)" in head
    drift_row = next(r for r in table.values.tolist() if r[0].startswith("log-prob per token, desirable"))
    assert drift_row[1:] == [-2.56, -16.72, -14.16]


@pytest.mark.parametrize("kind", ["old-engine", "garbage"])
def test_the_run_history_reads_the_stored_evaluation_through_the_reader(tmp_path, kind):
    from studio.training.engine import Job
    from studio.runs.history import History
    from studio.ui.train_tab import run_detail_md
    from tests.conftest import tiny_run_config

    cfg = tiny_run_config(tmp_path)
    history = History()
    job = Job(id="job1", config=cfg)
    cfg.run_dir().mkdir(parents=True)
    history.record(job, {"type": "started", "time": 1.0, "run_dir": str(cfg.run_dir())})
    (cfg.run_dir() / evaluate.EVAL_FILE).write_text(BAD_FILES[kind], encoding="utf-8")
    detail = run_detail_md(history, history.run_for_job("job1"))
    if kind == "old-engine":
        assert "held-out evaluation (old · final adapter): no measurable change" in detail
        assert "67% ± 19.7 (6 pairs)" in detail
    else:
        assert "held-out evaluation" not in detail
