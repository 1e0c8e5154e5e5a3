"""The Chat tab's handlers return {component: value} for the parts they change: called as Gradio calls them (no
browser, no model), every part named is one of the event's outputs, and what is left out stays as it is."""
from __future__ import annotations

import gradio as gr
import pytest

from studio.ui import chat_tab
from studio.ui.app import Studio


@pytest.fixture
def app(studio_home):
    with gr.Blocks() as blocks:
        chat_tab.build(Studio())
    return blocks


def _event(app, elem_id: str, name: str):
    return next(f for f in app.fns.values() if any(getattr(app.blocks.get(b), "elem_id", None) == elem_id and ev == name
                                                   for b, ev in f.targets))


def _named(block_fn, out) -> dict:
    assert isinstance(out, dict), f"{block_fn.name} returned {type(out).__name__}, not {{component: value}}"
    assert set(out) <= set(block_fn.outputs)
    return {c.elem_id or "state": v for c, v in out.items()}


def _call(block_fn, *args):
    """Call an event's function with ``args`` (its inputs in order); a generator's every step is checked."""
    out = block_fn.fn(*args)
    if hasattr(out, "__next__"):
        return [_named(block_fn, o) for o in out]
    return _named(block_fn, out)


def test_without_an_adapter_each_handler_says_so_and_changes_only_its_parts(app):
    steps = _call(_event(app, "chat-send", "click"), "hello", [], [], None, None, "", 20, 0.7, 0.9, 0)
    assert len(steps) == 1 and steps[0]["chat-status"] == chat_tab.NO_ADAPTER
    assert "chat-input" not in steps[0]  # the message stays in its box to send again
    assert _call(_event(app, "chat-send", "click"), "  ", [], [], None, None, "", 20, 0.7, 0.9, 0) == \
        [{"chat-base": [], "chat-tuned": [], "state": None}]
    assert _call(_event(app, "chat-eval-run", "click"), None, "", 10) == {"chat-eval-status": chat_tab.NO_ADAPTER}
    shown = _call(_event(app, "chat-export-run", "click"), None, "adapter", "", False, None)
    assert shown["chat-export-result"] == chat_tab.NO_ADAPTER and shown["chat-export-download"]["visible"] is False
    size = _call(_event(app, "chat-export-format", "change"), None, "gguf", None)
    assert size == {"chat-export-gguf-type": gr.update(visible=True), "chat-export-size": ""}


def test_clear_refresh_and_a_stored_evaluation(app):
    cleared = _call(_event(app, "chat-clear", "click"))
    assert cleared == {"chat-base": [], "chat-tuned": [], "state": {"base": {}, "tuned": {}}, "chat-input": ""}
    refreshed = _call(_event(app, "chat-refresh", "click"), None)
    assert refreshed["chat-status"] == chat_tab.NO_ADAPTER and refreshed["chat-adapter"]["choices"] == []
    views = _call(next(f for f in app.fns.values() if f.fn.__name__ == "on_adapter"), None)
    assert set(views) == {"chat-eval-status", "chat-eval-table", "chat-eval-plot"}
    assert views["chat-eval-status"].startswith("No evaluation stored")


def test_rating_a_reply_this_page_did_not_write_is_refused_in_words(app):
    rate = next(f for f in app.fns.values() if f.fn.__name__ == "handler")
    out = _call(rate, {"base": {}, "tuned": {}}, gr.LikeData(target=None, data={"index": 1, "value": "x",
                                                                                "liked": True}))
    assert list(out) == ["chat-feedback"] and out["chat-feedback"].startswith("Not saved")
