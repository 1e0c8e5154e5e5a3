"""One pending run with a version counter (issue 30, item 1): a handler result that arrives after a newer user choice
is dropped, never applied, in the studio's config and in the page."""
from __future__ import annotations

import threading

import gradio as gr

from studio.config.run import BUNDLED_MODEL, RunConfig
from studio.ui import model_tab
from studio.ui.app import Studio

MISTRAL = "mistralai/Mistral-7B-Instruct-v0.3"


def _tab(studio):
    with gr.Blocks() as app:
        model_tab.build(studio)
    return app


def _event(app, elem_id: str, name: str):
    return next(f for f in app.fns.values() if any(getattr(app.blocks.get(b), "elem_id", None) == elem_id and ev == name
                                                   for b, ev in f.targets))


def test_a_slow_card_plan_that_ends_after_a_newer_model_choice_is_dropped(monkeypatch, studio_home):
    """Picking "CPU only" while Mistral-7B is selected plans slowly (a hub lookup); the user picks the bundled model
    meanwhile. The later choice wins: the slow plan's config and its page update are both dropped."""
    studio = Studio(RunConfig().updated({"model.name_or_path": MISTRAL}))
    studio.card = "8gb"
    app = _tab(studio)
    real_plan = model_tab.planner.plan
    entered, release = threading.Event(), threading.Event()

    def plan(cfg, card, device, **kw):
        if (kw.get("model_key") or cfg.model.name_or_path).lower().startswith("mistral"):
            entered.set()
            assert release.wait(60)  # the hub lookup that answers late
        return real_plan(cfg, card, device, **kw)

    monkeypatch.setattr(model_tab.planner, "plan", plan)
    slow = {}
    t = threading.Thread(target=lambda: slow.setdefault(
        "out", _event(app, "gpu-preset", "input").fn("cpu", "mistral-7b-instruct-v0.3", "standard", 4096)))
    t.start()
    assert entered.wait(60)
    fast = _event(app, "model-preset", "input").fn("smollm2-135m", "cpu", "standard", 4096)
    assert fast != gr.skip() and studio.config.model.name_or_path == BUNDLED_MODEL
    release.set()
    t.join(120)
    assert slow["out"] == gr.skip()  # nothing of the stale plan reaches the page
    assert studio.config.model.name_or_path == BUNDLED_MODEL and studio.card == "cpu"


def test_a_direct_change_makes_results_computed_before_it_stale():
    studio = Studio()
    v = studio.begin()
    studio.update({"data.train_file": "mine.jsonl"})  # e.g. the Data tab saved a file meanwhile
    assert not studio.apply(RunConfig(), v) and studio.config.data.train_file == "mine.jsonl"
    v = studio.begin()
    assert studio.apply(studio.config.updated({"kto.beta": 0.2}), v) and studio.config.kto.beta == 0.2
