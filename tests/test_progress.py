"""Every phase of a job says what it is doing, with its own count, ETA and a clock that keeps moving (issue 16,
point 2): the engine's ``phase`` events, ``current_phase`` over them, and how the Train tab and the CLI show them."""
from __future__ import annotations

import io
import re
from contextlib import redirect_stderr

import pytest

from studio.training.engine import Engine, Job
from studio.training.events import current_phase
from tests.conftest import tiny_run_config


def _phase(t, phase, message, done=None, total=None):
    return {"type": "phase", "time": t, "phase": phase, "message": message, "done": done, "total": total}


def test_current_phase_times_the_latest_phase_and_counts_its_eta_down_between_events():
    events = [_phase(100.0, "data", "Reading…"), _phase(110.0, "training", "Training", 0, 10),
              _phase(130.0, "training", "Training", 2, 10)]
    ph = current_phase(events, now=135.0)
    assert ph["phase"] == "training" and ph["label"] == "Training"
    assert ph["elapsed_s"] == pytest.approx(25.0)  # since the phase's first event, not the job's
    # 10 s a step so far, 8 steps left, 5 s since the last event
    assert ph["eta_s"] == pytest.approx(75.0)
    # one second later, with no new event, the ETA and the clock have moved
    later = current_phase(events, now=136.0)
    assert later["eta_s"] == pytest.approx(74.0) and later["elapsed_s"] == pytest.approx(26.0)


def test_a_phase_that_runs_again_times_its_new_pass_from_its_own_start():
    # the held-out rows: scored by the base model before training (slowly), by the tuned model after it
    events = [_phase(0.0, "scoring", "Scoring 64 held-out rows with the base model…", 0, 64),
              _phase(40.0, "scoring", "Scoring 64 held-out rows with the base model…", 64, 64),
              _phase(41.0, "training", "Training", 0, 8), _phase(241.0, "training", "Training", 8, 8),
              _phase(242.0, "scoring", "Scoring 64 held-out rows with the tuned model…", 0, 64),
              _phase(252.0, "scoring", "Scoring 64 held-out rows with the tuned model…", 32, 64)]
    ph = current_phase(events, now=255.0)
    assert ph["elapsed_s"] == pytest.approx(13.0)  # not 255 s since the first pass began
    assert ph["eta_s"] == pytest.approx(10.0 - 3.0)  # this pass's rate: 32 rows in 10 s, 32 left


def test_a_phase_without_counts_has_a_clock_but_no_eta_and_nothing_before_the_first_phase():
    assert current_phase([{"type": "status", "time": 1.0, "message": "x"}]) is None
    ph = current_phase([_phase(50.0, "convert", "Converting…")], now=80.0)
    assert ph["eta_s"] is None and ph["elapsed_s"] == pytest.approx(30.0)


def _job(events, started=1000.0):
    job = Job(id="j", config=tiny_run_config(__import__("pathlib").Path("/tmp/unused")), started_at=started)
    job.events = events
    job.state = "running"
    return job


def _text(html: str) -> str:
    return re.sub(r"<[^>]+>", "", html)


def test_the_train_tab_shows_the_scoring_phase_with_its_bar_eta_and_moving_clocks():
    from studio.ui.train_tab import progress_html

    ticks = [{"type": "metrics", "time": 1100.0, "step": 15, "max_steps": 15, "epoch": 1.0, "loss": 0.5}]
    events = ticks + [_phase(1100.0, "saving", "Saving the adapter…"),
                      _phase(1110.0, "scoring", "Scoring 80 held-out rows, base vs tuned…", 0, 80),
                      _phase(1130.0, "scoring", "Scoring 80 held-out rows, base vs tuned…", 20, 80)]
    job = _job(events)
    html = progress_html(job, now=1140.0)
    text = _text(html)
    assert "Held-out scoring" in text and "20 / 80" in text
    assert 'data-fraction="0.2500"' in html and 'data-phase="scoring"' in html
    # 1 s a row, 60 rows left, 10 s since the last event: ETA 0:50; the phase started at 1110, the job at 1000
    assert "ETA 0:50" in text and "this phase 0:30" in text and "elapsed 2:20" in text
    later = _text(progress_html(job, now=1145.0))
    assert "ETA 0:45" in later and "elapsed 2:25" in later  # the page changes although no event came


def test_the_train_tab_shows_an_uncounted_phase_as_a_moving_bar_and_training_by_steps():
    from studio.ui.train_tab import progress_html

    job = _job([_phase(1000.0, "convert", "Converting the bundled SmolLM2-135M…")])
    html = progress_html(job, now=1042.0)
    assert "studio-indeterminate" in html and "Converting the model" in _text(html)
    assert "elapsed 0:42" in _text(html)
    job = _job([_phase(1000.0, "training", "Training", 0, 15), _phase(1030.0, "training", "Training", 3, 15),
                {"type": "metrics", "time": 1030.0, "step": 3, "max_steps": 15, "epoch": 0.2, "loss": 0.69}])
    text = _text(progress_html(job, now=1030.0))
    assert "step 3 / 15" in text and "ETA 2:00" in text and "loss 0.6900" in text


def test_the_cli_draws_one_bar_per_phase_with_its_own_count():
    from studio.cli import _Progress

    err = io.StringIO()
    with redirect_stderr(err):
        bar = _Progress(enabled=True)
        for ev in [_phase(1.0, "data", "Reading sample_kto.jsonl…"),
                   _phase(2.0, "reference", "Reference model's log-probs", 0, 6),
                   _phase(3.0, "reference", "Reference model's log-probs", 6, 6),
                   _phase(4.0, "training", "Training", 0, 4), _phase(5.0, "training", "Training", 4, 4),
                   _phase(6.0, "scoring", "Scoring 12 held-out rows", 0, 12),
                   _phase(7.0, "scoring", "Scoring 12 held-out rows", 12, 12)]:
            bar.show(ev)
            bar.tick()
        bar.show({"type": "done", "message": "Finished at step 4."})
    out = err.getvalue()
    assert "Reading sample_kto.jsonl" in out
    assert "6/6" in out and "4/4" in out and "12/12" in out
    assert "Scoring 12 held-out rows" in out and "Finished at step 4." in out


def test_a_real_run_emits_each_phase_in_order_with_counts(tmp_path, tiny_model_dir):
    """Data, model, reference pass (counted passes), training (counted steps), saving and held-out scoring (the
    engine's phases, not the model's learning: a tiny random model)."""
    cfg = tiny_run_config(tmp_path, **{"model.name_or_path": str(tiny_model_dir), "train.max_steps": 2,
                                       "kto.max_length": 64, "data.eval_fraction": 0.25,
                                       "kto.precompute_ref_log_probs": True, "train.save_steps": 1000})
    engine = Engine()
    job = engine.start(cfg)
    engine.wait(1200)  # a shared 2-core machine
    assert job.state == "finished", job.error
    phases = [e for e in job.events if e["type"] == "phase"]
    order = []
    for e in phases:
        if not order or order[-1] != e["phase"]:
            order.append(e["phase"])
    assert order[:2] == ["data", "model"]
    for name in ("reference", "training", "saving", "scoring"):
        assert name in order, order
    # the held-out watch scores during training as well as after it, so scoring shows up around saving
    assert order.index("reference") < order.index("training") < order.index("saving")
    assert order.index("training") < len(order) - 1 - order[::-1].index("scoring")
    ref = [e for e in phases if e["phase"] == "reference"]
    assert ref[-1]["done"] == ref[-1]["total"] >= 1
    train = [e for e in phases if e["phase"] == "training"]
    assert [e["done"] for e in train][-1] == 2 and all(e["total"] == 2 for e in train)
    for e in phases:
        assert set(e) >= {"phase", "message", "done", "total", "time"} and e["message"]


# ---- honest ETAs (issue 30, item 6) ------------------------------------------------------------------------------------

def test_the_eta_says_measuring_while_the_first_step_runs_never_0_00():
    from studio.ui.train_tab import progress_html

    events = [_phase(1000.0, "reference", "Reference pass", 0, 48), _phase(1030.0, "reference", "Reference pass", 48, 48),
              _phase(1031.0, "training", "Training", 0, 48)]
    text = _text(progress_html(_job(events), now=1100.0))  # step 1 has run 69 s
    assert "ETA measuring…" in text and "0:00" not in text.split("this phase")[0]
    # a finished count waiting for the next phase is not "ETA 0:00" either
    done = _text(progress_html(_job(events[:2]), now=1100.0))
    assert "ETA finishing…" in done


def test_the_eta_is_re_estimated_from_the_steps_after_the_slow_first_one():
    # step 1 took 60 s (warm-up), the next ones 10 s each: 43 steps left at 10 s, not at the 20 s average
    events = [_phase(0.0, "training", "Training", 0, 48), _phase(60.0, "training", "Training", 1, 48)]
    events += [_phase(60.0 + 10 * k, "training", "Training", 1 + k, 48) for k in range(1, 5)]
    ph = current_phase(events, now=100.0)
    assert ph["eta_s"] == pytest.approx(430.0)
    # a step running longer than the ones before counts down to "measuring…", not to 0:00
    late = current_phase(events, now=100.0 + 500.0)
    assert late["eta_s"] is None and late["eta_note"] == "measuring…"
