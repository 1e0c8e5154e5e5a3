"""Texts that depend on the pending run or on stored files re-render when those change (issue 30, item 3)."""
from __future__ import annotations

import gradio as gr

from studio.config.run import RunConfig
from studio.ui.app import Studio, build_app


def _selects(app, fn_name: str):
    return [f for f in app.fns.values() if getattr(f.fn, "__name__", "") == fn_name
            and any(ev == "select" for _, ev in f.targets)]


def _named(block_fn, out) -> dict:
    return {getattr(c, "elem_id", None): v for c, v in out.items()} if isinstance(out, dict) else \
        {getattr(c, "elem_id", None): v for c, v in zip(block_fn.outputs, out if isinstance(out, tuple) else [out])}


def test_the_model_tabs_plan_follows_a_data_save(studio_home):
    """The Data tab's save re-plans the run (max_length from the new file); the Model tab, shown again, shows that
    plan, not the one it drew before the save."""
    studio = Studio()
    app = build_app(studio)
    [show] = _selects(app, "on_load")
    before = _named(show, show.fn(4096))["fit-settings"]
    studio.update({"kto.max_length": 384, "train.max_steps": 7})  # what a Data save's CPU re-plan writes
    after = _named(show, show.fn(4096))["fit-settings"]
    assert "384" in after and after != before


def test_no_advice_to_pick_the_cpu_card_when_it_is_picked(studio_home):
    """After a reload the Train tab said "pick the CPU only card" with CPU only already picked."""
    from studio.ui import train_tab

    long_run = RunConfig().updated({"train.max_steps": 2000, "kto.max_length": 1024})
    for card in (None, "cpu"):  # None: not picked since the start, so the Model tab shows this machine's card
        text = train_tab.duration_markdown(long_run, card)
        assert "Over 10 minutes" in text and "CPU only" not in text, text
    assert "pick the **CPU only** card" in train_tab.duration_markdown(long_run, "8gb")
    studio = Studio(long_run)
    studio.card = "cpu"
    assert "CPU only" not in train_tab.expected_duration(studio)["expected"]


def test_ab_no_adapter_note_goes_once_refresh_finds_one(studio_home):
    from studio.runs import folder
    from studio.ui import ab_tab

    studio = Studio()
    with gr.Blocks() as app:
        ab_tab.build(studio)
    status = next(b for b in app.blocks.values() if getattr(b, "elem_id", "") == "ab-status")
    assert status.value == ab_tab.NO_ADAPTER
    run = studio_home / "runs" / "first"
    folder.write_config(run, RunConfig())
    adapter = folder.adapter_dir(run)
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "adapter_model.safetensors").write_bytes(b"0")
    refresh = next(f for f in app.fns.values() if any(getattr(app.blocks.get(b), "elem_id", None) == "ab-refresh"
                                                       for b, _ in f.targets))
    out = dict(zip([getattr(c, "elem_id", None) for c in refresh.outputs], refresh.fn("base", None, status.value)))
    assert out["ab-status"] == ""


def test_the_ratings_counter_counts_ab_votes(studio_home):
    from studio.data import feedback
    from studio.tuned.votes import FEEDBACK_SIDE

    studio = Studio()
    app = build_app(studio)
    feedback.record("hi", "hello", True, side="base")
    feedback.record("hi", "go away", False, side=FEEDBACK_SIDE)  # what an A/B vote adds
    shown = [f for f in app.fns.values() if getattr(f.fn, "__name__", "") == "feedback_md"
             and any(ev == "select" for _, ev in f.targets)]
    assert shown, "the Chat tab's counter is not redrawn when the tab is shown"
    text = shown[0].fn()
    assert "**2** rows so far: 1 👍, 1 👎, 1 of them from A/B votes" in text


def test_the_run_cards_duration_is_the_train_tabs_line_for_this_cpu(studio_home, host_bf16):
    """The card said "about 6 min 01 s (45 steps x ~5 s)" while the line under Start said "about 2 min 28 s (45
    steps x ~2 s)": the card estimated for a CPU without bf16 whatever this one is. Both now estimate for the
    machine's CPU, with and without native bf16."""
    from studio.training.run_card import run_card
    from studio.ui import train_tab

    card, saved = run_card(RunConfig().updated({"train.max_steps": 45}))
    line = train_tab.duration_markdown(saved, "cpu")
    assert card.duration and f"**{card.duration}**" in line, (card.duration, line)
